"""`sfact.datasets.read` on MERSCOPE, CosMx and Stereo-seq folders written in the vendors' layouts.

The folders are written file by file by ``vendor_layouts_fish.py`` and read by spatialdata-io's
own readers (nothing mocked); the tests check the exact counts (cell and gene order) and
coordinates that come back, and the errors for folders that are not what the reader needs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

pytest.importorskip("spatialdata_io")

import sfact

_spec = importlib.util.spec_from_file_location(
    "vendor_layouts_fish", Path(__file__).with_name("vendor_layouts_fish.py")
)
layouts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layouts)

GENES = [
    "Gad1",
    "Slc17a7",
    "Sst",
    "Pvalb",
    "Vip",
    "Aqp4",
    "Mbp",
    "Pdgfra",
    "Cx3cr1",
    "Cldn5",
    "Rorb",
    "Calb2",
]


def _dense(X) -> np.ndarray:
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def _check_table(adata, expected, coords) -> None:
    """The AnnData `read` returns: CSR float32 counts in the written cell and gene order, 2D float64 coordinates."""
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    assert list(adata.obs_names) == list(expected["cell_ids"])
    assert list(adata.var_names) == list(expected["genes"])
    np.testing.assert_array_equal(_dense(adata.X), expected["counts"])
    assert adata.obsm["spatial"].dtype == np.float64 and adata.obsm["spatial"].shape == (adata.n_obs, 2)
    np.testing.assert_array_equal(adata.obsm["spatial"], coords)


# --- MERSCOPE ---------------------------------------------------------------------------------


@pytest.fixture
def merscope(tmp_path):
    rng = np.random.default_rng(1)
    n = 40
    counts = rng.poisson(2.0, size=(n, len(GENES)))
    centres = np.round(np.column_stack([rng.uniform(1500, 2500, n), rng.uniform(3000, 3800, n)]), 3)
    folder = tmp_path / "202305011200_sfact-test_VMSC00101" / "region_0"
    return folder, layouts.write_merscope(folder, counts, GENES, centres)


@pytest.mark.parametrize("technology", ["auto", "merscope"])
def test_merscope_counts_and_micrometre_centres(merscope, technology):
    folder, expected = merscope
    adata = sfact.datasets.read(folder, technology)
    # the Blank-* barcodes are not genes: out of X and var (one of them was written among the genes)
    _check_table(adata, expected, expected["centres"])
    assert adata.uns["sfact_read"]["technology"] == "merscope"
    # EntityIDs (19 digits) are kept as written, not parsed as numbers
    assert adata.obs_names[0] == expected["cell_ids"][0] and len(adata.obs_names[0]) == 19


def test_merscope_blanks_stay_in_the_spatialdata(merscope):
    folder, expected = merscope
    sdata = sfact.datasets.read(folder, return_spatialdata=True)
    table = sdata.tables["table"]
    assert list(table.obsm["blank"].columns) == expected["blanks"]
    np.testing.assert_array_equal(table.obsm["blank"].to_numpy(), expected["blank_counts"])
    np.testing.assert_array_equal(np.asarray(table.obsm["spatial"], dtype=float), expected["centres"])


def test_merscope_folder_read_as_cosmx_names_merscope(merscope):
    folder, _ = merscope
    with pytest.raises(ValueError, match=r"looks like merscope output.*technology='merscope'"):
        sfact.datasets.read(folder, "cosmx")


def test_merscope_run_folder_names_the_region_folder(merscope):
    folder, _ = merscope
    with pytest.raises(ValueError, match=r"subfolder.*region_0"):
        sfact.datasets.read(folder.parent)


def test_merscope_without_the_transform_file(merscope):
    folder, _ = merscope
    (folder / "images" / "micron_to_mosaic_pixel_transform.csv").unlink()
    with pytest.raises(ValueError, match=r"images/micron_to_mosaic_pixel_transform\.csv"):
        sfact.datasets.read(folder)


def test_merscope_renamed_files_through_vpt_outputs(merscope):
    folder, expected = merscope
    (folder / "cell_by_gene.csv").rename(folder / "mouse_brain_cell_by_gene_S1R1.csv")
    (folder / "cell_metadata.csv").rename(folder / "mouse_brain_cell_metadata_S1R1.csv")
    with pytest.raises(ValueError, match=r"mouse_brain_cell_by_gene_S1R1\.csv.*vpt_outputs="):
        sfact.datasets.read(folder)
    adata = sfact.datasets.read(
        folder,
        vpt_outputs={
            "cell_by_gene": "mouse_brain_cell_by_gene_S1R1.csv",
            "cell_metadata": "mouse_brain_cell_metadata_S1R1.csv",
        },
    )
    _check_table(adata, expected, expected["centres"])


# --- CosMx ------------------------------------------------------------------------------------


@pytest.fixture
def cosmx_layout():
    """Three FOVs of 12 cells at distinct, non-collinear local pixels; FOV origins side by side."""
    rng = np.random.default_rng(2)
    width, height = layouts.COSMX_FOV_SIZE
    grid = np.array([(x, y) for x in range(3, width - 3, 5) for y in range(3, height - 3, 5)])
    fovs, local = [], []
    for fov in (1, 2, 3):
        local.append(grid[rng.choice(len(grid), size=12, replace=False)])
        fovs += [fov] * 12
    local = np.concatenate(local)
    counts = rng.poisson(2.0, size=(len(fovs), 10))
    positions = {1: (20000.0, 40000.0), 2: (20000.0 + width, 40000.0), 3: (20000.0, 40000.0 + height)}
    return counts, GENES[:10], fovs, local, positions


@pytest.fixture
def cosmx(tmp_path, cosmx_layout):
    folder = tmp_path / "Lung_S1_flatFiles"
    return folder, layouts.write_cosmx(folder, *cosmx_layout)


@pytest.mark.parametrize("technology", ["auto", "cosmx"])
def test_cosmx_counts_and_global_pixel_centres(cosmx, technology):
    folder, expected = cosmx
    adata = sfact.datasets.read(folder, technology)
    # cells "<cell_ID>_<fov>" in the metadata's order, none for cell_ID 0 (transcripts outside
    # cells); the negative probes are not genes; the centres are the whole-slide pixels, not
    # each FOV's own (where the FOVs overlap)
    _check_table(adata, expected, expected["global"])
    assert not any(name.startswith("0_") for name in adata.obs_names)
    assert adata.uns["sfact_read"]["technology"] == "cosmx"


def test_cosmx_spatialdata_global_centres_match_the_labels(cosmx):
    import spatialdata

    folder, expected = cosmx
    sdata = sfact.datasets.read(folder, return_spatialdata=True)
    table = sdata.tables["table"]
    np.testing.assert_array_equal(table.obsm["spatial"], expected["global"])
    np.testing.assert_array_equal(table.obsm["spatial_fov"], expected["local"])
    assert list(table.obsm["controls"].columns) == expected["negative"]
    np.testing.assert_array_equal(table.obsm["controls"].to_numpy(), expected["negative_counts"])
    # obsm['spatial'] is in the SpatialData's "global" coordinate system: each cell's label
    # (3 x 3 pixels around its centre) has its centroid half a pixel further (pixel centres)
    for fov in ("1", "2", "3"):
        centroids = spatialdata.get_centroids(sdata[f"{fov}_labels"], coordinate_system="global").compute()
        rows = np.flatnonzero(table.obs["fov"].astype(str) == fov)
        found = centroids.loc[table.obs["cell_ID"].to_numpy()[rows], ["x", "y"]].to_numpy()
        np.testing.assert_allclose(found, expected["global"][rows] + 0.5, atol=1e-6)


def test_cosmx_without_images_reads_from_the_empty_folders(tmp_path, cosmx_layout):
    folder = tmp_path / "export"
    expected = layouts.write_cosmx(folder, *cosmx_layout, images=False)
    adata = sfact.datasets.read(folder)
    _check_table(adata, expected, expected["global"])


def test_cosmx_without_the_image_folders(cosmx):
    folder, _ = cosmx
    for path in (folder / "CellLabels").iterdir():
        path.unlink()
    (folder / "CellLabels").rmdir()
    with pytest.raises(ValueError, match=r"`CellLabels/`.*empty folders will do"):
        sfact.datasets.read(folder)


def test_cosmx_prepare_scales_the_whole_slide(cosmx):
    folder, expected = cosmx
    adata = sfact.datasets.read(folder)
    sfact.pp.prepare(adata)
    record = adata.uns["sfact_prepare"]
    np.testing.assert_allclose(record["offset"], expected["global"].min(axis=0))
    span = expected["global"].max(axis=0) - expected["global"].min(axis=0)
    np.testing.assert_allclose(adata.obsm["spatial_sfact"].max(axis=0), 100 * span / span.max())
    np.testing.assert_array_equal(adata.obsm["spatial"], expected["global"])


# --- Stereo-seq -------------------------------------------------------------------------------


def _stereoseq_data(seed: int = 3):
    rng = np.random.default_rng(seed)
    n = 30
    counts = rng.poisson(1.5, size=(n, len(GENES)))
    counts[counts.sum(axis=1) == 0, 0] = 1
    centres = np.column_stack([rng.integers(12000, 12600, n), rng.integers(8000, 8400, n)])
    bins = np.array([(12000 + 10 * i, 8000 + 10 * j) for i in range(5) for j in range(4)])
    bin_counts = rng.poisson(1.0, size=(len(bins), len(GENES)))
    bin_counts[:, 3] = 0  # a gene with no count in the square bins
    cell_ids = np.sort(rng.choice(5000, size=n, replace=False))
    return counts, GENES, centres, bins, bin_counts, cell_ids


@pytest.fixture
def stereoseq(tmp_path):
    counts, genes, centres, bins, bin_counts, cell_ids = _stereoseq_data()
    folder = tmp_path / "C04042E3_SAW"
    return folder, layouts.write_stereoseq(
        folder, counts, genes, centres, bins, bin_counts, cell_ids=cell_ids
    )


@pytest.mark.parametrize("technology", ["auto", "stereoseq"])
def test_stereoseq_cell_bin_counts_and_dnb_centres(stereoseq, technology):
    folder, expected = stereoseq
    adata = sfact.datasets.read(folder, technology)
    # the counts of the cellbin GEF, not the normalized X of SAW's cell.cluster.h5ad
    _check_table(adata, expected, expected["centres"])
    assert adata.uns["sfact_read"]["table_key"] == "cells_table"


def test_stereoseq_spatialdata_keeps_the_h5ad_x(stereoseq):
    folder, expected = stereoseq
    sdata = sfact.datasets.read(folder, return_spatialdata=True)
    assert list(sdata.tables) == ["cells_table"]
    table = sdata.tables["cells_table"]
    np.testing.assert_array_equal(_dense(table.X), expected["counts"])
    scaled = expected["counts"] / expected["counts"].sum(axis=1, keepdims=True) * 1e4
    np.testing.assert_allclose(_dense(table.layers["cell_cluster"]), np.log1p(scaled), rtol=1e-6)


def test_stereoseq_h5ad_with_counts_is_left_as_it_is(tmp_path):
    counts, genes, centres, bins, bin_counts, _ = _stereoseq_data(4)
    folder = tmp_path / "saw"
    expected = layouts.write_stereoseq(folder, counts, genes, centres, bins, bin_counts, normalized=False)
    sdata = sfact.datasets.read(folder, return_spatialdata=True)
    assert "cell_cluster" not in sdata.tables["cells_table"].layers
    _check_table(sfact.datasets.read(folder), expected, expected["centres"])


def test_stereoseq_square_bins(stereoseq):
    folder, expected = stereoseq
    with pytest.raises(ValueError, match=r"2 tables.*`table_key=`"):
        sfact.datasets.read(folder, read_square_bin=True)
    adata = sfact.datasets.read(folder, read_square_bin=True, table_key="bin1_table")
    # bins in DNB units, their coordinates taken from the points element the table annotates;
    # the reader keeps the genes with a count in the bins, in alphabetical order
    kept = sorted(g for j, g in enumerate(expected["genes"]) if expected["bin_counts"][:, j].any())
    assert list(adata.var_names) == kept
    order = {tuple(b): i for i, b in enumerate(expected["bins"].tolist())}
    rows = [order[(int(x), int(y))] for x, y in adata.obsm["spatial"]]
    assert sorted(rows) == list(range(len(expected["bins"])))
    columns = [expected["genes"].index(g) for g in kept]
    np.testing.assert_array_equal(_dense(adata.X), expected["bin_counts"][np.ix_(rows, columns)])


def test_stereoseq_without_the_clustering_output(stereoseq):
    folder, _ = stereoseq
    for path in (folder / "051.cellcluster").iterdir():
        path.unlink()
    with pytest.raises(ValueError, match=r"051\.cellcluster/<SN>\.cell\.cluster\.h5ad"):
        sfact.datasets.read(folder)


def test_stereoseq_saw8_layout_is_named(tmp_path, stereoseq):
    folder, _ = stereoseq
    outs = tmp_path / "saw8" / "outs"
    (outs / "feature_expression").mkdir(parents=True)
    (folder / "041.cellcut" / "C04042E3.cellbin.gef").rename(
        outs / "feature_expression" / "C04042E3.cellbin.gef"
    )
    with pytest.raises(ValueError, match=r"SAW 8 output.*stereopy"):
        sfact.datasets.read(outs)


# --- none of them -----------------------------------------------------------------------------


def test_folder_of_no_technology_lists_what_is_expected(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "README.md").write_text("cells and genes, somewhere else\n")
    with pytest.raises(
        ValueError, match=r"none of the files.*merscope: cell_by_gene\.csv.*cosmx: \*exprMat_file\.csv"
    ):
        sfact.datasets.read(folder)
    with pytest.raises(ValueError, match=r"cell_by_gene\.csv"):
        sfact.datasets.read(folder, "merscope")
    with pytest.raises(ValueError, match=r"exprMat_file\.csv"):
        sfact.datasets.read(folder, "cosmx")
    with pytest.raises(ValueError, match=r"041\.cellcut/<SN>\.cellbin\.gef"):
        sfact.datasets.read(folder, "stereoseq")
