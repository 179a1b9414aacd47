"""The ``sfact`` command line end to end on a tiny config (bundled osmFISH, 3 iterations, every prior)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from sfact._cli import main
from sfact.pipeline import PRIORS

N_FACTORS = 3
TINY = f"""\
name: tiny
dataset: {{loader: osmfish, subsample: 600}}
preprocessing: {{min_group_size: 10}}
model:
  n_factors: {N_FACTORS}
  prior_kwargs: {{num_inducing: 40, n_neighbors: 8}}
training: {{max_iter: 3, min_iter: 1}}
analysis: {{n_neighs: 6}}
figures: {{kinds: [factors, elbo, inducing_points, groupwise_factors], dpi: 40}}
output_dir: out
"""
FIGURES = {
    "pnmf": {"factors", "elbo"},
    "svgp": {"factors", "elbo", "inducing_points"},
    "mggp_svgp": {"factors", "elbo", "inducing_points", "groupwise_factors"},
    "lcgp": {"factors", "elbo"},
    "mggp_lcgp": {"factors", "elbo", "groupwise_factors"},
}


def sfact(*args, capsys=None) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return rc, out, err


def planned(out: str) -> list[str]:
    """The names of the jobs a printed plan runs."""
    return [ln.split()[1] for ln in out.splitlines() if ln.strip().startswith("run ")]


def history_length(model_dir: Path) -> int:
    return len(json.loads((model_dir / "metadata.json").read_text())["history"]["elbo"])


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """``sfact run all`` once for every prior; tests that change it work on a copy."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "tiny.yaml").write_text(TINY)
    rc = main(["run", "all", "-c", str(root / "tiny.yaml"), "--executor", "serial"])
    return root, rc


@pytest.fixture
def copy_of_run(done_run, tmp_path):
    root, rc = done_run
    assert rc == 0
    shutil.copytree(root, tmp_path / "run")
    return tmp_path / "run"


def test_run_all_writes_every_output(done_run):
    root, rc = done_run
    assert rc == 0
    out = root / "out"
    prepared = ad.read_h5ad(out / "prepared.h5ad")
    n_obs, n_vars = prepared.shape
    assert 400 < n_obs <= 600 and n_vars == 33
    assert "sfact_prepare" in prepared.uns
    assert json.loads((out / "prepared.json").read_text())["dataset"]["subsample"] == 600
    assert "loaded 600 cells" in (out / "logs" / "preprocess.log").read_text()
    for prior in PRIORS:
        d = out / prior
        assert history_length(d / "model") == 3
        results = ad.read_h5ad(d / "results.h5ad")
        factors = np.load(d / "factors.npy")
        assert factors.shape == (n_obs, N_FACTORS)
        np.testing.assert_allclose(factors, results.obsm["X_sfact"])
        assert np.load(d / "scales.npy").shape == (n_obs, N_FACTORS)
        assert np.load(d / "loadings.npy").shape == (n_vars, N_FACTORS)
        assert results.uns["sfact"]["params"]["prior"] == prior
        names = json.loads((d / "names.json").read_text())
        assert names["genes"] == list(prepared.var_names) and len(names["factors"]) == N_FACTORS
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["prior"] == prior and metrics["n_iter"] == 3
        assert metrics["deviance_per_entry"] > 0
        moran = list(metrics["moranI"].values())
        assert moran == sorted(moran, reverse=True)  # ordered by Moran's I
        assert {p.stem for p in (d / "figures").glob("*.png")} == FIGURES[prior]
        assert all(p.stat().st_size > 1000 for p in (d / "figures").glob("*.png"))
        assert (d / "config.yaml").exists()
        log = (out / "logs" / f"{prior}.log").read_text()
        for task in ("train", "analyze", "figures"):
            assert f"tiny/{prior}: {task}" in log
        if prior.startswith("mggp"):
            assert results.obsm["X_sfact_groupwise"].shape[0] == n_obs
    # no temporary leftovers
    assert not [p for p in out.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    summary = json.loads((out / "run_summary.json").read_text())
    jobs = summary["jobs"]
    assert len(jobs) == 1 + 3 * len(PRIORS)
    assert {j["status"] for j in jobs.values()} == {"done"}
    assert jobs["tiny/svgp/train"]["log_path"] == str(out / "logs" / "svgp.log")
    assert jobs["tiny/svgp/train"]["output"]["n_iter"] == 3
    assert summary["counts"] == {"done": 16}


def test_second_run_skips_everything(done_run, capsys):
    root, _ = done_run
    before = mtimes(root / "out")
    rc, out, _ = sfact("run", "all", "-c", root / "tiny.yaml", "--executor", "serial", capsys=capsys)
    assert rc == 0
    assert "0 jobs to run, 16 skipped" in out
    after = mtimes(root / "out")
    assert {k: v for k, v in after.items() if k != "run_summary.json"} == {
        k: v for k, v in before.items() if k != "run_summary.json"
    }
    jobs = json.loads((root / "out" / "run_summary.json").read_text())["jobs"]
    assert jobs["tiny/pnmf/train"]["status"] == "skipped"
    assert jobs["tiny/pnmf/train"]["previous"]["status"] == "done"  # the earlier run is kept


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, done_run, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    rc, out, _ = sfact("run", "all", "-c", cfg, "--dry-run", capsys=capsys)
    assert rc == 0
    assert "16 jobs to run" in out and "tiny/mggp_lcgp/figures" in out and "Dry run" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]
    # --force --dry-run on a finished run changes nothing either
    root, _ = done_run
    before = mtimes(root / "out")
    rc, out, _ = sfact("run", "all", "-c", root / "tiny.yaml", "--force", "--dry-run", capsys=capsys)
    assert rc == 0 and "16 jobs to run" in out
    assert mtimes(root / "out") == before


def test_stages_are_sorted_and_nothing_is_added(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    rc, out, _ = sfact("run", "figures", "train", "-c", cfg, "--prior", "svgp", "--dry-run", capsys=capsys)
    assert rc == 0
    assert planned(out) == ["tiny/svgp/train", "tiny/svgp/figures"]
    # the plan says what to run first
    assert "run `sfact preprocess -c" in out and "run `sfact analyze -c" in out


def test_missing_input_fails_naming_the_stage_to_run_first(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    rc, out, _ = sfact("train", "-c", cfg, "--prior", "pnmf", "--executor", "serial", capsys=capsys)
    assert rc == 1
    assert "tiny/pnmf/train: FileNotFoundError" in out
    assert f"run `sfact preprocess -c {cfg}` first" in out
    assert f"log: {tmp_path / 'out' / 'logs' / 'pnmf.log'}" in out
    assert "Traceback" in (tmp_path / "out" / "logs" / "pnmf.log").read_text()
    assert not (tmp_path / "out" / "pnmf" / "model").exists()
    # the job's own error names the command too (not only the plan's note)
    job = json.loads((tmp_path / "out" / "run_summary.json").read_text())["jobs"]["tiny/pnmf/train"]
    assert job["status"] == "failed"
    assert f"run `sfact preprocess -c {cfg}` first" in job["error"]


def test_changed_settings_are_noted_not_silently_redone(copy_of_run, capsys):
    cfg = copy_of_run / "tiny.yaml"
    cfg.write_text(
        TINY.replace("min_group_size: 10", "min_group_size: 5").replace("n_neighbors: 8", "n_neighbors: 6")
    )
    rc, out, _ = sfact("run", "all", "-c", cfg, "--dry-run", capsys=capsys)
    assert rc == 0 and "0 jobs to run" in out
    assert "prepared.h5ad was made with other settings (preprocessing.min_group_size)" in out
    assert "tiny/lcgp/train: the saved model was trained with other settings" in out
    assert "model.prior_kwargs.n_neighbors" in out
    assert "tiny/svgp/train: the saved model" not in out  # n_neighbors is not an svgp option


def test_resume_appends_history_and_redoes_the_analysis(copy_of_run, capsys):
    cfg, out_dir = copy_of_run / "tiny.yaml", copy_of_run / "out"
    figures_before = mtimes(out_dir / "svgp" / "figures")
    pnmf_before = mtimes(out_dir / "pnmf")
    rc, out, _ = sfact(
        "run",
        "train",
        "analyze",
        "-c",
        cfg,
        "--prior",
        "svgp",
        "--resume",
        "--executor",
        "serial",
        capsys=capsys,
    )
    assert rc == 0
    assert "redo: outputs exist but train runs first" in out
    assert "figures outputs will be older" in out  # figures were not asked for: a note says so
    assert history_length(out_dir / "svgp" / "model") == 6
    results = ad.read_h5ad(out_dir / "svgp" / "results.h5ad")
    assert len(results.uns["sfact"]["history"]["elbo"]) == 6
    assert json.loads((out_dir / "svgp" / "metrics.json").read_text())["n_iter"] == 6
    assert "resuming from" in (out_dir / "logs" / "svgp.log").read_text()
    assert mtimes(out_dir / "svgp" / "figures") == figures_before
    assert mtimes(out_dir / "pnmf") == pnmf_before  # other priors untouched
    jobs = json.loads((out_dir / "run_summary.json").read_text())["jobs"]
    assert jobs["tiny/svgp/train"]["output"]["resumed"] is True
    assert jobs["tiny/svgp/train"]["output"]["n_iter_run"] == 3
    # without a saved model, --resume trains from scratch
    shutil.rmtree(out_dir / "lcgp" / "model")
    rc, _, _ = sfact("train", "-c", cfg, "--prior", "lcgp", "--resume", "--executor", "serial", capsys=capsys)
    assert rc == 0
    assert history_length(out_dir / "lcgp" / "model") == 3


def test_force_retrains_from_scratch(copy_of_run, capsys):
    cfg, out_dir = copy_of_run / "tiny.yaml", copy_of_run / "out"
    old = (out_dir / "pnmf" / "model" / "model.pt").stat().st_mtime_ns
    rc, out, _ = sfact("train", "-c", cfg, "--prior", "pnmf", "--executor", "serial", capsys=capsys)
    assert rc == 0 and "1 skipped" in out  # not without --force
    assert (out_dir / "pnmf" / "model" / "model.pt").stat().st_mtime_ns == old
    rc, out, _ = sfact(
        "train", "-c", cfg, "--prior", "pnmf", "--force", "--executor", "serial", capsys=capsys
    )
    assert rc == 0 and "1 done" in out
    assert (out_dir / "pnmf" / "model" / "model.pt").stat().st_mtime_ns != old
    assert history_length(out_dir / "pnmf" / "model") == 3  # fresh, not appended


def test_validation_cells_are_held_out_checked_and_reported(tmp_path, capsys):
    """``training.validation_fraction``: trained without the held-out cells, checked on them."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.replace("training: {", "training: {validation_fraction: 0.1, "))
    args = ("run", "all", "-c", cfg, "--prior", "svgp", "--executor", "serial")
    assert sfact(*args, capsys=capsys)[0] == 0
    out_dir = tmp_path / "out"
    saved = json.loads((out_dir / "svgp" / "model" / "validation.json").read_text())
    metrics = json.loads((out_dir / "svgp" / "metrics.json").read_text())
    results = ad.read_h5ad(out_dir / "svgp" / "results.h5ad")
    mask = results.obs["sfact_validation"].to_numpy()
    assert list(results.obs_names[mask]) == saved["cells"]
    assert mask.sum() == round(0.1 * results.n_obs) == metrics["n_validation"]
    for k in ("validation_deviance", "validation_baseline_deviance", "validation_knn_deviance"):
        assert metrics[k] == pytest.approx(saved["metrics"][k]) and np.isfinite(metrics[k])
    assert metrics["validation_fraction"] == 0.1
    meta = json.loads((out_dir / "svgp" / "model" / "metadata.json").read_text())
    assert meta["setup"]["n_obs"] == results.n_obs - mask.sum()  # trained on the other cells
    summary = json.loads((out_dir / "run_summary.json").read_text())["jobs"]["tiny/svgp/train"]["output"]
    assert summary["n_validation"] == mask.sum()
    assert "held-out check on" in (out_dir / "logs" / "svgp.log").read_text()
    # resuming keeps the same validation cells
    rc, _, _ = sfact("run", "train", "analyze", *args[2:], "--resume", capsys=capsys)
    assert rc == 0
    again = json.loads((out_dir / "svgp" / "model" / "validation.json").read_text())
    assert again["cells"] == saved["cells"]
    assert history_length(out_dir / "svgp" / "model") == 6


def test_bad_key_exits_2_naming_key_and_file(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(TINY.replace("n_factors:", "n_factor:"))
    rc, _, err = sfact("run", "all", "-c", cfg, capsys=capsys)
    assert rc == 2
    assert "model.n_factor" in err and str(cfg) in err and "did you mean 'n_factors'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    rc, _, err = sfact("run", "everything", "-c", cfg, capsys=capsys)
    assert rc == 2 and "invalid choice" in err
    rc, _, err = sfact("run", "all", "-c", tmp_path / "missing.yaml", capsys=capsys)
    assert rc == 2 and "not found" in err


def test_a_failed_job_does_not_stop_the_others(tmp_path, capsys, monkeypatch):
    # two data sets below one folder: one reads an .h5ad that does not exist
    good = TINY.replace("name: tiny", "name: good")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "general.yaml").write_text(good)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "general.yaml").write_text(
        "name: broken\ndataset: {path: nowhere.h5ad, group_key: cell_type}\nmodel: {prior: pnmf}\noutput_dir: out\n"
    )
    # and in the good data set the svgp training fails
    from sfact.models import SpatialFactorization

    train = SpatialFactorization.train

    def failing_train(self, *args, **kwargs):
        if self.prior == "svgp":
            raise RuntimeError("simulated failure")
        return train(self, *args, **kwargs)

    monkeypatch.setattr(SpatialFactorization, "train", failing_train)
    rc, out, _ = sfact(
        "run", "all", "-c", tmp_path, "--config-name", "general.yaml", "--prior", "pnmf,svgp",
        "--executor", "serial", capsys=capsys,
    )  # fmt: skip
    assert rc == 1
    a, b = tmp_path / "a" / "out", tmp_path / "b" / "out"
    assert (a / "pnmf" / "figures" / "factors.png").exists()  # the other prior finished
    assert not (a / "svgp" / "model").exists()
    assert "good/svgp/train: RuntimeError: simulated failure" in out
    assert f"log: {a / 'logs' / 'svgp.log'}" in out
    assert "broken/preprocess: FileNotFoundError" in out and "nowhere.h5ad" in out
    assert f"log: {b / 'logs' / 'preprocess.log'}" in out
    assert "Cancelled" in out and "good/svgp/analyze" in out and "broken/pnmf/train" in out
    assert "simulated failure" in (a / "logs" / "svgp.log").read_text()
    jobs = json.loads((a / "run_summary.json").read_text())["jobs"]
    assert jobs["good/svgp/train"]["status"] == "failed"
    assert "simulated failure" in jobs["good/svgp/train"]["error"]
    assert jobs["good/svgp/figures"]["status"] == "cancelled"
    assert jobs["good/pnmf/figures"]["status"] == "done"
    broken = json.loads((b / "run_summary.json").read_text())["jobs"]
    assert broken["broken/preprocess"]["status"] == "failed"
    assert broken["broken/preprocess"]["log_path"] == str(b / "logs" / "preprocess.log")
    # a failed retraining keeps the earlier good model
    old = mtimes(a / "pnmf" / "model")

    def broken_train(self, *args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(SpatialFactorization, "train", broken_train)
    rc, _, _ = sfact(
        "train", "-c", tmp_path / "a" / "general.yaml", "--prior", "pnmf", "--force", "--executor", "serial",
        capsys=capsys,
    )  # fmt: skip
    assert rc == 1
    assert mtimes(a / "pnmf" / "model") == old


def test_folders_share_preprocessing_and_names_are_unique(tmp_path, capsys):
    # general.yaml and a per-prior config write to the same folder: one preprocessing
    d = tmp_path / "one"
    d.mkdir()
    (d / "general.yaml").write_text(TINY)
    assert sfact("generate", "-c", d / "general.yaml", capsys=capsys)[0] == 0
    rc, out, _ = sfact(
        "run", "all", "-c", d / "general.yaml", "-c", d / "svgp.yaml", "--dry-run", capsys=capsys
    )
    assert rc == 0
    jobs = planned(out)
    assert len(jobs) == 16 and len(set(jobs)) == 16
    assert jobs.count("tiny/preprocess") == 1 and jobs.count("tiny/svgp/train") == 1
    # two data sets with one name in different folders get unique job names
    other = tmp_path / "two"
    other.mkdir()
    (other / "general.yaml").write_text(TINY)
    rc, out, _ = sfact("run", "preprocess", "-c", tmp_path, "--dry-run", capsys=capsys)
    assert rc == 0
    assert planned(out) == ["tiny/preprocess", "tiny-2/preprocess"]
    # a data set without groups leaves the multi-group priors out, with a note
    (other / "general.yaml").write_text(TINY.replace("subsample: 600", "subsample: 600, group_key: null"))
    rc, out, _ = sfact("run", "all", "-c", other / "general.yaml", "--dry-run", capsys=capsys)
    assert rc == 0 and "mggp_svgp left out" in out
    assert {j.split("/")[1] for j in planned(out) if j.count("/") == 2} == {"pnmf", "svgp", "lcgp"}


def test_generate_writes_per_prior_configs(tmp_path, capsys):
    cfg = tmp_path / "general.yaml"
    cfg.write_text(TINY)
    rc, out, _ = sfact("generate", "-c", cfg, capsys=capsys)
    assert rc == 0
    assert sorted(p.name for p in tmp_path.glob("*.yaml")) == sorted(
        ["general.yaml", *(f"{p}.yaml" for p in PRIORS)]
    )
    rc, out, _ = sfact("run", "all", "-c", tmp_path, "--config-name", "lcgp.yaml", "--dry-run", capsys=capsys)
    assert rc == 0
    assert planned(out) == ["tiny/preprocess", "tiny/lcgp/train", "tiny/lcgp/analyze", "tiny/lcgp/figures"]
    rc, _, err = sfact("generate", "-c", cfg, capsys=capsys)
    assert rc == 2 and "--force" in err
    assert sfact("generate", "-c", cfg, "--force", capsys=capsys)[0] == 0


def test_serial_executor_is_the_runners_serial_backend(tmp_path, capsys, monkeypatch):
    """``--executor serial`` goes through ``run_jobs`` and its serial backend, like the runner's tests."""
    from sfact.pipeline import _backends, _plan

    calls, submitted = [], []
    run_jobs, submit = _plan.run_jobs, _backends.SerialBackend.submit

    def spy_run_jobs(jobs, **kwargs):
        calls.append(kwargs["executor"])
        return run_jobs(jobs, **kwargs)

    def spy_submit(self, row, device, slot):
        submitted.append((row.job.name, device))
        return submit(self, row, device, slot)

    monkeypatch.setattr(_plan, "run_jobs", spy_run_jobs)
    monkeypatch.setattr(_backends.SerialBackend, "submit", spy_submit)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    rc, out, _ = sfact("run", "preprocess", "-c", cfg, "--executor", "serial", capsys=capsys)
    assert rc == 0, out
    assert calls == ["serial"] and submitted == [("tiny/preprocess", "cpu")]
    assert "1 jobs in" in out and "1 done" in out  # the runner's summary line
    log = (tmp_path / "out" / "logs" / "preprocess.log").read_text()
    assert "tiny/preprocess  (preprocess)  device cpu" in log.splitlines()[0]  # the runner's log header
    assert "loaded 600 cells" in log and "===== done after" in log


def test_a_stage_whose_outputs_exist_says_skipped_one_way(done_run):
    """Stages signal "skipped" as ``{"skipped": True}``, which the runner turns into the status."""
    from sfact.pipeline import Job, Layout, load_config, stages
    from sfact.pipeline._runner import run_jobs

    root, rc = done_run
    assert rc == 0
    cfg = load_config(root / "tiny.yaml").with_prior("pnmf")
    out = stages.figures(config=cfg.to_dict(), prior="pnmf")
    assert out["skipped"] is True and "status" not in out and "exists" in out["reason"]
    layout = Layout(Path(cfg.output_dir))
    job = Job(
        name="tiny/pnmf/figures",
        task="figures",
        fn=stages.figures,
        kwargs={"config": cfg.to_dict(), "prior": "pnmf"},
        log_path=layout.log("pnmf"),
    )
    before = mtimes(layout.figures("pnmf"))
    (result,) = run_jobs([job], executor="serial", live=False)
    assert result.status == "skipped" and result.output["skipped"] is True
    assert mtimes(layout.figures("pnmf")) == before


def test_python_m_sfact_help():
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    res = subprocess.run(
        [sys.executable, "-m", "sfact", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 0, res.stderr
    for cmd in ("preprocess", "train", "analyze", "figures", "run", "generate", "demo"):
        assert cmd in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "sfact", "run", "all", "-c", "nowhere.yaml"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 2 and "nowhere.yaml" in res.stderr


@pytest.mark.slow
def test_local_executor_runs_the_stages_in_worker_processes(tmp_path, capsys):
    """The stage functions and their config dicts survive spawned workers (the parallel runner)."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    rc, out, _ = sfact(
        "run", "preprocess", "train", "-c", cfg, "--prior", "pnmf", "--executor", "local", "--plain",
        capsys=capsys,
    )  # fmt: skip
    assert rc == 0, out
    assert history_length(tmp_path / "out" / "pnmf" / "model") == 3
    jobs = json.loads((tmp_path / "out" / "run_summary.json").read_text())["jobs"]
    assert [jobs[n]["status"] for n in ("tiny/preprocess", "tiny/pnmf/train")] == ["done", "done"]
    assert jobs["tiny/pnmf/train"]["device"] == "cpu"
    assert "tiny/pnmf: train" in (tmp_path / "out" / "logs" / "pnmf.log").read_text()


@pytest.mark.slow
def test_dask_executor_gives_the_same_outputs_as_serial(done_run, tmp_path, capsys):
    """The tiny plan on a Dask ``LocalCluster`` writes the same files and numbers as in-process."""
    pytest.importorskip("distributed")
    root, rc0 = done_run
    assert rc0 == 0
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    priors = ["pnmf", "mggp_svgp"]
    rc, out, _ = sfact(
        "run", "all", "-c", cfg, "--prior", ",".join(priors), "--executor", "dask", "--plain",
        capsys=capsys,
    )  # fmt: skip
    assert rc == 0, out
    jobs = json.loads((tmp_path / "out" / "run_summary.json").read_text())["jobs"]
    assert {j["status"] for j in jobs.values()} == {"done"}
    for prior in priors:
        a, b = root / "out" / prior, tmp_path / "out" / prior
        for arr in ("factors.npy", "scales.npy", "loadings.npy"):
            np.testing.assert_allclose(np.load(b / arr), np.load(a / arr), rtol=1e-5, atol=1e-7, err_msg=arr)
        ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
        assert mb["deviance"] == pytest.approx(ma["deviance"], rel=1e-6)
        assert sorted(p.name for p in (b / "figures").iterdir()) == sorted(
            p.name for p in (a / "figures").iterdir()
        )


def test_samples_from_the_config_reach_prepare_model_and_results(tmp_path, capsys):
    """``dataset.sample_key``: sections scaled one by one, one GP per section, per-section outputs."""
    import sfact as sf

    adata = sf.datasets.simulate(n_obs=450, n_vars=30, n_factors=2, n_groups=1, n_samples=3, random_state=0)
    adata.write_h5ad(tmp_path / "sections.h5ad")
    (tmp_path / "s.yaml").write_text(
        "name: sections\n"
        "dataset: {path: sections.h5ad, group_key: null, sample_key: sample}\n"
        "model: {n_factors: 2, prior_kwargs: {n_neighbors: 8}}\n"
        "training: {max_iter: 5, min_iter: 1}\n"
        "figures: {kinds: [factors], dpi: 40}\n"
        "output_dir: out\n"
    )
    rc, out, err = sfact(
        "run", "all", "-c", tmp_path / "s.yaml", "--prior", "lcgp", "--executor", "serial", capsys=capsys
    )
    assert rc == 0, out + err
    out_dir = tmp_path / "out"
    prepared = ad.read_h5ad(out_dir / "prepared.h5ad")
    assert prepared.uns["sfact_prepare"]["sample_key"] == "sample"
    meta = json.loads((out_dir / "lcgp" / "model" / "metadata.json").read_text())
    assert meta["setup"]["sample_key"] == "sample"
    assert meta["setup"]["sample_categories"] == ["s0", "s1", "s2"]
    results = ad.read_h5ad(out_dir / "lcgp" / "results.h5ad")
    assert list(results.uns["sfact"]["samples"].index) == ["s0", "s1", "s2"]
