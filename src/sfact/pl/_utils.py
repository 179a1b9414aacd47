"""Shared plotting helpers (STYLE.md "Plots")."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


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
    style_spatial_axes(ax, title)
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


def spatial_panel_size(
    coords: np.ndarray, *, height: float = 3.0, colorbar: bool = True
) -> tuple[float, float]:
    """Size (inches) of one spatial panel that keeps the tissue's aspect, plus room for a colour bar."""
    span = np.ptp(np.asarray(coords, dtype=float)[:, :2], axis=0)
    aspect = float(np.clip(span[1] / max(span[0], 1e-12), 0.3, 3.0))  # height / width
    if aspect >= 1:
        h = height
        w = float(np.clip(height / aspect, 1.2, 4.0))
    else:
        w = height * 1.15
        h = float(np.clip(w * aspect, 1.2, height)) + 0.35  # + title
    return (w + (0.75 if colorbar else 0.1), h)


def robust_limits(values: np.ndarray, *, upper: float = 99.5) -> tuple[float, float]:
    """Colour limits from the minimum to the ``upper`` percentile, ignoring NaN."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(np.percentile(v, upper))
    if hi <= lo:
        hi = lo + 1e-12 if hi == lo and lo == 0 else max(hi, float(v.max()))
        if hi <= lo:
            hi = lo + abs(lo) * 1e-6 + 1e-12
    return lo, hi


def group_colors(adata: AnnData, group_key: str, categories: list[str]) -> dict[str, Any]:
    """Colour of each group: ``adata.uns['{group_key}_colors']`` when it fits, else scanpy's palettes."""
    from scanpy.plotting import palettes

    stored = adata.uns.get(f"{group_key}_colors")
    col = adata.obs[group_key] if group_key in adata.obs else None
    if stored is not None and col is not None and hasattr(col, "cat"):
        cats = [str(c) for c in col.cat.categories]
        if len(stored) == len(cats):
            lookup = dict(zip(cats, stored, strict=True))
            if all(c in lookup for c in categories):
                return {c: lookup[c] for c in categories}
    n = len(categories)
    pal = palettes.default_20 if n <= 20 else palettes.default_28 if n <= 28 else palettes.default_102
    return {c: pal[i % len(pal)] for i, c in enumerate(categories)}


def style_spatial_axes(ax: Axes, title: str | None = None, *, fontsize: float = 10) -> None:
    """Equal aspect, no ticks or spines, optional title (spatial panels)."""
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title is not None:
        ax.set_title(title, fontsize=fontsize)


def select_factors(names: list[str], factors: Any) -> list[int]:
    """Indices of ``factors`` (names or indices) among ``names``; all when ``None``."""
    if factors is None:
        return list(range(len(names)))
    if isinstance(factors, str | int | np.integer):
        factors = [factors]
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


def wrap_label(text: str, width: int = 16) -> str:
    """Wrap a long label onto lines of at most ``width`` characters."""
    import textwrap

    return "\n".join(textwrap.wrap(str(text), width=width)) or str(text)
