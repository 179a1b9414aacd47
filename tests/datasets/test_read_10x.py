"""``sfact.datasets.read`` on Xenium, Visium and Visium HD folders written in 10x's documented layouts.

The folders are written file by file by ``vendor_layouts.py`` (no mock of a reader) and read by
spatialdata-io's own readers; each test checks the exact counts, order and coordinates written.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import sfact
from sfact._cli import main

pytest.importorskip("spatialdata_io")
spatialdata = pytest.importorskip("spatialdata")


def _layouts():
    """The writers module next to this file (the tests are imported by path, not as a package)."""
    name = "sfact_tests_vendor_layouts"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("vendor_layouts.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


layouts = _layouts()

GENES = [f"Gene{i:02d}" for i in range(12)]
N_CELLS = 60
FIT = {"prior": "svgp", "n_factors": 2, "max_iter": 5, "random_state": 0, "progress_bar": False}


def _counts(rng, shape, lam=2.0):
    return rng.poisson(lam, size=shape).astype(np.int64)


@pytest.fixture(scope="module")
def xenium(tmp_path_factory):
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("xenium") / "output-XETG00000__0011111__tiny__20240101"
    centroids = np.round(rng.uniform(0.0, 400.0, size=(N_CELLS, 2)), 4)
    truth = layouts.write_xenium(folder, _counts(rng, (N_CELLS, len(GENES))), GENES, centroids)
    return folder, truth


@pytest.fixture(scope="module")
def visium(tmp_path_factory):
    rng = np.random.default_rng(1)
    n = 36
    array_rc = np.column_stack([np.arange(n) // 6, 2 * (np.arange(n) % 6) + (np.arange(n) // 6) % 2])
    # the Visium lattice: spots 100 µm apart, about 138 px in a full-resolution image
    positions = np.column_stack([1500 + 69.0 * array_rc[:, 1], 900 + 119.5 * array_rc[:, 0]])
    folder = tmp_path_factory.mktemp("visium") / "V1_Tiny_Sample" / "outs"
    truth = layouts.write_visium(folder, _counts(rng, (n, len(GENES))), GENES, positions, array_rc)
    return folder, truth


@pytest.fixture(scope="module")
def visium_hd(tmp_path_factory):
    rng = np.random.default_rng(2)
    grid = _counts(rng, (8, 6, len(GENES)), lam=1.0)
    in_tissue = np.ones((8, 6), dtype=bool)
    in_tissue[:2, :2] = False  # one 16 µm bin (four 8 µm bins) outside the tissue
    grid[~in_tissue] = 0
    boxes = np.array([[1200, 800, 1260, 850], [1300, 820, 1340, 900], [1210, 900, 1290, 950]], dtype=float)
    cells = (_counts(rng, (3, len(GENES)), lam=3.0), boxes)
    folder = tmp_path_factory.mktemp("visium_hd") / "Visium_HD_Tiny" / "outs"
    truth = layouts.write_visium_hd(folder, grid, GENES, in_tissue=in_tissue, cells=cells)
    return folder, truth


def _check(adata, truth, names_key, technology, table_key):
    assert sp.issparse(adata.X) and adata.X.format == "csr" and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), truth["counts"])
    assert list(adata.obs_names) == list(truth[names_key])
    assert list(adata.var_names) == truth["genes"]
    coords = adata.obsm["spatial"]
    assert coords.dtype == np.float64 and coords.shape == (adata.n_obs, 2)
    np.testing.assert_array_equal(coords, truth["positions" if "positions" in truth else "centroids"])
    record = adata.uns["sfact_read"]
    assert record["technology"] == technology and record["table_key"] == table_key


# --------------------------------------------------------------------------------------------
# Xenium


@pytest.mark.parametrize("technology", ["auto", "xenium"])
def test_xenium_cells_with_their_micrometre_centroids(xenium, technology):
    folder, truth = xenium
    adata = sfact.datasets.read(folder, technology)
    # the control probes and codewords of the matrix are not genes: dropped
    _check(adata, truth, "cell_ids", "xenium", "table")
    assert adata.obs["cell_area"].notna().all()


def test_xenium_through_load_and_detect(xenium):
    folder, truth = xenium
    assert sfact.datasets.detect_technology(folder) == "xenium"
    adata = sfact.datasets.load("xenium", path=folder)
    np.testing.assert_array_equal(adata.X.toarray(), truth["counts"])
    np.testing.assert_array_equal(adata.obsm["spatial"], truth["centroids"])


def test_xenium_folder_without_its_cell_files_names_the_file(xenium, tmp_path):
    folder, _ = xenium
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("experiment.xenium", "cell_feature_matrix.h5", "cells.zarr.zip"):
        (partial / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(ValueError, match=r"no `cells.parquet`.*complete Xenium output folder"):
        sfact.datasets.read(partial)


# --------------------------------------------------------------------------------------------
# Visium


@pytest.mark.parametrize("technology", ["auto", "visium"])
def test_visium_spots_under_tissue_in_matrix_order(visium, technology):
    folder, truth = visium
    adata = sfact.datasets.read(folder, technology)
    # the positions file lists 5 more spots (outside the tissue) in another order: not read
    _check(adata, truth, "barcodes", "visium", "table")
    assert (adata.obs["in_tissue"] == 1).all()
    np.testing.assert_array_equal(adata.obs[["array_row", "array_col"]].to_numpy().max(axis=0), [5, 11])


@pytest.mark.parametrize(
    ("variant", "kwargs"),
    [("space ranger 1.x", {"spaceranger_v1": True}), ("prefixed matrix", {"library_prefix": "V1_Tiny"})],
)
def test_visium_older_and_renamed_layouts(tmp_path, variant, kwargs):
    rng = np.random.default_rng(3)
    n = 12
    array_rc = np.column_stack([np.arange(n) // 4, 2 * (np.arange(n) % 4)])
    positions = np.column_stack([700 + 69.0 * array_rc[:, 1], 500 + 119.5 * array_rc[:, 0]])
    truth = layouts.write_visium(
        tmp_path / "outs", _counts(rng, (n, len(GENES))), GENES, positions, array_rc, images=False, **kwargs
    )
    adata = sfact.datasets.read(tmp_path / "outs")
    _check(adata, truth, "barcodes", "visium", "table")


def test_visium_parent_of_outs_names_the_outs_folder(visium):
    folder, _ = visium
    with pytest.raises(ValueError, match=r"subfolder.*pass '.*V1_Tiny_Sample/outs'"):
        sfact.datasets.read(folder.parent)


# --------------------------------------------------------------------------------------------
# Visium HD


@pytest.mark.parametrize("technology", ["auto", "visium_hd"])
def test_visium_hd_reads_the_16um_bins_by_default(visium_hd, technology):
    folder, truth = visium_hd
    adata = sfact.datasets.read(folder, technology)
    # 12 bins of 16 µm, one outside the tissue; the cell segmentation is also read but not taken
    assert adata.n_obs == 11
    _check(adata, truth[16], "barcodes", "visium_hd", "square_016um")


def test_visium_hd_bin_size(visium_hd):
    folder, truth = visium_hd
    adata = sfact.datasets.read(folder, bin_size=8)
    _check(adata, truth[8], "barcodes", "visium_hd", "square_008um")
    # the 16 µm bins are the sums of the 8 µm bins they cover, at their centres
    again = sfact.datasets.load("visium_hd", path=folder, bin_size=[8, 16], table_key="square_016um")
    _check(again, truth[16], "barcodes", "visium_hd", "square_016um")


def test_visium_hd_several_bin_sizes_need_a_table_key(visium_hd):
    folder, _ = visium_hd
    with pytest.raises(
        ValueError, match=r"3 tables \(.*'square_008um'.*'square_016um'.*\): pass `table_key=`"
    ):
        sfact.datasets.read(folder, bin_size=[8, 16])
    with pytest.raises(ValueError, match=r"`bin_size=4`.*bins of \[8, 16\] µm"):
        sfact.datasets.read(folder, bin_size=4)


def test_visium_hd_segmented_cells_at_their_polygons_centroids(visium_hd):
    folder, truth = visium_hd
    adata = sfact.datasets.read(folder, load_segmentations_only=True)
    # no obsm['spatial'] in this table: the centroids of the cells' polygons, in full-resolution
    # image pixels (the coordinate system the polygons are in, not the downscaled images' ones)
    _check(adata, truth["cells"], "barcodes", "visium_hd", "cell_segmentations")


# --------------------------------------------------------------------------------------------
# Bad input


def test_bad_paths_and_technologies(visium, tmp_path):
    folder, _ = visium
    with pytest.raises(FileNotFoundError, match=r"No such folder.*Pass the folder the instrument"):
        sfact.datasets.read(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"looks like visium output.*technology='visium'"):
        sfact.datasets.read(folder, technology="xenium")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        ValueError, match=r"holds none of the files sfact recognizes.*xenium: experiment.xenium"
    ):
        sfact.datasets.read(empty)
    with pytest.raises(ValueError, match=r"is a file; pass the output folder that holds it"):
        sfact.datasets.read(folder / "filtered_feature_bc_matrix.h5")
    with pytest.raises(KeyError, match=r"Unknown `technology='visum'`"):
        sfact.datasets.read(folder, technology="visum")


def test_hd_folder_is_not_read_as_visium(visium_hd):
    folder, _ = visium_hd
    with pytest.raises(ValueError, match=r"looks like visium_hd output.*technology='visium_hd'"):
        sfact.datasets.read(folder, technology="visium")


# --------------------------------------------------------------------------------------------
# Prepare, fit, write back; the command line


@pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning")  # anndata, while writing
def test_fit_the_read_spatialdata_and_write_it_back(xenium, tmp_path):
    folder, truth = xenium
    sdata = sfact.datasets.read(folder, return_spatialdata=True)
    table = sdata.tables["table"]
    assert table.uns["sfact_read"]["technology"] == "xenium"
    # the table annotates the cells' circles (made from cells.parquet); the 'global' coordinate
    # system is the morphology image's pixels, the table's obsm['spatial'] micrometres
    assert table.uns["spatialdata_attrs"]["region"] == "cell_circles"
    pixels = spatialdata.get_centroids(sdata["cell_circles"], coordinate_system="global").compute()
    np.testing.assert_allclose(pixels[["x", "y"]].to_numpy() * 0.2125, truth["centroids"], rtol=1e-9)

    sfact.pp.prepare(sdata, table_key="table")
    sfact.tl.fit(sdata, table_key="table", **FIT)
    assert table.obsm["X_sfact"].shape == (N_CELLS, 2)
    np.testing.assert_array_equal(table.obsm["spatial"], truth["centroids"])  # never modified

    path = tmp_path / "x.zarr"
    sdata.write(path)
    back = spatialdata.read_zarr(path).tables["table"]
    np.testing.assert_allclose(back.obsm["X_sfact"], table.obsm["X_sfact"])
    np.testing.assert_allclose(back.varm["sfact_loadings"], table.varm["sfact_loadings"])
    assert list(back.uns["sfact"]["factor_names"]) == list(table.uns["sfact"]["factor_names"])
    assert back.uns["sfact_read"]["technology"] == "xenium"


def test_prepare_takes_the_read_tables(visium, visium_hd):
    for folder, _ in (visium, visium_hd):
        adata = sfact.datasets.read(folder)
        n = adata.n_obs
        sfact.pp.prepare(adata)
        assert adata.n_obs == n and "spatial_sfact" in adata.obsm


@pytest.mark.parametrize("source", ["loader: xenium", "reader: auto", "reader: xenium"])
def test_command_line_preprocess_reads_a_xenium_folder(xenium, tmp_path, capsys, source):
    import anndata as ad

    folder, truth = xenium
    (tmp_path / "c.yaml").write_text(
        f"name: tiny_xenium\ndataset: {{{source}, path: '{folder}'}}\noutput_dir: out\n"
    )
    assert main(["preprocess", "-c", str(tmp_path / "c.yaml"), "--executor", "serial"]) == 0
    prepared = ad.read_h5ad(tmp_path / "out" / "prepared.h5ad")
    np.testing.assert_array_equal(prepared.X.toarray(), truth["counts"])
    np.testing.assert_array_equal(prepared.obsm["spatial"], truth["centroids"])
    assert prepared.uns["sfact_read"]["technology"] == "xenium"


def test_command_line_reader_of_another_technology_fails_and_writes_nothing(visium, tmp_path, capsys):
    folder, _ = visium
    (tmp_path / "c.yaml").write_text(
        f"name: v\ndataset: {{reader: xenium, path: '{folder}'}}\noutput_dir: out\n"
    )
    assert main(["preprocess", "-c", str(tmp_path / "c.yaml"), "--executor", "serial"]) == 1
    assert "technology='visium'" in capsys.readouterr().out + "".join(
        p.read_text() for p in (tmp_path / "out" / "logs").glob("*.log")
    )
    assert not (tmp_path / "out" / "prepared.h5ad").exists()
