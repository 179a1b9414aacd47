"""What a user sees while and after fitting: convergence warning and summary, honest progress bars,
clean notebook output, and the threading set-up of ``import sfact``."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import anndata as ad
import pytest

import sfact
from sfact._core.train import estimate_iterations_left, progress_text
from sfact.models import ConvergenceWarning, SpatialFactorization

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(
    r"sfact pnmf: \d+ iterations.* in [\d.]+ s, (converged|NOT converged .*), ELBO per entry -?[\d.]+"
)


@pytest.fixture(scope="module")
def prepared() -> ad.AnnData:
    """200 simulated cells x 20 genes with 3 groups, prepared; take ``.copy()``."""
    adata = sfact.datasets.simulate(n_obs=200, n_vars=20, n_factors=3, random_state=0)
    sfact.pp.prepare(adata, group_key="group")
    return adata


@pytest.fixture
def verbosity():
    old = sfact.settings.verbosity
    yield
    sfact.settings.verbosity = old


@pytest.fixture
def scanpy_log(verbosity):
    """What sfact logs through scanpy's logger (bound to a stream of its own)."""
    import scanpy as sc

    old = sc.settings.logfile
    sc.settings.logfile = buf = io.StringIO()
    yield buf
    sc.settings.logfile = old


# --- the warning when training stops at max_iter ----------------------------------------------


def test_unconverged_train_warns_at_the_users_line_with_advice(prepared):
    model = SpatialFactorization(prepared.copy(), prior="pnmf", n_factors=2)
    with pytest.warns(ConvergenceWarning, match=r"stopped at `max_iter=5` before converging") as record:
        model.train(max_iter=5)
    (w,) = [r for r in record if r.category is ConvergenceWarning]
    assert w.filename == __file__  # the user's line, not sfact's (also on Python < 3.12)
    message = str(w.message)
    assert "`model.train(max_iter=" in message and "tol=0.0001" in message
    assert not model.converged


def test_unconverged_tl_fit_advises_what_tl_fit_users_can_do(prepared):
    adata = prepared.copy()
    with pytest.warns(ConvergenceWarning) as record:
        sfact.tl.fit(adata, prior="pnmf", n_factors=2, max_iter=25, validation_fraction=0)
    (w,) = [r for r in record if r.category is ConvergenceWarning]
    message = str(w.message)
    assert w.filename == __file__
    assert "`sfact.tl.fit(..., max_iter=" in message  # something a tl.fit user can follow
    assert "return_model=True" in message and "sfact.tl.analyze(adata, model)" in message
    assert "Continue from here with `model.train" not in message  # no model at hand after tl.fit


def test_converged_fit_does_not_warn(prepared):
    model = SpatialFactorization(prepared.copy(), prior="pnmf", n_factors=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        model.train(max_iter=1000)
    assert model.converged and len(model.history_) < 1000


def test_continuing_an_unconverged_fit_until_it_converges_stops_warning(prepared):
    model = SpatialFactorization(prepared.copy(), prior="pnmf", n_factors=2)
    with pytest.warns(ConvergenceWarning):
        model.train(max_iter=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        model.train(max_iter=1000)  # the advice works: training goes on and converges
    assert model.converged


# --- the one-line summary at the end of every fit ---------------------------------------------


def test_summary_line_at_default_verbosity(prepared, capfd, verbosity):
    sfact.settings.verbosity = 1  # the default: warnings only
    model = SpatialFactorization(prepared.copy(), prior="pnmf", n_factors=2)
    capfd.readouterr()
    model.train(max_iter=1000, progress_bar=True)
    err = capfd.readouterr().err
    lines = [ln for ln in re.split(r"[\r\n]+", err) if SUMMARY.fullmatch(ln.strip())]
    assert len(lines) == 1 and ", converged," in lines[0], err
    assert f"{len(model.history_)} iterations" in lines[0]
    with pytest.warns(ConvergenceWarning):
        model.train(max_iter=3, progress_bar=True)
    err = capfd.readouterr().err
    assert (
        "NOT converged (stopped at max_iter=3)" in err and "(" + str(len(model.history_)) + " in all)" in err
    )


def test_summary_is_an_info_message_without_progress_bars(prepared, capfd, scanpy_log):
    model = SpatialFactorization(prepared.copy(), prior="pnmf", n_factors=2)
    sfact.settings.verbosity = 1
    capfd.readouterr()
    model.train(max_iter=1000, progress_bar=False)
    assert "sfact pnmf:" not in capfd.readouterr().err + scanpy_log.getvalue()  # quiet: no bars
    sfact.settings.verbosity = 2
    model = SpatialFactorization(prepared.copy(), prior="pnmf", n_factors=2)
    model.train(max_iter=1000, progress_bar=True)
    log, err = scanpy_log.getvalue(), capfd.readouterr().err
    assert sum(bool(SUMMARY.fullmatch(ln.strip())) for ln in log.splitlines()) == 1, log
    assert "sfact pnmf:" not in err  # once: in the log, not also after the bar


# --- the training bar: estimated from the convergence criterion, not max_iter ------------------


def test_training_bar_does_not_count_down_to_max_iter(prepared, capfd):
    model = SpatialFactorization(prepared.copy(), prior="pnmf", n_factors=2)
    capfd.readouterr()
    model.train(max_iter=1000, progress_bar=True)
    err = capfd.readouterr().err
    bar = [s for s in re.split(r"[\r\n]+", err) if s.startswith("training pnmf")]
    n = len(model.history_)
    assert f"{n}it [" in bar[-1] and "/1000" not in err  # no total, no ETA to max_iter
    assert "change=" in bar[-1] and "(tol 1e-04)" in bar[-1]


def test_estimate_of_iterations_left_follows_the_relative_change():
    halving = [1e-2 * 0.5**i for i in range(30)]
    assert estimate_iterations_left(halving[:12], tol=halving[11] / 16) == pytest.approx(4)
    assert estimate_iterations_left(halving[:12], tol=1e-9, at_least=100) >= 100
    assert estimate_iterations_left(halving[:12], tol=1.0) == 0  # already below tol
    assert estimate_iterations_left(halving[:5], tol=1e-9) is None  # too few values for a trend
    assert estimate_iterations_left([1e-3] * 12, tol=1e-4) is None  # a plateau: no honest estimate
    assert estimate_iterations_left(halving[:12][::-1], tol=1e-9) is None  # growing
    assert estimate_iterations_left(halving[:12], tol=0.0) is None  # tol 0 never converges
    assert estimate_iterations_left([float("inf")] * 12, tol=1e-4) is None
    noisy = [1e-3 * (1.5 if i % 2 else 0.6) * 0.99**i for i in range(12)]  # the trend lost in scatter
    assert estimate_iterations_left(noisy, tol=1e-4) is None


def test_progress_text_says_when_it_does_not_know_or_max_iter_comes_first():
    assert progress_text(-2.0, 3e-4, 1e-4, None, 500, 0.1).endswith("time left ?")
    assert progress_text(-2.0, float("inf"), 1e-4, None, 500, 0.1).startswith("elbo=-2, change=? ")
    assert progress_text(-2.0, 3e-4, 1e-4, 90.0, 500, 2.0).endswith("~3m00s left")
    assert progress_text(-2.0, 3e-4, 1e-4, 900.0, 50, 2.0).endswith("~1m40s to max_iter")


# --- nested bars and notebooks -----------------------------------------------------------------


class _Log(io.StringIO):
    """A log file: not a terminal."""


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_inside_another_draws_nothing_and_reports_in_the_outer():
    from sfact._logging import progress_bar

    out = _Terminal()
    outer = progress_bar(total=3, desc="analysing", disable=False, file=out)
    outer.set_postfix_str("group loadings")
    seen = []
    for _ in progress_bar(range(4), desc="group loadings", disable=False, file=out):
        seen.append(outer.postfix)
    assert seen[-1] == "group loadings 3/4" and outer.postfix == "group loadings"  # restored
    outer.update(3)
    outer.close()
    assert "\x1b[A" not in out.getvalue()  # a nested tqdm bar moves the cursor up with ESC[A
    assert "group loadings:" not in out.getvalue()  # no bar of its own
    # with the outer bar closed, the next bar is a bar again
    log = _Log()
    bar = progress_bar(range(2), desc="alone", disable=False, file=log)
    list(bar)
    assert "alone: 100%" in log.getvalue()


def test_a_training_bar_is_closed_when_training_fails(prepared):
    """Else every later bar would count as nested in it and draw nothing."""
    from sfact._logging import _outer_bar

    def stop(iteration, elbo):
        if iteration == 3:
            raise KeyboardInterrupt

    model = SpatialFactorization(prepared.copy(), prior="pnmf", n_factors=2)
    with pytest.raises(KeyboardInterrupt) as info:  # the traceback is kept, as IPython keeps it
        model.train(max_iter=50, progress_bar=True, callback=stop)
    assert info.traceback and _outer_bar() is None


def test_tl_fit_with_groups_writes_no_cursor_escapes_to_a_log(prepared, capfd):
    capfd.readouterr()
    sfact.tl.fit(prepared.copy(), prior="pnmf", n_factors=2, max_iter=1000, progress_bar=True)
    err = capfd.readouterr().err
    assert "analysing" in err and "\x1b[" not in err
    assert not re.search(r"(^|[\r\n])group loadings:", err)  # the inner bar did not draw itself


def test_text_bars_in_a_kernel_without_ipywidgets(monkeypatch):
    from tqdm.std import tqdm as std_tqdm

    from sfact import _logging

    monkeypatch.setattr(_logging, "in_kernel", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ipywidgets" else real(name, *a)
    )
    assert _logging.bar_class() is std_tqdm
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # TqdmWarning: IProgress not found, from tqdm.auto
        bar = _logging.progress_bar(range(3), desc="x", disable=False, file=_Terminal())
        list(bar)


@pytest.mark.skipif(importlib.util.find_spec("ipywidgets") is None, reason="ipywidgets is not installed")
def test_widget_bars_in_a_kernel_with_ipywidgets(monkeypatch):
    from tqdm.notebook import tqdm as notebook_tqdm

    from sfact import _logging

    monkeypatch.setattr(_logging, "in_kernel", lambda: True)
    assert _logging.bar_class() is notebook_tqdm
    assert _logging.bar_class(file=_Log()) is not notebook_tqdm  # an explicit stream: text


def _python_with_nbclient() -> str | None:
    """An interpreter with nbclient and ipykernel: this one, or the docs environment's."""
    for python in (sys.executable, str(ROOT / ".venv-docs" / "bin" / "python")):
        if not Path(python).exists():
            continue
        probe = subprocess.run(
            [python, "-c", "import nbclient, nbformat, ipykernel, sfact"], capture_output=True, timeout=120
        )
        if probe.returncode == 0:
            return python
    return None


NOTEBOOK_RUNNER = textwrap.dedent(
    """
    import json, sys
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(sys.argv[1]))
    NotebookClient(nb, timeout=600, kernel_name="python3").execute()
    print(json.dumps(nb.cells[0].outputs))
    """
)

CELL = textwrap.dedent(
    """
    import sfact
    sfact.settings.progress_bar = True
    adata = sfact.datasets.simulate(n_obs=200, n_vars=20, n_factors=3, random_state=0)
    sfact.pp.prepare(adata, group_key="group")
    sfact.tl.fit(adata, prior="pnmf", n_factors=2, max_iter=10, validation_fraction=0)
    import importlib.util
    print("ipywidgets:", importlib.util.find_spec("ipywidgets") is not None)
    """
)


@pytest.mark.slow
def test_notebook_output_is_clean():
    """A cell that fits a tiny model in a real kernel: no ``ESC[A``, no ``TqdmWarning``, a summary."""
    python = _python_with_nbclient()
    if python is None:
        pytest.skip("no interpreter with nbclient and ipykernel (pip install -e '.[docs]', or make docs-env)")
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    run = subprocess.run(
        [python, "-c", NOTEBOOK_RUNNER, CELL], capture_output=True, text=True, timeout=900, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    outputs = json.loads(run.stdout.strip().splitlines()[-1])
    assert not [o for o in outputs if o["output_type"] == "error"], outputs
    text = json.dumps(outputs)  # every output, widgets' text included
    assert "\\u001b[A" not in text and "\x1b[A" not in text
    assert "TqdmWarning" not in text and "IProgress not found" not in text
    assert "sfact pnmf: 10 iterations" in text and "NOT converged" in text  # the summary line
    assert "ConvergenceWarning" in text and "return_model=True" in text  # visible, with advice


# --- the CLI's train stage logs the warning ------------------------------------------------------


def test_cli_train_stage_logs_the_warning_with_cli_advice(tmp_path):
    from sfact._cli import main

    (tmp_path / "tiny.yaml").write_text(
        "name: tiny\ndataset: {loader: osmfish, subsample: 300}\npreprocessing: {min_group_size: 10}\n"
        "model: {n_factors: 2}\ntraining: {max_iter: 3, min_iter: 1}\noutput_dir: out\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # the stage logs it, not warns
        args = ["run", "preprocess", "train", "-c", tmp_path / "tiny.yaml", "--prior", "pnmf"]
        rc = main([str(a) for a in (*args, "--executor", "serial")])
    assert rc == 0
    log = (tmp_path / "out" / "logs" / "pnmf.log").read_text()
    assert "WARNING: training pnmf stopped at `training.max_iter: 3` before converging" in log
    assert "--prior pnmf --resume" in log and "raise `training.max_iter`" in log
    assert "model.train" not in log


# --- threads: OMP_WAIT_POLICY before torch is imported -------------------------------------------


def _import_sfact(code: str = "", **env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "SFACT_NO_THREAD_SETUP")}
    script = code + "import os, sfact; print(os.environ.get('OMP_WAIT_POLICY')); print(sfact._threads.SETUP)"
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**base, **env}, timeout=300
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.strip().splitlines()


def test_import_sets_the_wait_policy_unless_the_user_did():
    assert _import_sfact() == ["PASSIVE", "sfact set OMP_WAIT_POLICY=PASSIVE before torch was imported"]
    assert _import_sfact(OMP_WAIT_POLICY="ACTIVE")[0] == "ACTIVE"  # the user's choice is kept
    assert _import_sfact(SFACT_NO_THREAD_SETUP="1")[0] == "None"


@pytest.mark.slow
def test_import_after_torch_leaves_it_and_says_so_at_debug_level(prepared, scanpy_log):
    policy, note = _import_sfact("import torch; ")
    assert policy == "None" and "torch was imported before sfact" in note
    # in this process: the set-up's note is logged once, at debug level, at the first fit
    from sfact._logging import log_thread_setup

    log_thread_setup.cache_clear()
    sfact.settings.verbosity = 4
    SpatialFactorization(prepared.copy(), prior="pnmf", n_factors=2).train(max_iter=1000)
    assert f"threads: {sfact._threads.SETUP}" in scanpy_log.getvalue()


def test_warning_text_when_the_change_is_below_tol_but_min_iter_not_reached():
    """A fit stopped by ``max_iter`` before ``min_iter`` must not claim the change is above ``tol``."""
    from sfact.models._convergence import not_converged_message

    below = not_converged_message(
        n_iter=5, n_total=5, max_iter=5, tol=1e-4, change=8.8e-5, left=None, from_fit=False
    )
    assert "below `tol=0.0001`" in below and "min_iter" in below and "above" not in below
    above = not_converged_message(
        n_iter=5, n_total=5, max_iter=5, tol=1e-4, change=3e-4, left=None, from_fit=False
    )
    assert "above `tol=0.0001`" in above
