"""The results of :func:`sfact.tl.select_model`: held-out deviance of each setting."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._spatialdata import resolve_table
from ._docs import doc_params
from ._utils import finish, single_axes, single_title

if TYPE_CHECKING:
    import os

    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


@doc_params
def model_selection(
    adata: AnnData,
    *,
    key: str = "sfact_selection",
    table_key: str | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Figure | Axes | list[Axes] | None:
    """Held-out deviance of each setting of :func:`sfact.tl.select_model` (lower is better).

    One row per setting (prior, number of factors L, grid options), coloured by prior: each
    fold's held-out deviance as a point, their mean as a vertical line with its value; the
    baseline (cell total x gene share, mean over the folds) as a dashed reference line; the best
    setting's label in bold.

    Parameters
    ----------
    {adata_selection}
    {key_selection}
    {table_key}
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
    >>> sfact.tl.select_model(adata, priors=["svgp", "lcgp"], n_factors=[5, 10])  # doctest: +SKIP
    >>> fig = sfact.pl.model_selection(adata, return_fig=True)  # doctest: +SKIP
    """
    from ..tl._select import _setting_means

    adata = resolve_table(adata, table_key, spatial_key=None)  # a SpatialData's table

    res = adata.uns.get(key)
    if not isinstance(res, dict) or "results" not in res:
        raise KeyError(f"`adata.uns[{key!r}]['results']` not found: run `sfact.tl.select_model` first.")
    df = res["results"]
    means = _setting_means(df)
    setting_cols = list(means.columns[: list(means.columns).index("heldout_deviance")])
    hyper_cols = [c for c in setting_cols if c not in ("prior", "n_factors")]
    labels = [_label(row, hyper_cols) for _, row in means.iterrows()]
    keys = df[setting_cols].astype(str).agg("|".join, axis=1).to_numpy()
    mean_keys = means[setting_cols].astype(str).agg("|".join, axis=1).to_numpy()
    priors = list(dict.fromkeys(means["prior"]))
    colors = {p: f"C{i % 10}" for i, p in enumerate(priors)}
    n = len(means)
    title = single_title(title)
    fig, ax = single_axes(ax, (5.2, 1.0 + 0.34 * n), figsize)
    values = means["heldout_deviance"].to_numpy(dtype=float)
    best = int(np.nanargmin(values)) if np.isfinite(values).any() else -1
    for i, (mkey, prior) in enumerate(zip(mean_keys, means["prior"], strict=True)):
        folds = df.loc[keys == mkey, "heldout_deviance"].to_numpy(dtype=float)
        c = colors[prior]
        offsets = np.linspace(-0.15, 0.15, len(folds)) if len(folds) > 1 else np.zeros(1)
        ax.scatter(folds, i + offsets, s=14, color=c, alpha=0.55, linewidths=0, zorder=3)
        if np.isfinite(values[i]):
            ax.plot([values[i], values[i]], [i - 0.32, i + 0.32], color=c, lw=2.4, zorder=4)
            ax.annotate(
                f"{values[i]:.4f}",
                xy=(values[i], i),
                xytext=(6, 0),
                textcoords="offset points",
                va="center",
                fontsize=7.5,
                color="0.25",
            )
    baseline = float(np.nanmean(df["baseline_deviance"].to_numpy(dtype=float)))
    ax.axvline(baseline, color="0.35", ls="--", lw=1.0, zorder=2, label=f"baseline {baseline:.4f}")
    ax.set_yticks(np.arange(n), labels, fontsize=8.5)
    for i, tick in enumerate(ax.get_yticklabels()):
        tick.set_color(colors[means["prior"].iloc[i]])
        if i == best:
            tick.set_fontweight("bold")
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlabel("held-out deviance per entry")
    n_folds = int(df["fold"].nunique())
    ax.set_title(
        title or f"Model selection ({n_folds} fold{'s' if n_folds > 1 else ''}; lower is better)", fontsize=10
    )
    ax.grid(axis="x", alpha=0.3, lw=0.5)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    return finish(fig, ax, show=show, save=save, return_fig=return_fig, name="model_selection")


def _label(row, hyper_cols: list[str]) -> str:
    parts = [f"{row['prior']} L={int(row['n_factors'])}"]
    for c in hyper_cols:
        v = row[c]
        if (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and v == ""):
            continue
        parts.append(f"{c}={v:g}" if isinstance(v, float) else f"{c}={v}")
    return " ".join(parts)
