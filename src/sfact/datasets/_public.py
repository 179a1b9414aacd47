"""Loaders for public data sets: downloaded through squidpy, or read from local files.

Every loader returns an :class:`~anndata.AnnData` in the same shape:

- raw, integer-valued counts in ``.X`` (float32; a :class:`scipy.sparse.csr_matrix` unless the
  file holds a small dense matrix). Where a file holds only normalized values (a per-cell
  scaling of the counts, or ``log1p`` of one) the counts are recovered exactly;
- coordinates in ``obsm['spatial']``, (n_obs, 2) float64;
- the group column (cell type or region) as a categorical under its own name in ``obs``, the
  loader's registered ``group_key``, with missing and unknown labels set to NaN.

Missing values are handled in one place: loaders drop no cell. Cells with NaN coordinates or a
missing label are kept (their numbers are logged) and :func:`sfact.pp.prepare` drops and counts
them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from sfact import _logging as logg
from sfact._utils import warn

from ._counts import _as_counts, _coordinates
from ._registry import LoaderInfo, _subsample_indices, register

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

Condition = Literal["healthy", "diseased", "both"]

_NA_LABELS = ("", "nan", "none", "na", "n/a", "null", "unknown", "unassigned")
"""Labels read as missing by every loader (compared case-insensitively, stripped)."""

_HEALTHY = ("healthy", "normal", "control", "ctrl")
"""Values of the liver condition column that mean healthy (case-insensitive)."""


# --- shared helpers --------------------------------------------------------------------------


def _read_h5ad(path: str | Path, **kwargs: Any) -> AnnData:
    from anndata import read_h5ad

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"No such data file: {str(path)!r}.")
    return read_h5ad(path, **kwargs)


def _groups(col: pd.Series, na_labels: Collection[str]) -> pd.Categorical:
    """A group column as a categorical, with missing and unknown labels as NaN."""
    import pandas as pd

    if isinstance(col.dtype, pd.CategoricalDtype):
        cat = col.array.copy()
    else:
        values = col.to_numpy(dtype=object)
        missing = pd.isna(values)
        values[~missing] = [str(v) for v in values[~missing]]
        cat = pd.Categorical(values)
    na = {str(v).strip().lower() for v in (*_NA_LABELS, *na_labels)}
    drop = [c for c in cat.categories if str(c).strip().lower() in na]
    if drop:
        cat = cat.remove_categories(drop)
    return cat.remove_unused_categories()


def _set_groups(adata: AnnData, key: str, source: str, na_labels: Collection[str]) -> None:
    if source not in adata.obs.columns:
        raise KeyError(
            f"`adata.obs[{source!r}]` not found: pass `group_key=` naming the column with the groups "
            f"(available: {list(adata.obs.columns)})."
        )
    adata.obs[key] = _groups(adata.obs[source], na_labels)


def _log_missing(adata: AnnData, group_key: str | None, name: str) -> None:
    n_coords = int((~np.isfinite(adata.obsm["spatial"]).all(axis=1)).sum())
    n_groups = int(adata.obs[group_key].isna().sum()) if group_key is not None else 0
    logg.info(
        f"    {name}: {adata.n_obs} cells x {adata.n_vars} genes; {n_coords} with missing coordinates and "
        f"{n_groups} with a missing or unknown `{group_key}` (left for `sfact.pp.prepare` to drop)"
    )


def _with_counts(adata: AnnData, X: Any, var: pd.DataFrame) -> AnnData:
    """A new AnnData with these counts and genes and ``adata``'s cells, coordinates and ``uns``."""
    from anndata import AnnData

    out = AnnData(X=X, obs=adata.obs.copy(), var=var.copy(), uns=dict(adata.uns))
    for key, value in adata.obsm.items():
        out.obsm[key] = value
    for key, value in adata.obsp.items():
        out.obsp[key] = value
    return out


def _squidpy_h5ad(name: str, path: str | Path | None, download: bool) -> AnnData:
    """Read a squidpy data set from ``path`` if it exists, else download it with squidpy."""
    if path is not None and Path(path).expanduser().is_file():
        return _read_h5ad(path)
    if not download:
        if path is None:
            raise ValueError("With `download=False`, pass `path=` naming the downloaded file.")
        raise FileNotFoundError(
            f"No such data file: {str(path)!r}; pass `download=True` to download it with squidpy."
        )
    import squidpy as sq

    return getattr(sq.datasets, name)(path=path)


def _from_raw(adata: AnnData, *, use_raw: bool, all_genes: bool, recover: bool) -> AnnData:
    """Counts from ``.raw`` (all its genes, or only those of ``.X``) or from ``.X``.

    With ``.raw``, the counts are recovered from all of its genes before any are dropped, so a
    cell's scale is read from every gene.
    """
    if not (use_raw and adata.raw is not None):
        return _with_counts(adata, _as_counts(adata.X, "adata.X", recover=recover), adata.var)
    raw = adata.raw
    idx = None
    if not all_genes:
        idx = raw.var_names.get_indexer(adata.var_names)
        if (idx < 0).any():
            raise KeyError(
                f"{int((idx < 0).sum())} genes of `adata.X` are missing from `adata.raw`; pass `all_genes=True`."
            )
    X = _as_counts(raw.X, "adata.raw.X", recover=recover, sparse=True)
    if idx is None:
        return _with_counts(adata, X, raw.var)
    return _with_counts(adata, X[:, idx], raw.var.iloc[idx])


# --- squidpy data sets -----------------------------------------------------------------------


def slideseqv2(
    *,
    path: str | Path | None = None,
    download: bool = True,
    all_genes: bool = True,
    use_raw: bool = True,
    recover_counts: bool = True,
) -> AnnData:
    """Slide-seqV2 mouse hippocampus (Stickels et al. 2021), squidpy's pre-processed subset.

    41,786 beads with annotated cell types (``obs['cluster']``), distributed by squidpy
    (:func:`squidpy.datasets.slideseqv2`) from https://exampledata.scverse.org/squidpy/. The
    file's ``.X`` holds 4,000 highly variable genes after normalization and ``.raw`` holds all
    genes, normalized and ``log1p``-transformed too: it has no raw counts (squidpy issue
    `#695 <https://github.com/scverse/squidpy/issues/695>`_). This loader recovers the integer
    counts from ``.raw`` exactly, by undoing the per-bead scaling and the ``log1p`` (see
    ``recover_counts``). Cite Stickels, R. R. et al., *Nat Biotechnol* 39:313-319 (2021),
    doi:10.1038/s41587-020-0739-1, and Palla, G. et al., *Nat Methods* 19:171-178 (2022) for
    squidpy; the data carry the terms of the original publication.

    No cell is dropped for a missing value: cells with missing coordinates or labels are kept
    (and counted in the log) for :func:`sfact.pp.prepare` to drop.

    Parameters
    ----------
    path
        An already-downloaded ``slideseqv2.h5ad`` to read (no network needed), or where to
        download it; ``None`` downloads to squidpy's cache (``scanpy.settings.datasetdir``).
    download
        Download the file with squidpy when ``path`` is ``None`` or does not exist; if
        ``False``, a missing file raises :class:`FileNotFoundError`.
    all_genes
        Return every gene of ``.raw``; if ``False``, only the 4,000 genes of ``.X``.
    use_raw
        Take the values from ``.raw`` (when the file has it); if ``False``, from ``.X``.
    recover_counts
        If the values are not integers but a per-bead scaling of integer counts, or ``log1p`` of
        one, recover the counts; if they are neither (or this is ``False``), return the values
        with a warning.

    Returns
    -------
    A new :class:`~anndata.AnnData` (41,786 beads) with:

    `.X`
        Raw counts, :class:`scipy.sparse.csr_matrix`, float32 with integer values.
    `.var`
        The genes of ``.raw`` (or of ``.X`` with ``all_genes=False``) and their annotations.
    `.obs`
        The file's bead annotations (QC metrics and clusterings), among them ``'cluster'``
        (the cell type: categorical, unknown labels as NaN).
    `.obsm['spatial']`
        Bead coordinates (n_obs, 2), float64, in the file's units; the file's other ``obsm`` and
        ``obsp`` entries are kept.
    `.uns`
        The file's ``uns`` (colours, neighbour-graph parameters).

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.slideseqv2(path="data/slideseqv2.h5ad")  # doctest: +SKIP
    >>> sfact.pp.prepare(adata, group_key="cluster")  # doctest: +SKIP
    """
    adata = _squidpy_h5ad("slideseqv2", path, download)
    out = _from_raw(adata, use_raw=use_raw, all_genes=all_genes, recover=recover_counts)
    out.obsm["spatial"] = _coordinates(adata.obsm["spatial"], "adata.obsm['spatial']")
    _set_groups(out, "cluster", "cluster", ())
    _log_missing(out, "cluster", "slideseqv2")
    return out


def visium_hne(
    *,
    path: str | Path | None = None,
    download: bool = True,
    all_genes: bool = True,
    use_raw: bool = True,
    recover_counts: bool = True,
) -> AnnData:
    """10x Visium H&E section of the adult mouse brain, squidpy's pre-processed version.

    2,688 spots x 18,078 genes of the 10x Genomics data set ``V1_Adult_Mouse_Brain`` (Space
    Ranger 1.1.0; 10x Genomics, CC BY 4.0), with brain regions annotated by the squidpy
    authors (``obs['cluster']``), distributed by squidpy (:func:`squidpy.datasets.visium_hne_adata`)
    from https://exampledata.scverse.org/squidpy/. The file's ``.X`` is normalized and
    ``log1p``-transformed; when the file has a ``.raw`` the values are taken from it. Integer
    counts are recovered exactly from either by undoing the per-spot scaling and the ``log1p``
    (see ``recover_counts``). Cite 10x Genomics and Palla, G. et al., *Nat Methods*
    19:171-178 (2022).

    No cell is dropped for a missing value: cells with missing coordinates or labels are kept
    (and counted in the log) for :func:`sfact.pp.prepare` to drop.

    Parameters
    ----------
    path
        An already-downloaded ``visium_hne_adata.h5ad`` to read (no network needed), or where to
        download it; ``None`` downloads to squidpy's cache (``scanpy.settings.datasetdir``).
    download
        Download the file with squidpy when ``path`` is ``None`` or does not exist; if
        ``False``, a missing file raises :class:`FileNotFoundError`.
    all_genes
        With a ``.raw``: return every gene of ``.raw``; if ``False``, only the genes of ``.X``.
    use_raw
        Take the values from ``.raw`` when the file has it; if ``False``, from ``.X``.
    recover_counts
        If the values are not integers but a per-spot scaling of integer counts, or ``log1p`` of
        one, recover the counts; if they are neither (or this is ``False``), return the values
        with a warning.

    Returns
    -------
    A new :class:`~anndata.AnnData` (2,688 spots) with:

    `.X`
        Raw counts, :class:`scipy.sparse.csr_matrix`, float32 with integer values.
    `.var`
        The genes (``'gene_ids'``, ``'feature_types'``, ``'genome'`` and QC columns).
    `.obs`
        ``'in_tissue'``, ``'array_row'``, ``'array_col'``, QC columns, ``'leiden'`` and
        ``'cluster'`` (the brain region: categorical, unknown labels as NaN).
    `.obsm['spatial']`
        Spot centres (n_obs, 2), float64, in full-resolution image pixels; the file's other
        ``obsm`` and ``obsp`` entries are kept.
    `.uns`
        The file's ``uns``, including ``'spatial'`` (images and scale factors).

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.visium_hne(path="data/visium_hne_adata.h5ad")  # doctest: +SKIP
    >>> sfact.pp.prepare(adata, group_key="cluster")  # doctest: +SKIP
    """
    adata = _squidpy_h5ad("visium_hne_adata", path, download)
    out = _from_raw(adata, use_raw=use_raw, all_genes=all_genes, recover=recover_counts)
    out.obsm["spatial"] = _coordinates(adata.obsm["spatial"], "adata.obsm['spatial']")
    _set_groups(out, "cluster", "cluster", ())
    _log_missing(out, "cluster", "visium_hne")
    return out


def merfish(
    *,
    path: str | Path | None = None,
    download: bool = True,
    bregma: float | Sequence[float] | None = None,
    drop_blank: bool = True,
    na_labels: Collection[str] = ("Ambiguous",),
    recover_counts: bool = True,
) -> AnnData:
    """MERFISH mouse hypothalamic preoptic region (Moffitt et al. 2018), squidpy's subset.

    73,655 cells x 161 features (genes and blank control barcodes) from 12 coronal sections of
    one animal, with 16 cell classes (``obs['Cell_class']``), distributed by squidpy
    (:func:`squidpy.datasets.merfish`) from https://exampledata.scverse.org/squidpy/; the
    original data are on Dryad (doi:10.5061/dryad.8t8s248, CC0). The authors published
    expression normalized by cell volume; when ``.X`` holds such a per-cell scaling of counts,
    the integer counts are recovered exactly (see ``recover_counts``), otherwise the values are
    returned with a warning. The sections share one (x, y) frame, so cells of different sections
    overlap in ``obsm['spatial']``: select sections with ``bregma``, or use the 3D coordinates
    ``obsm['spatial3d']``. Cite Moffitt, J. R. et al., *Science* 362:eaau5324 (2018),
    doi:10.1126/science.aau5324, and Palla, G. et al., *Nat Methods* 19:171-178 (2022).

    No cell is dropped for a missing value: cells with missing coordinates or labels are kept
    (and counted in the log) for :func:`sfact.pp.prepare` to drop.

    Parameters
    ----------
    path
        An already-downloaded ``merfish.h5ad`` to read (no network needed), or where to download
        it; ``None`` downloads to squidpy's cache (``scanpy.settings.datasetdir``).
    download
        Download the file with squidpy when ``path`` is ``None`` or does not exist; if
        ``False``, a missing file raises :class:`FileNotFoundError`.
    bregma
        Keep only the cells of these sections (values of ``obs['Bregma']``, e.g. ``-9`` in
        squidpy's file); ``None`` keeps all 12.
    drop_blank
        Drop the blank control barcodes (genes named ``'Blank...'``).
    na_labels
        Cell classes read as unknown and set to NaN (besides ``'nan'``, ``'unknown'`` and the
        like).
    recover_counts
        If the values are not integers but a per-cell scaling of integer counts, or ``log1p`` of
        one, recover the counts; if they are neither (or this is ``False``), return the values
        with a warning.

    Returns
    -------
    A new :class:`~anndata.AnnData` with:

    `.X`
        Counts, :class:`scipy.sparse.csr_matrix`, float32 (integer-valued unless a warning said
        otherwise).
    `.obs`
        ``'Cell_ID'``, ``'Animal_ID'``, ``'Animal_sex'``, ``'Behavior'``, ``'Bregma'`` (the
        section), ``'Centroid_X'``, ``'Centroid_Y'``, ``'Cell_class'`` (categorical,
        ``'Ambiguous'`` as NaN), ``'Neuron_cluster_ID'``, ``'batch'``.
    `.obsm['spatial']`
        Cell centroids (n_obs, 2), float64, in micrometres.
    `.obsm['spatial3d']`
        The centroids and the section's Bregma position (n_obs, 3), as in the file.

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.merfish(path="data/merfish.h5ad", bregma=-9)  # doctest: +SKIP
    >>> sfact.pp.prepare(adata, group_key="Cell_class")  # doctest: +SKIP
    """
    adata = _squidpy_h5ad("merfish", path, download)
    if bregma is not None:
        wanted = np.atleast_1d(np.asarray(bregma, dtype=np.float64))
        sections = adata.obs["Bregma"].astype(np.float64).to_numpy()
        keep = np.isin(sections, wanted)
        if not keep.any():
            raise ValueError(
                f"No cell has `obs['Bregma']` in {wanted.tolist()}; available sections: "
                f"{sorted(set(sections.tolist()))}."
            )
        adata = adata[keep].copy()
    if drop_blank:
        adata = adata[:, ~adata.var_names.astype(str).str.startswith("Blank")].copy()
    out = _with_counts(adata, _as_counts(adata.X, "adata.X", recover=recover_counts), adata.var)
    out.obsm["spatial"] = _coordinates(adata.obsm["spatial"], "adata.obsm['spatial']")
    _set_groups(out, "Cell_class", "Cell_class", na_labels)
    _log_missing(out, "Cell_class", "merfish")
    return out


# --- local files -----------------------------------------------------------------------------


def _sdmbench(path: str | Path, group_key: str, na_labels: Collection[str], name: str) -> AnnData:
    adata = _read_h5ad(path)
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    out = _with_counts(adata, _as_counts(adata.X, "adata.X"), adata.var)
    out.obsm["spatial"] = _coordinates(adata.obsm["spatial"], "adata.obsm['spatial']")
    _set_groups(out, group_key, group_key, na_labels)
    _log_missing(out, group_key, name)
    return out


def sdmbench_dlpfc(
    path: str | Path,
    *,
    group_key: str = "Region",
    na_labels: Collection[str] = (),
) -> AnnData:
    """One 10x Visium slide of human dorsolateral prefrontal cortex, as distributed by SDMBench.

    The 12 LIBD DLPFC slides (Maynard et al. 2021; ``151507``-``151510``, ``151669``-``151676``,
    3,460-4,789 spots x 33,538 genes each) with manual annotations of the cortical layers
    (``obs['Region']``: ``Layer1``-``Layer6`` and ``WM``; NaN for unannotated spots), one h5ad
    per slide as reprocessed by SDMBench (Zhao et al. 2024): download from
    http://sdmbench.drai.cn/ or https://figshare.com/projects/SDMBench/163942. Cite Maynard,
    K. R. et al., *Nat Neurosci* 24:425-436 (2021), doi:10.1038/s41593-020-00787-0, and Zhao,
    F. et al., *Nat Methods* (2024), doi:10.1038/s41592-024-02215-8; the data carry their terms.

    No cell is dropped for a missing value: cells with missing coordinates or labels are kept
    (and counted in the log) for :func:`sfact.pp.prepare` to drop.

    Parameters
    ----------
    path
        One slide's h5ad file, e.g. ``"151673.h5ad"``.
    group_key
        Column of ``obs`` with the groups (SDMBench's ground truth is ``'Region'``).
    na_labels
        Further labels read as unknown and set to NaN.

    Returns
    -------
    A new :class:`~anndata.AnnData` (spots x 33,538 genes) with:

    `.X`
        Raw counts, :class:`scipy.sparse.csr_matrix`, float32 with integer values.
    `.var`
        ``'gene_ids'``, ``'feature_types'``, ``'genome'``; gene names made unique if needed.
    `.obs`
        ``'in_tissue'``, ``'array_row'``, ``'array_col'``, ``group_key`` (categorical; the
        unannotated spots NaN) and any other columns of the file.
    `.obsm['spatial']`
        Spot centres (n_obs, 2), float64, in full-resolution image pixels.
    `.uns`
        The file's ``uns`` (``'spatial'``: images and scale factors).

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.sdmbench_dlpfc("151673.h5ad")  # doctest: +SKIP
    >>> sfact.pp.prepare(adata, group_key="Region")  # drops the unannotated spots  # doctest: +SKIP
    """
    return _sdmbench(path, group_key, na_labels, "sdmbench_dlpfc")


def sdmbench_osmfish(
    path: str | Path,
    *,
    group_key: str = "Region",
    na_labels: Collection[str] = (),
) -> AnnData:
    """The osmFISH mouse somatosensory cortex (Codeluppi et al. 2018), as distributed by SDMBench.

    4,839 cells x 33 genes: the valid cells of the bundled :func:`sfact.datasets.osmfish`
    (SDMBench removed the ``'Excluded'`` region), with the anatomical region
    (``obs['Region']``, 11 regions, SDMBench's ground truth) and the cell type
    (``obs['ClusterName']``), as ``Data/osmfish.h5ad`` of https://github.com/zhaofangyuan98/SDMBench
    (also on http://sdmbench.drai.cn/). Cite Codeluppi, S. et al., *Nat Methods* 15:932-935
    (2018), doi:10.1038/s41592-018-0175-z, and Zhao, F. et al., *Nat Methods* (2024),
    doi:10.1038/s41592-024-02215-8.

    No cell is dropped for a missing value: cells with missing coordinates or labels are kept
    (and counted in the log) for :func:`sfact.pp.prepare` to drop.

    Parameters
    ----------
    path
        The ``osmfish.h5ad`` file.
    group_key
        Column of ``obs`` with the groups: ``'Region'`` (SDMBench's ground truth) or
        ``'ClusterName'`` (the cell type, the group of the bundled osmFISH).
    na_labels
        Further labels read as unknown and set to NaN.

    Returns
    -------
    A new :class:`~anndata.AnnData` (4,839 x 33) with:

    `.X`
        Raw counts, dense float32 with integer values.
    `.obs`
        ``'ClusterName'``, ``'ClusterID'``, ``'Region'``; ``group_key`` is categorical with
        unknown labels as NaN.
    `.obsm['spatial']`
        Cell centroids (n_obs, 2), float64, in the original pixel units.
    `.uns`
        The file's ``uns`` (``'ClusterName_colors'``).

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.sdmbench_osmfish("osmfish.h5ad")  # doctest: +SKIP
    >>> sfact.pp.prepare(adata, group_key="Region")  # doctest: +SKIP
    """
    return _sdmbench(path, group_key, na_labels, "sdmbench_osmfish")


def _split_condition(values: pd.Series, condition: str) -> np.ndarray:
    """Cells of a condition: ``"both"``, ``"healthy"``, ``"diseased"`` or an exact value."""
    labels = values.astype(object).to_numpy()
    if condition == "both":
        return np.ones(labels.size, dtype=bool)
    present = sorted({str(v) for v in labels if v == v})
    if condition in present:
        return np.array([str(v) == condition for v in labels])
    healthy = [v for v in present if v.strip().lower() in _HEALTHY]
    if condition not in ("healthy", "diseased") or not healthy:
        raise ValueError(
            f"Cannot select `condition={condition!r}`: the condition column has the values {present}; "
            "pass one of them, or 'both'."
        )
    is_healthy = np.array([str(v) in healthy for v in labels])
    return is_healthy if condition == "healthy" else ~is_healthy


def liver_merfish(
    path: str | Path,
    *,
    condition: Condition | str = "healthy",
    group_key: str | None = None,
    condition_key: str = "condition",
    samples: str | Sequence[str] | None = None,
    sample_key: str = "sample_id",
    spatial_key: str | None = None,
    counts_layer: str | None = None,
    na_labels: Collection[str] = (),
) -> AnnData:
    """MERFISH of healthy and fibrotic human liver (Watson et al. 2025), from its h5ad files.

    A 317-gene MERFISH panel measured in human liver sections, published on Dryad
    (doi:10.5061/dryad.37pvmcvsg, CC0) as ``adata_healthy_merfish.h5ad`` (healthy donors,
    about 90,000 cells, cell types in ``obs['Cell_Type']``: hepatocytes 1-3, cholangiocytes,
    LSECs, stellate cells, macrophages) and ``adata_healthy_diseased_merfish.h5ad`` (healthy
    and fibrotic donors, about 310,000 cells, cell types in ``obs['Cell_Type_final']``). Both
    keep the raw counts in ``.raw`` and the coordinates in ``obsm['X_spatial']``. The cell type
    is returned as ``obs['Cell_Type']`` from either file. Cite Watson, B. R. et al., *Nat
    Commun* 16:319 (2025), doi:10.1038/s41467-024-55325-4.

    The schema was established from code that reads these files, not from the files
    themselves: the names of the condition and sample columns and their values are not known
    for certain, hence ``condition_key``, ``sample_key``, ``spatial_key`` and ``counts_layer``.

    No cell is dropped for a missing value: cells with missing coordinates or labels are kept
    (and counted in the log) for :func:`sfact.pp.prepare` to drop.

    Parameters
    ----------
    path
        One of the two h5ad files.
    condition
        ``"healthy"``, ``"diseased"`` (every non-healthy cell), ``"both"``, or a value of
        ``obs[condition_key]``. Healthy cells are those whose condition reads ``'healthy'``,
        ``'normal'`` or ``'control'`` (any case). A file without ``obs[condition_key]`` is
        taken as one condition: all of it is returned for ``"healthy"`` and ``"both"``, and
        ``"diseased"`` raises (pass the combined file).
    group_key
        Column of ``obs`` with the cell type; ``None`` uses ``'Cell_Type_final'`` if the file
        has it, else ``'Cell_Type'``. It is written to ``obs['Cell_Type']``; a different
        ``'Cell_Type'`` column already in the file is kept as ``'Cell_Type_original'``.
    condition_key
        Column of ``obs`` with the condition.
    samples
        Keep only the cells of these samples (values of ``obs[sample_key]``): the sections
        have separate coordinate frames, which overlap.
    sample_key
        Column of ``obs`` with the sample (section or donor).
    spatial_key
        Key of ``obsm`` with the coordinates; ``None`` uses ``'X_spatial'`` or ``'spatial'``,
        else ``obs[['x', 'y']]``.
    counts_layer
        Layer with the raw counts; ``None`` uses ``layers['counts']`` if present, else
        ``.raw``, else ``.X``.
    na_labels
        Further cell-type labels read as unknown and set to NaN.

    Returns
    -------
    A new :class:`~anndata.AnnData` (cells x 317 genes) with:

    `.X`
        Raw counts, float32 with integer values: a :class:`scipy.sparse.csr_matrix` when the
        matrix has more than 10 million entries and at most half are non-zero, dense otherwise.
    `.var`
        The genes of the counts slot used.
    `.obs`
        The file's cell annotations, with ``'Cell_Type'`` (categorical, unknown labels NaN).
    `.obsm['spatial']`
        Cell centroids (n_obs, 2), float64, in the file's units (micrometres); the file's
        other ``obsm`` entries (``'X_spatial'``, ``'X_pca'``, ``'X_umap'``, ...) are kept.
    `.uns`
        The file's ``uns``.

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.liver_merfish("adata_healthy_merfish.h5ad")  # doctest: +SKIP
    >>> sfact.pp.prepare(adata, group_key="Cell_Type")  # doctest: +SKIP
    >>> fibrotic = sfact.datasets.liver_merfish(
    ...     "adata_healthy_diseased_merfish.h5ad", condition="diseased"
    ... )  # doctest: +SKIP
    """
    adata = _read_h5ad(path)
    if condition_key in adata.obs.columns:
        keep = _split_condition(adata.obs[condition_key], condition)
        if not keep.all():
            adata = adata[keep].copy()
    elif condition not in ("healthy", "both"):
        raise KeyError(
            f"`adata.obs[{condition_key!r}]` not found, so {str(path)!r} holds one condition: pass the "
            "combined healthy/diseased file, or `condition_key=` naming the condition column "
            f"(available: {list(adata.obs.columns)})."
        )
    if samples is not None:
        if sample_key not in adata.obs.columns:
            raise KeyError(
                f"`adata.obs[{sample_key!r}]` not found: pass `sample_key=` naming the sample column "
                f"(available: {list(adata.obs.columns)})."
            )
        wanted = [samples] if isinstance(samples, str) else [str(s) for s in samples]
        keep = adata.obs[sample_key].astype(str).isin(wanted).to_numpy()
        if not keep.any():
            raise ValueError(
                f"No cell has `obs[{sample_key!r}]` in {wanted}; available: "
                f"{sorted(adata.obs[sample_key].astype(str).unique())}."
            )
        adata = adata[keep].copy()

    if counts_layer is not None:
        if counts_layer not in adata.layers:
            raise KeyError(
                f"`adata.layers[{counts_layer!r}]` not found; available layers: {list(adata.layers.keys())}."
            )
        X, var, slot = adata.layers[counts_layer], adata.var, f"adata.layers[{counts_layer!r}]"
    elif "counts" in adata.layers:
        X, var, slot = adata.layers["counts"], adata.var, "adata.layers['counts']"
    elif adata.raw is not None:
        X, var, slot = adata.raw.X, adata.raw.var, "adata.raw.X"
    else:
        X, var, slot = adata.X, adata.var, "adata.X"
    out = _with_counts(adata, _as_counts(X, slot), var)

    if spatial_key is None:
        spatial_key = next((k for k in ("X_spatial", "spatial") if k in adata.obsm), None)
    if spatial_key is not None:
        if spatial_key not in adata.obsm:
            raise KeyError(
                f"`adata.obsm[{spatial_key!r}]` not found: pass `spatial_key=` naming the coordinates "
                f"(available: {list(adata.obsm.keys())})."
            )
        out.obsm["spatial"] = _coordinates(adata.obsm[spatial_key], f"adata.obsm[{spatial_key!r}]")
    elif {"x", "y"} <= set(adata.obs.columns):
        out.obsm["spatial"] = _coordinates(adata.obs[["x", "y"]], "adata.obs[['x', 'y']]")
    else:
        raise KeyError(
            "No coordinates found (`obsm['X_spatial']`, `obsm['spatial']` or `obs[['x', 'y']]`): pass "
            f"`spatial_key=` (available obsm keys: {list(adata.obsm.keys())})."
        )

    if group_key is None:
        group_key = "Cell_Type_final" if "Cell_Type_final" in adata.obs.columns else "Cell_Type"
    if group_key != "Cell_Type" and "Cell_Type" in out.obs.columns:
        out.obs = out.obs.rename(columns={"Cell_Type": "Cell_Type_original"})
    _set_groups(out, "Cell_Type", group_key, na_labels)
    _log_missing(out, "Cell_Type", "liver_merfish")
    return out


def _align_labels(obs_names: pd.Index, labels: pd.DataFrame, label_key: str) -> pd.Series:
    """Labels per cell, matched by cell ID; by position in sorted-ID order if no ID matches."""
    import pandas as pd

    if label_key not in labels.columns:
        raise KeyError(
            f"Column {label_key!r} not found in the labels file: pass `label_key=` "
            f"(available: {list(labels.columns)})."
        )
    ids = pd.Index(labels.index.astype(str))
    if not ids.is_unique:
        raise ValueError("The labels file has repeated cell IDs in its first column.")
    col = labels[label_key]
    matched = ids.get_indexer(obs_names.astype(str))
    if (matched >= 0).any():
        values = col.to_numpy(dtype=object)
        out = np.where(matched >= 0, values[np.maximum(matched, 0)], None)
        logg.info(f"    matched labels to {int((matched >= 0).sum())} of {obs_names.size} cells by cell ID")
        return pd.Series(out, index=obs_names, dtype=object)
    if len(labels) != obs_names.size:
        raise ValueError(
            f"No cell ID of the labels file matches the cells' IDs and it has {len(labels)} rows for "
            f"{obs_names.size} cells, so it cannot be aligned."
        )
    warn(
        "No cell ID of the labels file matches the cells' IDs; aligning the labels by position, "
        "with the cells sorted by ID (as the labels were written)."
    )
    order = np.argsort(obs_names.to_numpy(dtype=str), kind="stable")
    out = np.empty(obs_names.size, dtype=object)
    out[order] = col.to_numpy(dtype=object)
    return pd.Series(out, index=obs_names, dtype=object)


def colon_merfish(
    path: str | Path,
    *,
    labels: str | Path,
    label_key: str = "cl46v1SubShort_ds",
    subsample: int | float | None = None,
    random_state: int = 0,
) -> AnnData:
    """Vizgen MERFISH of human colorectal cancer, with cell-type labels from a CSV file.

    The Vizgen MERSCOPE FFPE human immuno-oncology release for colon cancer
    (``HuColonCa-FFPE-ImmuOnco-LH``, 2022-04-27; about 1.2 million cells x 492 genes after
    segmentation), as an h5ad with the counts in ``.X``, the centroids in ``obsm['spatial']``
    (a data frame with columns ``x`` and ``y``) and only ``obs['n_counts']`` as annotation,
    plus a CSV of predicted cell types whose first column holds the cell IDs and whose
    ``label_key`` column the labels (by default ``'cl46v1SubShort_ds'``, the fine cell states of
    the colorectal cancer atlas of Pelka et al. 2021: ``gB1``, ``gM01``-``gM07``, ``gS01``-...).
    The labels are matched to the cells by ID; when no ID matches and the file has one row per
    cell, by position in the order of the sorted cell IDs (the order the labels were written
    in, with a warning). Cells without a label get NaN. Cite Vizgen's data release and Pelka,
    K. et al., *Cell* 184:4734-4752 (2021), doi:10.1016/j.cell.2021.08.003, for the labels.

    The schema was established from code that reads these files, not from the files
    themselves: ``label_key`` names the label column.

    No cell is dropped for a missing value: cells with missing coordinates or labels are kept
    (and counted in the log) for :func:`sfact.pp.prepare` to drop.

    Parameters
    ----------
    path
        The h5ad file with the counts, or the release's MERSCOPE region folder itself
        (``cell_by_gene.csv``, ``cell_metadata.csv``, ``images/``), read by spatialdata-io
        through :func:`sfact.datasets.read` (the ``spatialdata`` extra); the cells are then named
        by their ``EntityID``.
    labels
        The CSV file with the cell types.
    label_key
        Column of the CSV with the cell types.
    subsample
        Keep this many cells (int) or this fraction of them (float in (0, 1]), the same cells
        :func:`sfact.datasets.load` would keep, read from disk without loading the other cells'
        counts.
    random_state
        Seed of the subsample.

    Returns
    -------
    A new :class:`~anndata.AnnData` (cells x 492 genes) with:

    `.X`
        Raw counts, :class:`scipy.sparse.csr_matrix`, float32 with integer values.
    `.obs`
        The file's annotations (``'n_counts'``) and ``label_key`` (categorical; cells without
        a label NaN).
    `.obsm['spatial']`
        Cell centroids (n_obs, 2), float64, in micrometres (a plain array).

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.colon_merfish(
    ...     "HuColonCa_20220427.h5ad", labels="HuColonCa_20220427_labels.csv", subsample=100_000
    ... )  # doctest: +SKIP
    >>> sfact.pp.prepare(adata, group_key="cl46v1SubShort_ds")  # doctest: +SKIP
    """
    import pandas as pd

    labels_path = Path(labels).expanduser()
    if not labels_path.is_file():
        raise FileNotFoundError(f"No such labels file: {str(labels_path)!r}.")
    table = pd.read_csv(labels_path, index_col=0)
    if Path(path).expanduser().is_dir():  # the vendor's folder: spatialdata-io's MERSCOPE reader
        from ._read import read

        out = read(path, "merscope")
        idx = _subsample_indices(out.n_obs, subsample, random_state)
        if idx is not None:
            out = out[idx].copy()
        out.obs[label_key] = _align_labels(out.obs_names, table, label_key).to_numpy()
        _set_groups(out, label_key, label_key, ())
        _log_missing(out, label_key, "colon_merfish")
        return out
    backed = _read_h5ad(path, backed="r")
    try:
        names = backed.obs_names.copy()
        idx = _subsample_indices(backed.n_obs, subsample, random_state)
        adata = backed.to_memory() if idx is None else backed[idx].to_memory()
    finally:
        backed.file.close()
    groups = _align_labels(names, table, label_key)
    coords = _coordinates(adata.obsm["spatial"], "adata.obsm['spatial']")
    del adata.obsm["spatial"]
    out = _with_counts(adata, _as_counts(adata.X, "adata.X", sparse=True), adata.var)
    out.obsm["spatial"] = coords
    out.obs[label_key] = groups.loc[out.obs_names].to_numpy()
    _set_groups(out, label_key, label_key, ())
    _log_missing(out, label_key, "colon_merfish")
    return out


# --- registry ----------------------------------------------------------------------------------

register(
    LoaderInfo(
        "slideseqv2",
        slideseqv2,
        "cluster",
        False,
        "Slide-seqV2 mouse hippocampus (squidpy)",
        accepts_path=True,
    )
)
register(
    LoaderInfo(
        "visium_hne", visium_hne, "cluster", False, "10x Visium H&E mouse brain (squidpy)", accepts_path=True
    )
)
register(
    LoaderInfo(
        "merfish", merfish, "Cell_class", False, "MERFISH mouse hypothalamus (squidpy)", accepts_path=True
    )
)
register(LoaderInfo("sdmbench_dlpfc", sdmbench_dlpfc, "Region", True, "SDMBench Visium DLPFC slide (h5ad)"))
register(LoaderInfo("sdmbench_osmfish", sdmbench_osmfish, "Region", True, "SDMBench osmFISH (h5ad)"))
register(
    LoaderInfo(
        "liver_merfish", liver_merfish, "Cell_Type", True, "MERFISH human liver, healthy/fibrotic (h5ad)"
    )
)
register(
    LoaderInfo(
        "colon_merfish",
        colon_merfish,
        "cl46v1SubShort_ds",
        True,
        "Vizgen MERFISH colon cancer (h5ad or MERSCOPE folder + labels CSV)",
        subsamples=True,
    )
)
