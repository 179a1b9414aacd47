"""Spatial maps of the factors and their scales."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .._keys import Keys
from ._utils import default_size, finish, grid, require_fit, spatial_panel

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _select(names: list[str], factors: Sequence[int | str] | None) -> list[int]:
    if factors is None:
        return list(range(len(names)))
    out = []
    for f in factors:
        if isinstance(f, str):
            if f not in names:
                raise KeyError(f"Unknown factor {f!r}; factors are {names}.")
            out.append(names.index(f))
        else:
            if not 0 <= int(f) < len(names):
                raise IndexError(f"Factor index {f} out of range 0..{len(names) - 1}.")
            out.append(int(f))
    return out


def _spatial_maps(
    adata: AnnData,
    slot: str,
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
    keys = Keys(key)
    require_fit(adata, keys)
    if spatial_key not in adata.obsm:
        raise KeyError(f"`adata.obsm[{spatial_key!r}]` not found: pass `spatial_key=`.")
    uns = adata.uns[keys.uns]
    names = [
        str(n) for n in uns.get("factor_names", [f"factor_{i}" for i in range(adata.obsm[slot].shape[1])])
    ]
    sel = _select(names, factors)
    values = np.asarray(adata.obsm[slot])[:, sel]
    coords = np.asarray(adata.obsm[spatial_key], dtype=float)
    moran = uns.get("moranI")
    vmin = vmax = None
    if shared_scale:
        vmin, vmax = float(np.nanmin(values)), float(np.nanpercentile(values, 99.5))
    if ax is not None:
        if len(sel) != 1:
            raise ValueError(f"`ax` draws one panel; select one factor with `factors=`, received {len(sel)}.")
        fig, axes = ax.figure, [ax]
    else:
        span = np.ptp(coords[:, :2], axis=0)
        aspect = float(np.clip(span[1] / max(span[0], 1e-12), 0.4, 2.5))
        width = 3.4 if aspect <= 1 else float(np.clip(3.0 / aspect, 1.6, 3.4)) + 0.8
        fig, axes = grid(len(sel), ncols, panel_size=(width, 3.0 if aspect > 1 else 3.4 * aspect + 0.5))
    s = default_size(adata.n_obs) if size is None else size
    for a, j, name in zip(axes, range(len(sel)), [names[i] for i in sel], strict=True):
        title = f"{label}{name}"
        if moran is not None and name in moran.index:
            title += f"  (I = {float(moran.loc[name, 'I']):.2f})"
        lo, hi = vmin, vmax
        if not shared_scale:
            lo, hi = float(np.nanmin(values[:, j])), float(np.nanpercentile(values[:, j], 99.5))
        spatial_panel(a, coords, values[:, j], title=title, cmap=cmap, vmin=lo, vmax=hi, size=s)
    return finish(fig, show=show, return_fig=return_fig)


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

    Parameters
    ----------
    adata
        AnnData after :func:`sfact.tl.fit`.
    key
        The fit's ``key_added``.
    factors
        Factor names or indices to draw; all when ``None``.
    spatial_key
        Key of the coordinates in ``adata.obsm``.
    ncols
        Panels per row.
    cmap
        Colour map.
    shared_scale
        Use one colour scale for all panels (from the minimum to the 99.5th percentile of
        all values); each panel has its own otherwise.
    size
        Marker size; chosen from the number of cells when ``None``.
    ax
        Draw a single factor into this axes.
    show
        Show the figure (default when ``return_fig`` is False).
    return_fig
        Return the :class:`~matplotlib.figure.Figure` instead of showing it.

    Returns
    -------
    The figure when ``return_fig=True``, else ``None``.

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.osmfish()
    >>> sfact.tl.fit(adata, prior="pnmf", n_factors=5, max_iter=50)  # doctest: +SKIP
    >>> fig = sfact.pl.factors(adata, return_fig=True)  # doctest: +SKIP
    """
    return _spatial_maps(
        adata,
        Keys(key).factors,
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
    adata
        AnnData after :func:`sfact.tl.fit`.
    key
        The fit's ``key_added``.
    factors
        Factor names or indices to draw; all when ``None``.
    spatial_key
        Key of the coordinates in ``adata.obsm``.
    ncols
        Panels per row.
    cmap
        Colour map.
    shared_scale
        One colour scale for all panels.
    size
        Marker size; chosen from the number of cells when ``None``.
    ax
        Draw a single factor into this axes.
    show
        Show the figure (default when ``return_fig`` is False).
    return_fig
        Return the :class:`~matplotlib.figure.Figure` instead of showing it.

    Returns
    -------
    The figure when ``return_fig=True``, else ``None``.

    Examples
    --------
    >>> fig = sfact.pl.scales(adata, return_fig=True)  # doctest: +SKIP
    """
    return _spatial_maps(
        adata,
        Keys(key).scales,
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
