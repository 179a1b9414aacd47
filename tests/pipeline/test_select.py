"""``sfact select``: the ``selection`` config section, the plan, and the stage end to end on a tiny config."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from sfact._cli import main
from sfact.pipeline import Config, ConfigError, load_config, make_plan

TINY = """\
name: tiny
dataset: {loader: osmfish, subsample: 300}
preprocessing: {min_group_size: 10}
model:
  n_factors: 3
  prior_kwargs: {num_inducing: 30, n_neighbors: 8}
training: {max_iter: 3, min_iter: 1}
figures: {dpi: 40}
selection:
  priors: [pnmf, svgp]
  n_factors: [2, 3]
  prior_kwargs_grid: {lengthscale: [5, 20]}
  n_folds: 2
  n_jobs: 1
output_dir: out
"""


@pytest.fixture(scope="module")
def selected(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    (root / "tiny.yaml").write_text(TINY)
    rc = main(
        ["run", "preprocess", "select", "-c", str(root / "tiny.yaml"), "--executor", "serial", "--plain"]
    )
    return root, rc


def test_select_writes_table_json_and_figure(selected):
    root, rc = selected
    assert rc == 0
    sel = root / "out" / "selection"
    df = pd.read_csv(sel / "selection.csv")
    assert list(df.columns[:3]) == ["prior", "n_factors", "lengthscale"]
    assert len(df) == (2 + 4) * 2  # (pnmf x 2 L + svgp x 2 L x 2 lengthscales) x 2 folds
    assert set(df["fold"]) == {0, 1}
    info = json.loads((sel / "selection.json").read_text())
    assert info["best"]["prior"] in ("pnmf", "svgp")
    assert len(info["results"]) == len(df)
    assert info["params"]["n_folds"] == 2 and info["params"]["max_iter"] == 3
    assert (sel / "model_selection.png").stat().st_size > 1000
    log = (root / "out" / "logs" / "select.log").read_text()
    assert "tiny: select" in log and "best:" in log
    jobs = json.loads((root / "out" / "run_summary.json").read_text())["jobs"]
    assert jobs["tiny/select"]["status"] == "done"
    assert not [p for p in (root / "out").rglob(".*") if ".tmp-" in p.name]


def test_select_is_skipped_when_done_and_not_in_run_all(selected, capsys):
    root, _ = selected
    rc = main(["select", "-c", str(root / "tiny.yaml"), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "0 jobs to run, 1 skipped" in out
    plan = make_plan([load_config(root / "tiny.yaml")], ["all"])
    assert not [j for j in plan.jobs if j.task == "select"]
    plan = make_plan([load_config(root / "tiny.yaml")], ["all", "select"], force=True)
    names = [j.name for j in plan.jobs]
    assert names.index("tiny/select") == 1 and plan.jobs[1].depends_on == ("tiny/preprocess",)


def test_select_help_lists_the_command(capsys):
    assert main(["--help"]) == 0
    assert "select" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("selection", "key"),
    [
        ({"priors": ["svgp", "nsf"]}, "selection.priors"),
        ({"n_factors": [2, 0]}, "selection.n_factors"),
        ({"prior_kwargs_grid": {"lenghtscale": [5]}}, "selection.prior_kwargs_grid.lenghtscale"),
        (
            {"priors": ["pnmf"], "prior_kwargs_grid": {"lengthscale": [5]}},
            "selection.prior_kwargs_grid.lengthscale",
        ),
        ({"n_folds": 1}, "selection.n_folds"),
        ({"heldout_fraction": 0.0}, "selection.heldout_fraction"),
        ({"n_jobs": 0}, "selection.n_jobs"),
    ],
)
def test_bad_selection_config(selection, key):
    with pytest.raises(ConfigError) as exc:
        Config.from_dict({"dataset": {"loader": "osmfish", "group_key": None}, "selection": selection})
    assert exc.value.key == key


def test_multigroup_prior_needs_groups():
    with pytest.raises(ConfigError, match="needs groups"):
        Config.from_dict(
            {"dataset": {"loader": "osmfish", "group_key": None}, "selection": {"priors": ["mggp_svgp"]}}
        )
