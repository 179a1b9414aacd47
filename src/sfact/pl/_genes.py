"""Genes of the factors: top genes, loadings heatmap, and gene enrichment across groups."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .._spatialdata import resolve_table
from ..get._get import loadings_df
from ..get._get import top_genes as _top_genes
from ..get._view import FitView
from ._docs import doc_params
from ._utils import (
    RANK_BY,
    ColorScale,
    add_colorbar,
    color_scale,
    finish,
    panel_axes,
    panel_titles,
    resolve_limit,
    select_factors,
    select_groups,
    set_suptitle,
    single_axes,
    single_title,
    wrap_label,
)

if TYPE_CHECKING:
    import os

    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _bar_panel(
    ax: Axes,
    labels: list[str],
    values: np.ndarray,
    *,
    colors: Any,
    title: str,
    xlabel: str,
    fontsize: float = 8,
    xlim: tuple[float, float] | None = None,
) -> None:
    pos = np.arange(len(labels))
    ax.barh(pos, values, color=colors, height=0.72)
    ax.set_yticks(pos, labels, fontsize=fontsize)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    if xlim is not None:
        ax.set_xlim(*xlim)
    if values.size and np.nanmin(values) < 0:
        ax.axvline(0, color="0.3", lw=0.8)


@doc_params
def top_genes(
    adata: AnnData,
    *,
    key: str = "sfact",
    table_key: str | None = None,
    factors: Sequence[int | str] | None = None,
    n_genes: int = 10,
    by: str = RANK_BY,
    group: str | None = None,
    ncols: int = 5,
    color: str = "C0",
    shared_scale: bool = False,
    title: str | Sequence[str] | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Figure | Axes | list[Axes] | None:
    """The top genes of each factor as horizontal bars (one panel per factor).

    Parameters
    ----------
    {adata}
    {key}
    {table_key}
    factors
        Factor names or indices; all when ``None``.
    n_genes
        Genes per factor.
    {by}
    {group}
    {ncols}
    {color}
    shared_scale
        One x range for all panels (shares always use 0 to 1).
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
    >>> fig = sfact.pl.top_genes(adata, n_genes=8, by="loading", return_fig=True)  # doctest: +SKIP
    """
    adata = resolve_table(adata, table_key, spatial_key=None)  # a SpatialData's table
    names = FitView.from_adata(adata, key, what="plotting top genes").factor_names
    sel = select_factors(names, factors)
    table = _top_genes(adata, key=key, n_genes=n_genes, by=by, group=group)  # type: ignore[arg-type]
    column = "loading" if by == "loading" else "share"
    xmax = float(table.loc[table["factor"].isin([names[i] for i in sel]), column].max()) * 1.05
    titles, suptitle = panel_titles(title, [names[i] + (f" ({group})" if group else "") for i in sel])
    fig, axes = panel_axes(ax, len(sel), ncols, panel_size=(2.5, 0.6 + 0.2 * n_genes), figsize=figsize)
    for a, i, t in zip(axes, sel, titles, strict=True):
        rows = table[table["factor"] == names[i]]
        _bar_panel(
            a,
            rows["gene"].tolist(),
            rows[column].to_numpy(dtype=float),
            colors=color,
            title=t,
            xlabel="loading" if by == "loading" else "share of the gene",
            xlim=(0, 1.0) if by == "share" else (0, xmax) if shared_scale else None,
        )
    set_suptitle(fig, suptitle)
    return finish(fig, axes, show=show, save=save, return_fig=return_fig, name="top_genes")


@doc_params
def loadings(
    adata: AnnData,
    *,
    key: str = "sfact",
    table_key: str | None = None,
    factors: Sequence[int | str] | None = None,
    n_genes: int = 5,
    by: str = RANK_BY,
    normalize: bool = True,
    group: str | None = None,
    cmap: str = "Purples",
    vmin: float | str | None = None,
    vmax: float | str | None = None,
    vcenter: float | str | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Figure | Axes | list[Axes] | None:
    """Heatmap of the loadings of each factor's top genes (genes x factors).

    Rows are the union of the top ``n_genes`` of every selected factor, grouped by the factor
    they are top for.

    Parameters
    ----------
    {adata}
    {key}
    {table_key}
    factors
        Factor names or indices (columns); all when ``None``.
    n_genes
        Top genes per factor.
    {by}
    normalize
        Show each gene's shares of the factors (rows sum to 1 over all factors) instead of the
        raw loadings, which scale with the gene's expression.
    {group}
    {cmap}
    {vmin}
    {vmax}
    {vcenter}
    {title_single}
    {figsize}
    ax
        Draw into this axes; the colour bar is drawn inside the axes' area.
    {show}
    {save}
    {return_fig}

    Returns
    -------
    {returns_fig}

    Examples
    --------
    >>> fig = sfact.pl.loadings(adata, n_genes=4, return_fig=True)  # doctest: +SKIP
    """
    adata = resolve_table(adata, table_key, spatial_key=None)  # a SpatialData's table
    names = FitView.from_adata(adata, key, what="plotting loadings").factor_names
    sel = select_factors(names, factors)
    W = loadings_df(adata, key=key, group=group)
    if normalize:
        W = W.div(W.sum(axis=1).replace(0, np.nan), axis=0).fillna(0.0)
    table = _top_genes(adata, key=key, n_genes=n_genes, by=by, group=group)  # type: ignore[arg-type]
    genes: list[str] = []
    for i in sel:
        for g in table.loc[table["factor"] == names[i], "gene"]:
            if g not in genes:
                genes.append(g)
    M = W.loc[genes, [names[i] for i in sel]].to_numpy(dtype=float)
    # each gene next to the factor it loads most on (a block diagonal), strongest first
    best = M.argmax(1)
    order = np.lexsort((-M[np.arange(len(genes)), best], best))
    genes, M = [genes[k] for k in order], M[order]
    scale = color_scale(M, vmin=vmin, vmax=vmax, vcenter=vcenter)
    title = single_title(title)
    inside = ax is not None
    fig, ax = single_axes(ax, (1.9 + 0.42 * len(sel), 0.9 + 0.2 * len(genes)), figsize)
    im = ax.imshow(M, aspect="auto", cmap=cmap, norm=scale.norm(), interpolation="nearest")
    ax.set_xticks(np.arange(len(sel)), [names[i] for i in sel], rotation=90, fontsize=8)
    ax.set_yticks(np.arange(len(genes)), genes, fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title or ("gene shares" if normalize else "loadings"), fontsize=10)
    if inside:
        add_colorbar(im, ax, inside=True, extend=scale.extend)
    else:
        shrink = min(1.0, 6.0 / max(len(genes), 1) + 0.3)
        add_colorbar(im, ax, extend=scale.extend, shrink=shrink, aspect=25, pad=0.02)
    return finish(fig, ax, show=show, save=save, return_fig=return_fig, name="loadings")


# ---------------------------------------------------------------------------- enrichment
class _Enrichment(NamedTuple):
    names: list[str]  # all factors
    sel: list[int]  # the selected factors
    all_groups: list[str]
    gsel: list[int]  # the selected groups
    genes: np.ndarray
    log2fc: np.ndarray  # (all groups, genes, all factors)


def _enrichment(
    adata: AnnData, key: str, factors: Sequence[int | str] | None, groups: Sequence[str] | str | None
) -> _Enrichment:
    """The stored gene enrichment (:func:`sfact.tl.gene_enrichment`) and the selected factors and groups."""
    enr = FitView.from_adata(adata, key, what="plotting gene enrichment").enrichment
    names = [str(n) for n in np.atleast_1d(enr["factor_names"])]
    sel = select_factors(names, factors)
    all_groups = [str(g) for g in np.atleast_1d(enr["groups"])]
    gsel = select_groups(all_groups, groups, "the enrichment covers")
    genes = np.asarray(enr["genes"]).astype(str)
    return _Enrichment(names, sel, all_groups, gsel, genes, np.asarray(enr["log2fc"], dtype=float))


def _diverging_scale(
    values: np.ndarray, vmin: float | str | None, vmax: float | str | None, vcenter: float | str | None
) -> ColorScale:
    """A colour scale centred at ``vcenter`` (0 when ``None``), symmetric unless both limits are given.

    Without limits: ``±`` the 99th percentile of the absolute deviations from the centre; with
    one limit, the other mirrors it around the centre.
    """
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    center = resolve_limit(vcenter, v, "vcenter")
    c = 0.0 if center is None else center
    lo, hi = resolve_limit(vmin, v, "vmin"), resolve_limit(vmax, v, "vmax")
    if lo is None and hi is None:
        lim = float(max(np.percentile(np.abs(v - c), 99), 1e-3)) if v.size else 1.0
        lo, hi = c - lim, c + lim
    elif lo is None:
        lo = 2 * c - hi  # type: ignore[operator]
    elif hi is None:
        hi = 2 * c - lo
    if center is None and not lo < c < hi:  # type: ignore[operator]
        center = None  # limits away from 0: a plain linear scale
    elif center is None:
        center = c
    return color_scale(v, vmin=lo, vmax=hi, vcenter=center)


@doc_params
def gene_enrichment(
    adata: AnnData,
    *,
    key: str = "sfact",
    table_key: str | None = None,
    factors: Sequence[int | str] | None = None,
    groups: Sequence[str] | None = None,
    n_genes: int = 10,
    ncols: int = 2,
    cmap: str = "RdBu_r",
    shared_scale: bool = True,
    vmin: float | str | None = None,
    vmax: float | str | None = None,
    vcenter: float | str | None = None,
    title: str | Sequence[str] | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Figure | Axes | list[Axes] | None:
    """Heatmaps of gene enrichment (log2 fold change of group vs global loadings), one per factor.

    Each panel shows, for one factor, the ``n_genes`` genes with the largest absolute
    enrichment in any group (rows) against the groups (columns); red = the group attributes
    more of the gene to the factor than the tissue overall, blue = less. Grey cells: genes with
    too few counts in the group.

    Parameters
    ----------
    {adata_enrichment}
    {key}
    {table_key}
    factors
        Factor names or indices (panels); all when ``None``.
    groups
        Groups (columns); all when ``None``.
    n_genes
        Genes (rows) per panel.
    {ncols}
    cmap
        Diverging colour map, centred at ``vcenter``.
    shared_scale
        One symmetric colour scale (and one colour bar) for all panels; per panel otherwise.
    vmin
        Lower colour limit (a number or a percentile string like ``"p1"``); mirrors ``vmax``
        around the centre when ``None``. Clipped values are marked on the colour bar.
    vmax
        Upper colour limit (a number or a percentile string like ``"p99"``); mirrors ``vmin``
        when ``None``; with neither, ``±`` the 99th percentile of the absolute values.
    vcenter
        The value of the middle colour (a number or a percentile string); 0 when ``None``.
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
    >>> sfact.tl.gene_enrichment(adata, group_key="ClusterName")  # doctest: +SKIP
    >>> fig = sfact.pl.gene_enrichment(adata, factors=[0, 1], return_fig=True)  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    adata = resolve_table(adata, table_key, spatial_key=None)  # a SpatialData's table

    names, sel, all_groups, gsel, genes_all, lfc = _enrichment(adata, key, factors, groups)
    titles, suptitle = panel_titles(title, [names[i] for i in sel])
    lfc = lfc[gsel]  # (G, D, L)
    panels = []
    for i in sel:
        block = lfc[:, :, i]  # (G, D)
        with np.errstate(invalid="ignore"):
            score = np.nanmax(np.abs(block), axis=0) if block.size else np.zeros(len(genes_all))
        score = np.where(np.isfinite(score), score, -1.0)
        top = np.argsort(-score, kind="stable")[: min(n_genes, len(genes_all))]
        panels.append((i, top, block[:, top].T))  # (genes, groups)
    shared = (
        _diverging_scale(np.concatenate([p[2].ravel() for p in panels]), vmin, vmax, vcenter)
        if shared_scale
        else None
    )
    scales = [shared or _diverging_scale(p[2], vmin, vmax, vcenter) for p in panels]
    n_rows = max(len(p[1]) for p in panels) if panels else 1
    label_w = max([len(all_groups[k]) for k in gsel] + [1])
    width = 1.3 + 0.2 * len(gsel)
    height = 0.6 + 0.2 * n_rows
    label_h = 0.06 * label_w + 0.1  # room for the rotated group names (under the bottom panels)
    panel_size = None
    if ax is None:  # (only a grid has rows)
        n_cols_grid = max(1, min(ncols, len(sel)))
        n_grid_rows = -(-len(sel) // n_cols_grid)
        # rows holding the bottom panel of a column carry the group names (the last row, and the
        # row above it when the last one is not full)
        n_label_rows = 1 + int(len(sel) % n_cols_grid != 0 and n_grid_rows > 1)
        panel_size = (
            width + (0 if shared_scale else 0.7),
            height + label_h * n_label_rows / n_grid_rows,
        )
    fig, axes = panel_axes(ax, len(sel), ncols, panel_size=panel_size, figsize=figsize)
    if ax is None and shared_scale and figsize is None:  # room for the one colour bar beside the grid
        w, h = fig.get_size_inches()
        fig.set_size_inches(w + 0.9, h)
    cmap_obj = plt.get_cmap(cmap).copy()
    cmap_obj.set_bad("0.85")
    im = None
    n_cols = max(1, min(ncols, len(panels)))
    bottom = {max(k for k in range(len(panels)) if k % n_cols == c) for c in range(n_cols)}
    for k_panel, (a, (_i, top, M)) in enumerate(zip(axes, panels, strict=True)):
        im = a.imshow(
            np.ma.masked_invalid(M),
            aspect="auto",
            cmap=cmap_obj,
            norm=scales[k_panel].norm(),
            interpolation="nearest",
        )
        if (
            ax is not None or k_panel in bottom
        ):  # the groups are the same in every panel: label the bottom row
            a.set_xticks(np.arange(len(gsel)), [all_groups[k] for k in gsel], rotation=90, fontsize=7)
        else:
            a.set_xticks(np.arange(len(gsel)), [""] * len(gsel))
        a.set_yticks(np.arange(len(top)), genes_all[top], fontsize=8)
        a.tick_params(length=0)
        for spine in a.spines.values():
            spine.set_visible(False)
        a.set_title(titles[k_panel], fontsize=10)
        if ax is not None:
            add_colorbar(im, a, inside=True, extend=scales[k_panel].extend, label="log2 FC")
        elif shared is None:
            add_colorbar(
                im, a, extend=scales[k_panel].extend, shrink=0.6, aspect=20, pad=0.02, label="log2 FC"
            )
    if shared is not None and im is not None and ax is None:
        add_colorbar(
            im,
            axes,
            extend=shared.extend,
            shrink=min(0.6, 4.0 / max(height, 1e-3)),
            aspect=20,
            pad=0.01,
            label="log2 FC",
        )
    set_suptitle(fig, suptitle)
    return finish(fig, axes, show=show, save=save, return_fig=return_fig, name="gene_enrichment")


def _pairs_bars(
    fig: Figure,
    axes: list[Axes],
    items: list[tuple[str, list[str], np.ndarray, Any]],
    *,
    shared_scale: bool,
) -> None:
    finite = [np.abs(v[np.isfinite(v)]) for _, _, v, _ in items]
    allmax = max([float(f.max()) for f in finite if f.size] + [1e-3])
    for a, (title, labels, values, colors) in zip(axes, items, strict=True):
        m = allmax if shared_scale else max(float(np.nanmax(np.abs(values))) if values.size else 1e-3, 1e-3)
        _bar_panel(
            a, labels, values, colors=colors, title=title, xlabel="log2 FC", xlim=(-1.08 * m, 1.08 * m)
        )
        a.axvline(0, color="0.3", lw=0.8)


def _top_pairs(block: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (row, col) of the ``n`` entries of largest absolute value (NaN never), by decreasing value."""
    flat = np.abs(block).ravel()
    flat = np.where(np.isfinite(flat), flat, -1.0)
    order = np.argsort(-flat, kind="stable")[:n]
    order = order[flat[order] >= 0]
    order = order[np.argsort(-block.ravel()[order], kind="stable")]  # enriched on top, depleted below
    return np.unravel_index(order, block.shape)


@doc_params
def enrichment_by_group(
    adata: AnnData,
    *,
    key: str = "sfact",
    table_key: str | None = None,
    groups: Sequence[str] | None = None,
    factors: Sequence[int | str] | None = None,
    n_genes: int = 8,
    ncols: int = 4,
    shared_scale: bool = True,
    title: str | Sequence[str] | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Figure | Axes | list[Axes] | None:
    """For each group, its most enriched and depleted genes, as bars coloured by factor.

    Each panel lists the ``n_genes`` (gene, factor) pairs with the largest absolute log2 fold
    change in the group, labelled ``gene (f<k>)`` for ``factor_<k>``; the bar colour is the
    factor too (legend at the bottom).

    Parameters
    ----------
    {adata_enrichment}
    {key}
    {table_key}
    groups
        Groups (panels); all when ``None``.
    factors
        Factors considered; all when ``None``.
    n_genes
        Bars per panel.
    {ncols}
    shared_scale
        One x range for all panels.
    {title}
    {figsize}
    ax
        Draw a single group into this axes.
    {show}
    {save}
    {return_fig}

    Returns
    -------
    {returns_fig}

    Examples
    --------
    >>> fig = sfact.pl.enrichment_by_group(adata, groups=["Microglia"], return_fig=True)  # doctest: +SKIP
    """
    from matplotlib.patches import Patch

    adata = resolve_table(adata, table_key, spatial_key=None)  # a SpatialData's table

    names, sel, all_groups, gsel, genes, lfc = _enrichment(adata, key, factors, groups)
    fcolors = {names[i]: f"C{k % 10}" for k, i in enumerate(sel)}
    items = []
    for k in gsel:
        block = lfc[k][:, sel]  # (D, L_sel)
        d_idx, l_idx = _top_pairs(block, n_genes)
        labels = [f"{genes[d]} ({_abbrev(names[sel[j]])})" for d, j in zip(d_idx, l_idx, strict=True)]
        items.append(
            (
                wrap_label(all_groups[k], 30),
                labels,
                block[d_idx, l_idx],
                [fcolors[names[sel[j]]] for j in l_idx],
            )
        )
    titles, suptitle = panel_titles(title, [it[0] for it in items])
    items = [(t, *it[1:]) for t, it in zip(titles, items, strict=True)]
    fig, axes = panel_axes(
        ax, len(items), ncols, panel_size=(2.6, 0.95 + 0.19 * n_genes), what="group", figsize=figsize
    )
    _pairs_bars(fig, axes, items, shared_scale=shared_scale)
    set_suptitle(fig, suptitle)
    used = {c for *_, colors in items for c in colors}
    handles = [Patch(color=c, label=n) for n, c in fcolors.items() if c in used]
    if ax is None:
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncols=min(len(handles), 6),
            fontsize=8,
            frameon=False,
            title="factor",
            title_fontsize=8,
        )
    else:
        ax.legend(handles=handles, fontsize=7, frameon=False, loc="best")
    return finish(fig, axes, show=show, save=save, return_fig=return_fig, name="enrichment_by_group")


@doc_params
def enrichment_by_factor(
    adata: AnnData,
    *,
    key: str = "sfact",
    table_key: str | None = None,
    factors: Sequence[int | str] | None = None,
    groups: Sequence[str] | None = None,
    n_genes: int = 10,
    ncols: int = 3,
    shared_scale: bool = True,
    colors: tuple[str, str] = ("#c0392b", "#2e6da4"),
    title: str | Sequence[str] | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Figure | Axes | list[Axes] | None:
    """For each factor, the most enriched and depleted (gene, group) pairs as bars.

    Each panel lists the ``n_genes`` (gene, group) pairs with the largest absolute log2 fold
    change on the factor, labelled ``gene · group``; positive bars are red, negative blue.

    Parameters
    ----------
    {adata_enrichment}
    {key}
    {table_key}
    factors
        Factor names or indices (panels); all when ``None``.
    groups
        Groups considered; all when ``None``.
    n_genes
        Bars per panel.
    {ncols}
    shared_scale
        One x range for all panels.
    colors
        Colours of enriched and depleted bars.
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
    >>> fig = sfact.pl.enrichment_by_factor(adata, factors=[0, 1], return_fig=True)  # doctest: +SKIP
    """
    adata = resolve_table(adata, table_key, spatial_key=None)  # a SpatialData's table
    names, sel, all_groups, gsel, genes, lfc = _enrichment(adata, key, factors, groups)
    lfc = lfc[gsel]  # (G, D, L)
    items = []
    for i in sel:
        block = lfc[:, :, i]  # (G, D)
        g_idx, d_idx = _top_pairs(block, n_genes)
        values = block[g_idx, d_idx]
        labels = [f"{genes[d]} · {_short(all_groups[gsel[g]])}" for g, d in zip(g_idx, d_idx, strict=True)]
        items.append((names[i], labels, values, [colors[0] if v >= 0 else colors[1] for v in values]))
    titles, suptitle = panel_titles(title, [it[0] for it in items])
    items = [(t, *it[1:]) for t, it in zip(titles, items, strict=True)]
    fig, axes = panel_axes(ax, len(items), ncols, panel_size=(3.6, 0.9 + 0.19 * n_genes), figsize=figsize)
    _pairs_bars(fig, axes, items, shared_scale=shared_scale)
    set_suptitle(fig, suptitle)
    return finish(fig, axes, show=show, save=save, return_fig=return_fig, name="enrichment_by_factor")


def _short(text: str, width: int = 24) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _abbrev(factor: str) -> str:
    """``factor_3`` -> ``f3`` (bar labels); other names unchanged."""
    return "f" + factor.removeprefix("factor_") if factor.startswith("factor_") else factor
