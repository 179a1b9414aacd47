"""Analysis of a fitted model: Moran's I ordering, deviance, reconstruction error."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

if TYPE_CHECKING:
    from anndata import AnnData


def morans_i(
    values: np.ndarray,
    coords: np.ndarray,
    *,
    names: list[str] | None = None,
    n_neighs: int = 6,
) -> pd.DataFrame:
    """Moran's I of each column of ``values`` on a k-nearest-neighbour graph of ``coords``.

    Uses squidpy's k-nearest-neighbour graph (``squidpy.gr.spatial_neighbors_knn``;
    ``spatial_neighbors`` on squidpy < 1.7) and :func:`squidpy.gr.spatial_autocorr` (analytic
    p-values, no permutations).

    Parameters
    ----------
    values
        (N, L) array, one column per factor.
    coords
        (N, p) coordinates.
    names
        Column names; ``factor_0``, ... when ``None``.
    n_neighs
        Neighbours per cell in the spatial graph.

    Returns
    -------
    DataFrame indexed by name, with squidpy's columns ``I``, ``pval_norm``, ``var_norm``,
    ``pval_norm_fdr_bh``, in the order of ``values``' columns.

    Examples
    --------
    >>> import numpy as np
    >>> import sfact
    >>> rng = np.random.default_rng(0)
    >>> coords = rng.uniform(0, 10, (500, 2))
    >>> values = np.c_[coords[:, 0], rng.normal(size=500)]  # a gradient and noise
    >>> sfact.tl.morans_i(values, coords, names=["gradient", "noise"])["I"].round(2).tolist()
    [0.99, -0.01]
    """
    import logging
    import warnings

    import anndata as ad

    from .._utils import check_int, warn

    check_int(n_neighs, "n_neighs", minimum=1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # squidpy's dependencies warn at import time
        import squidpy as sq

    values = np.asarray(values, dtype=np.float64)
    names = [f"factor_{i}" for i in range(values.shape[1])] if names is None else list(names)
    tmp = ad.AnnData(
        X=values, obsm={"spatial": np.asarray(coords, dtype=np.float64)}, var=pd.DataFrame(index=names)
    )
    tmp.obs_names = [str(i) for i in range(tmp.n_obs)]
    n_neighs = int(min(n_neighs, max(tmp.n_obs - 1, 1)))
    quiet = [logging.getLogger(name) for name in ("squidpy", "spatialdata", "spatialdata._logging")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            knn = getattr(sq.gr, "spatial_neighbors_knn", None)  # squidpy >= 1.7
            if knn is not None:
                knn(tmp, n_neighs=n_neighs)
            else:  # older squidpy; deprecated in 1.7, removed in 1.9
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
    Y, factors_expected: np.ndarray, W: np.ndarray, s: np.ndarray, *, batch_size: int = 10000
):
    """Poisson deviance of counts ``Y`` against rates ``s_n Σ_l W_dl E_nl`` without a dense rate matrix.

    ``dev = 2 Σ_nd [y log(y/λ) − (y − λ)]`` = 2 (Σ_nz y log(y/λ) − Σ y + Σ λ), where
    ``Σ_d λ_nd = s_n Σ_l E_nl Σ_d W_dl`` factorizes.

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
    for start in range(0, N, batch_size):
        stop = min(start + batch_size, N)
        blk = Y[start:stop]
        E = factors_expected[start:stop] * s[start:stop, None]  # (b, L)
        rows = np.repeat(np.arange(stop - start), np.diff(blk.indptr))
        cols = blk.indices
        y = blk.data.astype(np.float64)
        lam_nz = np.maximum(np.einsum("nl,nl->n", E[rows], W[cols]), 1e-300)
        term = y * np.log(y / lam_nz) - y
        per_cell[start:stop] += np.bincount(rows, weights=term, minlength=stop - start)
        per_gene += np.bincount(cols, weights=term, minlength=D)
        per_cell[start:stop] += E @ Wsum
        per_gene += W @ E.sum(0)
    return 2 * per_cell, 2 * per_gene


def reconstruction_error(
    Y, factors_expected: np.ndarray, W: np.ndarray, s: np.ndarray, *, batch_size: int = 10000
) -> float:
    """Relative Frobenius error ``‖Y − Ŷ‖_F / ‖Y‖_F`` with ``Ŷ = diag(s) E Wᵀ``, never forming ``Ŷ``.

    ``‖Y − Ŷ‖² = ‖Y‖² − 2⟨Y, Ŷ⟩ + ‖Ŷ‖²``: the inner product touches only the non-zeros of ``Y``
    and ``‖Ŷ‖² = Σ_n s_n² e_nᵀ (WᵀW) e_n``, so the cost is O(nnz·L + N·L²) in cell batches.
    """
    Y = sp.csr_matrix(Y)
    N = Y.shape[0]
    W = np.asarray(W, dtype=np.float64)
    gram = W.T @ W
    cross = 0.0
    yhat_sq = 0.0
    lengths = np.diff(Y.indptr)
    for start in range(0, N, batch_size):
        stop = min(start + batch_size, N)
        E = np.asarray(factors_expected[start:stop], dtype=np.float64) * np.asarray(s[start:stop])[:, None]
        yhat_sq += float(np.einsum("nl,lk,nk->", E, gram, E))
        lo, hi = Y.indptr[start], Y.indptr[stop]
        if hi > lo:
            cols = Y.indices[lo:hi]
            En = np.repeat(E, lengths[start:stop], axis=0)
            yhat_nz = np.einsum("kl,kl->k", En, W[cols])
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
