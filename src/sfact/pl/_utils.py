"""Shared plotting helpers (STYLE.md "Plots")."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .._keys import Keys


def require_fit(adata: AnnData, keys: Keys, *, what: str = "factors") -> None:
    """Raise a clear error when ``tl.fit`` has not written its results under ``keys``."""
    if keys.factors not in adata.obsm or keys.uns not in adata.uns:
        raise KeyError(
            f"`adata.obsm[{keys.factors!r}]` not found: run `sfact.tl.fit(adata, key_added={keys.key!r})` "
            f"before plotting {what}."
        )


def grid(
    n_panels: int, ncols: int, *, panel_size: tuple[float, float] = (3.2, 3.0)
) -> tuple[Figure, list[Axes]]:
    """A figure with ``n_panels`` axes in rows of ``ncols``; unused axes removed."""
    import matplotlib.pyplot as plt

    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig, axs = plt.subplots(
        nrows,
        ncols,
        figsize=(panel_size[0] * ncols, panel_size[1] * nrows),
        squeeze=False,
        layout="constrained",
    )
    axes = list(axs.ravel())
    for ax in axes[n_panels:]:
        fig.delaxes(ax)
    return fig, axes[:n_panels]


def spatial_panel(
    ax: Axes,
    coords: np.ndarray,
    values: np.ndarray,
    *,
    title: str,
    cmap: str,
    vmin: float | None,
    vmax: float | None,
    size: float,
    colorbar: bool = True,
) -> Any:
    """One rasterized scatter of ``values`` at ``coords`` with equal aspect and a colour bar."""
    order = np.argsort(values, kind="stable")  # high values drawn on top
    sc = ax.scatter(
        coords[order, 0],
        coords[order, 1],
        c=values[order],
        s=size,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        linewidths=0,
        rasterized=True,
    )
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if colorbar:
        ax.figure.colorbar(sc, ax=ax, shrink=0.7, pad=0.02)
    return sc


def default_size(n_obs: int) -> float:
    """Marker size that fills a panel without overplotting too much."""
    return float(np.clip(12000.0 / max(n_obs, 1), 0.5, 30.0))


def finish(fig: Figure, *, show: bool | None, return_fig: bool) -> Figure | None:
    """Return the figure when asked, else show it (when ``show`` is not False) — never both."""
    import matplotlib.pyplot as plt

    if return_fig:
        return fig
    if show is None or show:
        plt.show()
    return None
