"""SpatialData everywhere: every pl, get and tl function that reads an AnnData takes a SpatialData
with ``table_key=`` and gives what it gives for the equivalent AnnData; ``copy=True`` on a
SpatialData returns a deep copy of it; tables annotating a labels raster get its centroids."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import sfact
from sfact._spatialdata import is_spatialdata, resolve_table

spatialdata = pytest.importorskip("spatialdata")

TABLE = "cell_table"  # the fitted table; the SpatialData also holds an unfitted "other" table
FIT = {"prior": "mggp_svgp", "n_factors": 2, "max_iter": 5, "random_state": 0, "progress_bar": False}
SELECT = {"priors": ["pnmf"], "n_factors": [2], "max_iter": 3, "n_jobs": 1}


def _adata():
    adata = sfact.datasets.simulate(n_obs=200, n_vars=20, n_factors=2, random_state=0)
    adata.obs["group"] = adata.obs["group"].astype("category")
    return adata


def _sdata(adata):
    """Circles at the cells' coordinates (shuffled, ids that are not row positions), annotated by
    the table ``TABLE`` without coordinates, and a second table ``"other"``."""
    import geopandas as gpd
    from shapely.geometry import Point
    from spatialdata.models import ShapesModel, TableModel

    xy = adata.obsm["spatial"]
    ids = np.arange(adata.n_obs) + 100
    order = np.random.default_rng(1).permutation(adata.n_obs)
    circles = gpd.GeoDataFrame(
        {"radius": np.ones(adata.n_obs)}, geometry=[Point(*xy[i]) for i in order], index=ids[order]
    )
    table = adata.copy()
    del table.obsm["spatial"]
    table.obs["region"] = pd.Categorical(["cells"] * adata.n_obs)
    table.obs["cell_id"] = ids
    table = TableModel.parse(table, region="cells", region_key="region", instance_key="cell_id")
    return spatialdata.SpatialData(
        shapes={"cells": ShapesModel.parse(circles)}, tables={TABLE: table, "other": table.copy()}
    )


@pytest.fixture(scope="module")
def fitted():
    """(adata, sdata, model of the AnnData fit, model of the SpatialData fit), fitted once the same way."""
    adata = _adata()
    sdata = _sdata(adata)
    sfact.pp.prepare(adata, group_key="group")
    sfact.pp.prepare(sdata, table_key=TABLE, group_key="group")
    m_adata = sfact.tl.fit(adata, return_model=True, **FIT)
    m_sdata = sfact.tl.fit(sdata, table_key=TABLE, return_model=True, **FIT)
    sfact.tl.groupwise_factors(adata, m_adata)
    sfact.tl.groupwise_factors(sdata, m_sdata, table_key=TABLE)
    sfact.tl.select_model(adata, **SELECT)
    sfact.tl.select_model(sdata, table_key=TABLE, **SELECT)
    table = sdata.tables[TABLE]
    assert np.array_equal(table.obsm["X_sfact"], adata.obsm["X_sfact"])  # the same fit: same plots
    assert np.array_equal(table.obsm["X_sfact_groupwise"], adata.obsm["X_sfact_groupwise"])
    assert "sfact_selection" in table.uns and "sfact_selection" not in sdata.tables["other"].uns
    return adata, sdata, m_adata, m_sdata


# every public plot that reads a fit, with the arguments it needs
PLOTS = {
    "factors": {},
    "scales": {},
    "factors_with_genes": {"n_genes": 2},
    "groupwise_factors": {},
    "inducing_points": {},
    "elbo": {},
    "moran": {},
    "loadings": {"n_genes": 3},
    "top_genes": {"n_genes": 3},
    "gene_enrichment": {"n_genes": 3},
    "enrichment_by_group": {"n_genes": 3},
    "enrichment_by_factor": {"n_genes": 3},
    "model_selection": {"key": "sfact_selection"},
}
GETTERS = ["factors_df", "loadings_df", "top_genes", "factors_adata", "history"]


def test_every_plot_reading_an_anndata_is_covered():
    import inspect

    readers = {n for n in sfact.pl.__all__ if "adata" in inspect.signature(getattr(sfact.pl, n)).parameters}
    assert readers - {"report"} == set(PLOTS)  # report: tested on its own below
    assert set(sfact.get.__all__) == set(GETTERS)


def _drawn(fig) -> list:
    """What each axes of ``fig`` draws: title, labels, tick labels, and the data of its artists."""
    out = []
    for ax in fig.axes:
        item = [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        item.append(
            [t.get_text() for t in ax.get_yticklabels()] + [t.get_text() for t in ax.get_xticklabels()]
        )
        for c in ax.collections:
            item.append(np.asarray(c.get_offsets(), dtype=float))
            arr = c.get_array()
            item.append(None if arr is None else np.ma.filled(np.asarray(arr, dtype=float), np.nan))
            item.append(np.asarray(c.get_facecolors(), dtype=float))
        item += [np.ma.filled(np.ma.asarray(im.get_array(), dtype=float), np.nan) for im in ax.images]
        item += [np.asarray(line.get_xydata(), dtype=float) for line in ax.lines]
        item += [np.asarray(p.get_path().vertices, dtype=float) for p in ax.patches]  # bars
        item += [t.get_text() for t in ax.texts]
        out.append(item)
    return out


def _assert_same(a, b):
    assert type(a) is type(b) or (a is None) == (b is None)
    if isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("name", list(PLOTS))
def test_plot_of_the_spatialdata_draws_what_the_anndata_draws(fitted, name):
    adata, sdata, _, _ = fitted
    plot = getattr(sfact.pl, name)
    fig_a = plot(adata, return_fig=True, **PLOTS[name])
    fig_s = plot(sdata, table_key=TABLE, return_fig=True, **PLOTS[name])
    try:
        drawn_a, drawn_s = _drawn(fig_a), _drawn(fig_s)
        assert len(drawn_a) == len(drawn_s) > 0
        assert sum(len(d) for d in drawn_a) > 4 * len(drawn_a)  # something was drawn and compared
        _assert_same(drawn_a, drawn_s)
    finally:
        plt.close(fig_a)
        plt.close(fig_s)


@pytest.mark.parametrize("name", list(PLOTS))
def test_plot_with_a_bad_table_key_raises(fitted, name):
    adata, sdata, _, _ = fitted
    plot = getattr(sfact.pl, name)
    open_figures = plt.get_fignums()
    with pytest.raises(KeyError, match=rf"table_key='nope'.*'{TABLE}', 'other'.*pass one of them"):
        plot(sdata, table_key="nope", show=False, **PLOTS[name])
    with pytest.raises(ValueError, match=r"2 tables .*pass `table_key=`"):
        plot(sdata, show=False, **PLOTS[name])
    with pytest.raises(ValueError, match=r"only for a SpatialData.*drop `table_key=`"):
        plot(adata, table_key=TABLE, show=False, **PLOTS[name])
    assert plt.get_fignums() == open_figures  # the check comes before any figure


def test_report_of_the_spatialdata(fitted, tmp_path):
    adata, sdata, _, _ = fitted
    with pytest.raises(KeyError, match=r"table_key='nope'"):
        sfact.pl.report(sdata, tmp_path / "bad" / "r.html", table_key="nope")
    assert not (tmp_path / "bad").exists()  # nothing written
    path = sfact.pl.report(sdata, tmp_path / "r.html", table_key=TABLE)
    html = path.read_text()
    assert html.count("data:image/png;base64,") >= 3  # ELBO, factor maps, top genes at least
    assert adata.uns["sfact"]["params"]["prior"] in html


@pytest.mark.parametrize("name", GETTERS)
def test_getter_of_the_spatialdata_returns_what_the_anndata_gives(fitted, name):
    adata, sdata, _, _ = fitted
    get = getattr(sfact.get, name)
    other_obsm = set(sdata.tables["other"].obsm)
    a, s = get(adata), get(sdata, table_key=TABLE)
    if name == "factors_adata":
        np.testing.assert_array_equal(a.X, s.X)
        pd.testing.assert_frame_equal(a.var, s.var)
        assert list(a.obs_names) == list(s.obs_names)
    else:  # the history's wall times are the two fits' own
        pd.testing.assert_frame_equal(
            a.drop(columns="time", errors="ignore"), s.drop(columns="time", errors="ignore")
        )
    with pytest.raises(KeyError, match=r"table_key='nope'"):
        get(sdata, table_key="nope")
    assert set(sdata.tables["other"].obsm) == other_obsm  # getters never write (no centroids either)


def test_tools_take_the_spatialdata(fitted):
    adata, sdata, m_adata, _ = fitted
    pd.testing.assert_frame_equal(sfact.tl.morans_i(adata), sfact.tl.morans_i(sdata, table_key=TABLE))
    _, test_a = sfact.tl.heldout_split(adata, fraction=0.1)
    _, test_s = sfact.tl.heldout_split(sdata, fraction=0.1, table_key=TABLE)
    assert list(test_a.obs_names) == list(test_s.obs_names)
    np.testing.assert_array_equal(test_s.obsm["spatial"], test_a.obsm["spatial"])
    assert sfact.tl.knn_deviance(adata, test_a) == sfact.tl.knn_deviance(sdata, test_a, table_key=TABLE)
    # the model predicts the SpatialData's table as it predicts the AnnData
    expected = sfact.tl.heldout_deviance(m_adata, adata)
    assert sfact.tl.heldout_deviance(m_adata, sdata, table_key=TABLE) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(KeyError, match=r"table_key='nope'"):
        sfact.tl.morans_i(sdata, table_key="nope")
    with pytest.raises(ValueError, match=r"only for a SpatialData"):
        sfact.tl.knn_deviance(adata, test_a, table_key=TABLE)
    # writers (on copies: the module's fit stays as it is): into the chosen table only
    g_a = sfact.tl.group_loadings(adata, groups=["g0"], copy=True)
    g_s = sfact.tl.group_loadings(sdata, table_key=TABLE, groups=["g0"], copy=True)
    assert list(g_s.tables[TABLE].uns["sfact"]["group_loadings"]["groups"]) == ["g0"]
    np.testing.assert_array_equal(g_s.tables[TABLE].varm["sfact_loadings_g0"], g_a.varm["sfact_loadings_g0"])
    e_a = sfact.tl.gene_enrichment(adata, group_key="group", n_top=3, copy=True)
    e_s = sfact.tl.gene_enrichment(sdata, table_key=TABLE, group_key="group", n_top=3, copy=True)
    enr_a, enr_s = e_a.uns["sfact"]["enrichment"], e_s.tables[TABLE].uns["sfact"]["enrichment"]
    np.testing.assert_array_equal(enr_s["log2fc"], enr_a["log2fc"])
    pd.testing.assert_frame_equal(enr_s["top_genes"], enr_a["top_genes"])
    assert all("sfact" not in sd.tables["other"].uns for sd in (sdata, g_s, e_s))


# ---------------------------------------------------------------------------- copy=True
def test_copy_returns_a_deep_copy_of_the_spatialdata_and_leaves_the_original():
    adata = _adata()
    sdata = _sdata(adata)
    out = sfact.pp.prepare(sdata, table_key=TABLE, group_key="group", copy=True)
    assert is_spatialdata(out) and out is not sdata
    assert "sfact_prepare" in out.tables[TABLE].uns
    # the original is as it was: not prepared, no centroids written into its table
    assert "sfact_prepare" not in sdata.tables[TABLE].uns
    assert "spatial" not in sdata.tables[TABLE].obsm

    fitted = sfact.tl.fit(out, table_key=TABLE, copy=True, **FIT)
    assert is_spatialdata(fitted) and "X_sfact" in fitted.tables[TABLE].obsm
    assert "X_sfact" not in out.tables[TABLE].obsm
    assert set(fitted.shapes) == {"cells"} and set(fitted.tables) == {TABLE, "other"}

    again, model = sfact.tl.fit(out, table_key=TABLE, copy=True, return_model=True, **FIT)
    assert is_spatialdata(again) and model.adata is again.tables[TABLE]
    np.testing.assert_array_equal(again.tables[TABLE].obsm["X_sfact"], fitted.tables[TABLE].obsm["X_sfact"])

    analysed = sfact.tl.analyze(fitted, model, table_key=TABLE, key_added="again", copy=True)
    assert "X_again" in analysed.tables[TABLE].obsm and "X_again" not in fitted.tables[TABLE].obsm
    grouped = sfact.tl.group_loadings(fitted, table_key=TABLE, groups=["g1"], copy=True)
    assert list(grouped.tables[TABLE].uns["sfact"]["group_loadings"]["groups"]) == ["g1"]
    assert list(fitted.tables[TABLE].uns["sfact"]["group_loadings"]["groups"]) != ["g1"]
    enriched = sfact.tl.gene_enrichment(fitted, table_key=TABLE, group_key="group", copy=True)
    assert is_spatialdata(enriched)
    gw = sfact.tl.groupwise_factors(fitted, model, table_key=TABLE, copy=True)
    assert (
        "X_sfact_groupwise" in gw.tables[TABLE].obsm and "X_sfact_groupwise" not in fitted.tables[TABLE].obsm
    )

    # an AnnData copy stays an AnnData
    assert type(sfact.pp.prepare(adata, copy=True)).__name__ == "AnnData"


def test_copy_with_a_bad_table_key_raises_before_copying(monkeypatch):
    sdata = _sdata(_adata())

    def no_copy(_):
        raise AssertionError("copied before checking table_key")

    monkeypatch.setattr(spatialdata, "deepcopy", no_copy)
    with pytest.raises(KeyError, match=r"table_key='nope'"):
        sfact.pp.prepare(sdata, table_key="nope", copy=True)
    with pytest.raises(ValueError, match=r"2 tables"):
        sfact.tl.fit(sdata, copy=True, **FIT)


# ---------------------------------------------------------------------------- labels
def _labels_sdata(n=12):
    """A labels raster of ``n`` 4x3-pixel cells (non-consecutive label values), in a ``global`` and
    a ``microns`` (half-size) coordinate system, annotated by a table in another row order; and the
    cells' pixel centres (x, y) in the table's row order."""
    import anndata as ad
    from spatialdata.models import Labels2DModel, TableModel
    from spatialdata.transformations import Identity, Scale

    rng = np.random.default_rng(0)
    img = np.zeros((20, 30), dtype=np.int32)
    ids = rng.permutation(np.arange(1, n + 1)) * 7
    centres = []
    for k in range(n):
        r0, c0 = 2 + 5 * (k // 4), 2 + 6 * (k % 4)
        img[r0 : r0 + 3, c0 : c0 + 4] = ids[k]
        centres.append((c0 + 2.0, r0 + 1.5))  # the middle of pixels c0..c0+3, r0..r0+2
    labels = Labels2DModel.parse(
        img,
        dims=("y", "x"),
        transformations={"global": Identity(), "microns": Scale([0.5, 0.5], axes=("y", "x"))},
    )
    order = rng.permutation(n)
    obs = pd.DataFrame(
        {"region": pd.Categorical(["seg"] * n), "label_id": ids[order]}, index=[f"c{i}" for i in range(n)]
    )
    table = ad.AnnData(X=rng.poisson(3.0, (n, 6)).astype(np.float32), obs=obs)
    table = TableModel.parse(table, region="seg", region_key="region", instance_key="label_id")
    sdata = spatialdata.SpatialData(labels={"seg": labels}, tables={"table": table})
    return sdata, np.asarray(centres)[order]


def test_centroids_of_a_labels_raster():
    sdata, centres = _labels_sdata()
    sfact.pp.prepare(sdata, min_group_size=None)  # the only table, centroids in "global"
    table = sdata.tables["table"]
    np.testing.assert_allclose(table.obsm["spatial"], centres)  # matched by label value, not row
    assert table.obsm["spatial_sfact"].max() == pytest.approx(100.0)

    sdata, centres = _labels_sdata()
    np.testing.assert_allclose(resolve_table(sdata, coordinate_system="microns").obsm["spatial"], centres / 2)
