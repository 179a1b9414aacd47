"""``sfact.tl.analyze``: every analysis of a fitted model, in cell batches, written to AnnData."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _logging as logg
from .._keys import Keys
from .._utils import view_to_actual

if TYPE_CHECKING:
    from anndata import AnnData

    from ..models import SpatialFactorization


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    """Drop ``None`` values and turn containers into h5ad-friendly plain values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if v is None:
            continue
        if isinstance(v, dict):
            out[k] = _plain(v)
        elif isinstance(v, list | tuple):
            if len(v) == 0:
                continue
            out[k] = np.asarray(v)
        elif isinstance(v, np.generic):
            out[k] = v.item()
        else:
            out[k] = v
    return out


def analyze(
    adata: AnnData,
    model: SpatialFactorization,
    *,
    key_added: str = "sfact",
    analyze_batch_size: int = 10000,
    group_key: str | None = None,
    n_neighs: int = 6,
    order_by_moran: bool = True,
    n_top: int = 10,
    progress_bar: bool | None = None,
    copy: bool = False,
) -> AnnData | None:
    """(Re)compute every analysis of a fitted model and write it to ``adata``.

    Factors and scales of all cells are computed in batches of ``analyze_batch_size`` cells
    (the GP forward never holds all cells at once), ordered by descending Moran's I, and the
    same permutation is applied to the model (loadings, variational parameters, per-factor
    kernels), so every factor-indexed output stays aligned. Deviance and reconstruction error
    touch only the non-zeros of the counts: no cells x genes matrix is formed. With a
    ``group_key``, per-group loadings and gene enrichment follow
    (:func:`sfact.tl.group_loadings`, :func:`sfact.tl.gene_enrichment`).

    Parameters
    ----------
    adata
        The cells to analyse: the training data, or new cells with the model's genes.
    model
        A trained :class:`~sfact.models.SpatialFactorization` (permuted in place by the reorder).
    key_added
        Base key of every slot written; slots written earlier under it are replaced.
    analyze_batch_size
        Cells per batch.
    group_key
        Column of ``adata.obs`` for per-group loadings and gene enrichment; none when ``None``.
    n_neighs
        Neighbours per cell of the spatial graph used for Moran's I.
    order_by_moran
        Order the factors by descending Moran's I.
    n_top
        Top enriched genes kept per factor and group.
    progress_bar
        Show the analysis steps' progress; defaults to :attr:`sfact.settings.progress_bar`.
    copy
        Return a modified copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy when ``copy=True``. Sets (with ``key = key_added``):

    ``adata.obsm['X_{key}']``, ``adata.obsm['X_{key}_scales']``
        Factors ``exp(μ)`` and posterior standard deviations ``σ`` (n_obs, n_factors).
    ``adata.varm['{key}_loadings']``
        Loadings (n_vars, n_factors).
    ``adata.obs['{key}_deviance']``, ``adata.var['{key}_deviance']``
        Poisson deviance per cell and per gene.
    ``adata.uns['{key}']``
        ``params``, ``history``, ``moranI``, ``metrics``, ``factor_names``, ``keys``, ``gp``;
        with ``group_key`` also ``group_loadings`` and ``enrichment``.
    ``adata.varm['{key}_loadings_{group}']``
        With ``group_key``: per-group loadings.

    Examples
    --------
    >>> model = sfact.models.SpatialFactorization.load("model_dir", adata)  # doctest: +SKIP
    >>> sfact.tl.analyze(adata, model, group_key="ClusterName")  # doctest: +SKIP
    """
    if copy:
        adata = adata.copy()
    else:
        view_to_actual(adata)
    _analyze(
        adata,
        model,
        key_added=key_added,
        analyze_batch_size=analyze_batch_size,
        group_key=group_key,
        n_neighs=n_neighs,
        order_by_moran=order_by_moran,
        n_top=n_top,
        progress_bar=progress_bar,
    )
    return adata if copy else None


def _analyze(
    adata: AnnData,
    model: SpatialFactorization,
    *,
    key_added: str,
    analyze_batch_size: int,
    group_key: str | None,
    n_neighs: int,
    order_by_moran: bool,
    n_top: int,
    progress_bar: bool | None = None,
) -> None:
    from tqdm.auto import tqdm

    from .. import __version__
    from .._keys import factor_names
    from .._settings import settings
    from .._utils import get_coordinates
    from ._analysis import _adata_counts, morans_i, poisson_deviance_sparse, reconstruction_error
    from ._groups import _drop_group_slots, gene_enrichment, group_loadings

    if analyze_batch_size < 1:
        raise ValueError(f"`analyze_batch_size` must be positive, received {analyze_batch_size}.")
    if group_key is not None and group_key not in adata.obs.columns:
        raise KeyError(
            f"`adata.obs[{group_key!r}]` not found: pass an existing `group_key` "
            f"(columns: {list(adata.obs.columns)})."
        )
    keys = Keys(key_added)
    setup = model._setup
    start = logg.info(f"analysing {adata.n_obs} cells in batches of {analyze_batch_size}")
    show = settings.progress_bar if progress_bar is None else progress_bar
    bar = tqdm(total=5 if group_key is None else 7, desc="analysing", disable=not show, leave=False)

    def step(name: str) -> None:
        bar.set_postfix_str(name)

    step("factors")
    mu, var = model.get_log_factors(None if adata is model.adata else adata, batch_size=analyze_batch_size)
    coords = get_coordinates(adata, setup["spatial_key"])
    names = factor_names(model.n_factors)
    factors = np.exp(mu)
    bar.update()
    step("Moran's I")
    moran = morans_i(factors, coords, names=names, n_neighs=n_neighs)
    bar.update()
    if order_by_moran:
        order = np.argsort(-moran["I"].to_numpy(), kind="stable")
        if not np.array_equal(order, np.arange(len(order))):
            model.reorder_factors(order)
            mu, var, factors = mu[:, order], var[:, order], factors[:, order]
            moran = moran.iloc[order].copy()
        moran.index = names
    W = model.get_loadings()
    Y = _adata_counts(adata, setup["layer"])
    s = model._size_factors(adata, Y)
    expected = np.exp(mu + 0.5 * var)
    step("deviance")
    dev_cell, dev_gene = poisson_deviance_sparse(Y, expected, W, s, batch_size=analyze_batch_size)
    bar.update()
    step("reconstruction error")
    recon = reconstruction_error(Y, expected, W, s, batch_size=analyze_batch_size)
    bar.update()
    step("writing")

    # replace everything written earlier under this key (it may belong to another fit or order)
    _drop_group_slots(adata, keys)
    if keys.groupwise in adata.obsm:
        del adata.obsm[keys.groupwise]
    adata.obsm[keys.factors] = factors.astype(np.float32)
    adata.obsm[keys.scales] = np.sqrt(var).astype(np.float32)
    adata.varm[keys.loadings] = W.astype(np.float32)
    adata.obs[keys.obs_deviance()] = dev_cell
    adata.var[keys.var_deviance()] = dev_gene
    params = {
        "prior": setup["prior"],
        "n_factors": setup["n_factors"],
        "layer": setup["layer"],
        "spatial_key": setup["spatial_key"],
        "group_key": setup["group_key"],
        "size_factors": setup["size_factors"],
        "size_factor_reference": setup.get("size_factor_reference"),
        "elbo_mode": setup["elbo_mode"],
        "loadings_mode": setup["loadings_mode"],
        "random_state": setup["seed"],
        "device": model.device,
        "dtype": setup["dtype"],
        "version": __version__,
        "analyze_batch_size": int(analyze_batch_size),
        **{
            k: v
            for k, v in model.train_info.items()
            if k not in ("n_iter", "converged", "train_time_s", "init_time_s")
        },
    }
    n_entries = adata.n_obs * adata.n_vars
    history = model.history_
    metrics = {
        "deviance": float(dev_cell.sum()),
        "deviance_per_entry": float(dev_cell.sum() / n_entries),
        "reconstruction_error": recon,
        "elbo_per_entry": float(history.elbo[-1]) if history.elbo else np.nan,
        "n_iter": len(history),
        "converged": bool(model.converged),
        "train_time_s": float(model.train_info.get("train_time_s", 0.0)),
        "init_time_s": float(model.train_info.get("init_time_s", 0.0)),
    }
    adata.uns[keys.uns] = _plain(
        {
            "params": params,
            "history": dict(history.as_dict().items()),
            "moranI": moran,
            "metrics": metrics,
            "factor_names": np.asarray(names),
            "gp": model.gp_info(),
            "keys": keys.as_dict(),
        }
    )
    deep = (
        f"added\n    '{keys.factors}', '{keys.scales}' (adata.obsm)\n    '{keys.loadings}' (adata.varm)\n"
        f"    '{keys.obs_deviance()}' (adata.obs, adata.var)\n    '{keys.uns}' (adata.uns)"
    )
    bar.update()
    if group_key is not None:
        step("group loadings")
        group_loadings(
            adata, group_key=group_key, key=key_added, batch_size=analyze_batch_size, progress_bar=show
        )
        bar.update()
        step("gene enrichment")
        gene_enrichment(adata, key=key_added, n_top=n_top)
        bar.update()
        deep += f"\n    '{keys.group_loadings_prefix}*' (adata.varm)"
    bar.close()
    logg.info("    finished analysis", time=start, deep=deep)
