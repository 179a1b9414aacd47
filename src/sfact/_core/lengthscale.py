"""Choosing the kernel lengthscale from the data before training (``lengthscale="auto"``).

The search costs a fraction of a fit and scores lengthscales the way the package scores models,
by the Poisson deviance of cells predicted from their coordinates:

1. the model's KL-NMF start gives every training cell log-factors ``log H`` (floored as in the
   initialization, centred) and the loadings ``W``; the cells (a seeded subsample of at most
   :data:`MAX_CELLS`) are split into :data:`N_FOLDS` seeded folds;
2. for each lengthscale of a geometric ladder (ratio √2, from the spacing the search resolves —
   the larger of the median distance between neighbouring cells and half that between its
   :data:`NUM_INDUCING` k-means inducing points — to half the longer side of the tissue), the
   log-factors of the cells outside a fold are smoothed by GP regression through the inducing
   points (the posterior mean of a whitened sparse GP with the model's kernel, groups included,
   σ = 1 and noise variance :data:`RIDGE`) and predicted at the fold's cells;
3. each cell's counts are scored with rates ``s_n Σ_l W_dl exp(F_nl)`` (mean Poisson deviance per
   entry over all folds);
4. the chosen lengthscale is the *longest* one whose deviance (interpolated linearly in
   ``log ℓ`` between ladder points) is within :data:`TOLERANCE` (relative) of the minimum: where
   the data cannot tell lengthscales apart the smoothest is taken, as the one-standard-error
   rule of cross-validation does.

The noise variance is fixed because the GP regression's lengthscale and noise trade off (with
both free the deviance is flat in ℓ); its value and the tolerance were set against full fits on
osmFISH, Visium prostate and dentate gyrus and on simulations with known lengthscales
(``benchmarks/bench_defaults.py``), where the chosen lengthscale fits held-out cells within 1% of
the best fixed one for ``svgp`` and ``lcgp`` and lies within 25% of the simulated truth.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .data import SparseCounts

__all__ = ["LengthscaleSearch", "choose_lengthscale", "lengthscale_ladder"]

#: relative tolerance of the "longest lengthscale within tol of the best" rule
TOLERANCE = 0.0025
#: noise variance of the GP regression of the log-factors, relative to the prior variance
RIDGE = 0.03
#: folds of the cross-validation over cells
N_FOLDS = 5
#: the search runs on a seeded subsample of at most this many training cells
MAX_CELLS = 20000
#: inducing points of the search's GP regression
NUM_INDUCING = 500
#: fewer training cells than this: no search (the fallback lengthscale is used)
MIN_CELLS = 100
#: floor of the NMF factors before their log is taken (as in initialization)
FACTOR_FLOOR = 0.05


@dataclass
class LengthscaleSearch:
    """What :func:`choose_lengthscale` tried and chose.

    Attributes
    ----------
    lengthscale
        The chosen lengthscale.
    ladder
        The lengthscales tried.
    deviance
        Validation deviance of each (best over the ridges).
    best
        The lengthscale of the lowest deviance.
    n_cells
        Cells of the search (every one scored once).
    n_folds
        Folds of the cross-validation.
    """

    lengthscale: float
    ladder: list[float] = field(default_factory=list)
    deviance: list[float] = field(default_factory=list)
    best: float = float("nan")
    n_cells: int = 0
    n_folds: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON)."""
        return {
            "lengthscale": float(self.lengthscale),
            "ladder": [float(x) for x in self.ladder],
            "deviance": [float(x) for x in self.deviance],
            "best": float(self.best),
            "n_cells": int(self.n_cells),
            "n_folds": int(self.n_folds),
        }


def lengthscale_ladder(nn1: float, extent: float, ratio: float = math.sqrt(2.0)) -> np.ndarray:
    """Geometric ladder from ``2·nn1`` to ``extent / 2`` (at least 3 values)."""
    lo = 2.0 * max(float(nn1), 1e-6)
    hi = max(0.5 * float(extent), 4.0 * lo)
    n = math.floor(math.log(hi / lo) / math.log(ratio)) + 1
    return lo * ratio ** np.arange(max(n, 3))


def _poisson_deviance(counts: SparseCounts, rows: Tensor, s: Tensor, logF: Tensor, W: Tensor) -> Tensor:
    """Mean Poisson deviance per entry of ``counts[rows]`` with rates ``s exp(logF) Wᵀ``."""
    batch = counts.batch(rows)
    F = torch.exp(logF)  # (B, L)
    lam_nz = (F[batch.rows] * W[batch.cols]).sum(1).clamp_min(1e-12) * s[batch.rows]
    y = batch.values.to(F.dtype)
    sum_lam = (s * (F @ W.sum(0))).sum()
    dev = 2.0 * ((y * torch.log(y / lam_nz)).sum() - y.sum() + sum_lam)
    return dev / (rows.numel() * counts.n_vars)


def _select(ladder: np.ndarray, dev: np.ndarray, tol: float) -> float:
    """The longest lengthscale (log-linear interpolation) whose deviance is within ``tol`` of the minimum."""
    i = int(np.argmin(dev))
    limit = dev[i] * (1.0 + tol)
    j = i
    while j + 1 < len(dev) and dev[j + 1] <= limit:
        j += 1
    if j + 1 == len(dev):
        return float(ladder[j])
    # between ladder[j] (within) and ladder[j + 1] (not): where the line crosses the limit
    a, b = dev[j], dev[j + 1]
    frac = 0.0 if b <= a else float(np.clip((limit - a) / (b - a), 0.0, 1.0))
    return float(math.exp(math.log(ladder[j]) + frac * (math.log(ladder[j + 1]) - math.log(ladder[j]))))


@torch.no_grad()
def choose_lengthscale(
    X: Tensor,
    groups: Tensor | None,
    counts: SparseCounts,
    s: Tensor,
    H: Tensor,
    W: Tensor,
    *,
    kernel: str,
    group_embedding: np.ndarray | None,
    group_diff_param: float,
    seed: int,
    ladder: np.ndarray | None = None,
    ridge: float = RIDGE,
    tol: float = TOLERANCE,
    n_folds: int = N_FOLDS,
    max_cells: int = MAX_CELLS,
    num_inducing: int = NUM_INDUCING,
    blocks: np.ndarray | None = None,
) -> LengthscaleSearch | None:
    """Choose a lengthscale by the cross-validated deviance of a GP smoothing of the NMF start.

    See the module docstring. Computations in float64 on the device of ``X``.

    Parameters
    ----------
    X, groups
        Scaled coordinates (N, p) and group codes (N,) of the training cells (``groups``:
        multi-group kernels only).
    counts, s
        Their counts and size factors.
    H, W
        The KL-NMF start: factors (N, L) and loadings (D, L).
    kernel, group_embedding, group_diff_param
        The model's kernel (σ = 1).
    seed
        Seed of the folds, the subsample and the k-means.
    ladder
        Lengthscales to try; default :func:`lengthscale_ladder` of the cells' spacing and extent.
    ridge
        Noise variance τ² of the GP regression, relative to the prior variance.
    tol
        Relative tolerance of the selection rule.
    n_folds
        Folds of the cross-validation over cells.
    max_cells, num_inducing
        Size limits of the search (``num_inducing`` per block).
    blocks
        Block (sample) of every cell, or ``None`` for one: the cells of different blocks are
        independent a priori, so each block is smoothed on its own, with its own inducing
        points and folds, and the deviances are pooled.

    Returns
    -------
    The search, or ``None`` with fewer than :data:`MIN_CELLS` cells.
    """
    from .inducing import inducing_points
    from .kernels import Kernel

    N = X.shape[0]
    if N < MIN_CELLS:
        return None
    dev = X.device
    f64 = torch.float64
    rng = np.random.default_rng(seed)
    use_all = np.sort(rng.choice(N, max_cells, replace=False)) if N > max_cells else np.arange(N)
    n_use = len(use_all)
    block_of = np.zeros(N, dtype=np.int64) if blocks is None else np.asarray(blocks, dtype=np.int64)
    multigroup = group_embedding is not None and groups is not None
    X64 = X.to(f64)
    logH_all = torch.log(H.to(f64)[torch.as_tensor(use_all, device=dev)].clamp_min(FACTOR_FLOOR))
    beta = logH_all.mean(0)  # one mean, as the model's (shared by every block)
    Wd = W.to(f64)
    from .factory import coordinate_spacing

    parts_b = []  # per block (sample): cells in fold order, folds, inducing points
    for b in np.unique(block_of[use_all]):
        use_np = use_all[block_of[use_all] == b]
        # cells in fold order (a seeded permutation), so every fold is a contiguous block
        use_np = use_np[rng.permutation(len(use_np))]
        n_b = len(use_np)
        bounds = np.linspace(0, n_b, n_folds + 1).round().astype(int)
        folds = [slice(int(x), int(y)) for x, y in itertools.pairwise(bounds) if y > x]
        use = torch.as_tensor(use_np, device=dev)
        Xd = X64[use]
        g = groups[use] if multigroup else None
        X_np = Xd.cpu().numpy()
        Z_np, Zg_np = inducing_points(
            X_np,
            min(num_inducing, n_b),
            groups=None if g is None else g.cpu().numpy(),
            n_groups=None if group_embedding is None else len(group_embedding),
            random_state=seed,
        )
        Z = torch.as_tensor(Z_np, dtype=f64, device=dev)
        Zg = None if Zg_np is None or not multigroup else torch.as_tensor(Zg_np, device=dev)
        F = torch.log(H.to(f64)[use].clamp_min(FACTOR_FLOOR)) - beta
        lo = (
            max(coordinate_spacing(X_np)["nn1"], 0.5 * coordinate_spacing(Z_np)["nn1"]) if n_b > 1 else np.nan
        )
        extent = float(np.ptp(X_np, axis=0).max()) if n_b > 1 else 0.0
        parts_b.append((use, folds, Xd, g, Z, Zg, F, s.to(f64)[use], lo, extent))
    if ladder is None:
        # no shorter than the spacing the search's inducing points resolve (the median block's)
        lo = float(np.nanmedian([p[8] for p in parts_b]))
        ladder = lengthscale_ladder(lo, max(p[9] for p in parts_b))
    ladder = np.asarray(ladder, dtype=np.float64)

    deviances = []
    for ls in ladder:
        k = Kernel(
            kernel,  # type: ignore[arg-type]
            n_dims=X.shape[1],
            lengthscale=np.asarray(ls),
            sigma=np.asarray(1.0),
            n_factors=H.shape[1],
            per_factor=False,
            group_embedding=group_embedding if multigroup else None,
            group_diff_param=group_diff_param,
            train_lengthscale=False,
            train_sigma=False,
            train_group_diff_param=False,
        ).to(device=dev, dtype=f64)
        total = torch.zeros((), dtype=f64, device=dev)
        for use, folds, Xd, g, Z, Zg, F, sd, _, _ in parts_b:
            M = Z.shape[0]
            eye = torch.eye(M, dtype=f64, device=dev)
            Kzz = k(Z, Z, Zg, Zg)[0]
            Lzz = torch.linalg.cholesky(Kzz + 1e-4 * Kzz.diagonal().mean() * eye)
            A = torch.cat(
                [
                    torch.linalg.solve_triangular(
                        Lzz,
                        k(Z, Xd[a : a + 8192], Zg, None if g is None else g[a : a + 8192])[0],
                        upper=False,
                    )
                    for a in range(0, Xd.shape[0], 8192)
                ],
                dim=1,
            )  # (M, n_b)
            # per fold: its cells' Gram matrix and projection (their sums are the whole's)
            parts = [(A[:, f], A[:, f] @ A[:, f].T, A[:, f] @ F[f]) for f in folds]
            AAt = sum(p[1] for p in parts)
            AF = sum(p[2] for p in parts)
            for idx, (Af, G, P) in zip(folds, parts, strict=True):  # the fold's cells are left out and scored
                if len(folds) == 1:
                    break  # a block too small for folds is not scored
                C = torch.linalg.cholesky(AAt - G + ridge * eye)
                logF = Af.T @ torch.cholesky_solve(AF - P, C) + beta
                n_f = idx.stop - idx.start
                total += _poisson_deviance(counts, use[idx], sd[idx], logF, Wd) * n_f
        deviances.append(float(total / n_use))
    devs = np.asarray(deviances)
    if not np.isfinite(devs).any():
        return None
    devs = np.where(np.isfinite(devs), devs, np.inf)
    chosen = _select(ladder, devs, tol)
    return LengthscaleSearch(
        lengthscale=chosen,
        ladder=ladder.tolist(),
        deviance=devs.tolist(),
        best=float(ladder[int(np.argmin(devs))]),
        n_cells=n_use,
        n_folds=n_folds,
    )
