"""SpatialData in and out: fit a table of a SpatialData, coordinates from the shapes it annotates."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import sfact
from sfact._spatialdata import is_spatialdata, resolve_table

spatialdata = pytest.importorskip("spatialdata")

FIT = {"prior": "svgp", "n_factors": 2, "max_iter": 5, "random_state": 0, "progress_bar": False}


def _adata():
    adata = sfact.datasets.simulate(n_obs=200, n_vars=20, n_factors=2, random_state=0)
    adata.obs["group"] = adata.obs["group"].astype("category")
    return adata


def _sdata(adata, *, shuffle=True, table_key="table", extra_tables=()):
    """A SpatialData with circles at the cells' coordinates, annotated by a table without coordinates."""
    import geopandas as gpd
    from shapely.geometry import Point
    from spatialdata.models import ShapesModel, TableModel

    xy = adata.obsm["spatial"]
    ids = np.arange(adata.n_obs) + 100  # instance ids that are not row positions
    order = np.random.default_rng(1).permutation(adata.n_obs) if shuffle else np.arange(adata.n_obs)
    circles = gpd.GeoDataFrame(
        {"radius": np.ones(adata.n_obs)},
        geometry=[Point(*xy[i]) for i in order],
        index=ids[order],
    )
    shapes = ShapesModel.parse(circles)
    table = adata.copy()
    del table.obsm["spatial"]
    table.obs["region"] = "cells"
    table.obs["region"] = table.obs["region"].astype("category")
    table.obs["cell_id"] = ids
    table = TableModel.parse(table, region="cells", region_key="region", instance_key="cell_id")
    tables = {table_key: table, **{k: table.copy() for k in extra_tables}}
    return spatialdata.SpatialData(shapes={"cells": shapes}, tables=tables)


def test_import_sfact_does_not_import_spatialdata():
    code = "import sys, sfact; print('spatialdata' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_is_spatialdata():
    adata = _adata()
    assert not is_spatialdata(adata)
    assert is_spatialdata(_sdata(adata))


def test_centroids_match_rows_by_instance_key():
    adata = _adata()
    sdata = _sdata(adata, shuffle=True)
    table = resolve_table(sdata)
    assert table is sdata.tables["table"]  # the table itself, not a copy
    np.testing.assert_allclose(table.obsm["spatial"], adata.obsm["spatial"])


def test_existing_coordinates_are_used_and_not_modified():
    adata = _adata()
    sdata = _sdata(adata)
    sdata.tables["table"].obsm["spatial"] = adata.obsm["spatial"] * 2.0
    table = resolve_table(sdata)
    np.testing.assert_allclose(table.obsm["spatial"], adata.obsm["spatial"] * 2.0)


@pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning")  # anndata, while writing
def test_fit_from_shape_centroids_equals_fit_from_obsm(tmp_path):
    adata = _adata()
    sdata = _sdata(adata)
    sfact.pp.prepare(adata)
    sfact.pp.prepare(sdata)
    sfact.tl.fit(adata, **FIT)
    sfact.tl.fit(sdata, **FIT)
    table = sdata.tables["table"]
    np.testing.assert_allclose(table.obsm["X_sfact"], adata.obsm["X_sfact"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(table.varm["sfact_loadings"], adata.varm["sfact_loadings"], rtol=1e-5)
    assert "sfact" in table.uns and "moranI" in table.uns["sfact"]

    # the plots take the SpatialData too
    fig = sfact.pl.factors(sdata, return_fig=True, show=False)
    assert len(fig.axes) >= 2
    sfact.pl.scales(sdata, show=False)

    # written with the SpatialData, read back: results present
    path = tmp_path / "x.zarr"
    sdata.write(path)
    back = spatialdata.read_zarr(path)
    read = back.tables["table"]
    np.testing.assert_allclose(read.obsm["X_sfact"], adata.obsm["X_sfact"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(read.obsm["spatial"], adata.obsm["spatial"])
    assert list(read.uns["sfact"]["factor_names"]) == list(adata.uns["sfact"]["factor_names"])


def test_analyze_takes_the_spatialdata():
    adata = _adata()
    sdata = _sdata(adata, table_key="cells_table", extra_tables=("other",))
    model = sfact.tl.fit(sdata, table_key="cells_table", return_model=True, **FIT)
    table = sdata.tables["cells_table"]
    before = table.obsm["X_sfact"].copy()
    del table.obsm["X_sfact"]
    sfact.tl.analyze(sdata, model, table_key="cells_table", key_added="again")
    np.testing.assert_allclose(table.obsm["X_again"], before, rtol=1e-5, atol=1e-7)
    assert "X_sfact" not in sdata.tables["other"].obsm


def test_several_tables_without_table_key_raise_and_write_nothing():
    sdata = _sdata(_adata(), extra_tables=("other",))
    with pytest.raises(ValueError, match=r"2 tables \('table', 'other'\).*table_key="):
        sfact.pp.prepare(sdata)
    with pytest.raises(KeyError, match=r"table_key='nope'.*'table', 'other'"):
        sfact.tl.fit(sdata, table_key="nope", **FIT)
    assert all("spatial" not in t.obsm for t in sdata.tables.values())


def test_table_without_coordinates_or_element_raises():
    from spatialdata.models import TableModel

    table = _adata()
    del table.obsm["spatial"]
    sdata = spatialdata.SpatialData(tables={"table": TableModel.parse(table)})
    with pytest.raises(ValueError, match=r"no `obsm\['spatial'\]` and annotates no shapes or labels"):
        sfact.tl.fit(sdata, **FIT)
    assert "spatial" not in sdata.tables["table"].obsm


def test_table_key_with_an_anndata_raises():
    with pytest.raises(ValueError, match=r"only for a SpatialData.*drop `table_key=`"):
        sfact.pp.prepare(_adata(), table_key="table")


def test_unknown_coordinate_system_raises():
    sdata = _sdata(_adata())
    with pytest.raises(ValueError, match=r"coordinate_system='aligned'.*\['global'\]"):
        resolve_table(sdata, coordinate_system="aligned")


def test_prepare_takes_centroids_in_the_chosen_coordinate_system():
    from spatialdata.transformations import Identity, Scale, set_transformation

    adata = _adata()
    sdata = _sdata(adata)
    set_transformation(
        sdata["cells"], {"global": Identity(), "microns": Scale([0.5, 0.5], axes=("x", "y"))}, set_all=True
    )
    with pytest.raises(ValueError, match=r"coordinate_system='aligned'.*\['global', 'microns'\]"):
        sfact.pp.prepare(sdata, coordinate_system="aligned")
    assert "spatial" not in sdata.tables["table"].obsm  # nothing written
    sfact.pp.prepare(sdata, coordinate_system="microns", min_group_size=None)
    np.testing.assert_allclose(sdata.tables["table"].obsm["spatial"], adata.obsm["spatial"] * 0.5)
