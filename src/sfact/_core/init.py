"""Initialization: KL-NMF of the counts, and the factors of new cells with the loadings fixed.

:func:`initialize` starts a :class:`~sfact._core.module.FactorModule` from a KL-NMF of the
training counts; :func:`nonneg_project` and :func:`fit_new_factors` give the factors of new
cells for the non-spatial ``pnmf`` prior (whose factors are free per cell).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .data import CountBatch, SparseCounts

if TYPE_CHECKING:
    from .module import FactorModule
    from .priors import Prior
    from .train import TrainData

__all__ = ["fit_new_factors", "initialize", "kl_nmf", "nmf_start", "nonneg_project"]

#: NMF factors have exact zeros; flooring them at 5% of a factor's mean keeps the log-factors
#: within reach of the prior (a floor of 1e-3 made spatial fits need ~10x more iterations to
#: reach the same ELBO; benchmarks/bench_init.py)
INIT_FACTOR_FLOOR = 0.05
#: floor of the projected factors of new cells before their log is taken
NEW_FACTOR_FLOOR = 1e-3


def kl_nmf(
    counts: SparseCounts,
    n_factors: int,
    *,
    n_iter: int = 100,
    size_factors: Tensor | None = None,
    generator: torch.Generator | None = None,
    eps: float = 1e-10,
) -> tuple[Tensor, Tensor]:
    """Kullback-Leibler NMF by multiplicative updates on the sparse counts.

    Solves ``Y ≈ diag(s) H Wᵀ`` with ``H`` (N, L) and ``W`` (D, L) non-negative, touching only
    the non-zeros (O(nnz·L) per iteration). Used to initialize every prior near a good optimum.

    Returns
    -------
    H (N, L) and W (D, L), with the columns of ``H`` scaled to unit mean.
    """
    dev = counts.device
    N, D = counts.shape
    dtype = counts.values.dtype
    s = torch.ones(N, dtype=dtype, device=dev) if size_factors is None else size_factors.to(dev, dtype)
    mean_rate = float(counts.values.sum()) / (N * D) / max(float(s.mean()), eps)
    scale = (mean_rate / n_factors) ** 0.5
    H = scale * (0.5 + torch.rand(N, n_factors, generator=generator, dtype=dtype, device="cpu").to(dev))
    W = scale * (0.5 + torch.rand(D, n_factors, generator=generator, dtype=dtype, device="cpu").to(dev))
    full = counts.full_batch()
    for _ in range(n_iter):
        H = kl_nmf_update_H(H, W, full, s, eps=eps)
        W = kl_nmf_update_W(H, W, full, s, eps=eps)
    m = H.mean(0).clamp_min(eps)
    return H / m, W * m


def kl_nmf_update_H(H: Tensor, W: Tensor, full: CountBatch, s: Tensor, *, eps: float = 1e-10) -> Tensor:
    """One KL-NMF multiplicative update of ``H``: ``H <- H * (Q W) / (s Σ_d W)``, ``Q = Y / (H Wᵀ)``.

    ``Q`` on the non-zeros of ``full`` (a batch of all cells with its CSR structure); ``s``
    cancels in ``Q``.
    """
    QW, _ = _ratio_products(H, W, full, need_t=False)
    return (H * QW / (s[:, None] * W.sum(0)[None, :]).clamp_min(eps)).clamp_min(eps)


def kl_nmf_update_W(H: Tensor, W: Tensor, full: CountBatch, s: Tensor, *, eps: float = 1e-10) -> Tensor:
    """One KL-NMF multiplicative update of ``W``: ``W <- W * (Qᵀ H) / Σ_n s_n H_n``."""
    _, QtH = _ratio_products(H, W, full, need_t=True)
    return (W * QtH / (s[:, None] * H).sum(0)[None, :].clamp_min(eps)).clamp_min(eps)


def _ratio_products(
    H: Tensor, W: Tensor, batch: CountBatch, *, need_t: bool
) -> tuple[Tensor | None, Tensor | None]:
    """``Q W`` (or ``Qᵀ H`` when ``need_t``) with ``Q = y / (H Wᵀ)`` on the non-zeros of ``batch``."""
    B, D = H.shape[0], W.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(batch.crow, batch.cols, batch.values, (B, D))
        r = torch.sparse.sampled_addmm(pattern, H, W.T, beta=0.0).values().clamp_min(1e-30)
        q = batch.values / r
        if not need_t:
            return torch.sparse_csr_tensor(batch.crow, batch.cols, q, (B, D)) @ W, None
        tp = batch.t_perm
        return None, torch.sparse_csr_tensor(batch.t_crow, batch.rows[tp], q[tp], (D, B)) @ H


@torch.no_grad()
def nmf_start(
    data: TrainData, n_factors: int, init_iter: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """The factors ``H`` (N, L) and loadings ``W`` (D, L) that :func:`initialize` starts from.

    A KL-NMF of ``data`` with ``init_iter`` iterations; ``init_iter = 0``: random factors instead
    (kept for comparisons). It depends only on the counts, size factors, ``n_factors`` and the
    generator, not on the prior, so models of different priors can share it.
    """
    H, W = kl_nmf(data.counts, n_factors, n_iter=init_iter, size_factors=data.s, generator=generator)
    if init_iter == 0:
        H = torch.exp(0.1 * torch.randn(H.shape, generator=generator, dtype=H.dtype).to(H.device))
    return H, W


@torch.no_grad()
def initialize(
    module: FactorModule,
    data: TrainData,
    init_iter: int,
    generator: torch.Generator | None,
    *,
    start: tuple[Tensor, Tensor] | None = None,
) -> None:
    """Set the loadings and the prior's posterior of ``module`` from a KL-NMF of ``data``.

    ``init_iter = 0``: random log-factors instead of NMF factors (kept for comparisons).
    ``start``: the ``(H, W)`` of :func:`nmf_start`, computed before (and shared between models).
    """
    if start is None:
        start = nmf_start(data, module.n_factors, init_iter, generator)
    H, W = start
    logH = torch.log(H.clamp_min(INIT_FACTOR_FLOOR))
    center = logH.mean(0)
    module.set_loadings(W * torch.exp(center)[None, :])
    module.prior.init_from_log_factors(
        logH - center, data.prior_input(torch.arange(data.n_obs, device=logH.device))
    )


def nonneg_project(counts: SparseCounts, s: Tensor, W: Tensor, n_iter: int = 50) -> Tensor:
    """Multiplicative KL-NMF updates of the factors ``H`` (N, L) of cells with ``W`` fixed."""
    # the update of kl_nmf_update_H by gathering (not sampled_addmm) and with its own floors:
    # sharing kl_nmf_update_H moves pnmf's held-out deviance on osmFISH by 1e-5 (relative)
    rows, cols, y = counts.row_of, counts.indices, counts.values
    H = torch.ones(counts.n_obs, W.shape[1], dtype=W.dtype, device=W.device)
    H = H * (s.new_tensor(counts.row_totals) / (s * W.sum()).clamp_min(1e-12))[:, None].clamp_min(1e-3)
    den = (s[:, None] * W.sum(0)[None, :]).clamp_min(1e-12)
    for _ in range(n_iter):
        r = (H[rows] * W[cols]).sum(1).clamp_min(1e-12)
        num = torch.zeros_like(H).index_add_(0, rows, (y / r)[:, None] * W[cols])
        H = (H * num / den).clamp_min(1e-10)
    return H


def fit_new_factors(
    module: FactorModule,
    data: TrainData,
    *,
    seed: int,
    max_iter: int = 300,
    learning_rate: float = 0.05,
) -> tuple[Tensor, Tensor]:
    """Posterior marginals of the factors of new cells under a per-cell prior with ``W`` fixed.

    ``module`` has ``loadings_mode="fixed"`` and its loadings already set; its prior is
    started from :func:`nonneg_project` and trained on ``data`` (Adam, ``seed``).

    Returns
    -------
    ``(mu, var)`` of the new cells, each (N, L), on the module's device.
    """
    from .train import History, TrainConfig, make_optimizer, train_loop

    prior: Prior = module.prior
    dev = data.s.device
    H = nonneg_project(data.counts, data.s, module.W, n_iter=50)
    with torch.no_grad():
        prior.init_from_log_factors(
            torch.log(H.clamp_min(NEW_FACTOR_FLOOR)), data.prior_input(torch.arange(data.n_obs, device=dev))
        )
    train_loop(
        module,
        data,
        TrainConfig(max_iter=max_iter, tol=1e-6, learning_rate=learning_rate, min_iter=20),
        optimizer=make_optimizer(module, learning_rate),
        history=History(),
        generator=torch.Generator().manual_seed(seed),
        progress_bar=False,
    )
    with torch.no_grad():
        return prior.marginals(data.prior_input(torch.arange(data.n_obs, device=dev)))
