"""Small real data sets shipped with sfact (no network needed)."""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from anndata import AnnData

_OSMFISH = "osmfish_codeluppi2018.h5ad"
_PROSTATE = "visium_prostate_2samples.h5ad"
_DENTATE_GYRUS = "visium_mouse_dentate_gyrus.h5ad"


def _read(filename: str) -> AnnData:
    """Read a bundled h5ad file into memory (a fresh object on every call)."""
    from anndata import read_h5ad

    resource = resources.files(__package__).joinpath("data", filename)
    with resources.as_file(resource) as path:
        if not path.is_file():
            raise FileNotFoundError(
                f"The bundled data file {filename!r} is missing from the sfact installation ({path}); "
                "reinstall sfact."
            )
        return read_h5ad(path)


def _remove_unused_categories(adata: AnnData) -> None:
    for key, col in adata.obs.items():
        if isinstance(col.dtype, pd.CategoricalDtype):
            adata.obs[key] = col.cat.remove_unused_categories()


def osmfish(*, valid_only: bool = True) -> AnnData:
    """Bundled osmFISH data of the mouse somatosensory cortex (Codeluppi et al. 2018).

    33 genes measured by single-molecule FISH in 6,471 segmented cells (Codeluppi et al.,
    *Nat Methods* 15:932, 2018). By default only the 4,839 cells the authors marked valid are kept
    (``obs['Valid'] == 1``, the same cells as dropping ``obs['Region'] == 'Excluded'``), the
    standard benchmark set (SDMBench uses the same cells). 952 valid cells share their
    exact coordinates with another cell. Distributed under the MIT licence by
    drieslab/spatial-datasets; see ``sfact/datasets/data/README.md``.

    Parameters
    ----------
    valid_only
        Keep only the valid cells (4,839); otherwise return all 6,471, including the 1,632 in
        the ``'Excluded'`` region (all of them in the ``'Excluded'`` cluster).

    Returns
    -------
    A new in-memory :class:`~anndata.AnnData` (4,839 x 33 or 6,471 x 33) on every call, with
    unused categories removed, and:

    `.X`
        Raw counts, dense float32 with integer values.
    `.obsm['spatial']`
        Cell centroids (n_obs, 2), float64, in the original pixel units (up to about 24,000 x
        49,600), as published.
    `.obs`
        ``'CellID'``, ``'ClusterID'``, ``'ClusterName'`` (cell type; 31 categories among the
        valid cells, 32 with ``'Excluded'`` otherwise), ``'Region'`` (11 anatomical regions,
        12 with ``'Excluded'``), ``'Total_molecules'``, ``'Valid'`` (0/1), ``'X'``, ``'Y'``
        (the coordinates again), ``'_tSNE_1'``, ``'_tSNE_2'``, ``'size_pix'``, ``'size_um2'``.

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.osmfish()
    >>> adata.shape
    (4839, 33)
    >>> sfact.pp.prepare(adata, group_key="ClusterName")
    """
    adata = _read(_OSMFISH)
    if valid_only:
        adata = adata[adata.obs["Valid"].to_numpy() == 1].copy()
    _remove_unused_categories(adata)
    return adata


def visium_prostate() -> AnnData:
    """10x Visium FFPE human prostate, a normal (NP) and a cancer (CP) section, bundled.

    2,327 spots x 1,255 genes from two sections placed side by side in one coordinate space
    (the data provider shifted them apart along the first axis, so they do not overlap). The
    sample is ``obs['list_ID']``: 987 spots of ``'NP'`` and 1,340 of ``'CP'``. Distributed
    under the MIT licence by drieslab/GiottoData (``Mini_datasets/Visium_multisample``); see
    ``sfact/datasets/data/README.md``.

    Returns
    -------
    A new in-memory :class:`~anndata.AnnData` (2,327 x 1,255) with:

    `.X`
        Raw counts, :class:`scipy.sparse.csr_matrix`, float32 with integer values (about 21%
        non-zero).
    `.obsm['spatial']`
        Spot coordinates (n_obs, 2), float64, in pixel units.
    `.obs`
        ``'in_tissue'`` (all 1), ``'array_row'``, ``'array_col'`` (Visium grid position),
        ``'list_ID'`` (categorical sample, categories ``['CP', 'NP']``). ``obs_names`` are the
        barcodes prefixed with the sample (``'NP-AAAC...-1'``).

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.visium_prostate()
    >>> adata.obs["list_ID"].value_counts().to_dict()
    {'CP': 1340, 'NP': 987}
    """
    return _read(_PROSTATE)


def visium_dentate_gyrus() -> AnnData:
    """10x Visium mouse brain cropped to the dentate gyrus, bundled.

    624 spots x 634 genes from one section, with no annotation of spot types. Distributed under
    the MIT licence by drieslab/GiottoData (``Mini_datasets/Visium``); see
    ``sfact/datasets/data/README.md``.

    Returns
    -------
    A new in-memory :class:`~anndata.AnnData` (624 x 634) with:

    `.X`
        Raw counts, :class:`scipy.sparse.csr_matrix`, float32 with integer values (about 43%
        non-zero).
    `.obsm['spatial']`
        Spot coordinates (n_obs, 2), float64, in pixel units (the second axis is negative).

    ``obs`` has no columns (``obs_names`` are the spot barcodes), so there is no group key.

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.visium_dentate_gyrus()
    >>> adata.shape
    (624, 634)
    """
    return _read(_DENTATE_GYRUS)
