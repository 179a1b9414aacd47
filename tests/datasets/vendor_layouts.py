"""Tiny output folders in the 10x Genomics instruments' documented layouts, written file by file.

Used by ``test_read_10x.py`` to read real files with spatialdata-io's readers (no mock of a
reader). Each writer takes known counts and coordinates and writes only the files of the
documented layout (h5py, pandas/pyarrow, zarr, Pillow), and returns what a reader must give back.

Layouts followed (10x Genomics documentation):

- Feature-barcode matrix HDF5 (Space Ranger, Xenium Onboard Analysis): group ``matrix`` with
  ``barcodes``, ``data`` (int32), ``indices``, ``indptr`` (CSC: one column per barcode),
  ``shape`` (n_features, n_barcodes) and ``features/{_all_tag_keys, feature_type, genome, id,
  name}``; file attributes ``filetype``, ``library_ids``, ``version``, ...
- Xenium Onboard Analysis 2.x output: ``experiment.xenium`` (JSON: ``pixel_size``,
  ``analysis_sw_version``, ...), ``cell_feature_matrix.h5`` (genes and control features),
  ``cells.parquet`` (``cell_id``, ``x_centroid``, ``y_centroid`` in µm, counts, areas),
  ``cells.zarr.zip`` (zarr v2: ``cell_id`` (N, 2) uint32 prefix/suffix, ``cell_summary`` with
  ``column_names``, ``masks/{0,1}``, ``polygon_sets/{0,1}/cell_index``).
- Visium Space Ranger ``outs/``: ``filtered_feature_bc_matrix.h5`` (spots under tissue),
  ``spatial/tissue_positions.csv`` (Space Ranger >= 2.0, with header; ``tissue_positions_list.csv``
  without header before), ``spatial/scalefactors_json.json``, ``spatial/tissue_{hires,lowres}_image.png``.
- Visium HD Space Ranger ``outs/``: ``feature_slice.h5`` (attribute ``metadata_json``),
  ``spatial/`` (scale factors and images), ``binned_outputs/square_NNNum/`` each with
  ``filtered_feature_bc_matrix.h5``, ``spatial/tissue_positions.parquet`` and
  ``spatial/scalefactors_json.json`` (``bin_size_um``, ``microns_per_pixel``, ...).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

GENE_EXPRESSION = "Gene Expression"


def barcodes(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct 16-base spot barcodes with the GEM-well suffix, e.g. ``AAACAAGTATCTCCCA-1``."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        bc = "".join(rng.choice(list("ACGT"), size=16)) + "-1"
        if bc not in seen:
            seen.add(bc)
            out.append(bc)
    return out


def xenium_cell_id(prefix: int, suffix: int = 1) -> str:
    """Xenium's string cell id of a (prefix, suffix) pair: each hex digit of the 32-bit prefix
    written as a letter (0 -> 'a', ..., 15 -> 'p'), then ``-suffix``."""
    digits = [(int(prefix) >> shift) & 0xF for shift in range(28, -4, -4)]
    return "".join(chr(ord("a") + d) for d in digits) + f"-{suffix}"


def write_10x_h5(
    path: Path,
    counts: np.ndarray,
    barcodes: Sequence[str],
    feature_ids: Sequence[str],
    feature_names: Sequence[str],
    feature_types: Sequence[str],
    *,
    genome: str = "GRCh38",
    library_id: str = "sample",
    software_version: str = "spaceranger-2.1.0",
    chemistry: str = "Spatial 3' v1",
) -> None:
    """A feature-barcode matrix HDF5 file (10x's format, version 2) of ``counts`` (barcodes x features)."""
    counts = np.asarray(counts)
    n_barcodes, n_features = counts.shape
    # CSC with one column per barcode: the rows of the (barcodes x features) matrix, one after another
    indptr = [0]
    indices: list[int] = []
    data: list[int] = []
    for row in counts:
        nz = np.flatnonzero(row)
        indices.extend(nz.tolist())
        data.extend(row[nz].astype(np.int64).tolist())
        indptr.append(len(indices))

    def strings(values: Sequence[str]) -> np.ndarray:
        return np.array([str(v).encode() for v in values])

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        f.attrs["library_ids"] = strings([library_id])
        f.attrs["original_gem_groups"] = np.array([1], dtype=np.int64)
        f.attrs["chemistry_description"] = chemistry
        f.attrs["software_version"] = software_version
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=strings(barcodes))
        m.create_dataset("data", data=np.asarray(data, dtype=np.int32), compression="gzip")
        m.create_dataset("indices", data=np.asarray(indices, dtype=np.int64), compression="gzip")
        m.create_dataset("indptr", data=np.asarray(indptr, dtype=np.int64), compression="gzip")
        m.create_dataset("shape", data=np.array([n_features, n_barcodes], dtype=np.int32))
        feats = m.create_group("features")
        feats.create_dataset("_all_tag_keys", data=strings(["genome"]))
        feats.create_dataset("feature_type", data=strings(feature_types))
        feats.create_dataset("genome", data=strings([genome] * n_features))
        feats.create_dataset("id", data=strings(feature_ids))
        feats.create_dataset("name", data=strings(feature_names))


def _png(path: Path, size: tuple[int, int], seed: int = 0) -> None:
    """A small RGB PNG (an H&E image stand-in; its pixels are not read by the tests)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(180, 255, size=(*size, 3), dtype=np.uint8), mode="RGB").save(path)


# --------------------------------------------------------------------------------------------
# Xenium
# --------------------------------------------------------------------------------------------

XENIUM_CONTROLS = (
    ("NegControlProbe_00042", "Negative Control Probe"),
    ("NegControlCodeword_0500", "Negative Control Codeword"),
    ("UnassignedCodeword_0003", "Unassigned Codeword"),
)
"""Control features of a Xenium matrix (not genes: spatialdata-io drops them with ``gex_only``)."""


def write_xenium(
    folder: str | Path,
    counts: np.ndarray,
    genes: Sequence[str],
    centroids: np.ndarray,
    *,
    pixel_size: float = 0.2125,
    version: str = "xenium-2.0.0.10",
    seed: int = 0,
) -> dict:
    """A Xenium Onboard Analysis 2.x output folder with ``counts`` (cells x genes) at ``centroids`` (µm).

    Parameters
    ----------
    folder
        Created (with parents) if missing.
    counts
        Integer counts, cells x genes.
    genes
        Gene names (``feature_type`` "Gene Expression"); three control features with their own
        counts are added after them, as in a real panel.
    centroids
        (n_cells, 2) cell centroids ``x_centroid``, ``y_centroid`` in micrometres.
    pixel_size
        µm per pixel of the morphology image (``experiment.xenium``).
    version
        ``analysis_sw_version``.

    Returns
    -------
    ``{"cell_ids", "counts", "genes", "centroids"}``: what a reader must give back.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    counts = np.asarray(counts, dtype=np.int64)
    centroids = np.asarray(centroids, dtype=np.float64)
    n_cells, n_genes = counts.shape
    rng = np.random.default_rng(seed)
    prefixes = np.sort(rng.choice(2**31, size=n_cells, replace=False)).astype(np.uint32)
    cell_ids = [xenium_cell_id(p) for p in prefixes]
    controls = rng.poisson(0.3, size=(n_cells, len(XENIUM_CONTROLS)))

    specs = {
        "major_version": 5,
        "minor_version": 0,
        "run_name": "sfact test run",
        "run_start_time": "2024-01-01T00:00:00Z",
        "region_name": "tiny",
        "preservation_method": "FFPE",
        "num_cells": n_cells,
        "transcripts_per_cell": float(counts.sum(axis=1).mean()),
        "panel_name": "Xenium Test Panel",
        "panel_organism": "Human",
        "panel_num_targets_predesigned": n_genes,
        "panel_num_targets_custom": 0,
        "pixel_size": pixel_size,
        "instrument_sn": "0000",
        "instrument_sw_version": "2.0.0.10",
        "analysis_sw_version": version,
        "experiment_uuid": "00000000-0000-0000-0000-000000000000",
        "cassette_uuid": "",
        "roi_uuid": "",
        "z_step_size": 3.0,
        "well_uuid": "",
        "calibration_uuid": "",
        "images": {
            "morphology_filepath": "morphology.ome.tif",
            "morphology_focus_filepath": "morphology_focus/",
        },
        "xenium_explorer_files": {
            "transcripts_zarr_filepath": "transcripts.zarr.zip",
            "cells_zarr_filepath": "cells.zarr.zip",
            "cell_features_zarr_filepath": "cell_feature_matrix.zarr.zip",
            "analysis_zarr_filepath": "analysis.zarr.zip",
            "analysis_summary_filepath": "analysis_summary.html",
        },
    }
    (folder / "experiment.xenium").write_text(json.dumps(specs, indent=4))

    names = [*genes, *(name for name, _ in XENIUM_CONTROLS)]
    ids = [f"ENSG{100000 + i:011d}" for i in range(n_genes)] + [name for name, _ in XENIUM_CONTROLS]
    types = [GENE_EXPRESSION] * n_genes + [kind for _, kind in XENIUM_CONTROLS]
    write_10x_h5(
        folder / "cell_feature_matrix.h5",
        np.hstack([counts, controls]),
        cell_ids,
        ids,
        names,
        types,
        genome="Unknown",
        library_id="tiny",
        software_version=version,
        chemistry="Xenium",
    )

    cell_area = rng.uniform(40.0, 120.0, size=n_cells)
    nucleus_area = cell_area * rng.uniform(0.2, 0.5, size=n_cells)
    cells = pd.DataFrame(
        {
            "cell_id": cell_ids,
            "x_centroid": centroids[:, 0],
            "y_centroid": centroids[:, 1],
            "transcript_counts": counts.sum(axis=1).astype(np.int64),
            "control_probe_counts": controls[:, 0].astype(np.int64),
            "genomic_control_counts": np.zeros(n_cells, dtype=np.int64),
            "control_codeword_counts": controls[:, 1].astype(np.int64),
            "unassigned_codeword_counts": controls[:, 2].astype(np.int64),
            "deprecated_codeword_counts": np.zeros(n_cells, dtype=np.int64),
            "total_counts": (counts.sum(axis=1) + controls.sum(axis=1)).astype(np.int64),
            "cell_area": cell_area,
            "nucleus_area": nucleus_area,
            "nucleus_count": np.ones(n_cells, dtype=np.int64),
            "segmentation_method": ["Segmented by nucleus expansion of 5.0µm"] * n_cells,
        }
    )
    cells.to_parquet(folder / "cells.parquet", index=False)

    _write_cells_zarr(folder / "cells.zarr.zip", prefixes, centroids, cell_area, nucleus_area, pixel_size)
    return {"cell_ids": cell_ids, "counts": counts, "genes": list(genes), "centroids": centroids}


def _write_cells_zarr(
    path: Path,
    prefixes: np.ndarray,
    centroids: np.ndarray,
    cell_area: np.ndarray,
    nucleus_area: np.ndarray,
    pixel_size: float,
) -> None:
    """``cells.zarr.zip`` (zarr v2, as Xenium Onboard Analysis 2.x writes it), zipped from a folder."""
    import zarr

    n = len(prefixes)
    summary = np.column_stack(
        [centroids, cell_area, centroids, nucleus_area, np.zeros(n), np.ones(n)]
    ).astype(np.float64)
    columns = [
        "cell_centroid_x",
        "cell_centroid_y",
        "cell_area",
        "nucleus_centroid_x",
        "nucleus_centroid_y",
        "nucleus_area",
        "z_level",
        "nucleus_count",
    ]
    # masks: each cell a 3 x 3 pixel square around its centroid (label = polygon index + 1)
    pix = np.round(centroids / pixel_size).astype(int)
    shape = (int(pix[:, 1].max()) + 3, int(pix[:, 0].max()) + 3)
    cells_mask = np.zeros(shape, dtype=np.uint32)
    nuclei_mask = np.zeros(shape, dtype=np.uint32)
    for i, (x, y) in enumerate(pix):
        cells_mask[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] = i + 1
        nuclei_mask[y, x] = i + 1
    tmp = Path(tempfile.mkdtemp())
    try:
        root = zarr.open_group(zarr.storage.LocalStore(tmp / "cells.zarr"), mode="w", zarr_format=2)
        root.attrs.update({"major_version": 6, "minor_version": 0, "number_cells": n})
        root.create_array("cell_id", data=np.column_stack([prefixes, np.ones(n, dtype=np.uint32)]))
        root.create_array("cell_summary", data=summary, attributes={"column_names": columns})
        masks = root.create_group("masks")
        masks.create_array("0", data=nuclei_mask)
        masks.create_array("1", data=cells_mask)
        masks.create_array("homogeneous_transform", data=np.diag([1 / pixel_size, 1 / pixel_size, 1.0]))
        polygons = root.create_group("polygon_sets")
        for index, method in ((0, 0), (1, 1)):
            group = polygons.create_group(str(index))
            group.create_array("cell_index", data=np.arange(n, dtype=np.uint32))
            group.create_array("method", data=np.full(n, method, dtype=np.uint32))
            group.create_array("num_vertices", data=np.full(n, 4, dtype=np.int32))
            corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float32)
            group.create_array(
                "vertices",
                data=(centroids[:, None, :] + corners[None] * pixel_size).reshape(n, -1).astype(np.float32),
            )
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            for file in sorted((tmp / "cells.zarr").rglob("*")):
                if file.is_file():
                    zf.write(file, file.relative_to(tmp / "cells.zarr").as_posix())
    finally:
        shutil.rmtree(tmp)


# --------------------------------------------------------------------------------------------
# Visium
# --------------------------------------------------------------------------------------------

VISIUM_SCALEFACTORS = {
    "tissue_hires_scalef": 0.1,
    "tissue_lowres_scalef": 0.03,
    "fiducial_diameter_fullres": 140.0,
    "spot_diameter_fullres": 90.0,
}


def write_visium(
    folder: str | Path,
    counts: np.ndarray,
    genes: Sequence[str],
    positions: np.ndarray,
    array_rc: np.ndarray,
    *,
    n_outside: int = 5,
    library_prefix: str | None = None,
    spaceranger_v1: bool = False,
    images: bool = True,
    seed: int = 0,
) -> dict:
    """A Visium Space Ranger ``outs/`` folder: ``counts`` (spots x genes) at ``positions``.

    Parameters
    ----------
    folder
        Created (with parents) if missing.
    counts
        Integer counts of the spots under tissue (the filtered matrix), spots x genes.
    genes
        Gene names; gene ids ``ENSG...`` are made up.
    positions
        (n_spots, 2) spot centres ``(pxl_col_in_fullres, pxl_row_in_fullres)``, i.e. (x, y) in
        pixels of the full-resolution image (rounded to whole pixels, as Space Ranger writes them).
    array_rc
        (n_spots, 2) ``array_row``, ``array_col`` of the spots.
    n_outside
        Spots outside the tissue (``in_tissue`` 0) listed in the positions file but not in the
        filtered matrix.
    library_prefix
        Prefix the matrix as ``<prefix>_filtered_feature_bc_matrix.h5`` (renamed downloads).
    spaceranger_v1
        ``spatial/tissue_positions_list.csv`` without a header (Space Ranger 1.x) instead of
        ``spatial/tissue_positions.csv``.
    images
        Write ``tissue_hires_image.png`` and ``tissue_lowres_image.png``.

    Returns
    -------
    ``{"barcodes", "counts", "genes", "positions"}`` of the spots under tissue, in matrix order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    counts = np.asarray(counts, dtype=np.int64)
    # Space Ranger writes whole pixels
    positions = np.rint(np.asarray(positions, dtype=np.float64)).astype(np.int64)
    n_spots, n_genes = counts.shape
    rng = np.random.default_rng(seed)
    codes = barcodes(n_spots + n_outside, seed)
    # the matrix lists barcodes sorted, as Space Ranger writes them
    order = np.argsort(codes[:n_spots], kind="stable")
    inside = [codes[i] for i in order]
    counts, positions, array_rc = counts[order], positions[order], np.asarray(array_rc)[order]
    name = (
        "filtered_feature_bc_matrix.h5"
        if library_prefix is None
        else f"{library_prefix}_filtered_feature_bc_matrix.h5"
    )
    write_10x_h5(
        folder / name,
        counts,
        inside,
        [f"ENSG{200000 + i:011d}" for i in range(n_genes)],
        list(genes),
        [GENE_EXPRESSION] * n_genes,
        library_id=library_prefix or "tiny_visium",
    )
    out_rc = np.column_stack([rng.integers(70, 77, n_outside), rng.integers(120, 127, n_outside) * 2])
    out_xy = rng.integers(0, positions.max(), size=(n_outside, 2))
    table = pd.DataFrame(
        {
            "barcode": inside + codes[n_spots:],
            "in_tissue": [1] * n_spots + [0] * n_outside,
            "array_row": np.concatenate([array_rc[:, 0], out_rc[:, 0]]).astype(int),
            "array_col": np.concatenate([array_rc[:, 1], out_rc[:, 1]]).astype(int),
            "pxl_row_in_fullres": np.concatenate([positions[:, 1], out_xy[:, 1]]),
            "pxl_col_in_fullres": np.concatenate([positions[:, 0], out_xy[:, 0]]),
        }
    )
    # the positions file lists every spot of the slide, in its own order (not the matrix's)
    table = table.sort_values(["array_row", "array_col"], kind="stable")
    spatial = folder / "spatial"
    spatial.mkdir(exist_ok=True)
    if spaceranger_v1:
        table.to_csv(spatial / "tissue_positions_list.csv", header=False, index=False)
    else:
        table.to_csv(spatial / "tissue_positions.csv", index=False)
    (spatial / "scalefactors_json.json").write_text(json.dumps(VISIUM_SCALEFACTORS))
    if images:
        extent = positions.max() + 100
        for kind in ("hires", "lowres"):
            side = max(int(extent * VISIUM_SCALEFACTORS[f"tissue_{kind}_scalef"]), 4)
            _png(spatial / f"tissue_{kind}_image.png", (side, side), seed)
    return {
        "barcodes": inside,
        "counts": counts,
        "genes": list(genes),
        "positions": positions.astype(np.float64),
    }


# --------------------------------------------------------------------------------------------
# Visium HD
# --------------------------------------------------------------------------------------------

VISIUM_HD_MICRONS_PER_PIXEL = 0.2738


def write_visium_hd(
    folder: str | Path,
    counts: np.ndarray,
    genes: Sequence[str],
    *,
    bin_sizes: Sequence[int] = (8, 16),
    in_tissue: np.ndarray | None = None,
    microns_per_pixel: float = VISIUM_HD_MICRONS_PER_PIXEL,
    origin: tuple[float, float] = (1200.0, 800.0),
    images: bool = True,
    cells: tuple[np.ndarray, np.ndarray] | None = None,
    seed: int = 0,
) -> dict[int | str, dict]:
    """A Visium HD Space Ranger ``outs/`` folder with the bins of ``bin_sizes`` µm.

    Parameters
    ----------
    folder
        Created (with parents) if missing.
    counts
        Integer counts of the smallest bins on their grid: (n_rows, n_cols, n_genes); the larger
        bins hold the sums of the blocks of smaller ones they cover (each size a multiple of the
        smallest, the grid a multiple of the blocks).
    genes
        Gene names; gene ids ``ENSG...`` are made up.
    bin_sizes
        Bin sizes in µm (a ``binned_outputs/square_NNNum`` folder each).
    in_tissue
        (n_rows, n_cols) booleans of the smallest bins under tissue; a larger bin is under tissue
        when any of its bins is. Bins outside the tissue are in the positions file, not in the
        filtered matrix. Default: all.
    microns_per_pixel
        µm per pixel of the full-resolution microscope image.
    origin
        Full-resolution pixel (x, y) of the grid's top-left corner.
    images
        Write ``spatial/tissue_hires_image.png`` and ``spatial/tissue_lowres_image.png``.
    cells
        ``(counts, boxes)``: segmented cells (Space Ranger >= 4.0 ``segmented_outputs/``): their
        counts (cells x genes) and boxes (n_cells, 4) ``x0, y0, x1, y1`` in full-resolution pixels,
        written as the polygons of ``cell_segmentations.geojson``.

    Returns
    -------
    For each bin size: ``{"table_key", "barcodes", "counts", "genes", "positions"}`` of its
    bins under tissue in matrix order, positions ``(pxl_col_in_fullres, pxl_row_in_fullres)``;
    with ``cells``, also ``"cells"``: the same for the cells, positions their boxes' centres.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    counts = np.asarray(counts, dtype=np.int64)
    n_rows, n_cols, n_genes = counts.shape
    tissue = np.ones((n_rows, n_cols), dtype=bool) if in_tissue is None else np.asarray(in_tissue, dtype=bool)
    smallest = min(bin_sizes)
    gene_ids = [f"ENSG{300000 + i:011d}" for i in range(n_genes)]
    scalef = {"tissue_hires_scalef": 0.05, "tissue_lowres_scalef": 0.005, "regist_target_img_scalef": 0.1}
    out: dict[int, dict] = {}
    for size in bin_sizes:
        k = size // smallest
        if size % smallest or n_rows % k or n_cols % k:
            raise ValueError(
                f"bin size {size} does not tile the {n_rows} x {n_cols} grid of {smallest} µm bins"
            )
        r, c = n_rows // k, n_cols // k
        binned = counts.reshape(r, k, c, k, n_genes).sum(axis=(1, 3))
        under = tissue.reshape(r, k, c, k).any(axis=(1, 3))
        rows, cols = np.meshgrid(np.arange(r), np.arange(c), indexing="ij")
        rows, cols = rows.ravel(), cols.ravel()
        side_px = size / microns_per_pixel
        x = origin[0] + (cols + 0.5) * side_px
        y = origin[1] + (rows + 0.5) * side_px
        codes = [f"s_{size:03d}um_{i:05d}_{j:05d}-1" for i, j in zip(rows, cols, strict=True)]
        keep = under.ravel()
        name = f"square_{size:03d}um"
        bin_dir = folder / "binned_outputs" / name
        write_10x_h5(
            bin_dir / "filtered_feature_bc_matrix.h5",
            binned.reshape(-1, n_genes)[keep],
            [b for b, kept in zip(codes, keep, strict=True) if kept],
            gene_ids,
            list(genes),
            [GENE_EXPRESSION] * n_genes,
            library_id="tiny_hd",
            software_version="spaceranger-3.1.1",
            chemistry="Visium HD v1",
        )
        positions = pd.DataFrame(
            {
                "barcode": codes,
                "in_tissue": keep.astype(np.int32),
                "array_row": rows.astype(np.int32),
                "array_col": cols.astype(np.int32),
                "pxl_row_in_fullres": y,
                "pxl_col_in_fullres": x,
            }
        )
        (bin_dir / "spatial").mkdir(parents=True, exist_ok=True)
        positions.to_parquet(bin_dir / "spatial" / "tissue_positions.parquet", index=False)
        bin_scalef = {
            **scalef,
            "spot_diameter_fullres": side_px,
            "bin_size_um": float(size),
            "microns_per_pixel": microns_per_pixel,
        }
        (bin_dir / "spatial" / "scalefactors_json.json").write_text(json.dumps(bin_scalef))
        out[size] = {
            "table_key": name,
            "barcodes": [b for b, kept in zip(codes, keep, strict=True) if kept],
            "counts": binned.reshape(-1, n_genes)[keep],
            "genes": list(genes),
            "positions": np.column_stack([x, y])[keep],
        }

    spatial = folder / "spatial"
    spatial.mkdir(exist_ok=True)
    side = smallest / microns_per_pixel
    (spatial / "scalefactors_json.json").write_text(
        json.dumps(
            {
                **scalef,
                "spot_diameter_fullres": side,
                "bin_size_um": float(smallest),
                "microns_per_pixel": microns_per_pixel,
            }
        )
    )
    if images:
        extent = max(origin) + max(n_rows, n_cols) * side + 100
        for kind in ("hires", "lowres"):
            _png(
                spatial / f"tissue_{kind}_image.png",
                (max(int(extent * scalef[f"tissue_{kind}_scalef"]), 4),) * 2,
                seed,
            )
    identity = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    hd_layout = {
        "file_format": "1.0",
        "schema_version": "1.0",
        "transform": identity,
        "num_rows": n_rows,
        "num_cols": n_cols,
    }
    metadata = {
        "hd_layout_json": json.dumps(hd_layout),
        "transform_matrices": {
            "cytassist_colrow_to_spot_colrow": identity,
            "spot_colrow_to_cytassist_colrow": identity,
            "microscope_colrow_to_spot_colrow": identity,
            "spot_colrow_to_microscope_colrow": identity,
        },
        "spaceranger_version": "spaceranger-3.1.1",
        "bin_scale": 1,
        "nrows": n_rows,
        "ncols": n_cols,
    }
    with h5py.File(folder / "feature_slice.h5", "w") as f:
        f.attrs["metadata_json"] = json.dumps(metadata)
        f.create_group("feature_slices")
    if cells is not None:
        out["cells"] = _write_segmented_outputs(folder, *cells, genes, gene_ids, scalef, microns_per_pixel)
    return out


def _write_segmented_outputs(
    folder: Path,
    counts: np.ndarray,
    boxes: np.ndarray,
    genes: Sequence[str],
    gene_ids: Sequence[str],
    scalef: dict,
    microns_per_pixel: float,
) -> dict:
    """``segmented_outputs/``: the cells' matrix, their polygons (GeoJSON) and the scale factors."""
    counts = np.asarray(counts, dtype=np.int64)
    boxes = np.asarray(boxes, dtype=np.float64)
    seg = folder / "segmented_outputs"
    ids = np.arange(1, len(counts) + 1) * 3  # Space Ranger's cell ids are not contiguous
    codes = [f"cellid_{i:09d}-1" for i in ids]
    write_10x_h5(
        seg / "filtered_feature_cell_matrix.h5",
        counts,
        codes,
        gene_ids,
        list(genes),
        [GENE_EXPRESSION] * len(genes),
        library_id="tiny_hd",
        software_version="spaceranger-4.0.1",
        chemistry="Visium HD v1",
    )
    features = [
        {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
            },
            "properties": {"cell_id": int(i)},
        }
        for i, (x0, y0, x1, y1) in zip(ids, boxes.tolist(), strict=True)
    ]
    (seg / "cell_segmentations.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": features})
    )
    (seg / "spatial").mkdir(exist_ok=True)
    (seg / "spatial" / "scalefactors_json.json").write_text(
        json.dumps(
            {
                **scalef,
                "spot_diameter_fullres": 2 / microns_per_pixel,
                "bin_size_um": 2.0,
                "microns_per_pixel": microns_per_pixel,
            }
        )
    )
    centres = np.column_stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2])
    return {
        "table_key": "cell_segmentations",
        "barcodes": codes,
        "counts": counts,
        "genes": list(genes),
        "positions": centres,
    }
