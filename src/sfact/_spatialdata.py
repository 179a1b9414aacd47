"""SpatialData in and out: the table of a :class:`spatialdata.SpatialData` that sfact fits and writes to.

``spatialdata`` is an optional dependency (``pip install 'sfact[spatialdata]'``): it is imported
only when a SpatialData object is passed, so ``import sfact`` never loads it.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData

ATTRS_KEY = "spatialdata_attrs"
"""Key of a SpatialData table's ``uns`` naming the elements it annotates (``TableModel.ATTRS_KEY``)."""


def is_spatialdata(obj: Any) -> bool:
    """Whether ``obj`` is a :class:`spatialdata.SpatialData`, without importing spatialdata.

    Parameters
    ----------
    obj
        Any object.

    Returns
    -------
    ``True`` for a SpatialData object (a class defined in the ``spatialdata`` package with
    ``tables``).
    """
    module = type(obj).__module__ or ""
    return (module == "spatialdata" or module.startswith("spatialdata.")) and hasattr(obj, "tables")


def resolve_table(
    obj: Any,
    table_key: str | None = None,
    *,
    spatial_key: str | None = "spatial",
    coordinate_system: str | None = None,
) -> AnnData:
    """The AnnData table sfact works on: ``obj`` itself, or a table of a SpatialData.

    For a SpatialData, the table is ``obj.tables[table_key]`` (the only table when
    ``table_key`` is ``None``), and the object returned *is* that table, so everything written
    to it stays in the SpatialData and ``sdata.write()`` keeps it. Its coordinates are found as
    squidpy finds them: ``table.obsm[spatial_key]`` when present (never modified), else the
    centroids of the shapes or labels the table annotates (``table.uns['spatialdata_attrs']``:
    ``region``, ``region_key``, ``instance_key``) in ``coordinate_system``, matched to the rows
    by the instance key and written to ``table.obsm[spatial_key]``. Every check runs before
    anything is written.

    Parameters
    ----------
    obj
        An AnnData (returned as it is) or a :class:`spatialdata.SpatialData`.
    table_key
        Key of ``obj.tables``; ``None`` for the only table. Only for a SpatialData.
    spatial_key
        Key of the table's ``obsm`` with the coordinates, read or written; ``None`` for the table
        alone (for what needs no coordinates, or only reads them: nothing is written).
    coordinate_system
        Coordinate system of the centroids; ``None`` for the element's only one, else
        ``"global"``.

    Returns
    -------
    The table (an AnnData); for a SpatialData with no ``obsm[spatial_key]`` in the table, with
    ``.obsm[spatial_key]`` set to the annotated elements' centroids (n_obs, n_dims).
    """
    if not is_spatialdata(obj):
        if table_key is not None:
            raise ValueError(
                f"`table_key={table_key!r}` is only for a SpatialData object, received a "
                f"{type(obj).__name__}: drop `table_key=`."
            )
        return obj
    table_key, table = _select_table(obj, table_key)
    if spatial_key is None or spatial_key in table.obsm:
        return table
    coords = _centroids(obj, table, table_key, spatial_key, coordinate_system)
    table.obsm[spatial_key] = coords
    return table


def resolve_table_copy(
    obj: Any,
    table_key: str | None = None,
    *,
    copy: bool,
    spatial_key: str | None = "spatial",
    coordinate_system: str | None = None,
) -> tuple[AnnData, Any]:
    """The table a function with ``copy=`` writes to, and the SpatialData it returns, if any.

    ``copy=True`` on a SpatialData returns a modified copy of the *SpatialData*, as ``copy=True``
    on an AnnData returns a modified AnnData: the SpatialData is deep-copied
    (``spatialdata.deepcopy``, which loads its elements into memory) after ``table_key`` is
    checked, so a bad key copies nothing, and the table of the copy is resolved (its centroids
    written into the copy's table): the original, its table included, is never modified. The
    caller writes into that table in place and returns the copy.

    Parameters
    ----------
    obj
        An AnnData or a :class:`spatialdata.SpatialData`.
    table_key
        Key of ``obj.tables``; ``None`` for the only table. Only for a SpatialData.
    copy
        The caller's ``copy``.
    spatial_key
        As for :func:`resolve_table`.
    coordinate_system
        As for :func:`resolve_table`.

    Returns
    -------
    ``(table, sdata_copy)``: for an AnnData ``(obj, None)`` (the caller copies it itself, after
    its checks); for a SpatialData with ``copy=False`` ``(its table, None)``; with ``copy=True``
    ``(the copy's table, the copy)``. Callers write ``copy = copy and sdata_copy is None`` and
    end with ``return table if copy else sdata_copy``.
    """
    if not (copy and is_spatialdata(obj)):
        return resolve_table(
            obj, table_key, spatial_key=spatial_key, coordinate_system=coordinate_system
        ), None
    table_key, _ = _select_table(obj, table_key)  # a bad key raises before anything is copied
    import spatialdata  # only here: a SpatialData was passed, so it is installed

    sdata_copy = spatialdata.deepcopy(obj)
    table = resolve_table(sdata_copy, table_key, spatial_key=spatial_key, coordinate_system=coordinate_system)
    return table, sdata_copy


def _select_table(obj: Any, table_key: str | None) -> tuple[str, AnnData]:
    """``(key, table)`` of the SpatialData ``obj``: ``tables[table_key]``, or its only table; never writes."""
    tables = dict(obj.tables)
    if not tables:
        raise ValueError(
            "The SpatialData has no table: add one (`sdata.tables['table'] = "
            "spatialdata.models.TableModel.parse(adata, ...)`) or pass an AnnData."
        )
    if table_key is None:
        if len(tables) > 1:
            raise ValueError(
                f"The SpatialData has {len(tables)} tables ({', '.join(map(repr, tables))}): "
                "pass `table_key=` to choose one."
            )
        table_key = next(iter(tables))
    elif table_key not in tables:
        raise KeyError(
            f"`table_key={table_key!r}` not found in the SpatialData's tables "
            f"({', '.join(map(repr, tables))}): pass one of them as `table_key=`."
        )
    return table_key, tables[table_key]


def _centroids(
    sdata: Any, table: AnnData, table_key: str, spatial_key: str, coordinate_system: str | None
) -> np.ndarray:
    """Centroids (n_obs, n_dims) of the elements ``table`` annotates, in the table's row order."""
    attrs = table.uns.get(ATTRS_KEY) or {}
    regions = attrs.get("region")
    no_coords = (
        f"The table {table_key!r} has no `obsm[{spatial_key!r}]` and annotates no shapes or labels "
        f"element: write the cells' coordinates to `sdata.tables[{table_key!r}].obsm[{spatial_key!r}]`, "
        "or link the table to its element with `spatialdata.models.TableModel.parse(table, "
        "region=..., region_key=..., instance_key=...)`."
    )
    if regions is None or len(np.atleast_1d(regions)) == 0:
        raise ValueError(no_coords)
    regions = [str(r) for r in np.atleast_1d(regions)]
    region_key, instance_key = attrs.get("region_key"), attrs.get("instance_key")
    for name, key in (("region_key", region_key), ("instance_key", instance_key)):
        if key is None or key not in table.obs.columns:
            raise ValueError(
                f"The table {table_key!r} annotates {regions} but its `uns['{ATTRS_KEY}']['{name}']` "
                f"({key!r}) is not a column of its obs: parse it again with "
                "`spatialdata.models.TableModel.parse`."
            )
    missing = [r for r in regions if r not in sdata]
    if missing:
        raise ValueError(
            f"The table {table_key!r} annotates {missing}, which the SpatialData does not hold: "
            f"add the element, or write the coordinates to `obsm[{spatial_key!r}]`."
        )
    import spatialdata  # only here: a SpatialData was passed, so it is installed

    region_of_row = table.obs[region_key].astype(str).to_numpy()
    instance_of_row = table.obs[instance_key].to_numpy()
    coords: np.ndarray | None = None
    for region in regions:
        rows = np.flatnonzero(region_of_row == region)
        if rows.size == 0:
            continue
        element = sdata[region]
        cs = _coordinate_system(spatialdata, element, region, coordinate_system)
        with warnings.catch_warnings():  # spatialdata's advice on its own index order: not the user's
            warnings.filterwarnings("ignore", "The index of the dataframe is not monotonic", UserWarning)
            centroids = spatialdata.get_centroids(element, coordinate_system=cs).compute()
        dims = [c for c in ("x", "y", "z") if c in centroids.columns]
        found = centroids.index.get_indexer(instance_of_row[rows])
        if (found < 0).any():
            absent = instance_of_row[rows][found < 0][:5].tolist()
            raise ValueError(
                f"{int((found < 0).sum())} rows of the table {table_key!r} name instances of {region!r} "
                f"that it does not hold (e.g. {absent}, column `obs[{instance_key!r}]`): fix the "
                f"instance ids, or write the coordinates to `obsm[{spatial_key!r}]`."
            )
        if coords is None:
            coords = np.full((table.n_obs, len(dims)), np.nan)
        elif coords.shape[1] != len(dims):
            raise ValueError(
                f"The elements the table {table_key!r} annotates mix 2D and 3D coordinates: write "
                f"the coordinates to `obsm[{spatial_key!r}]` yourself."
            )
        coords[rows] = centroids[dims].to_numpy(dtype=float)[found]
    if coords is None:
        raise ValueError(no_coords)
    unmatched = np.isnan(coords).all(axis=1)
    if unmatched.any():
        raise ValueError(
            f"{int(unmatched.sum())} rows of the table {table_key!r} have an `obs[{region_key!r}]` "
            f"that is not among its annotated regions {regions}: fix `obs[{region_key!r}]`."
        )
    return coords


def _coordinate_system(spatialdata: Any, element: Any, region: str, coordinate_system: str | None) -> str:
    """The coordinate system to take ``element``'s centroids in (checked to exist)."""
    systems = list(spatialdata.transformations.get_transformation(element, get_all=True))
    if coordinate_system is None:
        if len(systems) == 1:
            return systems[0]
        if "global" in systems:
            return "global"
        raise ValueError(
            f"The element {region!r} is in the coordinate systems {systems}: pass `coordinate_system=`."
        )
    if coordinate_system not in systems:
        raise ValueError(
            f"`coordinate_system={coordinate_system!r}` is not one of the element {region!r}'s "
            f"coordinate systems {systems}: pass one of them."
        )
    return coordinate_system
