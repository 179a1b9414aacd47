"""Training and fit diagnostics: the ELBO curve and Moran's I of the factors."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._spatialdata import resolve_table
from ..get._get import history
from ..get._view import FitView
from ._docs import doc_params
from ._utils import finish, single_axes, single_title

if TYPE_CHECKING:
    import os

    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


@doc_params
def elbo(
    adata: AnnData,
    *,
    key: str = "sfact",
    table_key: str | None = None,
    skip: int | None = None,
    color: str = "C0",
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Figure | Axes | list[Axes] | None:
    """ELBO per matrix entry against iteration.

    The first iterations climb steeply; by default the y range is set by the iterations after
    the first 5% (``skip``), with the full curve still drawn, so convergence stays readable.

    Parameters
    ----------
    {adata}
    {key}
    {table_key}
    skip
        Iterations left out of the y range; 5% of them (at least 1 when there are more than
        10) when ``None``, ``0`` for the full range.
    color
        Line colour.
    {title_single}
    {figsize}
    {ax}
    {show}
    {save}
    {return_fig}

    Returns
    -------
    {returns_fig}

    Raises
    ------
    ValueError
        If the fit has no training iterations (it was trained with ``max_iter=0``).

    Examples
    --------
    >>> fig = sfact.pl.elbo(adata, return_fig=True)  # doctest: +SKIP
    """
    adata = resolve_table(adata, table_key, spatial_key=None)  # a SpatialData's table
    fit = FitView.from_adata(adata, key, what="plotting the ELBO")
    hist = history(adata, key=key)
    if len(hist) == 0:
        raise ValueError(
            f"The fit under `key={key!r}` has no training iterations (trained with `max_iter=0`): there is no "
            "ELBO to plot. Fit again with `max_iter` > 0."
        )
    y = hist["elbo"].to_numpy()
    x = hist.index.to_numpy()
    title = single_title(title)
    fig, ax = single_axes(ax, (4.6, 3.0), figsize)
    ax.plot(x, y, color=color, lw=1.6)
    n = len(y)
    if skip is None:
        skip = max(1, int(0.05 * n)) if n > 10 else 0
    rest = y[skip:][np.isfinite(y[skip:])]
    if rest.size > 1 and skip > 0:
        lo, hi = float(rest.min()), float(rest.max())
        pad = 0.08 * max(hi - lo, 1e-12)
        ax.set_ylim(lo - pad, hi + pad)
    converged = bool(fit.metrics.get("converged", False))
    ax.set_xlabel("iteration")
    ax.set_ylabel("ELBO per entry")
    default = f"ELBO ({n} iterations, {'converged' if converged else 'not converged'})"
    ax.set_title(title or default, fontsize=10)
    ax.grid(alpha=0.3, lw=0.5)
    ax.spines[["top", "right"]].set_visible(False)
    ax.annotate(
        f"final {y[-1]:.4f}",
        xy=(x[-1], y[-1]),
        xytext=(-4, -12),
        textcoords="offset points",
        ha="right",
        va="top",
        fontsize=8,
        color="0.3",
    )
    return finish(fig, ax, show=show, save=save, return_fig=return_fig, name="elbo")


@doc_params
def moran(
    adata: AnnData,
    *,
    key: str = "sfact",
    table_key: str | None = None,
    alpha: float = 0.05,
    color: str = "C0",
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Figure | Axes | list[Axes] | None:
    """Moran's I of each factor, as horizontal bars (top factor first).

    Parameters
    ----------
    {adata}
    {key}
    {table_key}
    alpha
        Bars of factors whose FDR-adjusted p-value is at least ``alpha`` are drawn pale.
    {color}
    {title_single}
    {figsize}
    {ax}
    {show}
    {save}
    {return_fig}

    Returns
    -------
    {returns_fig}

    Examples
    --------
    >>> fig = sfact.pl.moran(adata, return_fig=True)  # doctest: +SKIP
    """
    from matplotlib.colors import to_rgba

    adata = resolve_table(adata, table_key, spatial_key=None)  # a SpatialData's table

    fit = FitView.from_adata(adata, key, what="plotting Moran's I")
    table = fit.moran
    if table is None:
        raise KeyError(f"`adata.uns[{key!r}]['moranI']` not found: run `sfact.tl.fit` or `sfact.tl.analyze`.")
    names = [n for n in fit.factor_names if n in table.index]
    values = table.loc[names, "I"].to_numpy(dtype=float)
    fdr = table.loc[names, "pval_norm_fdr_bh"].to_numpy(dtype=float) if "pval_norm_fdr_bh" in table else None
    colors = [
        to_rgba(color, 1.0 if fdr is None or not np.isfinite(p) or p < alpha else 0.35)
        for p in (fdr if fdr is not None else np.zeros(len(names)))
    ]
    title = single_title(title)
    fig, ax = single_axes(ax, (4.2, 0.9 + 0.32 * len(names)), figsize)
    pos = np.arange(len(names))
    ax.barh(pos, values, color=colors, height=0.7)
    ax.set_yticks(pos, names, fontsize=9)
    ax.invert_yaxis()
    ax.axvline(0, color="0.3", lw=0.8)
    span = max(float(np.nanmax(np.abs(values))) if values.size else 1.0, 1e-3)
    for p, v in zip(pos, values, strict=True):
        ax.text(
            v + (0.015 * span if v >= 0 else -0.015 * span),
            p,
            f"{v:.2f}",
            va="center",
            ha="left" if v >= 0 else "right",
            fontsize=8,
        )
    lo = min(0.0, float(np.nanmin(values)) * 1.15) if values.size else 0.0
    ax.set_xlim(lo, max(float(np.nanmax(values)) * 1.15, 0.05) if values.size else 1.0)
    ax.set_xlabel("Moran's I")
    ax.set_title(title or "Spatial autocorrelation of the factors", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    return finish(fig, ax, show=show, save=save, return_fig=return_fig, name="moran")
