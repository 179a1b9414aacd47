"""Inducing points: k-means of the (scaled) coordinates, per group for multi-group priors."""

from __future__ import annotations

import numpy as np

from .._constants import ALLOCATIONS, Allocation

_KMEANS_SAMPLE = 50_000  # k-means on at most this many cells (per call); scales to 10^6 cells


def _unique_rows(X: np.ndarray) -> np.ndarray:
    return np.unique(np.round(X, 9), axis=0)


def kmeans_centers(X: np.ndarray, k: int, *, random_state: int = 0) -> np.ndarray:
    """``k`` distinct k-means centres of ``X`` (fewer when ``X`` has fewer distinct points).

    Runs on a random subsample of at most 50,000 points with mini-batch k-means beyond
    10,000, so it stays fast for 10^6 cells.
    """
    X = np.asarray(X, dtype=np.float64)
    uniq = _unique_rows(X)
    if k >= len(uniq):
        return uniq
    if k <= 0:
        return np.zeros((0, X.shape[1]))
    rng = np.random.default_rng(random_state)
    if len(X) > _KMEANS_SAMPLE:
        X = X[rng.choice(len(X), _KMEANS_SAMPLE, replace=False)]
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if len(X) > 10_000:
        km = MiniBatchKMeans(n_clusters=k, random_state=random_state, n_init=3, batch_size=4096)
    else:
        km = KMeans(n_clusters=k, random_state=random_state, n_init=1)
    C = km.fit(X).cluster_centers_
    C = _unique_rows(C)
    if len(C) < k:  # rare: merged centres; top up with distinct data points
        extra = uniq[rng.choice(len(uniq), k - len(C), replace=False)]
        C = _unique_rows(np.vstack([C, extra]))[:k]
    return C


def largest_remainder(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` in proportion to ``sizes`` (largest remainder), capped by ``sizes``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(min(total, sizes.sum()))
    quota = sizes / sizes.sum() * total
    alloc = np.minimum(np.floor(quota).astype(np.int64), sizes)
    while alloc.sum() < total:  # hand out the rest by largest remainder, skipping full groups
        rem = np.where(alloc < sizes, quota - alloc, -np.inf)
        alloc[int(np.argmax(rem))] += 1
    return alloc


def inducing_points(
    X: np.ndarray,
    n_inducing: int,
    *,
    groups: np.ndarray | None = None,
    n_groups: int | None = None,
    allocation: Allocation = "proportional",
    random_state: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Choose inducing points (and their groups).

    Parameters
    ----------
    X
        (N, p) scaled coordinates.
    n_inducing
        Number of inducing points M (capped by the number of cells).
    groups
        (N,) group codes for a multi-group prior; ``None`` for one group.
    n_groups
        Number of groups G (``groups.max() + 1`` when ``None``).
    allocation
        ``"proportional"``: M split over groups by largest remainder of ``n_g / N · M``, capped
        by each group's size, then k-means within each group; ``"equal"``: the same number per
        group (capped); ``"derived"``: k-means of all cells, each centre taking the most common
        group of the cells nearest to it.
    random_state
        Seed of the k-means.

    Returns
    -------
    ``Z`` (M, p) and the group code of each inducing point (``None`` without groups).
    """
    X = np.asarray(X, dtype=np.float64)
    M = int(min(n_inducing, len(X)))
    if M < 1:
        raise ValueError(f"`num_inducing` must be positive, received {n_inducing}.")
    if groups is None:
        return kmeans_centers(X, M, random_state=random_state), None
    if allocation not in ALLOCATIONS:
        raise ValueError(f"`allocation` must be one of {ALLOCATIONS}, received {allocation!r}.")
    groups = np.asarray(groups, dtype=np.int64)
    G = int(groups.max()) + 1 if n_groups is None else int(n_groups)
    sizes = np.bincount(groups, minlength=G)
    if allocation == "derived":
        Z = kmeans_centers(X, M, random_state=random_state)
        from scipy.spatial import cKDTree

        _, nearest = cKDTree(Z).query(X)
        zg = np.zeros(len(Z), dtype=np.int64)
        for j in range(len(Z)):
            members = groups[nearest == j]
            zg[j] = np.bincount(members, minlength=G).argmax() if len(members) else 0
        return Z, zg
    if allocation == "proportional":
        alloc = largest_remainder(sizes, M)
    else:
        base = np.full(G, M // G)
        base[: M % G] += 1
        alloc = np.minimum(base, sizes)
    Zs, gs = [], []
    for g in range(G):
        if alloc[g] == 0:
            continue
        Zg = kmeans_centers(X[groups == g], int(alloc[g]), random_state=random_state)
        Zs.append(Zg)
        gs.append(np.full(len(Zg), g, dtype=np.int64))
    return np.vstack(Zs), np.concatenate(gs)
