"""Shared plotting helpers (STYLE.md "Plots")."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.colorbar import Colorbar
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

RANK_BY: Literal["share"] = "share"
"""How every gene plot ranks genes by default (``by=``): ``"share"``, see :func:`sfact.get.top_genes`."""

MAP_VMAX = "p99.5"
"""Default upper colour limit of the spatial maps: a few extreme cells do not wash out the rest."""


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
    n_panels: int,
    ncols: int,
    *,
    panel_size: tuple[float, float] = (3.2, 3.0),
    figsize: tuple[float, float] | None = None,
) -> tuple[Figure, list[Axes]]:
    """A figure with ``n_panels`` axes in rows of ``ncols``; unused axes removed.

    ``figsize`` (inches) overrides the size computed from ``panel_size``.
    """
    import matplotlib.pyplot as plt

    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig, axs = plt.subplots(
        nrows,
        ncols,
        figsize=check_figsize(figsize) or (panel_size[0] * ncols, panel_size[1] * nrows),
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
    figsize: tuple[float, float] | None = None,
) -> tuple[Figure, list[Axes]]:
    """``[ax]`` when given (it draws exactly one panel, of one ``what``), else a new :func:`grid`.

    ``panel_size`` is only read for the grid (``None`` is fine with ``ax``); ``figsize``
    overrides the grid's size and is refused with ``ax``.
    """
    if ax is not None:
        no_figsize_with_ax(figsize)
        if n_panels != 1:
            raise ValueError(f"`ax` draws one panel; select one {what} with `{what}s=`, received {n_panels}.")
        return ax.figure, [ax]
    return grid(n_panels, ncols, panel_size=panel_size, figsize=figsize)  # type: ignore[arg-type]


def single_axes(
    ax: Axes | None, default_size: tuple[float, float], figsize: tuple[float, float] | None = None
) -> tuple[Figure, Axes]:
    """``ax`` and its figure when given, else one new axes of ``figsize`` or ``default_size`` (constrained)."""
    import matplotlib.pyplot as plt

    if ax is not None:
        no_figsize_with_ax(figsize)
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=check_figsize(figsize) or default_size, layout="constrained")
    return fig, ax


def check_figsize(figsize: Any) -> tuple[float, float] | None:
    """``figsize`` as two positive floats (inches), or ``None``; a clear error otherwise."""
    if figsize is None:
        return None
    try:
        w, h = (float(v) for v in figsize)
    except (TypeError, ValueError):
        raise ValueError(f"`figsize` must be (width, height) in inches, received {figsize!r}.") from None
    if not (np.isfinite(w) and np.isfinite(h) and w > 0 and h > 0):
        raise ValueError(f"`figsize` must be two positive numbers of inches, received {figsize!r}.")
    return (w, h)


def no_figsize_with_ax(figsize: Any) -> None:
    """Refuse ``figsize`` together with ``ax`` (the figure of ``ax`` already has its size)."""
    if figsize is not None:
        raise ValueError(
            "`figsize` sizes a new figure: leave it None when passing `ax=`, and size the figure that "
            "holds `ax` instead."
        )


def spatial_panel(
    ax: Axes,
    coords: np.ndarray,
    values: np.ndarray,
    *,
    title: str | None,
    cmap: Any,
    scale: ColorScale,
    size: float,
    colorbar: bool = True,
    colorbar_inside: bool = False,
    invert_y: bool = True,
) -> Any:
    """One rasterized scatter of ``values`` at ``coords`` with equal aspect and a colour bar.

    ``scale`` (from :func:`color_scale`) gives the colour limits and how the colour bar marks
    clipped values; ``colorbar_inside`` keeps the colour bar inside ``ax``'s area (an ``ax``
    the user passed, see :func:`add_colorbar`); ``invert_y`` draws y downward (image convention).
    """
    order = np.argsort(values, kind="stable")  # high values drawn on top
    sc = ax.scatter(
        coords[order, 0],
        coords[order, 1],
        c=values[order],
        s=size,
        cmap=cmap,
        norm=scale.norm(),
        linewidths=0,
        rasterized=True,
    )
    style_spatial_axes(ax, title, invert_y=invert_y)
    if colorbar:
        add_colorbar(sc, ax, inside=colorbar_inside, extend=scale.extend, shrink=0.7, pad=0.02)
    return sc


def marker_size(size: float | None, n_obs: int) -> float:
    """``size``, or when ``None`` a marker size that fills a panel without overplotting too much."""
    return float(np.clip(12000.0 / max(n_obs, 1), 0.5, 30.0)) if size is None else size


def finish(
    fig: Figure,
    axes: Axes | Sequence[Axes] | None = None,
    *,
    show: bool | None,
    save: bool | str | os.PathLike | None = None,
    return_fig: bool,
    name: str = "plot",
) -> Figure | Axes | list[Axes] | None:
    """Save, then return or show, as scanpy's plots do.

    ``save`` writes the figure first (see :func:`save_path`). Then the figure with
    ``return_fig``; else it is shown unless ``show`` is False (``None``: scanpy's
    ``settings.autoshow``), returning ``None``; with ``show=False`` the panels ``axes`` are
    returned instead (the one Axes, or the list; ``None``: the figure's axes that are not colour
    bars). ``name`` is the plot's name (file name of ``save=True``).
    """
    import matplotlib.pyplot as plt

    if save is not None and save is not False:
        path = save_path(save, name)
        fig.savefig(path, bbox_inches="tight")
    if return_fig:
        return fig
    if show is None:
        import scanpy as sc

        show = bool(sc.settings.autoshow)
    if show:
        plt.show()
        if save is not None and save is not False:
            plt.close(fig)  # written and shown: do not keep it open (scanpy does the same)
        return None
    if axes is None:
        axes = [a for a in fig.axes if not hasattr(a, "_colorbar")]
    if not isinstance(axes, list | tuple):
        return axes
    return axes[0] if len(axes) == 1 else list(axes)


def save_path(save: bool | str | os.PathLike, name: str) -> Path:
    """The file ``save=`` names, its folder created.

    A path is used as given (``scanpy.settings.file_format_figs`` is appended when it has no
    suffix); ``True`` is ``{scanpy.settings.figdir}/sfact_{name}{plot_suffix}.{format}``.
    """
    import scanpy as sc

    fmt = str(sc.settings.file_format_figs)
    if save is True:
        path = Path(sc.settings.figdir) / f"sfact_{name}{sc.settings.plot_suffix}.{fmt}"
    elif isinstance(save, str | os.PathLike) and not isinstance(save, bool) and str(save):
        path = Path(save)
        if not path.suffix:
            path = path.with_name(f"{path.name}.{fmt}")
    else:
        raise TypeError(f"`save` must be a file path or True, received {save!r}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------- colour scales
_PERCENTILE = re.compile(r"p(\d+(?:\.\d*)?|\.\d+)")


def resolve_limit(value: float | str | None, data: np.ndarray, name: str) -> float | None:
    """A colour limit as a number: ``value`` itself, or the percentile ``"p<q>"`` of ``data``'s finite values.

    ``None`` stays ``None``; ``name`` names the parameter in the error.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float | np.integer | np.floating):
        raise TypeError(
            f"`{name}` must be a number, a percentile string like 'p99.5', or None; received {value!r}."
        )
    if isinstance(value, str):
        m = _PERCENTILE.fullmatch(value.strip())
        q = float(m.group(1)) if m else -1.0
        if not 0.0 <= q <= 100.0:
            raise ValueError(
                f"`{name}` as a string must be a percentile 'p0' to 'p100' (like 'p99.5'), received {value!r}."
            )
        v = np.asarray(data, dtype=float).ravel()
        v = v[np.isfinite(v)]
        return float(np.percentile(v, q)) if v.size else None
    out = float(value)
    if not np.isfinite(out):
        raise ValueError(f"`{name}` must be finite, received {value!r}.")
    return out


@dataclass(frozen=True)
class ColorScale:
    """Colour limits of a panel (or of panels that share them) and how the colour bar marks clipping."""

    vmin: float
    vmax: float
    vcenter: float | None = None
    extend: Literal["neither", "min", "max", "both"] = "neither"
    """Triangles at the ends of the colour bar: values lie below ``vmin`` (min) or above ``vmax`` (max)."""

    def norm(self) -> Normalize:
        """A new normalization (two slopes around ``vcenter`` when it is set)."""
        from matplotlib.colors import Normalize, TwoSlopeNorm

        if self.vcenter is not None:
            return TwoSlopeNorm(self.vcenter, self.vmin, self.vmax)
        return Normalize(self.vmin, self.vmax)


def color_scale(
    values: np.ndarray,
    *,
    vmin: float | str | None = None,
    vmax: float | str | None = None,
    vcenter: float | str | None = None,
) -> ColorScale:
    """The colour scale of ``values`` (all panels that share it) from scanpy-style ``vmin``/``vmax``/``vcenter``.

    Each limit is a number, a percentile string (``"p99.5"``) of the finite values, or ``None``
    (the minimum / maximum). ``extend`` records whether values fall outside the limits, so the
    colour bar shows the clipping.
    """
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    lo = resolve_limit(vmin, v, "vmin")
    hi = resolve_limit(vmax, v, "vmax")
    given_lo, given_hi = lo is not None, hi is not None
    if lo is None:
        lo = float(v.min()) if v.size else 0.0
    if hi is None:
        hi = float(v.max()) if v.size else 1.0
    if given_lo and given_hi and hi < lo:
        raise ValueError(f"`vmin` ({lo:g}) is above `vmax` ({hi:g}): pass vmin < vmax.")
    if hi <= lo:  # constant values, or a limit on the wrong side of the data: widen the derived one
        pad = max(abs(lo), abs(hi)) * 1e-6 + 1e-12
        if given_lo and not given_hi:
            hi = lo + pad
        else:
            lo = hi - pad
    center = resolve_limit(vcenter, v, "vcenter")
    if center is not None and not lo < center < hi:
        raise ValueError(
            f"`vcenter` ({center:g}) must lie strictly between vmin ({lo:g}) and vmax ({hi:g}): "
            "pass another `vcenter` or widen the limits."
        )
    below = bool((v < lo).any())
    above = bool((v > hi).any())
    extend = "both" if below and above else "min" if below else "max" if above else "neither"
    return ColorScale(lo, hi, center, extend)  # type: ignore[arg-type]


def add_colorbar(
    mappable: Any,
    ax: Axes | Sequence[Axes],
    *,
    inside: bool = False,
    extend: str = "neither",
    label: str | None = None,
    **kwargs: Any,
) -> Colorbar:
    """A colour bar for ``mappable`` that marks clipping (``extend``) and never overlaps a neighbour.

    With ``inside`` (an axes the user passed, maybe one of a grid), the colour bar and room for
    its tick labels are cut from ``ax``'s own area (:func:`~mpl_toolkits.axes_grid1.make_axes_locatable`),
    so nothing is drawn outside it; otherwise it takes space from ``ax`` (one axes or a list) in
    the figure's layout, with ``kwargs`` passed to :meth:`~matplotlib.figure.Figure.colorbar`.
    """
    if inside:
        from mpl_toolkits.axes_grid1 import axes_size, make_axes_locatable

        one = ax if not isinstance(ax, list | tuple) else ax[0]
        fig = one.figure
        divider = make_axes_locatable(one)
        cax = divider.append_axes("right", size="5%", pad=0.06)
        # room for the tick labels (and the label), inside the axes' area too
        divider.append_size("right", axes_size.Fixed(0.42 + (0.22 if label else 0.0)))
        cb = fig.colorbar(mappable, cax=cax, extend=extend, label=label)
        cb.ax.tick_params(labelsize=8)
        return cb
    first = ax if not isinstance(ax, list | tuple) else ax[0]
    return first.figure.colorbar(mappable, ax=ax, extend=extend, label=label, **kwargs)


# ---------------------------------------------------------------------------- titles, samples
def panel_titles(
    title: str | Sequence[str] | None, defaults: list[str], *, what: str = "panel"
) -> tuple[list[str], str | None]:
    """The panels' titles and the figure's title (suptitle) from ``title=``.

    ``None``: the defaults. A string: the title of a single panel, or of the figure when there
    are several panels (they keep theirs). A list: one title per panel (``what`` in the error).
    """
    if title is None:
        return list(defaults), None
    if isinstance(title, str):
        return ([title], None) if len(defaults) == 1 else (list(defaults), title)
    titles = [str(t) for t in title]
    if len(titles) != len(defaults):
        raise ValueError(
            f"`title` has {len(titles)} entries but the plot has {len(defaults)} titled {what}s: pass one "
            f"title per {what}, or a string for the figure's title."
        )
    return titles, None


def single_title(title: Any) -> str | None:
    """``title=`` of a one-panel plot: a string or ``None``."""
    if title is not None and not isinstance(title, str):
        raise TypeError(f"`title` of this plot (one panel) must be a string, received {title!r}.")
    return title


def set_suptitle(fig: Figure, suptitle: str | None) -> None:
    """The figure's title, when there is one."""
    if suptitle is not None:
        fig.suptitle(suptitle)


def select_samples(
    adata: AnnData, sample_key: str | None, library_id: str | Sequence[str] | None, *, key: str
) -> tuple[list[str], np.ndarray] | None:
    """The samples to draw (``library_id``, squidpy's name) and each cell's sample; ``None`` without samples.

    A fit "has samples" when its ``sample_key`` column exists with more than one value. Samples
    are in category order (sorted without categories) and only those with cells.
    """
    col = None
    if sample_key is not None and sample_key in adata.obs.columns:
        col = adata.obs[sample_key]
    if col is None or col.nunique() < 2:
        if library_id is not None:
            what = f"one sample in `{sample_key}`" if col is not None else "no samples (`sample_key`)"
            raise ValueError(
                f"`library_id` selects samples, but the fit under `key={key!r}` has {what}: leave "
                "`library_id=None`."
            )
        return None
    labels = col.astype(str).to_numpy()
    cats = col.cat.categories if hasattr(col, "cat") else sorted(col.astype(str).unique())
    samples = [str(c) for c in cats if (labels == str(c)).any()]
    if library_id is not None:
        wanted = [library_id] if isinstance(library_id, str) else [str(s) for s in library_id]
        unknown = [s for s in wanted if s not in samples]
        if unknown or not wanted:
            raise KeyError(
                f"Unknown `library_id` {unknown or wanted}; samples in `{sample_key}` are {samples}."
            )
        samples = list(dict.fromkeys(wanted))
    return samples, labels


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


def style_spatial_axes(
    ax: Axes, title: str | None = None, *, fontsize: float = 10, invert_y: bool = True
) -> None:
    """Equal aspect, no ticks or spines, optional title (spatial panels).

    ``invert_y`` (default) draws y increasing downward, the image convention of
    :func:`scanpy.pl.spatial` and :func:`squidpy.pl.spatial_scatter`, so the same coordinates
    give the same picture; ``False`` draws y upward.
    """
    ax.set_aspect("equal")
    ax.yaxis.set_inverted(bool(invert_y))
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
