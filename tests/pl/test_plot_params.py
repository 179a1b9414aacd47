"""``sfact.pl`` takes scanpy's plot arguments and draws maps the way scanpy and squidpy do.

Orientation (y downward, as ``sq.pl.spatial_scatter``), ``show=False`` returning the Axes,
``save=``, ``vmin``/``vmax``/``vcenter`` (numbers and ``"p99.5"`` strings) with clipping marked
on the colour bar, ``title``, ``figsize``, ``library_id``, one gene-ranking default, and colour
bars that stay inside an ``ax=`` of a grid.
"""

from __future__ import annotations

import inspect

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm

import sfact


@pytest.fixture(scope="module")
def small():
    """200 simulated cells, pnmf with 3 factors; the cell at the top-left corner has an extreme factor_0."""
    adata = sfact.datasets.simulate(n_obs=200, n_vars=20, n_factors=3, random_state=0)
    sfact.pp.prepare(adata)
    sfact.tl.fit(adata, prior="pnmf", n_factors=3, max_iter=5, progress_bar=False, validation_fraction=0)
    return adata


def _colorbars(fig) -> list:
    return [a._colorbar for a in fig.axes if hasattr(a, "_colorbar")]


def _panels(fig) -> list[Axes]:
    return [a for a in fig.axes if not hasattr(a, "_colorbar")]


# ---------------------------------------------------------------------------- orientation
def _marked(adata) -> tuple[int, np.ndarray]:
    """The cell nearest the origin (smallest x + y: top-left in image convention), given the top factor_0."""
    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    cell = int(np.argmin(xy[:, 0] + xy[:, 1]))
    return cell, xy[cell]


def _where(ax: Axes) -> tuple[np.ndarray, np.ndarray]:
    """The cell with the highest colour value: where it lands in axes fractions (0, 0 = bottom-left), its data xy."""
    ax.figure.canvas.draw()
    best, xy = -np.inf, None
    for coll in ax.collections:
        values = coll.get_array()
        if values is None or len(values) != len(coll.get_offsets()):
            continue
        k = int(np.argmax(np.asarray(values, dtype=float)))
        if values[k] > best:
            best, xy = float(values[k]), np.asarray(coll.get_offsets())[k]
    assert xy is not None
    return ax.transAxes.inverted().transform(ax.transData.transform(xy)), xy


@pytest.fixture
def marked(small):
    adata = small.copy()
    cell, xy = _marked(adata)
    F = np.array(adata.obsm["X_sfact"], copy=True)
    F[cell, 0] = F[:, 0].max() * 10
    adata.obsm["X_sfact"] = F
    return adata, xy


def test_factors_orientation_matches_squidpy(marked):
    sq = pytest.importorskip("squidpy")
    adata, marked_xy = marked
    _, (ax_sfact, ax_sq, ax_up) = plt.subplots(1, 3, figsize=(12, 4))
    sfact.pl.factors(adata, factors=["factor_0"], vmax=None, ax=ax_sfact, show=False)
    fa = sfact.get.factors_adata(adata)
    sq.pl.spatial_scatter(fa, color="factor_0", shape=None, ax=ax_sq)
    sfact.pl.factors(adata, factors=["factor_0"], vmax=None, ax=ax_up, invert_y=False, show=False)
    (ours, xy1), (theirs, xy2), (up, xy3) = _where(ax_sfact), _where(ax_sq), _where(ax_up)
    for xy in (xy1, xy2, xy3):  # the marked cell is the one found in every plot
        np.testing.assert_allclose(xy, marked_xy)
    # the marked cell (smallest x and y) lands top-left in both: same picture as squidpy
    assert ours[0] < 0.2 and ours[1] > 0.8
    assert theirs[0] < 0.2 and theirs[1] > 0.8
    np.testing.assert_allclose(ours, theirs, atol=0.08)
    # invert_y=False flips it to the bottom-left
    assert up[0] < 0.2 and up[1] < 0.2
    assert ax_sfact.yaxis_inverted() and not ax_up.yaxis_inverted()


@pytest.mark.parametrize("name", ["factors", "scales", "factors_with_genes"])
def test_every_map_draws_y_downward_by_default(small, name):
    fig = getattr(sfact.pl, name)(small, factors=[0], return_fig=True)
    maps = [a for a in _panels(fig) if a.collections]
    assert maps and all(a.yaxis_inverted() for a in maps)
    fig = getattr(sfact.pl, name)(small, factors=[0], invert_y=False, return_fig=True)
    assert not any(a.yaxis_inverted() for a in _panels(fig) if a.collections)


# ---------------------------------------------------------------------------- show, save, return_fig
def test_show_false_returns_the_axes(small):
    out = sfact.pl.factors(small, factors=[0], show=False)
    assert isinstance(out, Axes)
    out = sfact.pl.factors(small, show=False)
    assert isinstance(out, list) and len(out) == 3 and all(isinstance(a, Axes) for a in out)
    assert all(not hasattr(a, "_colorbar") for a in out)  # the panels, not the colour bars
    assert isinstance(sfact.pl.elbo(small, show=False), Axes)
    _, ax = plt.subplots()
    assert sfact.pl.moran(small, ax=ax, show=False) is ax
    fig = sfact.pl.top_genes(small, show=False, return_fig=True)
    assert isinstance(fig, matplotlib.figure.Figure)  # return_fig wins, as in scanpy


def test_show_true_returns_none(small):
    assert sfact.pl.moran(small, show=True) is None


@pytest.fixture
def scanpy_figdir(tmp_path):
    """scanpy's figure folder and format set to ``tmp_path/figs`` and png, restored afterwards."""
    import scanpy as sc

    old = sc.settings.figdir, sc.settings.file_format_figs
    sc.settings.figdir, sc.settings.file_format_figs = tmp_path / "figs", "png"
    yield tmp_path / "figs"
    sc.settings.figdir, sc.settings.file_format_figs = old


def test_save_writes_the_file(small, tmp_path, scanpy_figdir):
    path = tmp_path / "sub" / "factors.png"
    axes = sfact.pl.factors(small, save=path, show=False)
    assert path.is_file() and path.stat().st_size > 0
    assert len(axes) == 3
    sfact.pl.loadings(small, save=str(tmp_path / "loadings"), show=False)  # no suffix: scanpy's format
    assert (tmp_path / "loadings.png").is_file()
    open_before = plt.get_fignums()
    assert sfact.pl.elbo(small, save=True, show=True) is None
    assert (scanpy_figdir / "sfact_elbo.png").is_file()
    assert plt.get_fignums() == open_before  # saved and shown: closed, as scanpy does
    with pytest.raises(TypeError, match="`save` must be a file path or True"):
        sfact.pl.elbo(small, save=3, show=False)


# ---------------------------------------------------------------------------- colour limits
def test_vmin_vmax_numbers_set_the_colorbar(small):
    fig = sfact.pl.factors(small, factors=[0], vmin=0.1, vmax=0.5, return_fig=True)
    (cb,) = _colorbars(fig)
    assert (cb.norm.vmin, cb.norm.vmax) == pytest.approx((0.1, 0.5))
    (panel,) = _panels(fig)
    assert panel.collections[0].get_clim() == pytest.approx((0.1, 0.5))


def test_percentile_strings(small):
    values = np.asarray(small.obsm["X_sfact"])[:, 1]
    fig = sfact.pl.factors(small, factors=[1], vmin="p5", vmax="p90", return_fig=True)
    (cb,) = _colorbars(fig)
    assert cb.norm.vmin == pytest.approx(np.percentile(values, 5))
    assert cb.norm.vmax == pytest.approx(np.percentile(values, 90))
    fig = sfact.pl.loadings(small, vmax="p50", return_fig=True)
    (cb,) = _colorbars(fig)
    im = _panels(fig)[0].images[0]
    assert cb.norm.vmax == pytest.approx(np.percentile(im.get_array().compressed(), 50))


def test_clipping_is_marked_on_the_colorbar(small):
    # default: clipped at the 99.5th percentile, so the top of the colour bar is a triangle
    (cb,) = _colorbars(sfact.pl.factors(small, factors=[0], return_fig=True))
    assert cb.extend == "max"
    (cb,) = _colorbars(sfact.pl.factors(small, factors=[0], vmax=None, return_fig=True))
    assert cb.extend == "neither"
    (cb,) = _colorbars(sfact.pl.factors(small, factors=[0], vmin="p10", return_fig=True))
    assert cb.extend == "both"
    (cb,) = _colorbars(sfact.pl.factors(small, shared_scale=True, vmax="p50", return_fig=True))
    assert cb.extend == "max"
    (cb,) = _colorbars(sfact.pl.loadings(small, vmax="p50", return_fig=True))
    assert cb.extend == "max"


def test_vcenter_two_slopes(small):
    values = np.asarray(small.obsm["X_sfact"])[:, 0]
    fig = sfact.pl.factors(small, factors=[0], vcenter="p50", vmax=None, return_fig=True)
    norm = _panels(fig)[0].collections[0].norm
    assert isinstance(norm, TwoSlopeNorm)
    assert norm.vcenter == pytest.approx(np.median(values))
    with pytest.raises(ValueError, match=r"`vcenter`.*between"):
        sfact.pl.factors(small, factors=[0], vcenter=1e9, return_fig=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"vmax": "q99"}, ValueError, "percentile 'p0' to 'p100'"),
        ({"vmax": "p101"}, ValueError, "percentile 'p0' to 'p100'"),
        ({"vmin": [1]}, TypeError, "`vmin` must be a number, a percentile string"),
        ({"vmin": 2.0, "vmax": 1.0}, ValueError, "`vmin` .* is above `vmax`"),
        ({"vmax": float("nan")}, ValueError, "`vmax` must be finite"),
    ],
)
def test_bad_limits_raise(small, kwargs, error, match):
    with pytest.raises(error, match=match):
        sfact.pl.factors(small, factors=[0], return_fig=True, **kwargs)
    assert not plt.get_fignums()  # refused before a figure is made


# ---------------------------------------------------------------------------- title, figsize
def test_title_and_figsize(small):
    fig = sfact.pl.factors(small, factors=[0], title="mine", figsize=(4, 3), return_fig=True)
    assert _panels(fig)[0].get_title() == "mine"
    assert tuple(fig.get_size_inches()) == pytest.approx((4, 3))
    fig = sfact.pl.factors(small, title=["a", "b", "c"], return_fig=True)
    assert [a.get_title() for a in _panels(fig)] == ["a", "b", "c"]
    fig = sfact.pl.factors(small, title="all three", return_fig=True)
    assert fig.get_suptitle() == "all three"
    assert _panels(fig)[0].get_title().startswith("factor_0")
    ax = sfact.pl.elbo(small, title="training", show=False)
    assert ax.get_title() == "training"
    with pytest.raises(ValueError, match="`title` has 2 entries but the plot has 3"):
        sfact.pl.factors(small, title=["a", "b"], return_fig=True)
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="`figsize` sizes a new figure"):
        sfact.pl.moran(small, ax=ax, figsize=(3, 3))


# ---------------------------------------------------------------------------- gene ranking
def test_one_gene_ranking_default_across_gene_plots(small):
    defaults = {
        name: inspect.signature(getattr(sfact.pl, name)).parameters["by"].default
        for name in ("top_genes", "loadings", "factors_with_genes")
    }
    assert set(defaults.values()) == {"share"}
    # the same top genes for the same factor, whichever plot draws them
    expected = sfact.get.top_genes(small, n_genes=2, by="share")
    genes = expected.loc[expected["factor"] == "factor_1", "gene"].tolist()
    ax = sfact.pl.top_genes(small, factors=["factor_1"], n_genes=2, show=False)
    assert [t.get_text() for t in ax.get_yticklabels()] == genes
    fig = sfact.pl.factors_with_genes(small, factors=["factor_1"], n_genes=2, return_fig=True)
    assert [a.get_title() for a in _panels(fig) if a.collections][1:] == genes


# ---------------------------------------------------------------------------- colour bars in a grid
@pytest.mark.parametrize("layout", [None, "constrained"])
@pytest.mark.parametrize("name", ["factors", "scales", "loadings"])
def test_colorbar_stays_inside_the_given_ax(small, name, layout):
    fig, axs = plt.subplots(1, 3, figsize=(9, 3), layout=layout)
    boxes = [a.get_position(original=True) for a in axs]
    for j, a in enumerate(axs):
        kwargs = {} if name == "loadings" else {"factors": [j]}
        getattr(sfact.pl, name)(small, ax=a, show=False, **kwargs)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    cbs = _colorbars(fig)
    assert len(cbs) == 3
    # the area of each given axes: its grid cell (a layout engine may move the cells when drawing)
    areas = [
        (b if layout is None else a.get_position(original=True)).transformed(fig.transFigure)
        for a, b in zip(axs, boxes, strict=True)
    ]
    for j, cb in enumerate(cbs):
        tight = cb.ax.get_tightbbox(renderer)  # with its tick labels
        assert areas[j].x0 - 1 <= tight.x0 and tight.x1 <= areas[j].x1 + 1, (areas[j], tight)
        for k, other in enumerate(areas):  # so it never reaches a neighbouring panel
            if k != j:
                assert tight.x1 <= other.x0 + 1 or tight.x0 >= other.x1 - 1


# ---------------------------------------------------------------------------- library_id
@pytest.fixture(scope="module")
def sectioned():
    adata = sfact.datasets.simulate(n_obs=300, n_vars=20, n_factors=2, n_samples=3, random_state=0)
    codes = adata.obs["sample"].cat.codes.to_numpy()
    adata.obsm["spatial"] = adata.obsm["spatial"] + np.c_[codes * 300.0, np.zeros(adata.n_obs)]
    sfact.pp.prepare(adata, sample_key="sample")
    sfact.tl.fit(adata, prior="pnmf", n_factors=2, max_iter=5, validation_fraction=0, progress_bar=False)
    return adata


def test_library_id_selects_samples(sectioned):
    adata = sectioned
    assert adata.uns["sfact"]["params"]["sample_key"] == "sample"
    axes = sfact.pl.factors(adata, library_id=["s2", "s0"], show=False)
    assert len(axes) == 2 * 2
    assert [a.get_title().split(":")[0] for a in axes] == ["s2", "s2", "s0", "s0"]
    labels = adata.obs["sample"].astype(str).to_numpy()
    assert len(axes[0].collections[0].get_offsets()) == int((labels == "s2").sum())
    # one sample, one factor: one panel, so `ax=` works
    _, ax = plt.subplots()
    assert sfact.pl.factors(adata, library_id="s1", factors=[0], ax=ax, show=False) is ax
    assert len(ax.collections[0].get_offsets()) == int((labels == "s1").sum())
    fig = sfact.pl.factors_with_genes(adata, library_id="s1", n_genes=1, return_fig=True)
    assert all(len(a.collections[0].get_offsets()) == int((labels == "s1").sum()) for a in _panels(fig))
    with pytest.raises(KeyError, match=r"Unknown `library_id` \['s9'\]; samples in `sample` are"):
        sfact.pl.factors(adata, library_id="s9", return_fig=True)


def test_library_id_without_samples_raises(small):
    with pytest.raises(ValueError, match=r"`library_id` selects samples.*leave `library_id=None`"):
        sfact.pl.factors(small, library_id="s0", return_fig=True)
