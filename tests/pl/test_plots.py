"""``sfact.pl``: every plot returns a Figure with the expected panels and fails clearly before a fit."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

import sfact

N_FACTORS = 4


@pytest.fixture(scope="module")
def fitted():
    """osmFISH fitted once with pnmf; its cell types give group loadings and enrichment."""
    adata = sfact.datasets.osmfish()
    sfact.pp.prepare(adata, group_key="ClusterName")
    sfact.tl.fit(adata, prior="pnmf", n_factors=N_FACTORS, max_iter=30, progress_bar=False)
    return adata


@pytest.fixture(scope="module")
def mggp():
    """A small multi-group SVGP fit on 1500 osmFISH cells, with group-wise factors; (adata, model)."""
    adata = sfact.datasets.osmfish()
    sfact.pp.prepare(adata, group_key="ClusterName")
    adata = adata[np.random.default_rng(0).choice(adata.n_obs, 1500, replace=False)].copy()
    model = sfact.models.SpatialFactorization(
        adata, prior="mggp_svgp", n_factors=3, prior_kwargs={"num_inducing": 100}
    )
    model.train(max_iter=20, progress_bar=False)
    sfact.tl.analyze(adata, model)
    sfact.tl.groupwise_factors(adata, model)
    return adata, model


def n_panels(fig) -> int:
    """Axes that draw data (scatter, image, bars, lines), not counting colour bars."""
    return sum(
        1
        for ax in fig.axes
        if not hasattr(ax, "_colorbar") and (ax.collections or ax.images or ax.patches or ax.lines)
    )


N_GROUPS = 31  # osmFISH cell types after sfact.pp.prepare
THREE = ["Astrocyte Gfap", "Microglia", "Pyramidal L6"]

CASES = [
    ("factors", {}, N_FACTORS),
    ("factors", {"factors": [0, "factor_2"], "shared_scale": True}, 2),
    ("scales", {}, N_FACTORS),
    ("elbo", {}, 1),
    ("moran", {}, 1),
    ("top_genes", {}, N_FACTORS),
    ("top_genes", {"by": "share", "factors": [1], "group": "Microglia"}, 1),
    ("loadings", {}, 1),
    ("factors_with_genes", {"n_genes": 2}, N_FACTORS * 3),
    ("gene_enrichment", {}, N_FACTORS),
    ("gene_enrichment", {"groups": THREE, "shared_scale": False, "factors": [0, 1]}, 2),
    ("enrichment_by_group", {}, N_GROUPS),
    ("enrichment_by_group", {"groups": THREE}, 3),
    ("enrichment_by_factor", {}, N_FACTORS),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_plot_panels(fitted, name, kwargs, expected):
    fig = getattr(sfact.pl, name)(fitted, return_fig=True, **kwargs)
    assert isinstance(fig, matplotlib.figure.Figure)
    assert n_panels(fig) == expected


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("factors", {"factors": [1]}),
        ("scales", {"factors": [0]}),
        ("elbo", {}),
        ("moran", {}),
        ("top_genes", {"factors": [0]}),
        ("loadings", {}),
        ("gene_enrichment", {"factors": [0]}),
        ("enrichment_by_group", {"groups": ["Microglia"]}),
        ("enrichment_by_factor", {"factors": [2]}),
    ],
)
def test_single_panel_into_ax(fitted, name, kwargs):
    fig, ax = plt.subplots()
    out = getattr(sfact.pl, name)(fitted, ax=ax, return_fig=True, **kwargs)
    assert out is fig
    assert ax.collections or ax.images or ax.patches or ax.lines


def test_ax_with_many_panels_raises(fitted):
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="one panel"):
        sfact.pl.factors(fitted, ax=ax)


def test_show_false_returns_the_axes(fitted):
    """As in scanpy: ``show=False`` returns the Axes (``show=True`` shows and returns None)."""
    ax = sfact.pl.moran(fitted, show=False)
    assert isinstance(ax, matplotlib.axes.Axes) and ax.patches
    assert sfact.pl.moran(fitted, show=True) is None


def test_rasterized_scatter(fitted):
    fig = sfact.pl.factors(fitted, return_fig=True, factors=[0])
    scatters = [c for ax in fig.axes for c in ax.collections if not hasattr(ax, "_colorbar")]
    assert scatters and all(c.get_rasterized() for c in scatters)
    assert all(ax.get_aspect() == 1.0 for ax in fig.axes if not hasattr(ax, "_colorbar"))


def test_groupwise_factors(mggp):
    adata, _ = mggp
    groups = list(adata.uns["sfact"]["groupwise_groups"])
    fig = sfact.pl.groupwise_factors(adata, return_fig=True)
    assert n_panels(fig) == (1 + len(groups)) * 3
    fig = sfact.pl.groupwise_factors(
        adata, groups=groups[:2], factors=[0, 2], shared_scale=False, return_fig=True
    )
    assert n_panels(fig) == 3 * 2
    with pytest.raises(KeyError, match="Unknown groups"):
        sfact.pl.groupwise_factors(adata, groups=["nope"], return_fig=True)


def test_inducing_points(mggp):
    adata, model = mggp
    fig = sfact.pl.inducing_points(adata, model, return_fig=True)
    assert n_panels(fig) == 1
    offsets = fig.axes[0].collections[-1].get_offsets()
    assert len(offsets) == 100
    # the inducing points are drawn in the data's units, inside the tissue's bounding box
    lo, hi = adata.obsm["spatial"].min(0), adata.obsm["spatial"].max(0)
    span = hi - lo
    assert (offsets >= lo - 0.01 * span).all() and (offsets <= hi + 0.01 * span).all()
    groups = list(adata.obs["ClusterName"].cat.categories[:3])
    fig = sfact.pl.inducing_points(adata, model, split_groups=True, groups=groups, return_fig=True)
    assert n_panels(fig) == 3


def test_inducing_points_errors(mggp, fitted):
    adata, _ = mggp
    untrained = sfact.models.SpatialFactorization(adata, prior="svgp", n_factors=2)
    with pytest.raises(RuntimeError, match="not trained"):
        sfact.pl.inducing_points(adata, untrained, return_fig=True)


def test_groupwise_before_groupwise_factors(fitted):
    with pytest.raises(KeyError, match=r"sfact\.tl\.groupwise_factors"):
        sfact.pl.groupwise_factors(fitted, return_fig=True)


@pytest.mark.parametrize("name", ["gene_enrichment", "enrichment_by_group", "enrichment_by_factor"])
def test_enrichment_before_enrichment(fitted, name):
    adata = fitted.copy()
    del adata.uns["sfact"]["enrichment"]
    with pytest.raises(KeyError, match=r"sfact\.tl\.gene_enrichment"):
        getattr(sfact.pl, name)(adata, return_fig=True)


ALL = [
    "factors",
    "scales",
    "elbo",
    "moran",
    "top_genes",
    "loadings",
    "factors_with_genes",
    "gene_enrichment",
    "enrichment_by_group",
    "enrichment_by_factor",
    "groupwise_factors",
]


@pytest.mark.parametrize("name", ALL)
def test_before_fit_raises(name):
    raw = sfact.datasets.osmfish()
    with pytest.raises(KeyError, match=r"sfact\.tl\.fit"):
        getattr(sfact.pl, name)(raw, return_fig=True)
    assert not plt.get_fignums()  # no empty figure left behind


def test_every_public_plot_is_tested():
    assert set(sfact.pl.__all__) == {
        *ALL,
        "inducing_points",
        "model_selection",
        "report",
    }  # model_selection: test_selection.py; report: tests/pipeline/test_report.py


@pytest.fixture(scope="module")
def sectioned():
    adata = sfact.datasets.simulate(
        n_obs=600, n_vars=30, n_factors=3, n_groups=1, n_samples=3, lengthscale=15.0, random_state=0
    )
    codes = adata.obs["sample"].cat.codes.to_numpy()
    adata.obsm["spatial"] = adata.obsm["spatial"] + np.c_[codes * 300.0, np.zeros(adata.n_obs)]
    sfact.pp.prepare(adata, sample_key="sample")
    sfact.tl.fit(
        adata, prior="lcgp", n_factors=3, prior_kwargs={"n_neighbors": 8}, max_iter=10, validation_fraction=0
    )
    return adata


@pytest.mark.parametrize("shared", [False, True])
def test_factors_with_samples_draw_a_row_per_sample_on_shared_scales(sectioned, shared):
    adata = sectioned
    fig = sfact.pl.factors(adata, factors=[0, 2], shared_scale=shared, return_fig=True, show=False)
    axes = [a for a in fig.axes if a.get_title()]  # the scatter panels (not the colour bars)
    assert len(axes) == 3 * 2
    assert len(fig.axes) - len(axes) == (1 if shared else 2)  # colour bars: per factor, or one
    labels = adata.obs["sample"].astype(str).to_numpy()
    table = adata.uns["sfact"]["samples"]
    names = adata.uns["sfact"]["factor_names"]
    for r, smp in enumerate(["s0", "s1", "s2"]):
        for j, f in enumerate([0, 2]):
            a = axes[r * 2 + j]
            offsets = a.collections[0].get_offsets()
            # the sample's own cells, at their own coordinates
            assert len(offsets) == int((labels == smp).sum())
            own = adata.obsm["spatial"][labels == smp]
            # (drawn in value order: compare as sets of points)
            np.testing.assert_allclose(np.unique(np.asarray(offsets), axis=0), np.unique(own, axis=0))
            assert a.get_title().startswith(f"{smp}: {names[f]}")
            assert f"{float(table.loc[smp, f'moranI_{names[f]}']):.2f}" in a.get_title()
    # one colour scale per factor across the samples (for everything with shared_scale)
    for j in range(2):
        lims = {axes[r * 2 + j].collections[0].get_clim() for r in range(3)}
        assert len(lims) == 1
    if shared:
        assert axes[0].collections[0].get_clim() == axes[1].collections[0].get_clim()
    plt.close(fig)
    with pytest.raises(ValueError, match="one row per sample"):
        _, ax = plt.subplots()
        sfact.pl.factors(adata, factors=[0], ax=ax, show=False)
