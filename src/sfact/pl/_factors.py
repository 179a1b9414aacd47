"""Spatial maps of the factors, their scales, group-wise factors, and factors beside their genes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..get._view import FitView
from ._docs import doc_params
from ._utils import (
    finish,
    marker_size,
    panel_axes,
    plane_coords,
    robust_limits,
    select_factors,
    select_groups,
    spatial_panel,
    spatial_panel_size,
    wrap_label,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _coords(adata: AnnData, spatial_key: str, what: str) -> np.ndarray:
    return plane_coords(adata, spatial_key, what)


def _moran_title(fit: FitView, name: str, prefix: str = "", *, sep: str = "  ") -> str:
    moran = fit.moran
    title = f"{prefix}{name}"
    if moran is not None and name in moran.index:
        title += f"{sep}(I = {float(moran.loc[name, 'I']):.2f})"
    return title


def _spatial_maps(
    adata: AnnData,
    scales: bool,
    label: str,
    *,
    key: str,
    factors: Sequence[int | str] | None,
    spatial_key: str,
    ncols: int,
    cmap: str,
    shared_scale: bool,
    size: float | None,
    ax: Axes | None,
    show: bool | None,
    return_fig: bool,
) -> Figure | None:
    fit = FitView.from_adata(adata, key, what="plotting factors")
    coords = _coords(adata, spatial_key, f"`sfact.pl.{'scales' if scales else 'factors'}`")
    stored = fit.scales if scales else fit.factors
    names = fit.factor_names
    sel = select_factors(names, factors)
    values = np.asarray(stored, dtype=float)[:, sel]
    sample_key = fit.params.get("sample_key")
    if sample_key is not None and sample_key in adata.obs.columns and adata.obs[sample_key].nunique() > 1:
        return _sample_maps(
            adata, fit, values, sel, coords, label, sample_key=sample_key, cmap=cmap,
            shared_scale=shared_scale, size=size, ax=ax, show=show, return_fig=return_fig,
        )  # fmt: skip
    shared = robust_limits(values) if shared_scale else None
    fig, axes = panel_axes(ax, len(sel), ncols, panel_size=spatial_panel_size(coords))
    s = marker_size(size, adata.n_obs)
    one_bar = shared is not None and len(axes) > 1  # one colour bar for the figure, not one per panel
    sc = None
    for j, (a, i) in enumerate(zip(axes, sel, strict=True)):
        lo, hi = shared if shared is not None else robust_limits(values[:, j])
        title = _moran_title(fit, names[i], label)
        sc = spatial_panel(
            a, coords, values[:, j], title=title, cmap=cmap, vmin=lo, vmax=hi, size=s, colorbar=not one_bar
        )
    if one_bar and sc is not None:
        fig.colorbar(sc, ax=axes, shrink=0.6, aspect=30, pad=0.01)
    return finish(fig, show=show, return_fig=return_fig)


def _sample_maps(
    adata: AnnData,
    fit: FitView,
    values: np.ndarray,
    sel: list[int],
    coords: np.ndarray,
    label: str,
    *,
    sample_key: str,
    cmap: str,
    shared_scale: bool,
    size: float | None,
    ax: Axes | None,
    show: bool | None,
    return_fig: bool,
) -> Figure | None:
    """One row of panels per sample, one column per factor, each factor on one colour scale.

    Every sample is drawn in its own coordinates; a factor's colour limits come from all
    samples, so its panels compare across samples (``shared_scale``: one scale for everything).
    Titles carry the factor's Moran's I within the sample (``uns[key]["samples"]``).
    """
    from ._utils import grid

    if ax is not None:
        raise ValueError(
            f"A fit with samples (`{sample_key}`) draws one row per sample: leave `ax=None`, or subset "
            "`adata` to one sample."
        )
    col = adata.obs[sample_key]
    samples = [
        str(c) for c in (col.cat.categories if hasattr(col, "cat") else sorted(col.astype(str).unique()))
    ]
    labels = col.astype(str).to_numpy()
    samples = [smp for smp in samples if (labels == smp).any()]
    names = fit.factor_names
    table = fit.uns.get("samples")
    limits = (
        [robust_limits(values)] * len(sel)
        if shared_scale
        else [robust_limits(values[:, j]) for j in range(len(sel))]
    )
    panel = spatial_panel_size(coords[labels == samples[0]])
    fig, axes = grid(len(samples) * len(sel), len(sel), panel_size=panel)
    last = [None] * len(sel)
    for r, smp in enumerate(samples):
        cells = labels == smp
        s = marker_size(size, int(cells.sum()))
        for j, i in enumerate(sel):
            a = axes[r * len(sel) + j]
            title = f"{smp}: {label}{names[i]}"
            column = f"moranI_{names[i]}"
            if table is not None and column in getattr(table, "columns", ()) and smp in table.index:
                title += f"  (I = {float(table.loc[smp, column]):.2f})"
            lo, hi = limits[j]
            last[j] = spatial_panel(
                a,
                coords[cells],
                values[cells, j],
                title=title,
                cmap=cmap,
                vmin=lo,
                vmax=hi,
                size=s,
                colorbar=False,
            )
    # one colour bar per factor (column), or one for the figure with a shared scale
    if shared_scale:
        fig.colorbar(last[0], ax=axes, shrink=0.6, aspect=30, pad=0.01)
    else:
        for j in range(len(sel)):
            column_axes = [axes[r * len(sel) + j] for r in range(len(samples))]
            fig.colorbar(last[j], ax=column_axes, shrink=0.8, aspect=25, pad=0.01)
    return finish(fig, show=show, return_fig=return_fig)


@doc_params
def factors(
    adata: AnnData,
    *,
    key: str = "sfact",
    factors: Sequence[int | str] | None = None,
    spatial_key: str = "spatial",
    ncols: int = 5,
    cmap: str = "viridis",
    shared_scale: bool = False,
    size: float | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """Spatial maps of the factors, ordered by Moran's I (shown in each title).

    For a fit with samples (``sample_key``), one row of panels per sample, each in its own
    coordinates, with one colour scale per factor across samples (so sections compare) and the
    factor's Moran's I within the sample in each title.

    Parameters
    ----------
    {adata}
    {key}
    factors
        Factor names or indices to draw; all when ``None``.
    {spatial_key}
    {ncols}
    {cmap}
    shared_scale
        Use one colour scale, and one colour bar, for all panels (from the minimum to the
        99.5th percentile of all values); each panel has its own otherwise.
    {size}
    {ax_factor}
    {show}
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
    """
    return _spatial_maps(
        adata,
        False,
        "",
        key=key,
        factors=factors,
        spatial_key=spatial_key,
        ncols=ncols,
        cmap=cmap,
        shared_scale=shared_scale,
        size=size,
        ax=ax,
        show=show,
        return_fig=return_fig,
    )


@doc_params
def scales(
    adata: AnnData,
    *,
    key: str = "sfact",
    factors: Sequence[int | str] | None = None,
    spatial_key: str = "spatial",
    ncols: int = 5,
    cmap: str = "magma",
    shared_scale: bool = False,
    size: float | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """Spatial maps of the posterior scales σ of the log-factors (uncertainty).

    Parameters
    ----------
    {adata}
    {key}
    factors
        Factor names or indices to draw; all when ``None``.
    {spatial_key}
    {ncols}
    {cmap}
    shared_scale
        One colour scale, and one colour bar, for all panels.
    {size}
    {ax_factor}
    {show}
    {return_fig}

    Returns
    -------
    {returns_fig}

    Examples
    --------
    >>> fig = sfact.pl.scales(adata, return_fig=True)  # doctest: +SKIP
    """
    return _spatial_maps(
        adata,
        True,
        "σ ",
        key=key,
        factors=factors,
        spatial_key=spatial_key,
        ncols=ncols,
        cmap=cmap,
        shared_scale=shared_scale,
        size=size,
        ax=ax,
        show=show,
        return_fig=return_fig,
    )


@doc_params
def groupwise_factors(
    adata: AnnData,
    *,
    key: str = "sfact",
    groups: Sequence[str] | None = None,
    factors: Sequence[int | str] | None = None,
    spatial_key: str = "spatial",
    cmap: str = "viridis",
    shared_scale: bool = True,
    size: float | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """Group-wise factor maps of a multi-group fit: rows are groups, columns are factors.

    The first row is the fitted factors (every cell in its own group); each further row shows
    every cell's factors as if it belonged to that group, from :func:`sfact.tl.groupwise_factors`.
    The layout is fixed (groups x factors), so there is no ``ncols``; select rows with
    ``groups`` and columns with ``factors``.

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
    {cmap}
    shared_scale
        One colour scale per factor (column), shared by all its rows, with one colour bar under
        the column; each panel has its own scale and colour bar otherwise.
    {size}
    {show}
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

    fit = FitView.from_adata(adata, key, what="plotting group-wise factors")
    gw, all_groups = fit.groupwise  # (N, G, L)
    coords = _coords(adata, spatial_key, "`sfact.pl.groupwise_factors`")
    names = fit.factor_names
    sel = select_factors(names, factors)
    gsel = select_groups(all_groups, groups, "group-wise factors exist for")
    gw = np.asarray(gw)
    rows = [np.asarray(fit.factors, dtype=float)[:, sel]]
    rows += [np.asarray(gw[:, k, :], dtype=float)[:, sel] for k in gsel]
    row_labels = ["all groups\n(fitted)"] + [wrap_label(all_groups[k], 18) for k in gsel]
    nrows, ncols = len(rows), len(sel)
    w, h = spatial_panel_size(coords, height=2.4, colorbar=not shared_scale)
    fig, axs = plt.subplots(
        nrows,
        ncols,
        figsize=(w * ncols + 0.6, h * nrows + (0.6 if shared_scale else 0.0)),
        squeeze=False,
        layout="constrained",
    )
    s = marker_size(size, adata.n_obs)
    for j, i in enumerate(sel):
        col = np.stack([r[:, j] for r in rows])
        lims = robust_limits(col) if shared_scale else None
        sc = None
        for r in range(nrows):
            lo, hi = lims if lims is not None else robust_limits(col[r])
            title = _moran_title(fit, names[i], sep="\n") if r == 0 else None
            sc = spatial_panel(
                axs[r, j],
                coords,
                col[r],
                title=title or "",
                cmap=cmap,
                vmin=lo,
                vmax=hi,
                size=s,
                colorbar=not shared_scale,
            )
            if j == 0:
                axs[r, j].set_ylabel(row_labels[r], fontsize=9)
        if shared_scale and sc is not None:
            from matplotlib.ticker import MaxNLocator

            cb = fig.colorbar(sc, ax=axs[:, j], location="bottom", shrink=0.8, aspect=15, pad=0.01)
            cb.locator = MaxNLocator(nbins=3)
            cb.ax.tick_params(labelsize=8)
    return finish(fig, show=show, return_fig=return_fig)


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
    by: str = "share",
    spatial_key: str = "spatial",
    cmap: str = "viridis",
    gene_cmap: str = "magma",
    size: float | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """Each factor's map beside the expression maps of its top genes (one row per factor).

    The layout is fixed (factor, then ``n_genes`` genes per row), so there is no ``ncols``.
    Gene expression is ``log1p`` of the counts scaled to the median cell total, from the layer
    the fit used.

    Parameters
    ----------
    {adata}
    {key}
    factors
        Factor names or indices (rows); all when ``None``.
    n_genes
        Top genes per factor (see :func:`sfact.get.top_genes`).
    by
        Rank genes by ``"share"`` (specific to the factor, default) or ``"loading"``.
    {spatial_key}
    cmap
        Colour map of the factors.
    gene_cmap
        Colour map of the expression.
    {size}
    {show}
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

    fit = FitView.from_adata(adata, key, what="plotting factors with genes")
    coords = _coords(adata, spatial_key, "`sfact.pl.factors_with_genes`")
    names = fit.factor_names
    sel = select_factors(names, factors)
    top = top_genes(adata, key=key, n_genes=n_genes, by=by)  # type: ignore[arg-type]
    layer = fit.layer
    F = np.asarray(fit.factors, dtype=float)
    w, h = spatial_panel_size(coords, height=2.6)
    ncols = 1 + n_genes
    fig, axs = plt.subplots(
        len(sel), ncols, figsize=(w * ncols, h * len(sel)), squeeze=False, layout="constrained"
    )
    s = marker_size(size, adata.n_obs)
    for r, i in enumerate(sel):
        lo, hi = robust_limits(F[:, i])
        spatial_panel(
            axs[r, 0],
            coords,
            F[:, i],
            title=_moran_title(fit, names[i], sep="\n"),
            cmap=cmap,
            vmin=lo,
            vmax=hi,
            size=s,
        )
        genes = top.loc[top["factor"] == names[i], "gene"].tolist()
        expr = expression(adata, genes, layer)
        for c in range(n_genes):
            a = axs[r, c + 1]
            if c >= len(genes):
                a.set_axis_off()
                continue
            lo, hi = robust_limits(expr[:, c])
            spatial_panel(a, coords, expr[:, c], title=genes[c], cmap=gene_cmap, vmin=lo, vmax=hi, size=s)
    return finish(fig, show=show, return_fig=return_fig)
