"""Shared plotting helpers (STYLE.md "Plots")."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def plane_coords(adata: AnnData, spatial_key: str, what: str) -> np.ndarray:
    """``adata.obsm[spatial_key]`` as floats (n_obs, >= 2) for maps in the plane, with clear errors.

    ``what`` names the plot in the message; a third coordinate column is ignored by the maps.
    """
    from .._utils import get_coordinates

    coords = get_coordinates(adata, spatial_key)
    if coords.shape[1] < 2:
        raise ValueError(
            f"{what} draws maps in the plane, but `adata.obsm[{spatial_key!r}]` has {coords.shape[1]} "
            "coordinate column: pass `spatial_key=` naming 2-D coordinates, or plot "
            "`sfact.get.factors_df(adata)` against the 1-D positions."
        )
    return coords


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


def panel_axes(
    ax: Axes | None,
    n_panels: int,
    ncols: int,
    *,
    panel_size: tuple[float, float] | None,
    what: str = "factor",
) -> tuple[Figure, list[Axes]]:
    """``[ax]`` when given (it draws exactly one panel, of one ``what``), else a new :func:`grid`.

    ``panel_size`` is only read for the grid (``None`` is fine with ``ax``).
    """
    if ax is not None:
        if n_panels != 1:
            raise ValueError(f"`ax` draws one panel; select one {what} with `{what}s=`, received {n_panels}.")
        return ax.figure, [ax]
    return grid(n_panels, ncols, panel_size=panel_size)  # type: ignore[arg-type]


def single_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """``ax`` and its figure when given, else one new axes of ``figsize`` (constrained layout)."""
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


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


def marker_size(size: float | None, n_obs: int) -> float:
    """``size``, or when ``None`` a marker size that fills a panel without overplotting too much."""
    return float(np.clip(12000.0 / max(n_obs, 1), 0.5, 30.0)) if size is None else size


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


def select_groups(all_groups: list[str], groups: Sequence[str] | str | None, where: str) -> list[int]:
    """Indices of ``groups`` among ``all_groups``; all when ``None``. ``where`` ends the error, before the groups."""
    if groups is None:
        return list(range(len(all_groups)))
    groups = [groups] if isinstance(groups, str) else list(groups)
    unknown = [g for g in groups if str(g) not in all_groups]
    if unknown:
        raise KeyError(f"Unknown groups {unknown}; {where} {all_groups}.")
    return [all_groups.index(str(g)) for g in groups]


def wrap_label(text: str, width: int = 16) -> str:
    """Wrap a long label onto lines of at most ``width`` characters."""
    import textwrap

    return "\n".join(textwrap.wrap(str(text), width=width)) or str(text)
