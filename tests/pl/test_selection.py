"""``sfact.pl.model_selection``: one row per setting, folds as points, the baseline, ax/show/return_fig."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest

import sfact


@pytest.fixture(scope="module")
def selected():
    adata = sfact.datasets.simulate(n_obs=200, n_vars=20, random_state=0)
    sfact.pp.prepare(adata)
    sfact.tl.select_model(
        adata,
        priors=["pnmf", "svgp"],
        n_factors=[2],
        prior_kwargs_grid={"lengthscale": [5.0, 20.0]},
        n_folds=2,
        max_iter=5,
        n_jobs=1,
    )
    return adata


def test_model_selection_plot(selected):
    fig = sfact.pl.model_selection(selected, return_fig=True)
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["pnmf L=2", "svgp L=2 lengthscale=5", "svgp L=2 lengthscale=20"]
    assert sum(len(c.get_offsets()) for c in ax.collections) == 3 * 2  # settings x folds
    baseline = selected.uns["sfact_selection"]["results"]["baseline_deviance"].mean()
    assert any(
        line.get_linestyle() == "--" and line.get_xdata()[0] == pytest.approx(baseline) for line in ax.lines
    )
    best = selected.uns["sfact_selection"]["best"]
    bold = [t.get_text() for t in ax.get_yticklabels() if t.get_fontweight() == "bold"]
    assert len(bold) == 1 and bold[0].startswith(f"{best['prior']} L=")


def test_model_selection_into_ax_and_show_false(selected):
    fig, ax = plt.subplots()
    out = sfact.pl.model_selection(selected, ax=ax, return_fig=True)
    assert out is fig
    assert sfact.pl.model_selection(selected, show=False).get_title().startswith("Model selection")


def test_model_selection_before_select_raises():
    raw = sfact.datasets.simulate(n_obs=50, n_vars=10, random_state=0)
    with pytest.raises(KeyError, match=r"sfact\.tl\.select_model"):
        sfact.pl.model_selection(raw, return_fig=True)
    assert not plt.get_fignums()
