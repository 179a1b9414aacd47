"""Preparing an AnnData for sfact: missing values, groups, QC and scaled coordinates."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, get_args

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sfact import _logging as logg
from sfact._scaling import ScaleMethod
from sfact._scaling import apply_scaling as _apply_scaling
from sfact._scaling import fit_scaling as _fit_scaling
from sfact._scaling import sample_extents as _sample_extents
from sfact._spatialdata import resolve_table_copy
from sfact._utils import (
    MISSING_LABELS,
    check_counts,
    check_in_memory,
    get_coordinates,
    get_counts,
    group_codes,
    slot_name,
    view_to_actual,
    warn,
)

if TYPE_CHECKING:
    from anndata import AnnData


UNS_KEY = "sfact_prepare"
"""Key of ``adata.uns`` where :func:`prepare` records what it did."""

_MISSING_GROUPS = MISSING_LABELS  # the model refuses these labels too (sfact.models.ModelSetup)


def prepare(
    adata: AnnData,
    *,
    group_key: str | None = None,
    sample_key: str | None = None,
    spatial_key: str = "spatial",
    layer: str | None = None,
    min_group_fraction: float | None = None,
    min_group_size: int | None = 10,
    dropna: bool = True,
    scale: ScaleMethod = "box",
    box_size: float = 100.0,
    scaled_key: str = "spatial_sfact",
    min_counts: float | None = None,
    min_cells: int | None = None,
    mito_prefix: str | None = None,
    max_mito_fraction: float | None = None,
    table_key: str | None = None,
    coordinate_system: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Prepare spatial counts for :func:`sfact.tl.fit`.

    In order, this

    1. checks the inputs: ``adata`` is in memory (not backed), the coordinates (numeric), the
       group column and the counts exist, and the counts are non-negative and not all zero (a
       warning if they are not integer-valued); float16 counts become float32 (with a warning);
    2. drops cells with NaN or infinite coordinates, NaN counts (any NaN in the cell's row), a
       missing group or a missing sample (NaN, or one named ``"None"``, ``"nan"`` or
       ``"NaN"``), counting each cell under the first of these reasons that applies;
    3. drops cells with fewer than ``min_counts`` total counts and, with ``mito_prefix`` and
       ``max_mito_fraction``, cells whose fraction of counts in mitochondrial genes is above
       ``max_mito_fraction`` (computed over all genes);
    4. drops the groups with fewer than ``min_group_fraction`` of the remaining cells, or,
       when ``min_group_fraction`` is ``None``, fewer than ``min_group_size`` cells, and
       re-encodes ``obs[group_key]`` as a categorical with only the remaining groups, in their
       original order (the existing category order, else sorted), so its codes are
       ``0..G-1``;
    5. drops the mitochondrial genes (names starting with ``mito_prefix``) and the genes
       detected in fewer than ``min_cells`` of the remaining cells (genes with no counts are
       kept otherwise);
    6. scales the coordinates of the remaining cells and writes them to
       ``obsm[scaled_key]``; ``obsm[spatial_key]`` is never modified. With ``sample_key``
       (several tissue sections), every sample is shifted to its own minimum corner and all are
       divided by one factor, so the sections overlap in the scaled coordinates and a
       lengthscale means the same distance in each; a warning is logged when the samples'
       extents differ more than tenfold (coordinates in different units?).

    Everything is checked before anything is changed, so on an error ``adata`` is left as it
    was.

    Parameters
    ----------
    adata
        Annotated data with counts (cells x genes) and coordinates in ``obsm[spatial_key]``.
    group_key
        Column of ``adata.obs`` with the group (e.g. the cell type) of each cell, for the
        multi-group priors; ``None`` for no groups.
    sample_key
        Column of ``adata.obs`` with the sample (tissue section) of each cell; ``None`` for one
        sample. Re-encoded as a categorical of the samples left (in their original order).
    spatial_key
        Key of ``adata.obsm`` with the coordinates (n_obs, n_dims).
    layer
        Layer with the raw counts; ``None`` uses ``adata.X``.
    min_group_fraction
        Drop groups with fewer than this fraction of the cells (after removing cells with
        missing values and the QC filters). Takes precedence over ``min_group_size``.
    min_group_size
        Drop groups with fewer than this many cells, when ``min_group_fraction`` is ``None``;
        ``None`` or 0 keeps every group.
    dropna
        Drop cells with missing coordinates, counts or group. If ``False``, such cells raise a
        :class:`ValueError`.
    scale
        ``"box"``: subtract the minimum of each coordinate and divide all by one factor, so that
        the longer side of the bounding box spans ``box_size`` units (one default lengthscale
        then means the same fraction of every tissue). ``"none"``: copy the coordinates as
        they are.
    box_size
        Length of the longer side of the box for ``scale="box"``.
    scaled_key
        Key of ``adata.obsm`` for the scaled coordinates; must differ from ``spatial_key``.
    min_counts
        Drop cells with fewer total counts than this.
    min_cells
        Drop genes detected (count > 0) in fewer cells than this.
    mito_prefix
        Prefix of the mitochondrial gene names (e.g. ``"mt-"`` for mouse, ``"MT-"`` for
        human); these genes are dropped after the mitochondrial fraction is computed.
    max_mito_fraction
        Drop cells whose fraction of counts in mitochondrial genes is above this; needs
        ``mito_prefix``.
    table_key
        With a ``spatialdata.SpatialData`` as ``adata``: the key of its table to use
        (``None`` for its only table); the results are written into that table, so
        ``sdata.write()`` keeps them. Without ``obsm[spatial_key]`` in the table, the centroids
        of the shapes or labels it annotates are written there first (as squidpy finds them).
    coordinate_system
        With a SpatialData whose table has no ``obsm[spatial_key]``: the coordinate system of
        those centroids (e.g. ``"global"``, or a microscope's ``"aligned"``); ``None`` for the
        element's only one, else ``"global"``. An unknown name raises before anything is written.
    copy
        Return a prepared copy instead of modifying ``adata`` in place; for a SpatialData, a deep
        copy of all of it (``spatialdata.deepcopy``, which loads its elements into memory)
        with its table prepared, the original left as it was.

    Returns
    -------
    The prepared copy if ``copy=True``, otherwise ``None``; ``adata`` (or the copy) is subset
    to the kept cells and genes, and has

    `.obsm[scaled_key]`
        Scaled coordinates (n_obs, n_dims), ``(obsm[spatial_key] - offset) / factor``.
    `.obs[group_key]`
        Categorical with only the kept groups, in their original order (if ``group_key``).
    `.uns['sfact_prepare']`
        A dict of plain values: ``spatial_key``, ``scaled_key``, ``scale``, ``offset`` (one
        float per dimension), ``factor``, ``box_size``, ``group_key``, ``groups`` (the kept
        groups as strings, in code order), ``sample_key``, ``samples`` (the kept samples as
        strings) and, with ``sample_key``, ``sample_offsets`` (each sample's offset) and
        ``sample_sizes`` (cells per sample), ``layer``, the filter settings, ``n_obs_before``,
        ``n_obs_after``, ``n_vars_before``, ``n_vars_after``, ``n_obs_removed`` (cells removed
        per reason: ``nan_coordinates``, ``nan_counts``, ``missing_group``, ``min_counts``,
        ``max_mito_fraction``, ``small_groups``; ``missing_sample`` with ``sample_key``) and ``n_vars_removed`` (genes removed per
        reason: ``mito``, ``min_cells``). ``sfact.pp._prepare._apply_scaling(coords,
        adata.uns['sfact_prepare'])`` scales new coordinates the same way.

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.osmfish()
    >>> sfact.pp.prepare(adata, group_key="ClusterName", min_group_size=20)
    >>> adata.obsm["spatial_sfact"].max(axis=0)  # the longer side spans 100 units
    array([ 49.48326604, 100.        ])
    >>> adata.uns["sfact_prepare"]["groups"][:3]
    ['Astrocyte Gfap', 'Astrocyte Mfge8', 'C. Plexus']
    """
    # --- parameters ------------------------------------------------------------------------
    if scale not in get_args(ScaleMethod):
        raise ValueError(f"`scale` must be one of {get_args(ScaleMethod)}, received {scale!r}.")
    box_size = float(box_size)
    if not (np.isfinite(box_size) and box_size > 0):
        raise ValueError(f"`box_size` must be positive, received {box_size!r}.")
    if min_group_fraction is not None and not 0.0 <= float(min_group_fraction) <= 1.0:
        raise ValueError(f"`min_group_fraction` must be in [0, 1], received {min_group_fraction!r}.")
    if min_group_size is not None and min_group_size < 0:
        raise ValueError(f"`min_group_size` must be non-negative, received {min_group_size!r}.")
    if max_mito_fraction is not None:
        if mito_prefix is None:
            raise ValueError("`max_mito_fraction` needs `mito_prefix` (e.g. 'mt-' or 'MT-').")
        if not 0.0 <= float(max_mito_fraction) <= 1.0:
            raise ValueError(f"`max_mito_fraction` must be in [0, 1], received {max_mito_fraction!r}.")
    if scaled_key == spatial_key:
        raise ValueError(
            f"`scaled_key` must differ from `spatial_key` ({spatial_key!r}): sfact never overwrites "
            "the original coordinates."
        )

    # --- inputs ----------------------------------------------------------------------------
    # a SpatialData's table (with copy=True: of a deep copy of it, prepared in place and returned)
    adata, sdata_copy = resolve_table_copy(
        adata, table_key, copy=copy, spatial_key=spatial_key, coordinate_system=coordinate_system
    )
    copy = copy and sdata_copy is None
    check_in_memory(adata)
    coords = get_coordinates(adata, spatial_key)
    if group_key is not None and group_key not in adata.obs.columns:
        raise KeyError(
            f"`adata.obs[{group_key!r}]` not found: pass `group_key=` naming the column with the groups "
            f"(available: {list(adata.obs.columns)})."
        )
    if sample_key is not None and sample_key not in adata.obs.columns:
        raise KeyError(
            f"`adata.obs[{sample_key!r}]` not found: pass `sample_key=` naming the column with the samples "
            f"(available: {list(adata.obs.columns)})."
        )
    X = get_counts(adata, layer)
    slot = slot_name(layer)
    half = getattr(X, "dtype", None) == np.float16
    if half:  # scipy.sparse and torch training cannot use float16: the prepared counts are float32
        X = np.asarray(X, dtype=np.float32)
    check_counts(X, slot, allow_nan=True)
    if not np.nan_to_num(_values(X)).any():
        raise ValueError(
            f"`{slot}` has no counts (every entry is 0): there is nothing to factorize. Pass `layer=` "
            "naming the layer with the raw counts, or check how the data were loaded."
        )

    start = logg.info("preparing data for sfact")
    n_obs, n_vars = adata.n_obs, adata.n_vars
    n_nan, n_inf = _nonfinite_per_row(X, n_obs)

    # --- missing values --------------------------------------------------------------------
    na_coords = ~np.isfinite(coords).all(axis=1)
    na_counts = n_nan > 0
    if group_key is not None:
        categories, codes, ordered = _group_codes(adata.obs[group_key])
        missing_cat = np.array([str(c) in _MISSING_GROUPS for c in categories], dtype=bool)
        na_group = (codes < 0) | np.append(missing_cat, True)[codes]
    else:
        na_group = np.zeros(n_obs, dtype=bool)
    if sample_key is not None:
        s_categories, s_codes, s_ordered = _group_codes(adata.obs[sample_key])
        s_missing_cat = np.array([str(c) in _MISSING_GROUPS for c in s_categories], dtype=bool)
        na_sample = (s_codes < 0) | np.append(s_missing_cat, True)[s_codes]
    else:
        na_sample = np.zeros(n_obs, dtype=bool)
    if not dropna and (na_coords | na_counts | na_group | na_sample).any():
        n_bad = int((na_coords | na_counts | na_group | na_sample).sum())
        raise ValueError(
            f"{n_bad} cells have missing values ({int(na_coords.sum())} with NaN/infinite coordinates, "
            f"{int(na_counts.sum())} with NaN counts, {int(na_group.sum())} with a missing group, "
            f"{int(na_sample.sum())} with a missing sample); pass `dropna=True` to drop them."
        )

    keep = np.ones(n_obs, dtype=bool)
    removed = dict.fromkeys(
        ("nan_coordinates", "nan_counts", "missing_group", "min_counts", "max_mito_fraction", "small_groups"),
        0,
    )
    if sample_key is not None:
        removed["missing_sample"] = 0

    def drop(reason: str, bad: np.ndarray) -> None:
        removed[reason] = int((bad & keep).sum())
        keep[bad] = False

    drop("nan_coordinates", na_coords)
    drop("nan_counts", na_counts)
    drop("missing_group", na_group)
    if sample_key is not None:
        drop("missing_sample", na_sample)
    n_inf_kept = int(n_inf[keep].sum())
    if n_inf_kept:
        raise ValueError(
            f"`{slot}` has {n_inf_kept} infinite values in {int((n_inf[keep] > 0).sum())} cells; sfact "
            "needs finite raw counts."
        )

    # --- QC of cells -----------------------------------------------------------------------
    mito = np.zeros(n_vars, dtype=bool)
    if mito_prefix is not None:
        mito = np.asarray(adata.var_names.astype(str).str.startswith(mito_prefix), dtype=bool)
        if not mito.any():
            warn(f"No gene name starts with `mito_prefix={mito_prefix!r}`; no mitochondrial filter applied.")
    totals = None
    if min_counts is not None or max_mito_fraction is not None:
        totals = _sum(X, axis=1)
    if min_counts is not None:
        drop("min_counts", totals < min_counts)
    if max_mito_fraction is not None and mito.any():
        mito_counts = _sum(X[:, np.flatnonzero(mito)], axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(totals > 0, mito_counts / np.where(totals > 0, totals, 1.0), 0.0)
        drop("max_mito_fraction", frac > float(max_mito_fraction))

    # --- groups ----------------------------------------------------------------------------
    groups: list[str] = []
    new_groups = None
    if group_key is not None:
        valid = keep & (codes >= 0)
        sizes = np.bincount(codes[valid], minlength=len(categories))
        if min_group_fraction is not None:
            threshold = float(min_group_fraction) * int(keep.sum())
            rule = f"`min_group_fraction={min_group_fraction}` ({threshold:.1f} cells)"
        else:
            threshold = float(min_group_size or 0)
            rule = f"`min_group_size={min_group_size}`"
        kept_groups = (sizes >= threshold) & (sizes > 0) & ~missing_cat
        drop("small_groups", keep & ~np.append(kept_groups, False)[codes])
        if not kept_groups.any():
            raise ValueError(
                f"No group of `adata.obs[{group_key!r}]` is left with {rule}: lower the threshold "
                "(or check the group column)."
            )
        remap = np.full(len(categories) + 1, -1, dtype=np.int64)
        remap[np.flatnonzero(kept_groups)] = np.arange(int(kept_groups.sum()))
        new_groups = pd.Categorical.from_codes(
            remap[codes[keep]], categories=categories[kept_groups], ordered=ordered
        )
        groups = [str(c) for c in new_groups.categories]
    if not keep.any():
        raise ValueError(f"No cell is left after filtering (removed per reason: {removed}).")

    # --- QC of genes -----------------------------------------------------------------------
    var_keep = ~mito
    var_removed = {"mito": int(mito.sum())}
    if min_cells is not None:
        detected = _detected(X, keep)
        low = (detected < min_cells) & var_keep
        var_removed["min_cells"] = int(low.sum())
        var_keep &= ~low
    else:
        var_removed["min_cells"] = 0
    if not var_keep.any():
        raise ValueError(f"No gene is left after filtering (removed per reason: {var_removed}).")
    if not _sum(X[np.flatnonzero(keep)][:, np.flatnonzero(var_keep)], axis=1).any():
        raise ValueError(
            f"`{slot}` has no counts in the {int(keep.sum())} cells and {int(var_keep.sum())} genes left after "
            f"filtering (removed per reason: cells {removed}, genes {var_removed}): loosen the filters, or "
            "pass `layer=` naming the layer with the raw counts."
        )

    # --- samples ---------------------------------------------------------------------------
    samples: list[str] = []
    new_samples = None
    sample_labels = None
    if sample_key is not None:
        present = np.zeros(len(s_categories), dtype=bool)
        present[s_codes[keep]] = True
        present &= ~s_missing_cat
        remap_s = np.full(len(s_categories) + 1, -1, dtype=np.int64)
        remap_s[np.flatnonzero(present)] = np.arange(int(present.sum()))
        new_samples = pd.Categorical.from_codes(
            remap_s[s_codes[keep]], categories=s_categories[present], ordered=s_ordered
        )
        samples = [str(c) for c in new_samples.categories]
        sample_labels = np.asarray(samples, dtype=object)[new_samples.codes].astype(str)

    # --- coordinates -----------------------------------------------------------------------
    scaling = _fit_scaling(coords[keep], scale, box_size, samples=sample_labels)
    scaled = _apply_scaling(coords[keep], scaling, sample_labels)
    sample_sizes: dict[str, int] = {}
    if sample_key is not None:
        sample_sizes = {
            k: int(v)
            for k, v in zip(samples, np.bincount(new_samples.codes, minlength=len(samples)), strict=True)
        }
        extents = _sample_extents(coords[keep], sample_labels)
        positive = [v for v in extents.values() if v > 0]
        if positive and max(positive) > 10 * min(positive):
            warn(
                f"The samples of `adata.obs[{sample_key!r}]` differ more than tenfold in extent "
                f"({min(positive):.3g} to {max(positive):.3g}): are their coordinates in the same units? "
                "They share one scale factor, so a lengthscale means the same distance in each."
            )

    if group_key is not None and len(groups) == 1:
        warn(
            f"Only one group ({groups[0]!r}) of `adata.obs[{group_key!r}]` is left: the multi-group "
            "priors reduce to their single-group versions."
        )

    # --- write -----------------------------------------------------------------------------
    all_obs, all_vars = bool(keep.all()), bool(var_keep.all())
    if copy:
        if all_obs and all_vars:
            out = adata.copy()
        else:
            out = adata[np.flatnonzero(keep), np.flatnonzero(var_keep)].copy()
    else:
        view_to_actual(adata)
        if not all_obs:
            adata._inplace_subset_obs(np.flatnonzero(keep))
        if not all_vars:
            adata._inplace_subset_var(np.flatnonzero(var_keep))
        out = adata

    if half:
        if layer is None:
            out.X = np.asarray(out.X, dtype=np.float32)
        else:
            out.layers[layer] = np.asarray(out.layers[layer], dtype=np.float32)
        warn(
            f"`{slot}` was float16, which sfact cannot train on (and which holds counts above 2048 "
            "inexactly); the prepared counts are float32. Store counts as integers or float32."
        )
    out.obsm[scaled_key] = scaled
    if new_groups is not None:
        out.obs[group_key] = new_groups
    if new_samples is not None:
        out.obs[sample_key] = new_samples
    out.uns[UNS_KEY] = {
        "spatial_key": spatial_key,
        "scaled_key": scaled_key,
        **scaling,
        "group_key": group_key,
        "groups": groups,
        "sample_key": sample_key,
        "samples": samples,
        **({"sample_sizes": sample_sizes} if sample_key is not None else {}),
        "layer": layer,
        "dropna": bool(dropna),
        "min_group_fraction": None if min_group_fraction is None else float(min_group_fraction),
        "min_group_size": None if min_group_size is None else int(min_group_size),
        "min_counts": None if min_counts is None else float(min_counts),
        "min_cells": None if min_cells is None else int(min_cells),
        "mito_prefix": mito_prefix,
        "max_mito_fraction": None if max_mito_fraction is None else float(max_mito_fraction),
        "n_obs_before": int(n_obs),
        "n_obs_after": int(out.n_obs),
        "n_vars_before": int(n_vars),
        "n_vars_after": int(out.n_vars),
        "n_obs_removed": removed,
        "n_vars_removed": var_removed,
    }

    logg.info(
        f"    finished: kept {out.n_obs} of {n_obs} cells, {out.n_vars} of {n_vars} genes"
        + (f", {len(groups)} groups" if group_key is not None else "")
        + (f", {len(samples)} samples" if sample_key is not None else ""),
        time=start,
        deep=(
            f"added\n    {scaled_key!r}, scaled coordinates (adata.obsm)\n"
            + (f"    {group_key!r}, groups re-encoded (adata.obs)\n" if group_key is not None else "")
            + (f"    {sample_key!r}, samples re-encoded (adata.obs)\n" if sample_key is not None else "")
            + f"    {UNS_KEY!r}, how the data were prepared (adata.uns)"
        ),
    )
    return out if copy else sdata_copy


def _group_codes(col: pd.Series) -> tuple[pd.Index, np.ndarray, bool]:
    """Categories (in order), integer codes (-1 for NaN) and orderedness of a group column."""
    cat = col.array if isinstance(col.dtype, pd.CategoricalDtype) else pd.Categorical(col.to_numpy())
    return cat.categories, group_codes(cat, cat.categories), bool(cat.ordered)


def _nonfinite_per_row(X: Any, n_obs: int) -> tuple[np.ndarray, np.ndarray]:
    """Number of NaN and of infinite values in every row of a dense or sparse matrix."""
    zeros = np.zeros(n_obs, dtype=np.int64)
    data = X.data if sp.issparse(X) else np.asarray(X)
    if not np.issubdtype(data.dtype, np.floating) or np.isfinite(data).all():
        return zeros, zeros.copy()
    if sp.issparse(X):
        coo = X.tocoo()
        n_nan = np.bincount(coo.row[np.isnan(coo.data)], minlength=n_obs)
        n_inf = np.bincount(coo.row[np.isinf(coo.data)], minlength=n_obs)
        return n_nan, n_inf
    return np.isnan(data).sum(axis=1), np.isinf(data).sum(axis=1)


def _values(X: Any) -> np.ndarray:
    """The stored values of a dense or sparse matrix."""
    return np.asarray(X.data) if sp.issparse(X) else np.asarray(X)


def _sum(X: Any, axis: int) -> np.ndarray:
    return np.asarray(X.sum(axis=axis, dtype=np.float64)).ravel()


def _detected(X: Any, keep: np.ndarray) -> np.ndarray:
    """Number of kept cells with a positive count, per gene."""
    if sp.issparse(X):
        positive = sp.csr_matrix(X) > 0
        return np.asarray(positive.T @ keep.astype(np.float64)).ravel()
    return (np.asarray(X)[keep] > 0).sum(axis=0)
