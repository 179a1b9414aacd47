"""Vendor output folders (Xenium, Visium, Visium HD, MERSCOPE, CosMx, Stereo-seq) read by spatialdata-io.

sfact does not parse the instruments' files itself: :func:`read` finds which technology wrote a
folder, calls the maintained reader of `spatialdata-io <https://spatialdata.scverse.org/projects/io>`_
for it (images, transcripts and boundaries skipped unless asked for), and returns the cell (or
spot, or bin) table as an AnnData ready for :func:`sfact.pp.prepare`: raw counts in ``.X``,
coordinates in ``obsm['spatial']``. ``spatialdata-io`` is an optional dependency
(``pip install 'sfact[spatialdata]'``), imported only here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sfact import _logging as logg

from ._registry import LoaderInfo, register

if TYPE_CHECKING:
    from anndata import AnnData


@dataclass(frozen=True)
class ReaderInfo:
    """How one technology's output folder is recognized and read.

    Examples
    --------
    >>> import sfact
    >>> sorted(sfact.datasets.READERS)[:3]
    ['cosmx', 'merscope', 'stereoseq']
    """

    technology: str
    """The name passed as ``technology=``, e.g. ``"xenium"``."""
    function: str
    """The reader's name in :mod:`spatialdata_io`."""
    markers: tuple[str, ...]
    """Glob patterns (relative to the folder, searched up to two levels deep): a folder holding a
    match of any of them was written by this technology."""
    description: str
    """One line: the instrument and what :func:`read` takes from it."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments of the spatialdata-io reader that skip what sfact does not use (images,
    transcripts, boundaries); a keyword passed to :func:`read` overrides them."""
    excludes: tuple[str, ...] = ()
    """Glob patterns of another technology whose folder also matches ``markers`` (Visium HD
    folders hold Visium files): a match rules this technology out."""
    prepare: Callable[[Path, dict[str, Any]], None] | None = None
    """Optional hook adjusting the reader's keyword arguments for this folder (in place)."""


def _visium_hd_bins(path: Path, kwargs: dict[str, Any]) -> None:
    """Visium HD: one bin size by default (16 µm when written, else 8 µm), not every bin size."""
    if "bin_size" in kwargs:
        return
    sizes = sorted(
        int(p.name[len("square_") : -len("um")])
        for p in path.glob("**/square_*um")
        if p.is_dir() and p.name[len("square_") : -len("um")].isdigit()
    )
    if not sizes:
        return
    chosen = 16 if 16 in sizes else (8 if 8 in sizes else sizes[-1])
    if len(sizes) > 1:
        logg.info(f"    visium_hd: reading the {chosen} µm bins of {sizes} (pass `bin_size=` for another)")
    kwargs["bin_size"] = chosen


READERS: dict[str, ReaderInfo] = {
    info.technology: info
    for info in (
        ReaderInfo(
            "xenium",
            "xenium",
            ("experiment.xenium",),
            "10x Genomics Xenium output folder (cells, their centroids and counts)",
            defaults={
                "cells_boundaries": False,
                "nucleus_boundaries": False,
                "cells_as_circles": False,
                "cells_labels": False,
                "nucleus_labels": False,
                "transcripts": False,
                "morphology_mip": False,
                "morphology_focus": False,
                "aligned_images": False,
            },
        ),
        ReaderInfo(
            "visium",
            "visium",
            ("spatial/tissue_positions.csv", "spatial/tissue_positions_list.csv"),
            "10x Genomics Visium Space Ranger output folder (spots and their counts)",
            excludes=("binned_outputs", "**/square_*um"),
        ),
        ReaderInfo(
            "visium_hd",
            "visium_hd",
            ("binned_outputs", "square_*um"),
            "10x Genomics Visium HD Space Ranger output folder (bins of one size and their counts)",
            defaults={"load_all_images": False},
            prepare=_visium_hd_bins,
        ),
        ReaderInfo(
            "merscope",
            "merscope",
            ("cell_by_gene.csv", "*cell_by_gene*.csv"),
            "Vizgen MERSCOPE output folder (cells, their centres and counts)",
            defaults={"transcripts": False, "cells_boundaries": False, "mosaic_images": False},
        ),
        ReaderInfo(
            "cosmx",
            "cosmx",
            ("*exprMat_file.csv",),
            "NanoString CosMx SMI flat-file export (cells, their global centres and counts)",
            defaults={"transcripts": False},
        ),
        ReaderInfo(
            "stereoseq",
            "stereoseq",
            ("*.cellbin.gef", "*.tissuecut.gef", "*.gef"),
            "BGI STOmics Stereo-seq SAW output folder (cell bins or square bins and their counts)",
            defaults={"optional_tif": False},
        ),
    )
}
"""Every technology :func:`read` knows, by name."""


def _matches(path: Path, patterns: tuple[str, ...]) -> str | None:
    """The first file or folder below ``path`` (up to two levels deep) matching one of ``patterns``."""
    for pattern in patterns:
        for depth in ("", "*/", "*/*/"):
            hit = next(iter(sorted(path.glob(depth + pattern))), None)
            if hit is not None:
                return str(hit.relative_to(path))
    return None


def detect_technology(path: str | Path) -> str:
    """The technology that wrote an output folder, from the files it holds.

    Parameters
    ----------
    path
        The instrument's (or its software's) output folder.

    Returns
    -------
    A key of :data:`~sfact.datasets.READERS`, e.g. ``"xenium"``.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        ``path`` is not a folder, or no known technology's files are in it.

    Examples
    --------
    >>> import sfact
    >>> sfact.datasets.detect_technology("Xenium_V1_hLung/")  # doctest: +SKIP
    'xenium'
    """
    path = _folder(path)
    found = _found(path)
    if not found:
        raise ValueError(
            f"{str(path)!r} holds none of the files sfact recognizes ({_expected()}): pass the "
            "instrument's output folder, or `technology=` to read it anyway."
        )
    return next(iter(found))


def _found(path: Path) -> dict[str, str]:
    """Technologies whose marker files are in ``path``: name -> the file that shows it."""
    found = {}
    for name, info in READERS.items():
        hit = _matches(path, info.markers)
        if hit is not None and not (info.excludes and _matches(path, info.excludes)):
            found[name] = hit
    return found


def _expected() -> str:
    return "; ".join(f"{name}: {info.markers[0]}" for name, info in READERS.items())


def _folder(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"No such folder: {str(path)!r}. Pass the folder the instrument (or Space Ranger, Xenium "
            "Ranger, ...) wrote, e.g. the Xenium output folder holding `experiment.xenium`."
        )
    if not path.is_dir():
        raise ValueError(
            f"{str(path)!r} is a file; pass the output folder that holds it (for an .h5ad file use "
            "`anndata.read_h5ad`, for a SpatialData .zarr `spatialdata.read_zarr`)."
        )
    return path


def _spatialdata_io() -> Any:
    try:
        import spatialdata_io
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Reading vendor output folders needs spatialdata-io: `pip install 'sfact[spatialdata]'` "
            "(or `pip install spatialdata-io`)."
        ) from err
    return spatialdata_io


def read(
    path: str | Path,
    technology: str = "auto",
    *,
    table_key: str | None = None,
    coordinate_system: str | None = None,
    return_spatialdata: bool = False,
    **reader_kwargs: Any,
) -> AnnData | Any:
    """Read an instrument's output folder with spatialdata-io, as a table ready for :func:`sfact.pp.prepare`.

    The folder is read by the maintained reader of `spatialdata-io`_ for its technology, without
    images, transcripts or boundaries unless asked for (``reader_kwargs``), and its table (cells,
    spots or bins x genes) is returned with raw counts in ``.X`` and coordinates in
    ``obsm['spatial']``: the table's own, or else the centroids of the shapes or labels it
    annotates, as :func:`sfact.pp.prepare` finds them in a SpatialData.

    .. _spatialdata-io: https://spatialdata.scverse.org/projects/io

    Parameters
    ----------
    path
        The output folder: Xenium (``experiment.xenium``), Visium (Space Ranger ``outs/`` with
        ``spatial/``), Visium HD (``outs/`` with ``binned_outputs/``), MERSCOPE
        (``cell_by_gene.csv``), CosMx (``*_exprMat_file.csv``) or Stereo-seq (``*.gef``); see
        :data:`~sfact.datasets.READERS`.
    technology
        A key of :data:`~sfact.datasets.READERS`, or ``"auto"`` (default) to tell it from the
        folder's files. A folder whose files belong to another technology raises an error
        naming it.
    table_key
        The table to return when the reader writes several (e.g. one per Visium HD bin size);
        ``None`` for the only one.
    coordinate_system
        Coordinate system of centroids taken from shapes or labels; ``None`` for the element's
        only one, else ``"global"``.
    return_spatialdata
        Return the whole :class:`spatialdata.SpatialData` (its table with ``obsm['spatial']`` set),
        to fit with ``table_key=`` and write the results back with ``sdata.write()``.
    **reader_kwargs
        Passed to the spatialdata-io reader, overriding sfact's defaults
        (:attr:`ReaderInfo.defaults`), e.g. ``transcripts=True`` or, for Visium HD,
        ``bin_size=8``.

    Returns
    -------
    A new :class:`~anndata.AnnData` (the table) with:

    `.X`
        Raw counts, :class:`scipy.sparse.csr_matrix`, float32 with integer values.
    `.obs`, `.var`
        The table's annotations and genes (gene names made unique).
    `.obsm['spatial']`
        Coordinates (n_obs, 2), float64, in the reader's units (micrometres for Xenium,
        MERSCOPE; pixels of the full-resolution image for Visium).
    `.uns['sfact_read']`
        ``technology``, ``path``, ``table_key`` and the spatialdata-io version.

    With ``return_spatialdata=True``, the SpatialData instead.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        ``path`` is a file; its files belong to another technology than ``technology``, or to
        none; the reader writes several tables and ``table_key`` is not given; the table holds
        no integer counts.
    KeyError
        Unknown ``technology``, or ``table_key`` not among the tables.
    ImportError
        spatialdata-io is not installed.

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.read("Xenium_V1_hLung/")  # doctest: +SKIP
    >>> sfact.pp.prepare(adata)  # doctest: +SKIP
    >>> sfact.tl.fit(adata, prior="svgp")  # doctest: +SKIP
    """
    if technology != "auto" and technology not in READERS:
        raise KeyError(
            f"Unknown `technology={technology!r}`; available: 'auto', {', '.join(map(repr, READERS))}."
        )
    folder = _folder(path)
    found = _found(folder)
    if technology == "auto":
        if not found:
            raise ValueError(
                f"{str(folder)!r} holds none of the files sfact recognizes ({_expected()}): pass the "
                "instrument's output folder, or `technology=` to read it anyway."
            )
        technology = next(iter(found))
        logg.info(f"    read: {str(folder)!r} is {technology} output (found {found[technology]})")
    elif technology not in found and found:
        other = next(iter(found))
        raise ValueError(
            f"{str(folder)!r} looks like {other} output (found {found[other]}), not {technology}: pass "
            f"`technology={other!r}` (or 'auto')."
        )
    info = READERS[technology]
    kwargs = {**info.defaults, **reader_kwargs}
    if info.prepare is not None:
        info.prepare(folder, kwargs)
    sio = _spatialdata_io()
    reader = getattr(sio, info.function)
    logg.info(f"    read: spatialdata_io.{info.function}({str(folder)!r}, {_kwargs_repr(kwargs)})")
    sdata = reader(folder, **kwargs)
    from sfact._spatialdata import resolve_table

    table = resolve_table(sdata, table_key, coordinate_system=coordinate_system)
    chosen_key = table_key if table_key is not None else next(iter(sdata.tables))
    record = {
        "technology": technology,
        "path": str(folder),
        "table_key": chosen_key,
        "spatialdata_io_version": getattr(sio, "__version__", "unknown"),
    }
    if return_spatialdata:
        table.uns["sfact_read"] = record
        return sdata
    return _as_table(table, record)


def _kwargs_repr(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _as_table(table: AnnData, record: dict[str, Any]) -> AnnData:
    """A plain AnnData of the table: raw counts (CSR float32), obs, var, 2D ``obsm['spatial']``."""
    from anndata import AnnData

    from ._public import _as_counts, _coordinates

    where = f"the {record['technology']} table {record['table_key']!r}"
    X = _as_counts(table.X, f"{where}'s X", recover=True, sparse=True)
    out = AnnData(X=X, obs=table.obs.copy(), var=table.var.copy())
    if not out.var_names.is_unique:
        out.var_names_make_unique()
    out.obsm["spatial"] = _coordinates(table.obsm["spatial"], f"{where}'s obsm['spatial']")
    out.uns["sfact_read"] = record
    n_missing = int((~np.isfinite(out.obsm["spatial"]).all(axis=1)).sum())
    logg.info(
        f"    read: {out.n_obs} {'spots' if record['technology'] == 'visium' else 'cells'} x "
        f"{out.n_vars} genes from {record['technology']}"
        + (f"; {n_missing} without coordinates (left for `sfact.pp.prepare` to drop)" if n_missing else "")
    )
    return out


def _loader(technology: str) -> Callable[..., AnnData]:
    def load(path: str | Path, **kwargs: Any) -> AnnData:
        return read(path, technology, **kwargs)

    load.__name__ = f"read_{technology}"
    load.__doc__ = f"Read a {READERS[technology].description} (:func:`sfact.datasets.read`)."
    return load


for _name, _info in READERS.items():
    register(LoaderInfo(_name, _loader(_name), None, True, f"{_info.description} (spatialdata-io)"))
