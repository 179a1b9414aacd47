"""Nearest-neighbour search for the LCGP priors: the Vecchia conditioning sets (earlier cells only)."""

from __future__ import annotations

import numpy as np

from .._constants import NEIGHBOR_METHODS, NEIGHBOR_SELECTIONS

__all__ = ["EXACT_MAX_N", "NEIGHBOR_METHODS", "NEIGHBOR_SELECTIONS", "vecchia_neighbors"]

EXACT_MAX_N = 20_000  # exact kd-tree search up to this many cells for any dimension


def _knn_index(X: np.ndarray, method: str, n_neighbors: int):
    """A nearest-neighbour index over ``X``: ``("exact", cKDTree)`` or ``("pynndescent", NNDescent)``."""
    if method == "pynndescent":
        import pynndescent

        index = pynndescent.NNDescent(
            X, n_neighbors=int(min(len(X) - 1, max(n_neighbors, 15))), random_state=0, n_jobs=1
        )
        index.prepare()
        return ("pynndescent", index)
    from scipy.spatial import cKDTree

    return ("exact", cKDTree(X))


def _knn_query(index, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    kind, obj = index
    if kind == "pynndescent":
        idx, dist = obj.query(Q, k=k)
        return np.asarray(dist, dtype=np.float64), np.asarray(idx, dtype=np.int64)
    dist, idx = obj.query(Q, k=k)
    if k == 1:
        dist, idx = dist[:, None], idx[:, None]
    return np.asarray(dist, dtype=np.float64), np.asarray(idx, dtype=np.int64)


def _resolve_method(method: str, n_obs: int, n_dims: int) -> str:
    if method not in NEIGHBOR_METHODS:
        raise ValueError(f"`neighbor_method` must be one of {NEIGHBOR_METHODS}, received {method!r}.")
    if method == "auto":
        # kd-trees are exact and faster than pynndescent in 2-3 dimensions at any N
        # (200,000 cells, K=50: 2.7 s against 26 s plus ~100 s of numba compilation)
        return "exact" if (n_obs <= EXACT_MAX_N or n_dims <= 3) else "pynndescent"
    return method


def vecchia_neighbors(
    X: np.ndarray, n_neighbors: int, rank: np.ndarray, *, method: str = "auto"
) -> np.ndarray:
    """The K nearest cells *earlier in the ordering* of every cell (the Vecchia conditioning sets).

    Parameters
    ----------
    X
        (N, p) coordinates.
    n_neighbors
        K.
    rank
        (N,) position of each cell in the ordering (a permutation of 0..N-1).
    method
        ``"exact"`` (kd-tree), ``"pynndescent"`` (approximate, for large N in high dimension) or
        ``"auto"``.

    Returns
    -------
    (N, K) int64 cell indices sorted by (distance, index), padded with -1 for the first K cells of
    the ordering (which have fewer than K earlier cells). A cell never appears in its own set.

    Notes
    -----
    Cells at positions ``[lo, 2·lo)`` of the ordering are searched in an index over positions
    ``< 2·lo``, so at least half of the indexed cells are earlier; ``2K+2`` candidates are asked
    for and the query is repeated with twice as many for the rare cells with fewer than K earlier
    candidates. The total cost is O(N log N) index work and O(N·K) memory.
    """
    X = np.asarray(X, dtype=np.float64)
    N = len(X)
    K = int(min(n_neighbors, max(N - 1, 0)))
    rank = np.asarray(rank, dtype=np.int64)
    order = np.argsort(rank)
    method = _resolve_method(method, N, X.shape[1])
    Xo = X[order]
    nbr_pos = np.full((N, K), -1, dtype=np.int64)
    if K == 0:
        return nbr_pos
    head = min(N, K + 1)
    for p in range(1, head):  # all earlier cells
        d = np.sqrt(((Xo[:p] - Xo[p]) ** 2).sum(1))
        sel = np.lexsort((order[:p], d))[:K]
        nbr_pos[p, : len(sel)] = sel
    lo = head
    while lo < N:
        hi = min(2 * lo, N)
        index = _knn_index(
            Xo[:hi], "exact" if (method == "exact" or hi <= EXACT_MAX_N) else method, 2 * K + 2
        )
        need = np.arange(lo, hi)
        k = min(hi, 2 * K + 2)
        while need.size:
            dist, cand = _knn_query(index, Xo[need], k)
            earlier = (cand >= 0) & (cand < need[:, None])
            ok = (earlier.sum(1) >= K) | (k >= hi)
            if ok.any():
                d_ok = np.where(earlier[ok], dist[ok], np.inf)
                c_ok = np.where(earlier[ok], cand[ok], 0)
                # sort by distance, ties by cell index; non-earlier candidates last
                srt = np.lexsort((order[c_ok], d_ok), axis=-1)[:, :K]
                chosen = np.take_along_axis(c_ok, srt, 1)
                valid = np.isfinite(np.take_along_axis(d_ok, srt, 1))
                nbr_pos[need[ok]] = np.where(valid, chosen, -1)
            need = need[~ok]
            k = min(2 * k, hi)
        lo = hi
    nbr = np.where(nbr_pos >= 0, order[np.maximum(nbr_pos, 0)], -1)
    out = np.empty_like(nbr)
    out[order] = nbr
    return out
