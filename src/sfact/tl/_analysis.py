"""Analysis of a fitted model: Moran's I ordering, deviance, reconstruction error."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

if TYPE_CHECKING:
    from anndata import AnnData


def morans_i(
    data: AnnData | np.ndarray,
    coords: np.ndarray | None = None,
    *,
    key: str = "sfact",
    obsm_key: str | None = None,
    spatial_key: str | None = None,
    sample_key: str | None = None,
    connectivity_key: str | None = None,
    names: list[str] | None = None,
    n_neighs: int = 6,
    table_key: str | None = None,
) -> pd.DataFrame:
    """Moran's I of each factor (or column) on a spatial neighbour graph; reads, never writes.

    Called with an AnnData, as :func:`squidpy.gr.spatial_autocorr` is: ``morans_i(adata)`` scores
    the factors of the fit stored under ``key`` on a k-nearest-neighbour graph of its
    coordinates (within each sample when the fit has several), reproducing
    ``adata.uns[key]['moranI']``; ``obsm_key=`` scores the columns of any ``adata.obsm`` entry;
    ``connectivity_key=`` uses a graph already in ``adata.obsp`` (e.g. from
    :func:`squidpy.gr.spatial_neighbors`). Called with arrays, ``morans_i(values, coords)`` scores
    the columns of ``values`` on a k-nearest-neighbour graph of ``coords``.

    Uses squidpy's k-nearest-neighbour graph (``squidpy.gr.spatial_neighbors_knn``;
    ``spatial_neighbors`` on squidpy < 1.7) and :func:`squidpy.gr.spatial_autocorr` (analytic
    p-values, no permutations).

    Parameters
    ----------
    data
        An AnnData, or an (N, L) array with one column per factor.
    coords
        (N, p) coordinates, with an array ``data`` only.
    key
        With an AnnData: the fit's ``key_added`` whose factors (``obsm['X_{key}']``) are scored
        (unless ``obsm_key`` is given).
    obsm_key
        With an AnnData: score the columns of ``adata.obsm[obsm_key]`` instead (an array, or a
        DataFrame whose columns name the results).
    spatial_key
        With an AnnData: key of the coordinates in ``adata.obsm``; the fit's (``'spatial'``
        without a fit) when ``None``.
    sample_key
        With an AnnData: column of ``adata.obs`` with the samples (tissue sections); the graph
        then joins cells of the same sample only. The fit's ``sample_key`` when ``None`` and
        reading a fit.
    connectivity_key
        With an AnnData: key of a cells x cells graph in ``adata.obsp`` to use instead of the
        k-nearest-neighbour graph (``n_neighs`` and ``sample_key`` are then not used).
    names
        Names of the columns; the fit's factor names, a DataFrame's columns, or ``factor_0``, ...
        when ``None``.
    n_neighs
        Neighbours per cell in the spatial graph.
    table_key
        With a ``spatialdata.SpatialData`` as ``data``: the key of its table holding the
        factors (``None`` for its only table; a key it does not hold raises a :class:`KeyError`
        naming its tables). Its coordinates are read from ``obsm`` (as :func:`sfact.tl.fit`
        left them); nothing is written.

    Returns
    -------
    DataFrame indexed by name, with squidpy's columns ``I``, ``pval_norm``, ``var_norm``,
    ``pval_norm_fdr_bh``, in the order of the columns.

    Examples
    --------
    >>> import numpy as np
    >>> import sfact
    >>> rng = np.random.default_rng(0)
    >>> coords = rng.uniform(0, 10, (500, 2))
    >>> values = np.c_[coords[:, 0], rng.normal(size=500)]  # a gradient and noise
    >>> sfact.tl.morans_i(values, coords, names=["gradient", "noise"])["I"].round(2).tolist()
    [0.99, -0.01]
    >>> sfact.tl.morans_i(adata)  # the factors of the fit under 'sfact'  # doctest: +SKIP
    >>> sfact.tl.morans_i(adata, obsm_key="X_pca", connectivity_key="spatial_connectivities")  # doctest: +SKIP
    """
    from anndata import AnnData

    from .._spatialdata import is_spatialdata, resolve_table
    from .._utils import check_int

    check_int(n_neighs, "n_neighs", minimum=1)
    if is_spatialdata(data) or table_key is not None:
        data = resolve_table(data, table_key, spatial_key=None)  # a SpatialData's table; never writes
    if not isinstance(data, AnnData):
        if coords is None:
            raise TypeError(
                "`sfact.tl.morans_i(values, coords)` needs the coordinates with an array: pass `coords=`, "
                "or pass an AnnData (`sfact.tl.morans_i(adata)`)."
            )
        given = {
            "obsm_key": obsm_key,
            "spatial_key": spatial_key,
            "sample_key": sample_key,
            "connectivity_key": connectivity_key,
        }
        extra = [k for k, v in given.items() if v is not None]
        if extra:
            raise TypeError(
                f"`{'`, `'.join(extra)}` read an AnnData: pass `sfact.tl.morans_i(adata, ...)`, or leave "
                "them out with arrays."
            )
        values = np.asarray(data, dtype=np.float64)
        if values.ndim != 2:
            raise ValueError(f"`values` must be (n_obs, n_columns), received shape {values.shape}.")
        names = [f"factor_{i}" for i in range(values.shape[1])] if names is None else list(names)
        return _morans_i(values, np.asarray(coords, dtype=np.float64), names, n_neighs=n_neighs)
    if coords is not None:
        raise TypeError(
            "`coords` goes with an array of values; with an AnnData the coordinates are "
            "`adata.obsm[spatial_key]`: pass `spatial_key=` instead."
        )
    values, default_names, fit_params = _anndata_values(data, key=key, obsm_key=obsm_key)
    names = default_names if names is None else [str(n) for n in names]
    if len(names) != values.shape[1]:
        raise ValueError(f"`names` has {len(names)} names for {values.shape[1]} columns.")
    if connectivity_key is not None:
        if connectivity_key not in data.obsp:
            raise KeyError(
                f"`adata.obsp[{connectivity_key!r}]` not found: run `squidpy.gr.spatial_neighbors(adata)` "
                f"first, or leave out `connectivity_key` for a {n_neighs}-nearest-neighbour graph "
                f"(available: {list(data.obsp.keys())})."
            )
        return _morans_i(values, None, names, n_neighs=n_neighs, graph=data.obsp[connectivity_key])
    from .._utils import get_coordinates

    spatial_key = fit_params.get("spatial_key", "spatial") if spatial_key is None else spatial_key
    xy = get_coordinates(data, str(spatial_key))
    sample_key = fit_params.get("sample_key") if sample_key is None else sample_key
    if sample_key is not None:
        if sample_key not in data.obs.columns:
            raise KeyError(
                f"`adata.obs[{sample_key!r}]` (the samples) not found: pass `sample_key=` naming an existing "
                f"column (columns: {list(data.obs.columns)})."
            )
        xy = _apart(xy, data.obs[sample_key].astype(str).to_numpy())
    return _morans_i(values, xy, names, n_neighs=n_neighs)


def _anndata_values(adata: AnnData, *, key: str, obsm_key: str | None) -> tuple[np.ndarray, list[str], dict]:
    """The columns :func:`morans_i` scores in ``adata``, their names, and the fit's params (or ``{}``)."""
    from ..get._view import FitView

    if obsm_key is None:
        fit = FitView.from_adata(adata, key, what="`sfact.tl.morans_i(adata)` (or pass `obsm_key=`)")
        return np.asarray(fit.factors, dtype=np.float64), fit.factor_names, dict(fit.params)
    if obsm_key not in adata.obsm:
        raise KeyError(
            f"`adata.obsm[{obsm_key!r}]` not found: pass `obsm_key=` naming an existing entry "
            f"(available: {list(adata.obsm.keys())})."
        )
    raw = adata.obsm[obsm_key]
    if isinstance(raw, pd.DataFrame):
        return raw.to_numpy(dtype=np.float64), [str(c) for c in raw.columns], {}
    values = np.asarray(raw.toarray() if sp.issparse(raw) else raw, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(
            f"`adata.obsm[{obsm_key!r}]` must be (n_obs, n_columns), received shape {values.shape}."
        )
    return values, [f"{obsm_key}_{i}" for i in range(values.shape[1])], {}


def _apart(xy: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """Coordinates whose nearest-neighbour graph stays within each sample: samples moved far apart.

    Each sample from its own corner, moved along the first axis by ten times the largest extent
    (as the fit's Moran's I does): the graph's neighbours are the same as within each sample.
    """
    out = xy.copy()
    shift = 10.0 * max(float(np.ptp(xy, axis=0).max()) if len(xy) else 1.0, 1.0)
    for k, s in enumerate(dict.fromkeys(samples)):
        cells = samples == s
        out[cells] -= xy[cells].min(axis=0)
        out[cells, 0] += k * shift
    return out


def _morans_i(
    values: np.ndarray, coords: np.ndarray | None, names: list[str], *, n_neighs: int, graph=None
) -> pd.DataFrame:
    """Moran's I of the columns of ``values`` on a ``n_neighs``-NN graph of ``coords``, or on ``graph``."""
    import logging
    import warnings

    import anndata as ad

    from .._utils import warn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # squidpy's dependencies warn at import time
        import squidpy as sq

    obsm = {} if coords is None else {"spatial": np.asarray(coords, dtype=np.float64)}
    tmp = ad.AnnData(X=values, obsm=obsm, var=pd.DataFrame(index=names))
    tmp.obs_names = [str(i) for i in range(tmp.n_obs)]
    if graph is not None:
        tmp.obsp["spatial_connectivities"] = sp.csr_matrix(graph)
    n_neighs = int(min(n_neighs, max(tmp.n_obs - 1, 1)))
    quiet = [logging.getLogger(name) for name in ("squidpy", "spatialdata", "spatialdata._logging")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            knn = getattr(sq.gr, "spatial_neighbors_knn", None)  # squidpy >= 1.7
            if graph is None and knn is not None:
                knn(tmp, n_neighs=n_neighs)
            elif graph is None:  # older squidpy; deprecated in 1.7, removed in 1.9
                sq.gr.spatial_neighbors(tmp, coord_type="generic", n_neighs=n_neighs)
            df = sq.gr.spatial_autocorr(
                tmp, mode="moran", genes=names, n_perms=None, copy=True, show_progress_bar=False
            )
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    df = df.loc[names, ["I", "pval_norm", "var_norm", "pval_norm_fdr_bh"]].copy()
    df.index.name = None
    undefined = [str(n) for n, i in zip(names, df["I"].to_numpy(), strict=True) if not np.isfinite(i)]
    if undefined:
        warn(
            f"Moran's I is undefined (NaN) for {', '.join(undefined)}: the factor is constant over the cells (flat), e.g. "
            "from a lengthscale much longer than the tissue, all cells at one place, or too little training. "
            "Such a factor carries no spatial pattern; check the fit (`prior_kwargs={'lengthscale': ...}`)."
        )
    return df


def poisson_deviance_sparse(
    Y,
    factors_expected: np.ndarray,
    W: np.ndarray,
    s: np.ndarray,
    *,
    batch_size: int = 10000,
    offsets: tuple[np.ndarray, np.ndarray] | None = None,
):
    """Poisson deviance of counts ``Y`` against rates ``s_n Σ_l W_dl E_nl`` without a dense rate matrix.

    ``dev = 2 Σ_nd [y log(y/λ) − (y − λ)]`` = 2 (Σ_nz y log(y/λ) − Σ y + Σ λ), where
    ``Σ_d λ_nd = s_n Σ_l E_nl Σ_d W_dl`` factorizes. ``offsets``: ``(g, codes)``, per-sample
    gene offsets g (S x D) and every cell's sample code, for rates ``s_n g_{s(n),d} Σ_l W_dl E_nl``.

    Returns
    -------
    ``(per_cell, per_gene)`` deviance arrays; their sums are the total.
    """
    Y = sp.csr_matrix(Y, copy=True)
    Y.eliminate_zeros()  # explicit zeros would give 0 · log 0
    N, D = Y.shape
    per_cell = np.zeros(N)
    per_gene = np.zeros(D)
    Wsum = W.sum(0)
    if offsets is not None:
        g, codes = np.asarray(offsets[0], dtype=np.float64), np.asarray(offsets[1])
        gW = g @ W  # (S, L): Σ_d g_sd W_dl
    for start in range(0, N, batch_size):
        stop = min(start + batch_size, N)
        blk = Y[start:stop]
        E = factors_expected[start:stop] * s[start:stop, None]  # (b, L)
        rows = np.repeat(np.arange(stop - start), np.diff(blk.indptr))
        cols = blk.indices
        y = blk.data.astype(np.float64)
        lam_nz = np.einsum("nl,nl->n", E[rows], W[cols])
        if offsets is not None:
            c = codes[start:stop]
            lam_nz = lam_nz * g[c[rows], cols]
        lam_nz = np.maximum(lam_nz, 1e-300)
        term = y * np.log(y / lam_nz) - y
        per_cell[start:stop] += np.bincount(rows, weights=term, minlength=stop - start)
        per_gene += np.bincount(cols, weights=term, minlength=D)
        if offsets is None:
            per_cell[start:stop] += E @ Wsum
            per_gene += W @ E.sum(0)
        else:
            per_cell[start:stop] += np.einsum("nl,nl->n", E, gW[c])
            for k in np.unique(c):
                per_gene += g[k] * (W @ E[c == k].sum(0))
    return 2 * per_cell, 2 * per_gene


def reconstruction_error(
    Y,
    factors_expected: np.ndarray,
    W: np.ndarray,
    s: np.ndarray,
    *,
    batch_size: int = 10000,
    offsets: tuple[np.ndarray, np.ndarray] | None = None,
) -> float:
    """Relative Frobenius error ``‖Y − Ŷ‖_F / ‖Y‖_F`` with ``Ŷ = diag(s) E Wᵀ``, never forming ``Ŷ``.

    ``‖Y − Ŷ‖² = ‖Y‖² − 2⟨Y, Ŷ⟩ + ‖Ŷ‖²``: the inner product touches only the non-zeros of ``Y``
    and ``‖Ŷ‖² = Σ_n s_n² e_nᵀ (WᵀW) e_n``, so the cost is O(nnz·L + N·L²) in cell batches.
    ``offsets``: ``(g, codes)`` as for :func:`poisson_deviance_sparse`, for
    ``Ŷ_nd = s_n g_{s(n),d} (E Wᵀ)_nd``; the Gram matrix is then per sample, ``Wᵀ diag(g_s²) W``.
    """
    Y = sp.csr_matrix(Y)
    N = Y.shape[0]
    W = np.asarray(W, dtype=np.float64)
    if offsets is None:
        grams = (W.T @ W)[None]
        codes = np.zeros(N, dtype=np.int64)
        g = None
    else:
        g, codes = np.asarray(offsets[0], dtype=np.float64), np.asarray(offsets[1])
        grams = np.einsum("dl,sd,dk->slk", W, g**2, W)
    cross = 0.0
    yhat_sq = 0.0
    lengths = np.diff(Y.indptr)
    for start in range(0, N, batch_size):
        stop = min(start + batch_size, N)
        E = np.asarray(factors_expected[start:stop], dtype=np.float64) * np.asarray(s[start:stop])[:, None]
        c = codes[start:stop]
        yhat_sq += float(np.einsum("nl,nlk,nk->", E, grams[c], E))
        lo, hi = Y.indptr[start], Y.indptr[stop]
        if hi > lo:
            cols = Y.indices[lo:hi]
            rows = np.repeat(np.arange(stop - start), lengths[start:stop])
            yhat_nz = np.einsum("kl,kl->k", E[rows], W[cols])
            if g is not None:
                yhat_nz = yhat_nz * g[c[rows], cols]
            cross += float(np.dot(Y.data[lo:hi].astype(np.float64), yhat_nz))
    den = float(Y.multiply(Y).sum())
    num = max(den - 2 * cross + yhat_sq, 0.0)
    return float(np.sqrt(num / max(den, 1e-300)))


def baseline_deviance(Y_train, Y_test) -> float:
    """Mean Poisson deviance per entry of the "cell total × gene share" baseline on ``Y_test``.

    The gene shares come from ``Y_train``; each test cell's own total scales them. It is the
    floor every fit should beat on held-out cells (compare :func:`sfact.tl.heldout_deviance`).

    Parameters
    ----------
    Y_train
        (n_train, D) training counts, sparse or dense: the gene shares.
    Y_test
        (n_test, D) held-out counts, sparse or dense, with the same genes.

    Returns
    -------
    ``2 Σ [y log(y/λ) − (y − λ)] / (n_test · D)`` with ``λ_nd`` = cell ``n``'s total × gene
    ``d``'s share of all training counts.

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.osmfish()
    >>> train, test = sfact.tl.heldout_split(adata)
    >>> round(sfact.tl.baseline_deviance(train.X, test.X), 2)
    8.01
    """
    Y_train = sp.csr_matrix(Y_train)
    Y_test = sp.csr_matrix(Y_test)
    share = np.asarray(Y_train.sum(0)).ravel().astype(np.float64)
    share = share / share.sum()
    totals = np.asarray(Y_test.sum(1)).ravel().astype(np.float64)
    W = np.maximum(share, 1e-12)[:, None]
    per_cell, _ = poisson_deviance_sparse(Y_test, np.ones((Y_test.shape[0], 1)), W, totals)
    return float(per_cell.sum() / (Y_test.shape[0] * Y_test.shape[1]))


def _adata_counts(adata: AnnData, layer: str | None):
    from .._utils import get_counts

    X = get_counts(adata, layer)
    return X if sp.issparse(X) else sp.csr_matrix(np.asarray(X))


def moran_order(moran: pd.DataFrame) -> np.ndarray:
    """The factor order by descending Moran's I (stable: ties keep their order).

    Parameters
    ----------
    moran
        Table from :func:`morans_i` (column ``I``), one row per factor in the current order.

    Returns
    -------
    ``order``, a permutation: ``order[k]`` is the current index of the factor to put at ``k``.
    """
    return np.argsort(-moran["I"].to_numpy(), kind="stable")
