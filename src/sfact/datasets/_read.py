"""Vendor output folders (Xenium, Visium, Visium HD, MERSCOPE, CosMx, Stereo-seq) read by spatialdata-io.

sfact does not parse the instruments' files itself: :func:`read` finds which technology wrote a
folder, calls the maintained reader of `spatialdata-io <https://spatialdata.scverse.org/projects/io>`_
for it (images, transcripts and boundaries skipped unless asked for), and returns the cell (or
spot, or bin) table as an AnnData ready for :func:`sfact.pp.prepare`: raw counts in ``.X``,
coordinates in ``obsm['spatial']``. ``spatialdata-io`` is an optional dependency
(``pip install 'sfact[spatialdata]'``), imported only here.
"""

from __future__ import annotations

import warnings
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
    """The reader's name in ``spatialdata_io``."""
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
    prepare: Callable[[Path, dict[str, Any]], str | None] | None = None
    """Optional hook called before the reader: checks the folder (raising an error that names the
    fix), adjusts the reader's keyword arguments for it (in place), and returns the table to take
    when ``table_key`` is not given (``None``: the only one)."""
    quiet: tuple[str, ...] = ()
    """Regular expressions of the reader's warnings that say nothing to an sfact user (about images
    sfact does not read, or the reader's own bookkeeping): silenced while it reads."""
    finish: Callable[[AnnData], AnnData] | None = None
    """Optional hook called on each table the reader wrote, before the table is taken: returns the
    table sfact uses (e.g. CosMx: whole-slide coordinates, control probes out of the counts)."""


def _require(path: Path, technology: str, patterns: tuple[str, ...], what: str) -> str:
    """The first of ``patterns`` found directly in ``path``; else an error naming the subfolder that holds it."""
    for pattern in patterns:
        hit = next(iter(sorted(path.glob(pattern))), None)
        if hit is not None:
            return hit.name
    below = _matches(path, tuple(f"*/{p}" for p in patterns) + tuple(f"*/*/{p}" for p in patterns))
    if below is not None:
        inner = Path(below).parent
        for _ in range(len(Path(patterns[0]).parts) - 1):
            inner = inner.parent
        raise ValueError(
            f"The {technology} files are in a subfolder of {str(path)!r} (found {below}): pass "
            f"{str(path / inner)!r}, the folder that holds {what}."
        )
    raise ValueError(
        f"{str(path)!r} is not a complete {technology} output folder: {what} is missing. Pass the "
        "folder the software wrote, with its files as they were written."
    )


def _element_name(path: Path) -> str:
    """A SpatialData element name from the folder's name (its parent's for Space Ranger's ``outs``)."""
    import re

    name = path.resolve().name
    if name == "outs" and path.resolve().parent.name:
        name = path.resolve().parent.name
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip("_.") or "sample"
    return name


def _xenium_folder(path: Path, kwargs: dict[str, Any]) -> None:
    """Xenium: the output folder itself (``experiment.xenium`` and the cell files in it)."""
    _require(path, "xenium", ("experiment.xenium",), "`experiment.xenium`")
    for name in ("cell_feature_matrix.h5", "cells.parquet", "cells.zarr.zip"):
        if kwargs.get("cells_table", True) and not (path / name).exists():
            raise ValueError(
                f"{str(path)!r} has `experiment.xenium` but no `{name}`, which the xenium reader needs "
                "for the cells' counts and centroids: pass the complete Xenium output folder."
            )
    return None


def _visium_folder(path: Path, kwargs: dict[str, Any]) -> None:
    """Visium: the Space Ranger ``outs/`` folder; names its elements when the matrix file does not."""
    _require(
        path,
        "visium",
        ("spatial/tissue_positions.csv", "spatial/tissue_positions_list.csv"),
        "`spatial/tissue_positions.csv`",
    )
    counts_file = str(kwargs.get("counts_file", "filtered_feature_bc_matrix.h5"))
    _require(path, "visium", (counts_file, f"*_{counts_file}"), f"`{counts_file}`")
    if not (path / "spatial" / "scalefactors_json.json").exists() and "scalefactors_file" not in kwargs:
        raise ValueError(
            f"{str(path)!r} has no `spatial/scalefactors_json.json`, which the visium reader needs: pass "
            "the complete Space Ranger `outs` folder (or `scalefactors_file=`)."
        )
    # spatialdata-io names the elements after a `<library>_` prefix of the matrix file, and needs
    # `dataset_id=` when there is none (Space Ranger's own file names)
    if "dataset_id" not in kwargs and (path / counts_file).exists():
        kwargs["dataset_id"] = _element_name(path)
    return None


def _visium_hd_bins(path: Path, kwargs: dict[str, Any]) -> str | None:
    """Visium HD: one bin size by default (16 µm when written, else 8 µm), not every bin size.

    Returns the table to take: the one bin size read, or the cell segmentation with
    ``load_segmentations_only=True``.
    """
    found = _require(path, "visium_hd", ("feature_slice.h5", "*_feature_slice.h5"), "`feature_slice.h5`")
    if "dataset_id" not in kwargs and found == "feature_slice.h5":
        # else spatialdata-io names the elements "_square_016um", ... in the coordinate system ""
        kwargs["dataset_id"] = _element_name(path)
    if kwargs.get("load_segmentations_only"):
        return "cell_segmentations"
    sizes = sorted(
        int(p.name[len("square_") : -len("um")])
        for p in (path / "binned_outputs").glob("square_*um")
        if p.is_dir() and p.name[len("square_") : -len("um")].isdigit()
    )
    if not sizes:
        raise ValueError(
            f"{str(path)!r} has no `binned_outputs/square_NNNum` folder: pass the complete Space Ranger "
            "`outs` folder, or `load_segmentations_only=True` to read the segmented cells."
        )
    requested = kwargs.get("bin_size")
    if requested is None:
        chosen = 16 if 16 in sizes else (8 if 8 in sizes else sizes[-1])
        if len(sizes) > 1:
            logg.info(
                f"    visium_hd: reading the {chosen} µm bins of {sizes} (pass `bin_size=` for another)"
            )
        kwargs["bin_size"] = chosen
        return f"square_{chosen:03d}um"
    many = isinstance(requested, list | tuple)
    wanted = [int(b) for b in requested] if many else [int(requested)]
    missing = [b for b in wanted if b not in sizes]
    if missing or not wanted:
        raise ValueError(
            f"`bin_size={requested!r}`: {str(path)!r} has bins of {sizes} µm; pass some of them."
        )
    kwargs["bin_size"] = wanted if many else wanted[0]
    return f"square_{wanted[0]:03d}um" if len(wanted) == 1 else None


def _merscope_folder(path: Path, kwargs: dict[str, Any]) -> None:
    """MERSCOPE: the region folder (``cell_by_gene.csv``, ``cell_metadata.csv`` and ``images/``)."""
    vpt = kwargs.get("vpt_outputs")
    if isinstance(vpt, Mapping):
        # the reader takes every entry as a Path, the boundaries' one too even when it skips them
        vpt = {str(key): path / Path(value).expanduser() for key, value in vpt.items()}
        vpt.setdefault("cell_boundaries", path / "cell_boundaries.parquet")
        for key in ("cell_by_gene", "cell_metadata"):
            if key not in vpt or not vpt[key].is_file():
                raise ValueError(
                    f"`vpt_outputs[{key!r}]` must name the {key} CSV file, received "
                    f"{str(vpt[key]) if key in vpt else 'no such key'!r}: pass "
                    "`vpt_outputs={'cell_by_gene': ..., 'cell_metadata': ...}`."
                )
        kwargs["vpt_outputs"] = vpt
    elif vpt is None and not (path / "cell_by_gene.csv").is_file():
        renamed = sorted(p.name for p in path.glob("*cell_by_gene*.csv"))
        if renamed:
            raise ValueError(
                f"{str(path)!r} holds {renamed[0]!r} but no `cell_by_gene.csv`, the name the merscope "
                "reader opens: pass `vpt_outputs={'cell_by_gene': <that file>, 'cell_metadata': "
                "<its cell metadata CSV>}`."
            )
    if vpt is None:
        _require(path, "merscope", ("cell_by_gene.csv",), "`cell_by_gene.csv`")
        _require(path, "merscope", ("cell_metadata.csv",), "`cell_metadata.csv`")
    # opened for the coordinate transformation even when no image is read
    _require(
        path,
        "merscope",
        ("images/micron_to_mosaic_pixel_transform.csv",),
        "`images/micron_to_mosaic_pixel_transform.csv` (read even when the images are not)",
    )
    return None


def _cosmx_folder(path: Path, kwargs: dict[str, Any]) -> None:
    """CosMx: the flat-file export (``<name>_exprMat_file.csv`` and its companions)."""
    name = kwargs.get("dataset_id")
    if name is None:
        _require(path, "cosmx", ("*_exprMat_file.csv",), "`<name>_exprMat_file.csv`")
        found = sorted(p.name for p in path.glob("*_exprMat_file.csv"))
        if len(found) > 1:
            raise ValueError(
                f"{str(path)!r} holds several CosMx exports ({', '.join(found)}): pass "
                "`dataset_id=` (the part of the name before `_exprMat_file.csv`)."
            )
        name = found[0][: -len("_exprMat_file.csv")]
    suffixes = ("exprMat_file.csv", "metadata_file.csv", "fov_positions_file.csv")
    for suffix in (*suffixes, "tx_file.csv") if kwargs.get("transcripts") else suffixes:
        _require(path, "cosmx", (f"{name}_{suffix}",), f"`{name}_{suffix}`")
    missing = [d for d in ("CellComposite", "CellLabels") if not (path / d).is_dir()]
    if missing:
        raise ValueError(
            f"{str(path)!r} has no {' or '.join(f'`{d}/`' for d in missing)} folder, which the cosmx "
            "reader requires even though sfact reads no image: put the export's image folders next "
            "to its CSV files (empty folders will do)."
        )
    return None


_COSMX_CONTROLS = r"^(NegPrb|Negative|SystemControl|FalseCode)"
"""Names of the CosMx panel's control probes (negative probes, system controls, false codes)."""


def _cosmx_table(table: AnnData) -> AnnData:
    """CosMx: whole-slide coordinates in ``obsm['spatial']``; control probes out of ``X``.

    spatialdata-io puts each cell's centre in its own field of view's pixels in ``obsm['spatial']``
    (fields of view overlap there) and the whole-slide ones in ``obsm['global']``: these become
    ``obsm['spatial']``, the former ``obsm['spatial_fov']``. The negative and system-control probes
    are not genes: their counts move to ``obsm['controls']``, as MERSCOPE's blanks are in
    ``obsm['blank']``.
    """
    import pandas as pd
    import scipy.sparse as sp

    if "global" in table.obsm:
        table.obsm["spatial_fov"] = table.obsm["spatial"]
        table.obsm["spatial"] = np.asarray(table.obsm["global"], dtype=np.float64)
    is_control = np.asarray(table.var_names.str.match(_COSMX_CONTROLS), dtype=bool)
    if not is_control.any():
        return table
    X = table.X[:, is_control]
    controls = pd.DataFrame(
        X.toarray() if sp.issparse(X) else np.asarray(X),
        index=table.obs_names,
        columns=table.var_names[is_control],
    )
    out = table[:, ~is_control].copy()
    out.obsm["controls"] = controls
    logg.info(f"    cosmx: {int(is_control.sum())} control probes moved out of X to `obsm['controls']`")
    return out


_SAW7_FOLDERS = ("02.count", "03.register", "04.tissuecut", "041.cellcut", "051.cellcluster")


def _stereoseq_folder(path: Path, kwargs: dict[str, Any]) -> str | None:
    """Stereo-seq: a SAW 7 output folder (``02.count/`` to ``051.cellcluster/``), its cell bins."""
    _stereoseq_no_saw8(path)
    _require(path, "stereoseq", ("041.cellcut/*.cellbin.gef",), "`041.cellcut/<SN>.cellbin.gef`")
    missing = [d for d in _SAW7_FOLDERS if not (path / d).is_dir()]
    if missing:
        raise ValueError(
            f"{str(path)!r} has no {', '.join(f'`{d}/`' for d in missing)}: the stereoseq reader needs "
            f"the SAW 7 output folders {', '.join(f'`{d}/`' for d in _SAW7_FOLDERS)}. Pass the SAW "
            "output folder that holds them all."
        )
    _require(
        path,
        "stereoseq",
        ("051.cellcluster/*cell.cluster.h5ad",),
        "`051.cellcluster/<SN>.cell.cluster.h5ad` (written by SAW's cell clustering step)",
    )
    if kwargs.get("dataset_id") is None:
        _require(path, "stereoseq", ("02.count/*.gef",), "`02.count/<SN>.raw.gef`")
    if kwargs.get("read_square_bin"):
        _require(path, "stereoseq", ("04.tissuecut/*.gef",), "`04.tissuecut/<SN>.tissuecut.gef`")
        return None
    return "cells_table"


def _stereoseq_no_saw8(path: Path) -> None:
    """SAW 8 writes ``outs/feature_expression/``, which spatialdata-io does not read: say so."""
    hit = _matches(path, ("feature_expression/*.cellbin.gef",))
    if hit is not None and _matches(path, ("041.cellcut",)) is None:
        raise ValueError(
            f"{str(path)!r} is SAW 8 output (found {hit}); the stereoseq reader of spatialdata-io reads "
            "the SAW 7 layout (`041.cellcut/`, `051.cellcluster/`, ...) only. Read the cellbin GEF with "
            "stereopy (`stereo.io.read_gef(path, bin_type='cell_bins')`, then "
            "`stereo.io.stereo_to_anndata`) and pass that AnnData to `sfact.pp.prepare`."
        )


def _stereoseq_counts(table: AnnData) -> AnnData:
    """Stereo-seq cell bins: the counts of the cellbin GEF in ``X``.

    spatialdata-io takes ``X`` from SAW's ``cell.cluster.h5ad``, which its clustering step may have
    normalized; the GEF's per-cell entries (which it keeps in ``uns``) are the MID counts. They
    replace ``X``; a different ``X`` is kept in ``layers['cell_cluster']``.
    """
    import scipy.sparse as sp

    entries = table.uns.get("cellBin_cell_gene_exon_exp")
    if entries is None or not {"offset", "geneCount"} <= set(table.obs.columns):
        return table  # a square-bin table: its counts are the GEF's already
    starts = table.obs["offset"].to_numpy(dtype=np.int64)
    lengths = table.obs["geneCount"].to_numpy(dtype=np.int64)
    first = np.cumsum(lengths) - lengths
    index = np.arange(int(lengths.sum())) - np.repeat(first, lengths) + np.repeat(starts, lengths)
    genes = entries["geneID"].to_numpy(dtype=np.int64)
    if index.size and (index.max() >= len(entries) or genes[index].max() >= table.n_vars):
        raise ValueError(
            "The cellbin GEF's cells and genes do not match the table of `cell.cluster.h5ad` "
            f"({table.n_obs} cells x {table.n_vars} genes): pass a SAW output folder whose files come "
            "from one run."
        )
    counts = sp.csr_matrix(
        (
            entries["cellExp"].to_numpy(dtype=np.int32)[index],
            (np.repeat(np.arange(table.n_obs), lengths), genes[index]),
        ),
        shape=table.shape,
    )
    X = table.X
    same = X.shape == counts.shape and (sp.csr_matrix(X) != counts).nnz == 0
    if not same:
        table.layers["cell_cluster"] = X
        table.X = counts
        logg.info("    stereoseq: counts from the cellbin GEF (the h5ad's X in `layers['cell_cluster']`)")
    return table


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
                # the circles are made from the cells table (no file read): the table then annotates
                # an element the SpatialData holds, not the labels that are skipped
                "cells_as_circles": True,
                "cells_labels": False,
                "nucleus_labels": False,
                "transcripts": False,
                "morphology_mip": False,
                "morphology_focus": False,
                "aligned_images": False,
            },
            prepare=_xenium_folder,
        ),
        ReaderInfo(
            "visium",
            "visium",
            ("spatial/tissue_positions.csv", "spatial/tissue_positions_list.csv"),
            "10x Genomics Visium Space Ranger output folder (spots and their counts)",
            excludes=("binned_outputs", "square_*um", "feature_slice.h5", "*_feature_slice.h5"),
            prepare=_visium_folder,
            quiet=(r"Converting `region_key: .*` to categorical dtype",),
        ),
        ReaderInfo(
            "visium_hd",
            "visium_hd",
            ("feature_slice.h5", "*_feature_slice.h5", "binned_outputs", "square_*um"),
            "10x Genomics Visium HD Space Ranger output folder (bins of one size and their counts)",
            defaults={"load_segmentations_only": False, "load_all_images": False, "gex_only": True},
            prepare=_visium_hd_bins,
            quiet=(
                "No full resolution image found",
                "No image path found containing the (hires|lowres) image",
                r"Converting `region_key: .*` to categorical dtype",
            ),
        ),
        ReaderInfo(
            "merscope",
            "merscope",
            ("cell_by_gene.csv", "*cell_by_gene*.csv"),
            "Vizgen MERSCOPE output folder (cells, their centres and counts)",
            defaults={"transcripts": False, "cells_boundaries": False, "mosaic_images": False},
            prepare=_merscope_folder,
            quiet=(
                "The dtype argument is deprecated",
                r"The table is annotating '.*', which is not present in the SpatialData object",
            ),
        ),
        ReaderInfo(
            "cosmx",
            "cosmx",
            ("*exprMat_file.csv",),
            "NanoString CosMx SMI flat-file export (cells, their global centres and counts)",
            defaults={"transcripts": False},
            prepare=_cosmx_folder,
            quiet=(
                "The dtype argument is deprecated",
                r"The table is annotating '.*', which is not present in the SpatialData object",
            ),
            finish=_cosmx_table,
        ),
        ReaderInfo(
            "stereoseq",
            "stereoseq",
            ("*.cellbin.gef", "*.tissuecut.gef", "*.gef"),
            "BGI STOmics Stereo-seq SAW 7 output folder (cell bins and their counts)",
            defaults={"read_square_bin": False, "optional_tif": False},
            prepare=_stereoseq_folder,
            quiet=("Transforming to str index",),
            finish=_stereoseq_counts,
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
    return _first_found(path, _found(path))


def _found(path: Path) -> dict[str, str]:
    """Technologies whose marker files are in ``path``: name -> the file that shows it."""
    found = {}
    for name, info in READERS.items():
        hit = _matches(path, info.markers)
        if hit is not None and not (info.excludes and _matches(path, info.excludes)):
            found[name] = hit
    return found


def _first_found(path: Path, found: dict[str, str]) -> str:
    """The technology of ``path`` among those :func:`_found` there; an error naming what is expected if none."""
    if not found:
        raise ValueError(
            f"{str(path)!r} holds none of the files sfact recognizes ({_expected()}): pass the "
            "instrument's output folder, or `technology=` to read it anyway."
        )
    return next(iter(found))


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
        Return the whole ``spatialdata.SpatialData`` (its table with ``obsm['spatial']`` set),
        to fit with ``table_key=`` and write the results back with ``sdata.write()``.
    **reader_kwargs
        Passed to the spatialdata-io reader, overriding sfact's defaults
        (``ReaderInfo.defaults``), e.g. ``transcripts=True`` or, for Visium HD,
        ``bin_size=8``.

    Returns
    -------
    A new :class:`~anndata.AnnData` (the table) with:

    `.X`
        Raw counts, :class:`scipy.sparse.csr_matrix`, float32 with integer values.
    `.obs`, `.var`
        The table's annotations and genes (gene names made unique).
    `.obsm['spatial']`
        Coordinates (n_obs, 2), float64, in the reader's units: micrometres for Xenium and
        MERSCOPE; pixels of the full-resolution image for Visium and Visium HD (whose
        ``spatial/scalefactors_json.json`` gives ``microns_per_pixel``); whole-slide pixels for
        CosMx (about 0.12 µm; not the per-field-of-view ones); DNB units for Stereo-seq (0.5 µm).
        Only the scale of the coordinates matters to sfact, which rescales them
        (:func:`sfact.pp.prepare`).
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
        technology = _first_found(folder, found)
        logg.info(f"    read: {str(folder)!r} is {technology} output (found {found[technology]})")
    elif technology not in found and found:
        other = next(iter(found))
        raise ValueError(
            f"{str(folder)!r} looks like {other} output (found {found[other]}), not {technology}: pass "
            f"`technology={other!r}` (or 'auto')."
        )
    info = READERS[technology]
    kwargs = {**info.defaults, **reader_kwargs}
    default_key = info.prepare(folder, kwargs) if info.prepare is not None else None
    sio = _spatialdata_io()
    reader = getattr(sio, info.function)
    logg.info(f"    read: spatialdata_io.{info.function}({str(folder)!r}, {_kwargs_repr(kwargs)})")
    with warnings.catch_warnings():
        for pattern in info.quiet:
            warnings.filterwarnings("ignore", pattern)
        sdata = reader(folder, **kwargs)
        if info.finish is not None:
            for key in list(sdata.tables):
                sdata.tables[key] = info.finish(sdata.tables[key])
    from sfact._spatialdata import resolve_table

    if table_key is None and default_key is not None and default_key in sdata.tables:
        table_key = default_key
    chosen_key = table_key if table_key is not None else next(iter(sdata.tables), None)
    if coordinate_system is None:
        coordinate_system = _own_coordinate_system(sdata, chosen_key)
    table = resolve_table(sdata, table_key, coordinate_system=coordinate_system)
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


def _own_coordinate_system(sdata: Any, table_key: str | None) -> str | None:
    """The coordinate system in which the elements a table annotates are untransformed.

    Only for a table without ``obsm['spatial']`` whose elements are in several coordinate systems
    and not in ``"global"`` (e.g. Visium HD's full-resolution image pixels, next to the downscaled
    images' systems); else ``None``, to let :func:`sfact._spatialdata.resolve_table` choose.
    """
    table = sdata.tables.get(table_key) if table_key is not None else None
    if table is None or "spatial" in table.obsm:
        return None
    from spatialdata.transformations import Identity, get_transformation

    regions = (table.uns.get("spatialdata_attrs") or {}).get("region")
    own: set[str] = set()
    for region in np.atleast_1d(regions if regions is not None else []):
        if str(region) not in sdata:
            return None
        systems = get_transformation(sdata[str(region)], get_all=True)
        if len(systems) < 2 or "global" in systems:
            return None
        identity = [cs for cs, t in systems.items() if isinstance(t, Identity)]
        if len(identity) != 1:
            return None
        own.add(identity[0])
    return own.pop() if len(own) == 1 else None


def _kwargs_repr(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _as_table(table: AnnData, record: dict[str, Any]) -> AnnData:
    """A plain AnnData of the table: raw counts (CSR float32), obs, var, 2D ``obsm['spatial']``."""
    from anndata import AnnData

    from ._counts import _as_counts, _coordinates

    where = f"the {record['technology']} table {record['table_key']!r}"
    X = _as_counts(table.X, f"{where}'s X", recover=True, sparse=True)
    out = AnnData(X=X, obs=table.obs.copy(), var=table.var.copy())
    if not out.var_names.is_unique:
        out.var_names_make_unique()
    out.obsm["spatial"] = _coordinates(table.obsm["spatial"], f"{where}'s obsm['spatial']")
    out.uns["sfact_read"] = record
    n_missing = int((~np.isfinite(out.obsm["spatial"]).all(axis=1)).sum())
    noun = "spots" if record["technology"] == "visium" else "cells"
    noun = "bins" if str(record["table_key"]).startswith("square_") else noun
    logg.info(
        f"    read: {out.n_obs} {noun} x "
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
