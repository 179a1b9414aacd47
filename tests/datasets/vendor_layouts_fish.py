"""Tiny output folders in the MERSCOPE, CosMx and Stereo-seq documented layouts, written file by file.

Used by ``test_read_fish.py`` to read real files with spatialdata-io's readers (no mock of a
reader). Each writer takes known counts and coordinates, writes the files of the vendor's layout
(pandas, h5py, numpy, tifffile, anndata for SAW's h5ad) and returns what a reader must give back.

Layouts followed:

- Vizgen MERSCOPE region folder (Vizgen post-processing tool docs, "Entity Metadata File Format"):
  ``cell_by_gene.csv`` (first column ``cell``, the EntityID; one column per codebook target,
  ``Blank-*`` barcodes among them), ``cell_metadata.csv`` (``EntityID``, ``fov``, ``volume``,
  ``center_x``, ``center_y``, ``min_x``, ``max_x``, ``min_y``, ``max_y`` in µm of the global
  coordinate system, ``anisotropy``, ``transcript_count``, ``perimeter_area_ratio``,
  ``solidity``), ``images/micron_to_mosaic_pixel_transform.csv`` (3 x 3 affine, space-separated).
  The region folder sits in the run's folder (``<date>_<run>/region_0``), as the instrument
  writes it. Transcripts, boundaries and mosaics are not written (sfact reads none of them).
- NanoString CosMx SMI flat-file export (the public NSCLC release and the SMI ReadMe):
  ``<name>_exprMat_file.csv`` (``fov``, ``cell_ID``, one column per target, ``NegPrb*`` negative
  probes; ``cell_ID`` 0 holds each FOV's transcripts outside cells), ``<name>_metadata_file.csv``
  (``fov``, ``cell_ID``, ``Area``, ``AspectRatio``, ``CenterX_local_px``, ``CenterY_local_px``,
  ``CenterX_global_px``, ``CenterY_global_px``, ``Width``, ``Height``, stain intensities),
  ``<name>_fov_positions_file.csv`` (``fov``, ``x_global_px``, ``y_global_px``),
  ``CellComposite/CellComposite_F###.jpg`` and ``CellLabels/CellLabels_F###.tif`` (one label
  per cell, ``cell_ID`` as value; the image rows run against the local y axis).
- BGI STOmics SAW 7 output (the layout spatialdata-io's reader walks, SAW's GEF documents):
  ``02.count/<SN>.raw.gef``, ``03.register/<SN>_regist.tif`` and ``<SN>_mask.tif``,
  ``04.tissuecut/<SN>.tissuecut.gef`` (square bins: ``geneExp/bin1/{expression, gene}``),
  ``041.cellcut/<SN>.cellbin.gef`` (``cellBin/{cell, cellBorder, cellExp, gene, geneExp, ...}``:
  cell centres in DNB units, 500 nm apart) and ``051.cellcluster/<SN>.cell.cluster.h5ad``
  (SAW's clustering output: normalized, log-transformed ``X`` with the counts in ``raw``, as
  stereopy writes it; cells and genes in the GEF's order).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

MERSCOPE_TRANSFORM = np.array([[9.2058, 0.0, -2345.6], [0.0, 9.2058, -1234.5], [0.0, 0.0, 1.0]])
"""µm to mosaic pixels (about 0.108 µm per pixel, as on the instrument)."""


def merscope_entity_ids(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct 19-digit EntityIDs (analysis timestamp, tile, task, geometry), ascending."""
    rng = np.random.default_rng(seed)
    low = np.sort(rng.choice(10**6, size=n, replace=False))
    return [str(3_094_130_200_000_000_000 + int(v)) for v in low]


def write_merscope(
    folder: str | Path,
    counts: np.ndarray,
    genes: Sequence[str],
    centres: np.ndarray,
    *,
    blanks: Sequence[str] = ("Blank-1", "Blank-2", "Blank-3"),
    seed: int = 0,
) -> dict:
    """A MERSCOPE region folder with ``counts`` (cells x genes) at ``centres`` (µm).

    Parameters
    ----------
    folder
        The region folder (e.g. ``.../202301011200_run/region_0``); created with its parents.
    counts
        Integer counts, cells x genes.
    genes
        Gene names; the ``blanks`` columns are written among them (one in the middle, the others
        at the end), with counts of their own.
    centres
        (n_cells, 2) ``center_x``, ``center_y`` in micrometres.
    blanks
        Names of the blank barcodes.

    Returns
    -------
    ``{"cell_ids", "counts", "genes", "centres", "blanks", "blank_counts"}``.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    counts = np.asarray(counts, dtype=np.int64)
    centres = np.asarray(centres, dtype=np.float64)
    n_cells, n_genes = counts.shape
    rng = np.random.default_rng(seed)
    ids = merscope_entity_ids(n_cells, seed)
    blank_counts = rng.poisson(0.4, size=(n_cells, len(blanks)))

    table = pd.DataFrame(counts, index=pd.Index(ids, name="cell"), columns=list(genes))
    middle = n_genes // 2
    for j, name in enumerate(blanks):
        if j == 0:
            table.insert(middle, name, blank_counts[:, j])
        else:
            table[name] = blank_counts[:, j]
    table.to_csv(folder / "cell_by_gene.csv")

    half = rng.uniform(3.0, 6.0, size=(n_cells, 2))
    metadata = pd.DataFrame(
        {
            "fov": (centres[:, 0] // 200).astype(np.int64),
            "volume": np.round(rng.uniform(300, 1500, n_cells), 3),
            "center_x": centres[:, 0],
            "center_y": centres[:, 1],
            "min_x": centres[:, 0] - half[:, 0],
            "max_x": centres[:, 0] + half[:, 0],
            "min_y": centres[:, 1] - half[:, 1],
            "max_y": centres[:, 1] + half[:, 1],
            "anisotropy": np.round(rng.uniform(1.0, 2.5, n_cells), 4),
            "transcript_count": counts.sum(axis=1) + blank_counts.sum(axis=1),
            "perimeter_area_ratio": np.round(rng.uniform(0.3, 0.9, n_cells), 4),
            "solidity": np.round(rng.uniform(0.85, 1.0, n_cells), 4),
        },
        index=pd.Index(ids, name="EntityID"),
    )
    metadata.to_csv(folder / "cell_metadata.csv")
    np.savetxt(folder / "images" / "micron_to_mosaic_pixel_transform.csv", MERSCOPE_TRANSFORM, fmt="%.6g")
    return {
        "cell_ids": ids,
        "counts": counts,
        "genes": list(genes),
        "centres": centres,
        "blanks": list(blanks),
        "blank_counts": blank_counts,
    }


COSMX_FOV_SIZE = (64, 48)
"""(width, height) of a field of view in pixels in these fixtures (5472 x 3648 on the instrument)."""


def write_cosmx(
    folder: str | Path,
    counts: np.ndarray,
    genes: Sequence[str],
    fovs: Sequence[int],
    local: np.ndarray,
    fov_positions: dict[int, tuple[float, float]],
    *,
    name: str = "Run1000_S1",
    negative_probes: int = 2,
    images: bool = True,
    seed: int = 0,
) -> dict:
    """A CosMx flat-file export: ``counts`` (cells x genes) of cells at ``local`` pixels of their ``fovs``.

    Parameters
    ----------
    folder
        Created with its parents.
    counts
        Integer counts, cells x genes; cells numbered 1, 2, ... within each FOV, in this order.
    genes
        Target names; ``negative_probes`` columns ``NegPrb1``, ... with counts of their own follow.
    fovs
        The FOV of each cell.
    local
        (n_cells, 2) ``CenterX_local_px``, ``CenterY_local_px`` (integers within
        :data:`COSMX_FOV_SIZE`, at least 2 from the edges).
    fov_positions
        FOV -> (``x_global_px``, ``y_global_px``) of its origin; a cell's global centre is its
        FOV's position plus its local centre.
    name
        The export's name, the prefix of its files.
    images
        Write ``CellComposite`` (JPEG) and ``CellLabels`` (TIFF) images; else the empty folders.

    Returns
    -------
    ``{"cell_ids", "counts", "genes", "global", "local", "negative", "negative_counts"}``;
    ``cell_ids`` as the reader names the cells, ``<cell_ID>_<fov>``.
    """
    import tifffile
    from PIL import Image

    folder = Path(folder)
    counts = np.asarray(counts, dtype=np.int64)
    local = np.asarray(local, dtype=np.int64)
    fovs = np.asarray(fovs, dtype=np.int64)
    n_cells = counts.shape[0]
    rng = np.random.default_rng(seed)
    negative = [f"NegPrb{i + 1}" for i in range(negative_probes)]
    negative_counts = rng.poisson(0.3, size=(n_cells, negative_probes))
    cell_id = np.zeros(n_cells, dtype=np.int64)
    for fov in np.unique(fovs):
        rows = np.flatnonzero(fovs == fov)
        cell_id[rows] = np.arange(1, rows.size + 1)
    offsets = np.array([fov_positions[int(f)] for f in fovs], dtype=np.float64)
    glob = offsets + local

    expr_rows = []
    for fov in np.unique(fovs):
        # cell_ID 0: the FOV's transcripts outside any cell, first as in the exports
        outside = {"fov": int(fov), "cell_ID": 0}
        outside.update({g: int(v) for g, v in zip(genes, rng.poisson(3, len(genes)), strict=True)})
        outside.update({n: int(v) for n, v in zip(negative, rng.poisson(1, negative_probes), strict=True)})
        expr_rows.append(outside)
        for i in np.flatnonzero(fovs == fov):
            row = {"fov": int(fov), "cell_ID": int(cell_id[i])}
            row.update(dict(zip(genes, counts[i].tolist(), strict=True)))
            row.update(dict(zip(negative, negative_counts[i].tolist(), strict=True)))
            expr_rows.append(row)
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(expr_rows).to_csv(folder / f"{name}_exprMat_file.csv", index=False)

    area = rng.integers(9, 40, n_cells)
    pd.DataFrame(
        {
            "fov": fovs,
            "cell_ID": cell_id,
            "Area": area,
            "AspectRatio": np.round(rng.uniform(0.5, 2.0, n_cells), 2),
            "CenterX_local_px": local[:, 0],
            "CenterY_local_px": local[:, 1],
            "CenterX_global_px": glob[:, 0],
            "CenterY_global_px": glob[:, 1],
            "Width": rng.integers(3, 8, n_cells),
            "Height": rng.integers(3, 8, n_cells),
            "Mean.MembraneStain": rng.integers(500, 5000, n_cells),
            "Max.MembraneStain": rng.integers(5000, 20000, n_cells),
            "Mean.DAPI": rng.integers(500, 5000, n_cells),
            "Max.DAPI": rng.integers(5000, 20000, n_cells),
        }
    ).to_csv(folder / f"{name}_metadata_file.csv", index=False)
    positions = sorted(fov_positions.items())
    pd.DataFrame(
        {
            "fov": [f for f, _ in positions],
            "x_global_px": [p[0] for _, p in positions],
            "y_global_px": [p[1] for _, p in positions],
        }
    ).to_csv(folder / f"{name}_fov_positions_file.csv", index=False)

    (folder / "CellComposite").mkdir(exist_ok=True)
    (folder / "CellLabels").mkdir(exist_ok=True)
    if images:
        width, height = COSMX_FOV_SIZE
        for fov in np.unique(fovs):
            labels = np.zeros((height, width), dtype=np.uint32)
            for i in np.flatnonzero(fovs == fov):
                x, y = local[i]
                row = height - 1 - y  # image rows run against the local y axis
                labels[row - 1 : row + 2, x - 1 : x + 2] = cell_id[i]
            tifffile.imwrite(folder / "CellLabels" / f"CellLabels_F{int(fov):03d}.tif", labels)
            composite = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
            Image.fromarray(composite).save(folder / "CellComposite" / f"CellComposite_F{int(fov):03d}.jpg")
    return {
        "cell_ids": [f"{c}_{f}" for c, f in zip(cell_id, fovs, strict=True)],
        "counts": counts,
        "genes": list(genes),
        "global": glob,
        "local": local.astype(np.float64),
        "negative": negative,
        "negative_counts": negative_counts,
    }


STEREOSEQ_PADDING = 32767
"""Fill value of ``cellBin/cellBorder`` after a cell's last vertex."""


def _square_bin_gef(path: Path, bins: np.ndarray, bin_counts: np.ndarray, genes: Sequence[str]) -> None:
    """A square-bin GEF with the bin1 level: ``geneExp/bin1/gene`` and ``.../expression`` (gene-major)."""
    entries = [np.flatnonzero(bin_counts[:, j]) for j in range(len(genes))]
    expression = np.zeros(sum(e.size for e in entries), dtype=[("x", "<i4"), ("y", "<i4"), ("count", "<u2")])
    gene = np.zeros(len(genes), dtype=[("gene", "S64"), ("offset", "<u4"), ("count", "<u4")])
    at = 0
    for j, (name, rows) in enumerate(zip(genes, entries, strict=True)):
        gene[j] = (name.encode(), at, rows.size)
        expression[at : at + rows.size] = [(bins[r, 0], bins[r, 1], bin_counts[r, j]) for r in rows]
        at += rows.size
    with h5py.File(path, "w") as f:
        f.attrs["version"] = np.array([4], dtype=np.uint32)
        f.attrs["omics"] = np.bytes_("Transcriptomics")
        level = f.create_group("geneExp").create_group("bin1")
        level["gene"] = gene
        level["expression"] = expression
        attrs = level["expression"].attrs
        attrs["minX"] = np.array([bins[:, 0].min()], dtype=np.uint32)
        attrs["minY"] = np.array([bins[:, 1].min()], dtype=np.uint32)
        attrs["maxX"] = np.array([bins[:, 0].max()], dtype=np.uint32)
        attrs["maxY"] = np.array([bins[:, 1].max()], dtype=np.uint32)
        attrs["maxExp"] = np.array([bin_counts.max()], dtype=np.uint32)
        attrs["resolution"] = np.array([500], dtype=np.uint32)
        level["exon"] = np.zeros(len(expression), dtype=np.uint16)


def write_stereoseq(
    folder: str | Path,
    counts: np.ndarray,
    genes: Sequence[str],
    centres: np.ndarray,
    bins: np.ndarray,
    bin_counts: np.ndarray,
    *,
    sn: str = "C04042E3",
    cell_ids: Sequence[int] | None = None,
    normalized: bool = True,
    seed: int = 0,
) -> dict:
    """A SAW 7 output folder: cell bins with ``counts`` at ``centres``, square bins with ``bin_counts``.

    Parameters
    ----------
    folder
        Created with its parents.
    counts
        Integer MID counts, cells x genes (each cell with at least one).
    genes
        Gene names, in the GEF's order.
    centres
        (n_cells, 2) integer cell centres ``x``, ``y`` in DNB units (bin1, 500 nm apart).
    bins
        (n_bins, 2) integer bin1 coordinates of ``04.tissuecut/<SN>.tissuecut.gef``.
    bin_counts
        Integer counts, bins x genes, of that file.
    sn
        The chip's serial number, the prefix of the files.
    cell_ids
        The cells' ids (``cellBin/cell`` field ``id``, the h5ad's obs names); ``0, 1, ...`` if
        ``None``.
    normalized
        ``X`` of ``cell.cluster.h5ad`` log1p of counts per 10,000 with the counts in ``raw`` (as
        SAW's clustering writes it), else the counts.

    Returns
    -------
    ``{"cell_ids", "counts", "genes", "centres", "bins", "bin_counts"}``.
    """
    import anndata as ad
    import scipy.sparse as sp
    import tifffile

    folder = Path(folder)
    counts = np.asarray(counts, dtype=np.int64)
    centres = np.asarray(centres, dtype=np.int64)
    n_cells, n_genes = counts.shape
    rng = np.random.default_rng(seed)
    ids = np.arange(n_cells) if cell_ids is None else np.asarray(cell_ids)
    for sub in ("02.count", "03.register", "04.tissuecut", "041.cellcut", "051.cellcluster"):
        (folder / sub).mkdir(parents=True, exist_ok=True)

    _square_bin_gef(folder / "02.count" / f"{sn}.raw.gef", bins, bin_counts, genes)
    _square_bin_gef(folder / "04.tissuecut" / f"{sn}.tissuecut.gef", bins, bin_counts, genes)
    # the registered stain image and the cell mask (tiny: sfact reads neither)
    tifffile.imwrite(
        folder / "03.register" / f"{sn}_regist.tif", rng.integers(0, 255, (32, 32), dtype=np.uint8)
    )
    tifffile.imwrite(folder / "03.register" / f"{sn}_mask.tif", np.zeros((32, 32), dtype=np.uint8))

    # cellBin: cell-major entries (cellExp) located by each cell's offset and geneCount, and the
    # same entries gene-major (geneExp) located by each gene's offset and cellCount
    cells_of, genes_of = np.nonzero(counts)
    per_cell = np.bincount(cells_of, minlength=n_cells)
    genes_t, cells_t = np.nonzero(counts.T)
    per_gene = np.bincount(genes_t, minlength=n_genes)
    cell = np.zeros(
        n_cells,
        dtype=[
            ("id", "<u4"),
            ("x", "<i4"),
            ("y", "<i4"),
            ("offset", "<u4"),
            ("geneCount", "<u2"),
            ("expCount", "<u2"),
            ("dnbCount", "<u2"),
            ("area", "<u2"),
            ("cellTypeID", "<u2"),
            ("clusterID", "<u2"),
        ],
    )
    cell["id"] = ids
    cell["x"], cell["y"] = centres[:, 0], centres[:, 1]
    cell["offset"] = np.cumsum(per_cell) - per_cell
    cell["geneCount"] = per_cell
    cell["expCount"] = counts.sum(axis=1)
    cell["dnbCount"] = counts.sum(axis=1) + rng.integers(0, 5, n_cells)
    cell["area"] = rng.integers(60, 200, n_cells)
    cell["clusterID"] = rng.integers(0, 3, n_cells)
    cell_exp = np.zeros(cells_of.size, dtype=[("geneID", "<u4"), ("count", "<u2")])
    cell_exp["geneID"], cell_exp["count"] = genes_of, counts[cells_of, genes_of]
    gene_exp = np.zeros(genes_t.size, dtype=[("cellID", "<u4"), ("count", "<u2")])
    gene_exp["cellID"], gene_exp["count"] = cells_t, counts[cells_t, genes_t]
    gene = np.zeros(
        n_genes,
        dtype=[
            ("geneName", "S64"),
            ("offset", "<u4"),
            ("cellCount", "<u4"),
            ("expCount", "<u4"),
            ("maxMIDcount", "<u2"),
        ],
    )
    gene["geneName"] = [g.encode() for g in genes]
    gene["offset"] = np.cumsum(per_gene) - per_gene
    gene["cellCount"] = per_gene
    gene["expCount"] = counts.sum(axis=0)
    gene["maxMIDcount"] = counts.max(axis=0)
    border = np.full((n_cells, 32, 2), STEREOSEQ_PADDING, dtype=np.int16)
    border[:, :6] = [[-6, -2], [-2, -6], [4, -5], [6, 1], [2, 6], [-4, 5]]  # offsets from the centre
    with h5py.File(folder / "041.cellcut" / f"{sn}.cellbin.gef", "w") as f:
        f.attrs["version"] = np.array([2], dtype=np.uint32)
        f.attrs["geftool_ver"] = np.array([0, 7, 9], dtype=np.uint32)
        f.attrs["resolution"] = np.array([500], dtype=np.uint32)
        f.attrs["offsetX"] = np.array([0], dtype=np.int32)
        f.attrs["offsetY"] = np.array([0], dtype=np.int32)
        f.attrs["omics"] = np.bytes_("Transcriptomics")
        group = f.create_group("cellBin")
        group["cell"] = cell
        group["cellBorder"] = border
        group["cellExon"] = np.zeros(n_cells, dtype=np.uint16)
        group["cellExp"] = cell_exp
        group["cellExpExon"] = np.zeros(cells_of.size, dtype=np.uint16)
        group["gene"] = gene
        group["geneExon"] = np.zeros(n_genes, dtype=np.uint32)
        group["geneExp"] = gene_exp
        group["geneExpExon"] = np.zeros(genes_t.size, dtype=np.uint16)
        group["blockIndex"] = np.zeros(2, dtype=np.uint32)
        group["blockSize"] = np.array([256, 256, 1, 1], dtype=np.uint32)
        group["cellTypeList"] = np.array([b"default"], dtype="S32")

    obs = pd.DataFrame(index=[str(i) for i in ids])
    var = pd.DataFrame(index=list(genes))
    raw = sp.csr_matrix(counts.astype(np.float32))
    if normalized:
        scaled = counts / counts.sum(axis=1, keepdims=True) * 1e4
        adata = ad.AnnData(sp.csr_matrix(np.log1p(scaled).astype(np.float32)), obs=obs, var=var)
        adata.raw = ad.AnnData(raw, obs=obs, var=var)
    else:
        adata = ad.AnnData(raw, obs=obs, var=var)
    adata.obs["leiden"] = pd.Categorical(rng.integers(0, 3, n_cells).astype(str))
    adata.obsm["spatial"] = centres.astype(np.float64)
    adata.write_h5ad(folder / "051.cellcluster" / f"{sn}.cell.cluster.h5ad")
    return {
        "cell_ids": [str(i) for i in ids],
        "counts": counts,
        "genes": list(genes),
        "centres": centres.astype(np.float64),
        "bins": np.asarray(bins),
        "bin_counts": np.asarray(bin_counts),
    }
