"""Inducing points of a sparse GP prior over the data's groups."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ._docs import doc_params
from ._utils import (
    finish,
    grid,
    group_colors,
    marker_size,
    plane_coords,
    spatial_panel_size,
    style_spatial_axes,
    wrap_label,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..models import SpatialFactorization


@doc_params
def inducing_points(
    adata: AnnData,
    model: SpatialFactorization,
    *,
    group_key: str | None = None,
    spatial_key: str | None = None,
    split_groups: bool = False,
    groups: Sequence[str] | None = None,
    ncols: int = 4,
    palette: dict[str, str] | None = None,
    size: float | None = None,
    inducing_size: float | None = None,
    legend: bool = True,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """The data's cells coloured by group with the GP's inducing points over them.

    For multi-group priors each inducing point has a group and takes its colour (black edge);
    for single-group priors the inducing points are black. With ``split_groups=True`` each group
    gets its own panel: its cells and inducing points in colour, the other cells in grey.

    Parameters
    ----------
    adata
        The cells (usually the training data).
    model
        A trained model with an SVGP prior (``svgp`` or ``mggp_svgp``); the inducing points live
        in the model, not in ``adata``.
    group_key
        Column of ``adata.obs`` colouring the cells; the model's ``group_key`` when ``None``
        (cells are grey when there is none).
    spatial_key
        Key of the coordinates in ``adata.obsm``; the model's when ``None``.
    split_groups
        One panel per group instead of one panel.
    groups
        Groups to draw panels for (``split_groups=True``); all when ``None``.
    ncols
        Panels per row when ``split_groups=True``.
    palette
        Colour of each group; ``adata.uns['{group_key}_colors']`` or scanpy's palette when ``None``.
    size
        Marker size of the cells; chosen from the number of cells when ``None``.
    inducing_size
        Marker size of the inducing points.
    legend
        Draw a legend of the groups (single panel).
    ax
        Draw the single panel into this axes.
    {show}
    {return_fig}

    Returns
    -------
    {returns_fig}

    Examples
    --------
    >>> model = sfact.models.SpatialFactorization.load("model_dir", adata)  # doctest: +SKIP
    >>> sfact.pl.inducing_points(adata, model)  # doctest: +SKIP
    """
    from matplotlib.lines import Line2D

    Z, Zg = model.inducing_points()
    setup = model.setup
    spatial_key = setup.spatial_key if spatial_key is None else spatial_key
    coords = plane_coords(adata, spatial_key, "`sfact.pl.inducing_points`")
    group_key = setup.group_key if group_key is None else group_key
    if group_key is not None and group_key not in adata.obs.columns:
        raise KeyError(f"`adata.obs[{group_key!r}]` not found: pass an existing `group_key`.")
    cats: list[str] = []
    cell_groups = None
    if group_key is not None:
        col = adata.obs[group_key].astype("category")
        cats = [str(c) for c in col.cat.categories]
        cell_groups = col.astype(str).to_numpy()
    model_cats = list(setup.group_categories or [])
    z_names = None
    if Zg is not None and model_cats and group_key == setup.group_key:
        z_names = np.asarray(model_cats, dtype=object)[Zg]
        cats = list(dict.fromkeys([*cats, *model_cats]))
    colors = group_colors(adata, group_key, cats) if group_key is not None else {}
    if palette is not None:
        colors.update(palette)
    s = marker_size(size, adata.n_obs)
    zs = float(np.clip(1500.0 / max(len(Z), 1), 6.0, 40.0)) if inducing_size is None else inducing_size
    n_z = len(Z)

    def draw_inducing(a: Axes, mask: np.ndarray | None = None, *, hollow: bool = False) -> None:
        zc = Z if mask is None else Z[mask]
        if hollow:  # over cells of one colour: open black rings stay visible on any colour
            a.scatter(
                zc[:, 0], zc[:, 1], s=zs * 2, facecolors="none", edgecolors="k", linewidths=0.9, zorder=3
            )
            return
        if z_names is not None:
            names = z_names if mask is None else z_names[mask]
            fc = [colors.get(str(g), "k") for g in names]
        else:
            fc = "k"
        a.scatter(zc[:, 0], zc[:, 1], s=zs, c=fc, edgecolors="k", linewidths=0.6, marker="o", zorder=3)

    if not split_groups:
        if ax is None:
            w, h = spatial_panel_size(coords, height=6.0, colorbar=False)
            extra = 0.0 if not (legend and cats) else (2.2 if len(cats) <= 16 else 4.2)
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(w + extra, h), layout="constrained")
            own_fig = True
            ax.set_anchor("E")  # next to the legend, whatever room the equal aspect leaves
        else:
            fig, own_fig = ax.figure, False
        if cell_groups is None:
            ax.scatter(coords[:, 0], coords[:, 1], s=s, c="0.75", linewidths=0, rasterized=True)
        else:
            cc = [colors[g] for g in cell_groups]
            ax.scatter(coords[:, 0], coords[:, 1], s=s, c=cc, alpha=0.45, linewidths=0, rasterized=True)
        draw_inducing(ax)
        style_spatial_axes(ax, f"{n_z} inducing points" + (f" over {group_key}" if group_key else ""))
        if legend and cats:
            handles = [
                Line2D([], [], marker="o", ls="", markerfacecolor=colors[c], markeredgecolor="none", label=c)
                for c in cats
            ]
            handles.append(
                Line2D(
                    [],
                    [],
                    marker="o",
                    ls="",
                    markerfacecolor="w",
                    markeredgecolor="k",
                    label="inducing point",
                )
            )
            where = fig if own_fig else ax
            where.legend(
                handles=handles,
                loc="outside right center" if own_fig else "center left",
                bbox_to_anchor=None if own_fig else (1.01, 0.5),
                frameon=False,
                fontsize=7,
                ncols=1 if len(cats) <= 16 else 2,
                handletextpad=0.2,
                columnspacing=0.8,
            )
        return finish(fig, show=show, return_fig=return_fig)

    if ax is not None:
        raise ValueError("`ax` draws one panel; pass `split_groups=False` or leave `ax=None`.")
    if cell_groups is None:
        raise ValueError("`split_groups=True` needs groups: pass `group_key=`.")
    sel = cats if groups is None else [str(g) for g in ([groups] if isinstance(groups, str) else groups)]
    unknown = [g for g in sel if g not in cats]
    if unknown:
        raise KeyError(f"Unknown groups {unknown}; groups are {cats}.")
    fig, axes = grid(len(sel), ncols, panel_size=spatial_panel_size(coords, height=2.8, colorbar=False))
    for a, g in zip(axes, sel, strict=True):
        inside = cell_groups == g
        a.scatter(coords[~inside, 0], coords[~inside, 1], s=s, c="0.88", linewidths=0, rasterized=True)
        a.scatter(coords[inside, 0], coords[inside, 1], s=s * 1.5, c=colors[g], linewidths=0, rasterized=True)
        mask = None if z_names is None else (z_names == g)
        draw_inducing(a, mask, hollow=True)
        n_here = n_z if mask is None else int(mask.sum())
        style_spatial_axes(
            a, f"{wrap_label(g, 26)}\n{int(inside.sum())} cells, {n_here} inducing", fontsize=8
        )
    return finish(fig, show=show, return_fig=return_fig)
