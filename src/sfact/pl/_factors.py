"""Spatial maps of the factors, their scales, group-wise factors, and factors beside their genes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .._spatialdata import resolve_table
from ..get._view import FitView
from ._docs import doc_params
from ._utils import (
    MAP_VMAX,
    RANK_BY,
    ColorScale,
    add_colorbar,
    color_scale,
    finish,
    grid,
    marker_size,
    no_figsize_with_ax,
    panel_axes,
    panel_titles,
    plane_coords,
    select_factors,
    select_groups,
    select_samples,
    set_suptitle,
    spatial_panel,
    spatial_panel_size,
    wrap_label,
)

if TYPE_CHECKING:
    import os

    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Limit = float | str | None


def _coords(adata: AnnData, spatial_key: str, what: str) -> np.ndarray:
    return plane_coords(adata, spatial_key, what)


def _moran_title(fit: FitView, name: str, prefix: str = "", *, sep: str = "  ") -> str:
    moran = fit.moran
    title = f"{prefix}{name}"
    if moran is not None and name in moran.index:
        title += f"{sep}(I = {float(moran.loc[name, 'I']):.2f})"
    return title


def _column_scales(
    values: np.ndarray, shared: bool, vmin: Limit, vmax: Limit, vcenter: Limit
) -> list[ColorScale]:
    """One colour scale per column of ``values`` (cells x panels), or one for all with ``shared``."""
    if shared:
        return [color_scale(values, vmin=vmin, vmax=vmax, vcenter=vcenter)] * values.shape[1]
    return [color_scale(values[:, j], vmin=vmin, vmax=vmax, vcenter=vcenter) for j in range(values.shape[1])]


def _sample_cells(
    adata: AnnData, fit: FitView, library_id: str | Sequence[str] | None, key: str
) -> np.ndarray:
    """Mask of the cells of the samples ``library_id`` selects (all cells when ``None``)."""
    picked = select_samples(adata, fit.params.get("sample_key"), library_id, key=key)
    if picked is None or library_id is None:
        return np.ones(adata.n_obs, dtype=bool)
    samples, labels = picked
    return np.isin(labels, samples)


def _spatial_maps(
    adata: AnnData,
    use_scales: bool,
    label: str,
    *,
    name: str,
    key: str,
    factors: Sequence[int | str] | None,
    spatial_key: str,
    ncols: int,
    cmap: str,
    shared_scale: bool,
    size: float | None,
    vmin: Limit,
    vmax: Limit,
    vcenter: Limit,
    title: str | Sequence[str] | None,
    figsize: tuple[float, float] | None,
    library_id: str | Sequence[str] | None,
    invert_y: bool,
    ax: Axes | None,
    show: bool | None,
    save: bool | str | os.PathLike | None,
    return_fig: bool,
) -> Figure | Axes | list[Axes] | None:
    fit = FitView.from_adata(adata, key, what=f"plotting {name}")
    coords = _coords(adata, spatial_key, f"`sfact.pl.{name}`")
    stored = fit.scales if use_scales else fit.factors
    names = fit.factor_names
    sel = select_factors(names, factors)
    values = np.asarray(stored, dtype=float)[:, sel]
    picked = select_samples(adata, fit.params.get("sample_key"), library_id, key=key)
    common = {
        "cmap": cmap, "shared_scale": shared_scale, "size": size, "vmin": vmin, "vmax": vmax,
        "vcenter": vcenter, "title": title, "figsize": figsize, "invert_y": invert_y, "ax": ax,
    }  # fmt: skip
    if picked is not None:
        fig, axes = _sample_maps(
            adata, fit, values, sel, coords, label, samples=picked[0], labels=picked[1],
            sample_key=fit.params["sample_key"], **common,
        )  # fmt: skip
        return finish(fig, axes, show=show, save=save, return_fig=return_fig, name=name)
    scales = _column_scales(values, shared_scale, vmin, vmax, vcenter)
    fig, axes = panel_axes(ax, len(sel), ncols, panel_size=spatial_panel_size(coords), figsize=figsize)
    titles, suptitle = panel_titles(title, [_moran_title(fit, names[i], label) for i in sel])
    s = marker_size(size, adata.n_obs)
    one_bar = shared_scale and len(axes) > 1  # one colour bar for the figure, not one per panel
    sc = None
    for j, a in enumerate(axes):
        sc = spatial_panel(
            a, coords, values[:, j], title=titles[j], cmap=cmap, scale=scales[j], size=s,
            colorbar=not one_bar, colorbar_inside=ax is not None, invert_y=invert_y,
        )  # fmt: skip
    if one_bar and sc is not None:
        add_colorbar(sc, axes, extend=scales[0].extend, shrink=0.6, aspect=30, pad=0.01)
    set_suptitle(fig, suptitle)
    return finish(fig, axes, show=show, save=save, return_fig=return_fig, name=name)


def _sample_maps(
    adata: AnnData,
    fit: FitView,
    values: np.ndarray,
    sel: list[int],
    coords: np.ndarray,
    label: str,
    *,
    samples: list[str],
    labels: np.ndarray,
    sample_key: str,
    cmap: str,
    shared_scale: bool,
    size: float | None,
    vmin: Limit,
    vmax: Limit,
    vcenter: Limit,
    title: str | Sequence[str] | None,
    figsize: tuple[float, float] | None,
    invert_y: bool,
    ax: Axes | None,
) -> tuple[Figure, list[Axes]]:
    """One row of panels per sample, one column per factor, each factor on one colour scale.

    Every sample is drawn in its own coordinates; a factor's colour limits come from all drawn
    samples, so its panels compare across samples (``shared_scale``: one scale for everything).
    Titles carry the factor's Moran's I within the sample (``uns[key]["samples"]``).
    """
    n_panels = len(samples) * len(sel)
    if ax is not None and n_panels != 1:
        raise ValueError(
            f"A fit with samples (`{sample_key}`) draws one row per sample: leave `ax=None`, or select one "
            "sample with `library_id=` and one factor with `factors=`."
        )
    names = fit.factor_names
    table = fit.uns.get("samples")
    drawn = np.isin(labels, samples)
    scales = _column_scales(values[drawn], shared_scale, vmin, vmax, vcenter)
    if ax is not None:
        no_figsize_with_ax(figsize)
        fig, axes = ax.figure, [ax]
    else:
        panel = spatial_panel_size(coords[labels == samples[0]])
        fig, axes = grid(n_panels, len(sel), panel_size=panel, figsize=figsize)
    defaults = []
    for smp in samples:
        for i in sel:
            t = f"{smp}: {label}{names[i]}"
            column = f"moranI_{names[i]}"
            if table is not None and column in getattr(table, "columns", ()) and smp in table.index:
                t += f"  (I = {float(table.loc[smp, column]):.2f})"
            defaults.append(t)
    titles, suptitle = panel_titles(title, defaults)
    last = [None] * len(sel)
    for r, smp in enumerate(samples):
        cells = labels == smp
        s = marker_size(size, int(cells.sum()))
        for j in range(len(sel)):
            k = r * len(sel) + j
            last[j] = spatial_panel(
                axes[k], coords[cells], values[cells, j], title=titles[k], cmap=cmap, scale=scales[j],
                size=s, colorbar=False, invert_y=invert_y,
            )  # fmt: skip
    # one colour bar per factor (column), or one for the figure with a shared scale
    if ax is not None:
        add_colorbar(last[0], ax, inside=True, extend=scales[0].extend)
    elif shared_scale:
        add_colorbar(last[0], axes, extend=scales[0].extend, shrink=0.6, aspect=30, pad=0.01)
    else:
        for j in range(len(sel)):
            column_axes = [axes[r * len(sel) + j] for r in range(len(samples))]
            add_colorbar(last[j], column_axes, extend=scales[j].extend, shrink=0.8, aspect=25, pad=0.01)
    set_suptitle(fig, suptitle)
    return fig, axes


@doc_params
def factors(
    adata: AnnData,
    *,
    key: str = "sfact",
    factors: Sequence[int | str] | None = None,
    spatial_key: str = "spatial",
    table_key: str | None = None,
    library_id: str | Sequence[str] | None = None,
    ncols: int = 5,
    cmap: str = "viridis",
    shared_scale: bool = False,
    vmin: float | str | None = None,
    vmax: float | str | None = MAP_VMAX,
    vcenter: float | str | None = None,
    size: float | None = None,
    invert_y: bool = True,
    title: str | Sequence[str] | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Figure | Axes | list[Axes] | None:
    """Spatial maps of the factors, ordered by Moran's I (shown in each title).

    For a fit with samples (``sample_key``), one row of panels per sample, each in its own
    coordinates, with one colour scale per factor across samples (so sections compare) and the
    factor's Moran's I within the sample in each title. y is drawn downward by default, as in
    scanpy and squidpy (``invert_y``).

    Parameters
    ----------
    {adata}
    {key}
    factors
        Factor names or indices to draw; all when ``None``.
    {spatial_key}
    {table_key}
    {library_id}
    {ncols}
    {cmap}
    shared_scale
        Use one colour scale, and one colour bar, for all panels (``vmin``/``vmax`` from all
        values); each panel has its own otherwise.
    {vmin}
    {vmax}
    {vcenter}
    {size}
    {invert_y}
    {title}
    {figsize}
    {ax_factor}
    {show}
    {save}
    {return_fig}

    Returns
    -------
    {returns_fig}

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.osmfish()
    >>> sfact.tl.fit(adata, prior="pnmf", n_factors=5, max_iter=50)  # doctest: +SKIP
    >>> fig = sfact.pl.factors(adata, return_fig=True)  # doctest: +SKIP
    >>> axs = sfact.pl.factors(adata, factors=[0, 1], vmax="p99", show=False)  # doctest: +SKIP
    """
    adata = resolve_table(adata, table_key, spatial_key=spatial_key)  # a SpatialData's table
    return _spatial_maps(
        adata, False, "", name="factors", key=key, factors=factors, spatial_key=spatial_key,
        ncols=ncols, cmap=cmap, shared_scale=shared_scale, size=size, vmin=vmin, vmax=vmax,
        vcenter=vcenter, title=title, figsize=figsize, library_id=library_id, invert_y=invert_y,
        ax=ax, show=show, save=save, return_fig=return_fig,
    )  # fmt: skip


@doc_params
def scales(
    adata: AnnData,
    *,
    key: str = "sfact",
    factors: Sequence[int | str] | None = None,
    spatial_key: str = "spatial",
    table_key: str | None = None,
    library_id: str | Sequence[str] | None = None,
    ncols: int = 5,
    cmap: str = "magma",
    shared_scale: bool = False,
    vmin: float | str | None = None,
    vmax: float | str | None = MAP_VMAX,
    vcenter: float | str | None = None,
    size: float | None = None,
    invert_y: bool = True,
    title: str | Sequence[str] | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Figure | Axes | list[Axes] | None:
    """Spatial maps of the posterior scales σ of the log-factors (uncertainty).

    Parameters
    ----------
    {adata}
    {key}
    factors
        Factor names or indices to draw; all when ``None``.
    {spatial_key}
    {table_key}
    {library_id}
    {ncols}
    {cmap}
    shared_scale
        One colour scale, and one colour bar, for all panels.
    {vmin}
    {vmax}
    {vcenter}
    {size}
    {invert_y}
    {title}
    {figsize}
    {ax_factor}
    {show}
    {save}
    {return_fig}

    Returns
    -------
    {returns_fig}

    Examples
    --------
    >>> fig = sfact.pl.scales(adata, return_fig=True)  # doctest: +SKIP
    """
    adata = resolve_table(adata, table_key, spatial_key=spatial_key)  # a SpatialData's table
    return _spatial_maps(
        adata, True, "σ ", name="scales", key=key, factors=factors, spatial_key=spatial_key,
        ncols=ncols, cmap=cmap, shared_scale=shared_scale, size=size, vmin=vmin, vmax=vmax,
        vcenter=vcenter, title=title, figsize=figsize, library_id=library_id, invert_y=invert_y,
        ax=ax, show=show, save=save, return_fig=return_fig,
    )  # fmt: skip


@doc_params
def groupwise_factors(
    adata: AnnData,
    *,
    key: str = "sfact",
    groups: Sequence[str] | None = None,
    factors: Sequence[int | str] | None = None,
    spatial_key: str = "spatial",
    table_key: str | None = None,
    library_id: str | Sequence[str] | None = None,
    cmap: str = "viridis",
    shared_scale: bool = True,
    vmin: float | str | None = None,
    vmax: float | str | None = MAP_VMAX,
    vcenter: float | str | None = None,
    size: float | None = None,
    invert_y: bool = True,
    title: str | Sequence[str] | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Figure | Axes | list[Axes] | None:
    """Group-wise factor maps of a multi-group fit: rows are groups, columns are factors.

    The first row is the fitted factors (every cell in its own group); each further row shows
    every cell's factors as if it belonged to that group, from :func:`sfact.tl.groupwise_factors`.
    The layout is fixed (groups x factors), so there is no ``ncols`` and no ``ax``; select rows
    with ``groups`` and columns with ``factors``.

    Parameters
    ----------
    adata
        AnnData after :func:`sfact.tl.fit` and :func:`sfact.tl.groupwise_factors`.
    {key}
    groups
        Groups (rows) to draw; all evaluated groups when ``None``.
    factors
        Factor names or indices (columns) to draw; all when ``None``.
    {spatial_key}
    {table_key}
    library_id
        Draw only the cells of these samples (values of the fit's ``sample_key`` column), for a
        fit with several samples; all cells when ``None``.
    {cmap}
    shared_scale
        One colour scale per factor (column), shared by all its rows, with one colour bar under
        the column; each panel has its own scale and colour bar otherwise.
    {vmin}
    {vmax}
    {vcenter}
    {size}
    {invert_y}
    title
        Titles of the columns (a list, one per factor) replacing the default ones, or a string
        for the figure's title.
    {figsize}
    {show}
    {save}
    {return_fig}

    Returns
    -------
    {returns_fig}

    Examples
    --------
    >>> sfact.tl.groupwise_factors(adata, model)  # doctest: +SKIP
    >>> sfact.pl.groupwise_factors(adata, groups=["Microglia", "Pericytes"], factors=[0, 1])  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    from ._utils import check_figsize

    adata = resolve_table(adata, table_key, spatial_key=spatial_key)  # a SpatialData's table

    fit = FitView.from_adata(adata, key, what="plotting group-wise factors")
    gw, all_groups = fit.groupwise  # (N, G, L)
    coords = _coords(adata, spatial_key, "`sfact.pl.groupwise_factors`")
    names = fit.factor_names
    sel = select_factors(names, factors)
    gsel = select_groups(all_groups, groups, "group-wise factors exist for")
    cells = _sample_cells(adata, fit, library_id, key)
    coords = coords[cells]
    gw = np.asarray(gw)[cells]
    rows = [np.asarray(fit.factors, dtype=float)[cells][:, sel]]
    rows += [np.asarray(gw[:, k, :], dtype=float)[:, sel] for k in gsel]
    row_labels = ["all groups\n(fitted)"] + [wrap_label(all_groups[k], 18) for k in gsel]
    col_titles, suptitle = panel_titles(
        title, [_moran_title(fit, names[i], sep="\n") for i in sel], what="factor (column)"
    )
    nrows, ncols = len(rows), len(sel)
    w, h = spatial_panel_size(coords, height=2.4, colorbar=not shared_scale)
    fig, axs = plt.subplots(
        nrows,
        ncols,
        figsize=check_figsize(figsize) or (w * ncols + 0.6, h * nrows + (0.6 if shared_scale else 0.0)),
        squeeze=False,
        layout="constrained",
    )
    s = marker_size(size, int(cells.sum()))
    for j in range(ncols):
        col = np.stack([r[:, j] for r in rows])
        shared = color_scale(col, vmin=vmin, vmax=vmax, vcenter=vcenter) if shared_scale else None
        sc = None
        for r in range(nrows):
            scale = shared or color_scale(col[r], vmin=vmin, vmax=vmax, vcenter=vcenter)
            sc = spatial_panel(
                axs[r, j], coords, col[r], title=col_titles[j] if r == 0 else None, cmap=cmap,
                scale=scale, size=s, colorbar=not shared_scale, invert_y=invert_y,
            )  # fmt: skip
            if j == 0:
                axs[r, j].set_ylabel(row_labels[r], fontsize=9)
        if shared is not None and sc is not None:
            from matplotlib.ticker import MaxNLocator

            cb = add_colorbar(
                sc, list(axs[:, j]), extend=shared.extend, location="bottom", shrink=0.8, aspect=15, pad=0.01
            )
            cb.locator = MaxNLocator(nbins=3)
            cb.ax.tick_params(labelsize=8)
    set_suptitle(fig, suptitle)
    return finish(
        fig, list(axs.ravel()), show=show, save=save, return_fig=return_fig, name="groupwise_factors"
    )


def expression(adata: AnnData, genes: Sequence[str], layer: str | None) -> np.ndarray:
    """``log1p`` of counts scaled to the median cell total, for a few genes (cells x genes, dense)."""
    import scipy.sparse as sp

    from .._utils import get_counts

    X = get_counts(adata, layer)
    idx = [adata.var_names.get_loc(g) for g in genes]
    totals = np.asarray(X.sum(axis=1)).ravel().astype(float)
    ref = float(np.median(totals[totals > 0])) if (totals > 0).any() else 1.0
    sub = X[:, idx]
    sub = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
    return np.log1p(sub.astype(float) * (ref / np.maximum(totals, 1e-12))[:, None])


@doc_params
def factors_with_genes(
    adata: AnnData,
    *,
    key: str = "sfact",
    factors: Sequence[int | str] | None = None,
    n_genes: int = 3,
    by: str = RANK_BY,
    spatial_key: str = "spatial",
    table_key: str | None = None,
    library_id: str | Sequence[str] | None = None,
    cmap: str = "viridis",
    gene_cmap: str = "magma",
    vmin: float | str | None = None,
    vmax: float | str | None = MAP_VMAX,
    vcenter: float | str | None = None,
    size: float | None = None,
    invert_y: bool = True,
    title: str | Sequence[str] | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Figure | Axes | list[Axes] | None:
    """Each factor's map beside the expression maps of its top genes (one row per factor).

    The layout is fixed (factor, then ``n_genes`` genes per row), so there is no ``ncols`` and
    no ``ax``. Gene expression is ``log1p`` of the counts scaled to the median cell total, from
    the layer the fit used. Every panel has its own colour scale (``vmin``/``vmax``/``vcenter``
    apply to each).

    Parameters
    ----------
    {adata}
    {key}
    factors
        Factor names or indices (rows); all when ``None``.
    n_genes
        Top genes per factor (see :func:`sfact.get.top_genes`).
    {by}
    {spatial_key}
    {table_key}
    library_id
        Draw only the cells of these samples (values of the fit's ``sample_key`` column), for a
        fit with several samples; all cells when ``None``.
    cmap
        Colour map of the factors.
    gene_cmap
        Colour map of the expression.
    {vmin}
    {vmax}
    {vcenter}
    {size}
    {invert_y}
    title
        Titles of the factors' panels (a list, one per factor) replacing the default ones, or a
        string for the figure's title.
    {figsize}
    {show}
    {save}
    {return_fig}

    Returns
    -------
    {returns_fig}

    Examples
    --------
    >>> fig = sfact.pl.factors_with_genes(adata, factors=[0, 1, 2], return_fig=True)  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    from ..get._get import top_genes
    from ._utils import check_figsize

    adata = resolve_table(adata, table_key, spatial_key=spatial_key)  # a SpatialData's table

    fit = FitView.from_adata(adata, key, what="plotting factors with genes")
    coords = _coords(adata, spatial_key, "`sfact.pl.factors_with_genes`")
    names = fit.factor_names
    sel = select_factors(names, factors)
    top = top_genes(adata, key=key, n_genes=n_genes, by=by)  # type: ignore[arg-type]
    cells = _sample_cells(adata, fit, library_id, key)
    coords = coords[cells]
    titles, suptitle = panel_titles(
        title, [_moran_title(fit, names[i], sep="\n") for i in sel], what="factor (row)"
    )
    layer = fit.layer
    F = np.asarray(fit.factors, dtype=float)[cells]
    w, h = spatial_panel_size(coords, height=2.6)
    ncols = 1 + n_genes
    fig, axs = plt.subplots(
        len(sel),
        ncols,
        figsize=check_figsize(figsize) or (w * ncols, h * len(sel)),
        squeeze=False,
        layout="constrained",
    )
    s = marker_size(size, int(cells.sum()))
    limits = {"vmin": vmin, "vmax": vmax, "vcenter": vcenter}
    panels = []
    for r, i in enumerate(sel):
        spatial_panel(
            axs[r, 0], coords, F[:, i], title=titles[r], cmap=cmap, scale=color_scale(F[:, i], **limits),
            size=s, invert_y=invert_y,
        )  # fmt: skip
        panels.append(axs[r, 0])
        genes = top.loc[top["factor"] == names[i], "gene"].tolist()
        expr = expression(adata, genes, layer)[cells]
        for c in range(n_genes):
            a = axs[r, c + 1]
            if c >= len(genes):
                a.set_axis_off()
                continue
            spatial_panel(
                a, coords, expr[:, c], title=genes[c], cmap=gene_cmap, scale=color_scale(expr[:, c], **limits),
                size=s, invert_y=invert_y,
            )  # fmt: skip
            panels.append(a)
    set_suptitle(fig, suptitle)
    return finish(fig, panels, show=show, save=save, return_fig=return_fig, name="factors_with_genes")
