"""Inducing points of a sparse GP prior over the data's groups."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .._spatialdata import resolve_table
from ._docs import doc_params
from ._utils import (
    finish,
    grid,
    group_colors,
    marker_size,
    no_figsize_with_ax,
    panel_titles,
    plane_coords,
    select_samples,
    set_suptitle,
    single_title,
    spatial_panel_size,
    style_spatial_axes,
    wrap_label,
)

if TYPE_CHECKING:
    import os

    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..models import SpatialFactorization


@dataclass(frozen=True)
class _Inducing:
    """Inducing points and the keys they go with, from a model or from ``adata.uns[key]``."""

    coords: np.ndarray
    """(M, 2) in the data's coordinate units."""
    groups: np.ndarray | None
    """(M,) group name of each point (multi-group priors with groups), else ``None``."""
    group_key: str | None
    """The ``obs`` column of the groups (the fit's)."""
    spatial_key: str
    """The ``obsm`` key of the coordinates the fit used."""
    samples: np.ndarray | None
    """(M,) sample of each point (several samples), else ``None``."""
    sample_key: str | None
    """The ``obs`` column of the samples (the fit's)."""

    @classmethod
    def from_model(cls, model: SpatialFactorization) -> _Inducing:
        coords, codes = model.inducing_points()
        setup = model.setup
        groups = None
        if codes is not None and setup.group_categories:
            groups = np.asarray([str(g) for g in setup.group_categories], dtype=object)[np.asarray(codes)]
        samples = model.inducing_point_samples()
        return cls(
            coords=np.asarray(coords, dtype=float),
            groups=groups,
            group_key=setup.group_key,
            spatial_key=setup.spatial_key,
            samples=None if samples is None else np.asarray(samples).astype(str),
            sample_key=setup.sample_key,
        )

    @classmethod
    def from_adata(cls, adata: AnnData, key: str) -> _Inducing:
        from ..get._view import FitView

        try:
            fit = FitView.from_adata(adata, key)
        except KeyError:
            raise KeyError(
                f"`sfact.pl.inducing_points` received no model and there is no sfact fit under key {key!r} "
                f"(`adata.obsm['X_{key}']` not found): pass the trained model "
                "(`sfact.pl.inducing_points(adata, model)`, e.g. from `sfact.tl.fit(..., return_model=True)`), "
                f"or fit with an SVGP prior first (`sfact.tl.fit(adata, prior='mggp_svgp', key_added={key!r})`)."
            ) from None
        try:
            rec = fit.inducing_points
        except KeyError as err:
            raise KeyError(
                f"{err.args[0]} Or pass the trained model: `sfact.pl.inducing_points(adata, model)`."
            ) from None
        groups = None
        if "group_codes" in rec and "group_names" in rec:
            names = np.asarray(rec["group_names"]).astype(str).astype(object)
            groups = names[np.asarray(rec["group_codes"], dtype=np.int64)]
        group_key = str(rec["group_key"]) if "group_key" in rec else fit.group_key
        samples = np.asarray(rec["samples"]).astype(str) if "samples" in rec else None
        return cls(
            coords=np.asarray(rec["coords"], dtype=float),
            groups=groups,
            group_key=group_key,
            spatial_key=str(fit.params.get("spatial_key", "spatial")),
            samples=samples,
            sample_key=fit.params.get("sample_key"),
        )


@doc_params
def inducing_points(
    adata: AnnData,
    model: SpatialFactorization | None = None,
    *,
    key: str = "sfact",
    group_key: str | None = None,
    spatial_key: str | None = None,
    table_key: str | None = None,
    library_id: str | Sequence[str] | None = None,
    split_groups: bool = False,
    groups: Sequence[str] | None = None,
    ncols: int = 4,
    palette: dict[str, str] | None = None,
    size: float | None = None,
    inducing_size: float | None = None,
    legend: bool = True,
    invert_y: bool = True,
    title: str | Sequence[str] | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Figure | Axes | list[Axes] | None:
    """The data's cells coloured by group with the GP's inducing points over them.

    For multi-group priors each inducing point has a group and takes its colour (black edge);
    for single-group priors the inducing points are black. With ``split_groups=True`` each group
    gets its own panel: its cells and inducing points in colour, the other cells in grey.

    The inducing points come from ``model`` when it is given, else from
    ``adata.uns[key]['inducing_points']``, where :func:`sfact.tl.fit` and :func:`sfact.tl.analyze`
    store them (in the data's units, with their groups): no model is needed, also for an AnnData
    read back from ``.h5ad``.

    Parameters
    ----------
    adata
        The cells (usually the training data).
    model
        A trained model with an SVGP prior (``svgp`` or ``mggp_svgp``); when ``None`` the
        inducing points stored under ``key`` are drawn.
    {key}
    group_key
        Column of ``adata.obs`` colouring the cells; the fit's ``group_key`` when ``None``
        (cells are grey when there is none).
    spatial_key
        Key of the coordinates in ``adata.obsm``; the fit's when ``None``.
    {table_key}
    library_id
        Draw only these samples' cells and inducing points (values of the fit's ``sample_key``
        column; squidpy's name for them), for a fit with several samples; all when ``None``.
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
    {invert_y}
    title
        Title replacing the default one; with ``split_groups=True`` a list of one title per
        group, or a string for the figure's title.
    {figsize}
    ax
        Draw the single panel into this axes.
    {show}
    {save}
    {return_fig}

    Returns
    -------
    {returns_fig}

    Examples
    --------
    >>> sfact.tl.fit(adata, prior="mggp_svgp")  # doctest: +SKIP
    >>> sfact.pl.inducing_points(adata)  # from adata.uns["sfact"]  # doctest: +SKIP
    >>> model = sfact.models.SpatialFactorization.load("model_dir", adata)  # doctest: +SKIP
    >>> sfact.pl.inducing_points(adata, model)  # doctest: +SKIP
    """
    from matplotlib.lines import Line2D

    adata = resolve_table(adata, table_key, spatial_key=spatial_key)  # a SpatialData's table

    src = _Inducing.from_adata(adata, key) if model is None else _Inducing.from_model(model)
    spatial_key = src.spatial_key if spatial_key is None else spatial_key
    coords = plane_coords(adata, spatial_key, "`sfact.pl.inducing_points`")
    Z, z_groups = src.coords, src.groups
    if Z.ndim != 2 or Z.shape[1] < 2:
        raise ValueError(f"`sfact.pl.inducing_points` draws 2-D inducing points, received shape {Z.shape}.")
    picked = select_samples(adata, src.sample_key, library_id, key=key)
    if picked is not None and library_id is not None:
        samples, labels = picked
        keep = np.isin(labels, samples)
        adata, coords = adata[keep], coords[keep]
        if src.samples is not None:
            z_keep = np.isin(src.samples, samples)
            Z, z_groups = Z[z_keep], None if z_groups is None else z_groups[z_keep]
    group_key = src.group_key if group_key is None else group_key
    if group_key is not None and group_key not in adata.obs.columns:
        raise KeyError(f"`adata.obs[{group_key!r}]` not found: pass an existing `group_key`.")
    cats: list[str] = []
    cell_groups = None
    if group_key is not None:
        col = adata.obs[group_key].astype("category")
        cats = [str(c) for c in col.cat.categories]
        cell_groups = col.astype(str).to_numpy()
    z_names = None
    if z_groups is not None and group_key == src.group_key:  # the points carry the cells' groups
        z_names = np.asarray(z_groups, dtype=object)
        cats = list(dict.fromkeys([*cats, *(str(g) for g in dict.fromkeys(z_names))]))
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
        panel_title = single_title(title)
        if ax is None:
            from ._utils import check_figsize

            w, h = spatial_panel_size(coords, height=6.0, colorbar=False)
            extra = 0.0 if not (legend and cats) else (2.2 if len(cats) <= 16 else 4.2)
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=check_figsize(figsize) or (w + extra, h), layout="constrained")
            own_fig = True
            ax.set_anchor("E")  # next to the legend, whatever room the equal aspect leaves
        else:
            no_figsize_with_ax(figsize)
            fig, own_fig = ax.figure, False
        if cell_groups is None:
            ax.scatter(coords[:, 0], coords[:, 1], s=s, c="0.75", linewidths=0, rasterized=True)
        else:
            cc = [colors[g] for g in cell_groups]
            ax.scatter(coords[:, 0], coords[:, 1], s=s, c=cc, alpha=0.45, linewidths=0, rasterized=True)
        draw_inducing(ax)
        default = f"{n_z} inducing points" + (f" over {group_key}" if group_key else "")
        style_spatial_axes(ax, default if panel_title is None else panel_title, invert_y=invert_y)
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
        return finish(fig, ax, show=show, save=save, return_fig=return_fig, name="inducing_points")

    if ax is not None:
        raise ValueError("`ax` draws one panel; pass `split_groups=False` or leave `ax=None`.")
    if cell_groups is None:
        raise ValueError("`split_groups=True` needs groups: pass `group_key=`.")
    sel = cats if groups is None else [str(g) for g in ([groups] if isinstance(groups, str) else groups)]
    unknown = [g for g in sel if g not in cats]
    if unknown:
        raise KeyError(f"Unknown groups {unknown}; groups are {cats}.")
    fig, axes = grid(
        len(sel), ncols, panel_size=spatial_panel_size(coords, height=2.8, colorbar=False), figsize=figsize
    )
    counts = {
        g: (int((cell_groups == g).sum()), n_z if z_names is None else int((z_names == g).sum())) for g in sel
    }
    titles, suptitle = panel_titles(
        title,
        [f"{wrap_label(g, 26)}\n{counts[g][0]} cells, {counts[g][1]} inducing" for g in sel],
        what="group",
    )
    for a, g, t in zip(axes, sel, titles, strict=True):
        inside = cell_groups == g
        a.scatter(coords[~inside, 0], coords[~inside, 1], s=s, c="0.88", linewidths=0, rasterized=True)
        a.scatter(coords[inside, 0], coords[inside, 1], s=s * 1.5, c=colors[g], linewidths=0, rasterized=True)
        mask = None if z_names is None else (z_names == g)
        draw_inducing(a, mask, hollow=True)
        style_spatial_axes(a, t, fontsize=8, invert_y=invert_y)
    set_suptitle(fig, suptitle)
    return finish(fig, axes, show=show, save=save, return_fig=return_fig, name="inducing_points")
