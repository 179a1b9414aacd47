"""Getters: read a fit's results from AnnData as DataFrames or a new AnnData; they never write."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._spatialdata import resolve_table
from ._view import FitView

if TYPE_CHECKING:
    from anndata import AnnData

RankBy = Literal["loading", "share"]


def factors_df(
    adata: AnnData, *, key: str = "sfact", table_key: str | None = None, scales: bool = False
) -> pd.DataFrame:
    """Factors (or their posterior scales) as a cells x factors DataFrame.

    Parameters
    ----------
    adata
        AnnData after :func:`sfact.tl.fit`.
    key
        The fit's ``key_added``.
    table_key
        With a ``spatialdata.SpatialData`` as ``adata``: the key of its table holding the results
        (``None`` for its only table; a key it does not hold raises a :class:`KeyError` naming its
        tables).
    scales
        Return the posterior standard deviations ``σ`` of the log-factors instead.

    Returns
    -------
    DataFrame indexed by ``adata.obs_names`` with one column per factor name, and, for a fit with
    samples (``sample_key``), the sample column first.

    Examples
    --------
    >>> df = sfact.get.factors_df(adata)  # doctest: +SKIP
    >>> df.idxmax(axis=1).value_counts()  # doctest: +SKIP
    """
    adata = resolve_table(adata, table_key, spatial_key=None)  # a SpatialData's table; never writes
    fit = FitView.from_adata(adata, key, what="`sfact.get.factors_df`")
    values = fit.scales if scales else fit.factors
    df = pd.DataFrame(np.array(values, copy=True), index=adata.obs_names.copy(), columns=fit.factor_names)
    params = adata.uns.get(key, {}).get("params", {})
    sample_key = params.get("sample_key") if isinstance(params, dict) else None
    if sample_key is not None and sample_key in adata.obs.columns and sample_key not in df.columns:
        df.insert(0, str(sample_key), adata.obs[sample_key].to_numpy())
    return df


def loadings_df(
    adata: AnnData, *, key: str = "sfact", table_key: str | None = None, group: str | None = None
) -> pd.DataFrame:
    """Loadings as a genes x factors DataFrame (global, or one group's).

    Parameters
    ----------
    adata
        AnnData after :func:`sfact.tl.fit`.
    key
        The fit's ``key_added``.
    table_key
        With a ``spatialdata.SpatialData`` as ``adata``: the key of its table holding the results
        (``None`` for its only table; a key it does not hold raises a :class:`KeyError` naming its
        tables).
    group
        A group's loadings (from :func:`sfact.tl.group_loadings`) instead of the global ones.

    Returns
    -------
    DataFrame indexed by ``adata.var_names`` with one column per factor name.

    Examples
    --------
    >>> sfact.get.loadings_df(adata)["factor_0"].nlargest(5)  # doctest: +SKIP
    """
    adata = resolve_table(adata, table_key, spatial_key=None)  # a SpatialData's table; never writes
    fit = FitView.from_adata(adata, key, what="`sfact.get.loadings_df`")
    values = fit.loadings if group is None else fit.group_loadings(group)
    return pd.DataFrame(np.array(values, copy=True), index=adata.var_names.copy(), columns=fit.factor_names)


def top_genes(
    adata: AnnData,
    *,
    key: str = "sfact",
    table_key: str | None = None,
    n_genes: int = 10,
    by: RankBy = "share",
    group: str | None = None,
) -> pd.DataFrame:
    """The top genes of each factor, as a long table.

    Parameters
    ----------
    adata
        AnnData after :func:`sfact.tl.fit`.
    key
        The fit's ``key_added``.
    table_key
        With a ``spatialdata.SpatialData`` as ``adata``: the key of its table holding the results
        (``None`` for its only table; a key it does not hold raises a :class:`KeyError` naming its
        tables).
    n_genes
        Genes per factor.
    by
        ``"share"`` (default, as in the gene plots of :mod:`sfact.pl`) ranks by
        ``W_dl / Σ_l W_dl`` (how specific the gene is to the factor); ``"loading"`` by the loading
        ``W_dl`` (how much of the factor's expression the gene carries).
    group
        Rank one group's loadings (from :func:`sfact.tl.group_loadings`).

    Returns
    -------
    DataFrame with columns ``factor``, ``rank`` (0 = top), ``gene``, ``loading`` and ``share``,
    ``n_genes`` rows per factor in factor order.

    Examples
    --------
    >>> sfact.get.top_genes(adata, n_genes=5).pivot(index="rank", columns="factor", values="gene")  # doctest: +SKIP
    """
    adata = resolve_table(adata, table_key, spatial_key=None)  # a SpatialData's table; never writes
    if by not in ("loading", "share"):
        raise ValueError(f"`by` must be 'loading' or 'share', received {by!r}.")
    if n_genes < 1:
        raise ValueError(f"`n_genes` must be positive, received {n_genes}.")
    W = loadings_df(adata, key=key, group=group)
    share = W.div(W.sum(axis=1).replace(0, np.nan), axis=0).fillna(0.0)
    score = W if by == "loading" else share
    rows = []
    for name in W.columns:
        order = np.argsort(-score[name].to_numpy(), kind="stable")[:n_genes]
        for rank, d in enumerate(order):
            rows.append((name, rank, str(W.index[d]), float(W[name].iloc[d]), float(share[name].iloc[d])))
    df = pd.DataFrame(rows, columns=["factor", "rank", "gene", "loading", "share"])
    df["rank"] = df["rank"].astype(np.int64)
    return df


def factors_adata(adata: AnnData, *, key: str = "sfact", table_key: str | None = None) -> AnnData:
    """A new AnnData whose variables are the factors, for scanpy's and squidpy's plots.

    ``X`` holds the factors (cells x factors) with the factor names as ``var_names``, so
    ``sc.pl.embedding(fa, basis="spatial", color="factor_0")``,
    ``sq.pl.spatial_scatter(fa, color="factor_0", shape=None)`` or ``sc.pl.violin(fa, "factor_0",
    groupby=...)`` work without adding columns to ``adata.obs``. The input is not modified.

    Parameters
    ----------
    adata
        AnnData after :func:`sfact.tl.fit`.
    key
        The fit's ``key_added``.
    table_key
        With a ``spatialdata.SpatialData`` as ``adata``: the key of its table holding the results
        (``None`` for its only table; a key it does not hold raises a :class:`KeyError` naming its
        tables).

    Returns
    -------
    AnnData with ``X`` the factors (float32), ``layers['scales']`` the posterior scales,
    ``var`` the Moran's I table, and copies of ``obs``, ``obsm`` (all but the fit's own slots),
    ``obsp``, and the ``spatial`` and ``*_colors`` entries of ``uns``.

    Examples
    --------
    >>> import scanpy as sc
    >>> fa = sfact.get.factors_adata(adata)  # doctest: +SKIP
    >>> sc.pl.embedding(fa, basis="spatial", color=["factor_0", "factor_1"])  # doctest: +SKIP
    """
    import anndata as ad

    adata = resolve_table(adata, table_key, spatial_key=None)  # a SpatialData's table; never writes

    fit = FitView.from_adata(adata, key, what="`sfact.get.factors_adata`")
    keys = fit.keys
    X = np.array(fit.factors, dtype=np.float32, copy=True)
    var = pd.DataFrame(index=pd.Index(fit.factor_names))
    moran = fit.moran
    if isinstance(moran, pd.DataFrame):
        var = var.join(moran)
    own = {keys.factors, keys.scales, keys.groupwise}
    obsm = {
        k: np.array(v, copy=True) for k, v in adata.obsm.items() if k not in own and isinstance(v, np.ndarray)
    }
    obsm.update({k: v.copy() for k, v in adata.obsm.items() if k not in own and isinstance(v, pd.DataFrame)})
    uns = {k: v for k, v in adata.uns.items() if k == "spatial" or str(k).endswith("_colors")}
    out = ad.AnnData(X=X, obs=adata.obs.copy(), var=var, obsm=obsm, uns=_deep_copy(uns))
    for k, v in adata.obsp.items():
        out.obsp[k] = v.copy()
    if fit.has_scales:
        out.layers["scales"] = np.array(fit.scales, dtype=np.float32, copy=True)
    return out


def _deep_copy(obj):
    import copy

    return copy.deepcopy(obj)


def history(adata: AnnData, *, key: str = "sfact", table_key: str | None = None) -> pd.DataFrame:
    """Training history: ELBO per matrix entry, expected log-likelihood, KL and elapsed seconds.

    Parameters
    ----------
    adata
        AnnData after :func:`sfact.tl.fit`.
    key
        The fit's ``key_added``.
    table_key
        With a ``spatialdata.SpatialData`` as ``adata``: the key of its table holding the results
        (``None`` for its only table; a key it does not hold raises a :class:`KeyError` naming its
        tables).

    Returns
    -------
    DataFrame indexed by iteration (from 1), one column per recorded quantity.

    Examples
    --------
    >>> sfact.get.history(adata)["elbo"].plot()  # doctest: +SKIP
    """
    adata = resolve_table(adata, table_key, spatial_key=None)  # a SpatialData's table; never writes
    fit = FitView.from_adata(adata, key, what="`sfact.get.history`")
    hist = fit.history
    if hist is None or len(hist) == 0:
        raise KeyError(
            f"`adata.uns[{fit.keys.uns!r}]['history']` not found: the fit recorded no training history."
        )
    data = {str(k): np.asarray(v, dtype=np.float64).ravel() for k, v in hist.items()}
    n = max(len(v) for v in data.values())
    return pd.DataFrame(data, index=pd.RangeIndex(1, n + 1, name="iteration"))
