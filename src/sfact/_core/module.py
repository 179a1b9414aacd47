"""The Poisson factorization likelihood, its ELBO, and the loadings updates.

``y_nd ~ Poisson(λ_nd)``, ``λ_nd = s_n Σ_l W_dl exp(F_nl)``, ``q(F_nl) = N(μ_nl, σ²_nl)``.

The ``lower-bound`` ELBO uses Jensen on the convex log-sum-exp,
``E[log Σ_l W_dl e^{F_nl}] >= log Σ_l W_dl e^{μ_nl}``, and the analytic
``E[λ_nd] = s_n Σ_l W_dl e^{μ_nl + σ²_nl/2}``. The first term touches only the non-zeros of
``Y``; the second factorizes as ``Σ_l (Σ_d W_dl)(Σ_n s_n e^{μ_nl+σ²_nl/2})``. A step therefore
costs O(nnz·L + (N+D)·L) and never forms a dense rate matrix.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .._constants import ELBO_MODES, LOADINGS_MODES, ElboMode
from .data import CountBatch
from .priors import Prior, PriorInput

#: ``"fixed"``: loadings set from outside and never updated (new cells of ``pnmf``)
ModuleLoadingsMode = Literal["multiplicative", "projected", "fixed"]
MODULE_LOADINGS_MODES = (*LOADINGS_MODES, "fixed")

__all__ = ["ELBO_MODES", "GENE_OFFSET_PSEUDOCOUNT", "ElboTerms", "FactorModule", "sparse_log_rate"]

#: ``a`` of the gene offsets' Gamma(a + 1, a) prior (pseudo-counts towards an offset of 1)
GENE_OFFSET_PSEUDOCOUNT = 10.0


@dataclass
class ElboTerms:
    """One mini-batch estimate of the ELBO (:meth:`FactorModule.elbo`) and what the step reuses.

    Attributes
    ----------
    elbo
        ``loglik - kl_weight * kl``, the objective.
    loglik
        Expected log-likelihood, scaled to the full data set.
    kl
        KL(q || p), scaled to the full data set.
    mu, var
        The batch's marginals of ``q(F)`` (B, L).
    mm_numerator
        ``Σ_n y_nd φ_ndl`` (D, L) at ``mu`` (``lower-bound`` mode; ``None`` otherwise), for
        :meth:`FactorModule.multiplicative_update`.
    """

    elbo: Tensor
    loglik: Tensor
    kl: Tensor
    mu: Tensor
    var: Tensor
    mm_numerator: Tensor | None = None


class _SparseLogRate(torch.autograd.Function):
    """``Σ_nz y_nd log Σ_l W_dl exp(μ_nl)`` and its gradients in one pass over the non-zeros.

    With ``E = exp(μ − max_l μ)`` the rates at the non-zeros are ``r = (E Wᵀ)_nz`` (a sampled
    dense-dense product), and with ``Q = y / r`` (sparse, same pattern) the gradients are
    ``∂/∂μ = E ⊙ (Q W)`` and ``∂/∂W = Qᵀ E`` — sparse-dense products, no exponential per
    non-zero and nothing of size nnz x L kept for the backward pass. ``W ⊙ Qᵀ E = Σ_n y φ`` is
    also the numerator of the multiplicative update of W, returned as a second,
    non-differentiable output. Without a CSR structure (gene subsets) the same quantities are
    computed by gathering and scattering.
    """

    @staticmethod
    def forward(ctx, mu: Tensor, W: Tensor, batch: CountBatch):  # type: ignore[override]
        rows, cols, y = batch.rows, batch.cols, batch.values
        B, D = mu.shape[0], W.shape[0]
        m = mu.max(dim=1, keepdim=True).values
        E = torch.exp(mu - m)
        if batch.crow is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch: "sparse CSR support is in beta"
                pattern = torch.sparse_csr_tensor(batch.crow, cols, y, (B, D))
                r = torch.sparse.sampled_addmm(pattern, E, W.T, beta=0.0).values()
                q = y / r.clamp_min(1e-30)
                QW = torch.sparse_csr_tensor(batch.crow, cols, q, (B, D)) @ W
                tp = batch.t_perm
                QtE = torch.sparse_csr_tensor(batch.t_crow, rows[tp], q[tp], (D, B)) @ E
        else:
            r = (E[rows] * W[cols]).sum(1)
            q = y / r.clamp_min(1e-30)
            QW = torch.zeros_like(E).index_add_(0, rows, W[cols] * q[:, None])
            QtE = torch.zeros_like(W).index_add_(0, cols, E[rows] * q[:, None])
        row_y = torch.zeros(B, dtype=y.dtype, device=y.device).index_add_(0, rows, y)
        t1 = (y * torch.log(r.clamp_min(1e-30))).sum() + (row_y * m[:, 0]).sum()
        g_mu = E * QW
        ctx.save_for_backward(g_mu, QtE)
        num = W * QtE
        ctx.mark_non_differentiable(num)
        return t1, num

    @staticmethod
    def backward(ctx, grad_t1: Tensor, _grad_num: Tensor):  # type: ignore[override]
        g_mu, QtE = ctx.saved_tensors
        return grad_t1 * g_mu, grad_t1 * QtE, None


def sparse_log_rate(mu: Tensor, W: Tensor, batch: CountBatch) -> tuple[Tensor, Tensor]:
    """See :class:`_SparseLogRate`; returns the term and ``Σ_n y_nd φ_ndl`` (D, L)."""
    return _SparseLogRate.apply(mu, W, batch)


class FactorModule(nn.Module):
    """A prior on the log-factors plus non-negative loadings ``W`` (D x L)."""

    def __init__(
        self,
        prior: Prior,
        n_vars: int,
        *,
        loadings_mode: ModuleLoadingsMode,
        w_floor: float = 1e-8,
    ):
        super().__init__()
        if loadings_mode not in MODULE_LOADINGS_MODES:
            raise ValueError(
                f"`loadings_mode` must be one of {MODULE_LOADINGS_MODES}, received {loadings_mode!r}."
            )
        self.prior = prior
        self.loadings_mode = loadings_mode
        self.w_floor = float(w_floor)
        W = torch.ones(n_vars, prior.n_factors)
        if loadings_mode == "projected":
            self.W = nn.Parameter(W)
        else:
            self.register_buffer("W", W)
        # running sufficient statistics of the multiplicative update (mini-batch mode)
        self.register_buffer("mm_num", torch.zeros(n_vars, prior.n_factors))
        self.register_buffer("mm_den", torch.zeros(prior.n_factors))
        self.register_buffer("mm_initialized", torch.zeros((), dtype=torch.bool))

    @property
    def n_factors(self) -> int:
        """Number of factors L."""
        return self.prior.n_factors

    def loadings(self) -> Tensor:
        """``W`` clamped to its floor."""
        return self.W.clamp_min(self.w_floor)

    @torch.no_grad()
    def set_loadings(self, W: Tensor, rows: slice | Tensor | None = None) -> None:
        """Set ``W`` (or its ``rows``) to ``W`` clamped to the floor ``w_floor``."""
        W = W.clamp_min(self.w_floor)
        if rows is None:
            self.W.copy_(W)
        else:
            self.W[rows] = W

    @torch.no_grad()
    def floor_loadings(self) -> None:
        """Clamp ``W`` in place to its floor (after an Adam step in ``projected`` mode)."""
        self.W.clamp_(min=self.w_floor)

    @property
    def has_gene_offsets(self) -> bool:
        """Whether the rates carry a per-sample gene offset ``g_{s(n),d}`` (:meth:`enable_gene_offsets`)."""
        return hasattr(self, "gene_offset")

    def enable_gene_offsets(
        self, sample_totals: Tensor, sample_weights: Tensor, pseudocount: float = GENE_OFFSET_PSEUDOCOUNT
    ) -> None:
        """Give the rates a per-sample gene offset: ``λ_nd = s_n g_{s(n),d} Σ_l W_dl e^{F_nl}``.

        ``g`` (S x D) starts at 1 and is updated in closed form after the loadings
        (:meth:`update_gene_offsets`): ``g_sd = (Y_sd + a) / (Σ_{n in s} E[λ_nd]/g_sd + a)``, the
        maximizer of the expected log-likelihood times a Gamma(a + 1, a) prior with mode 1
        (``a`` the ``pseudocount``: genes with few counts in a sample stay near 1); then every
        gene's offsets are divided by their geometric mean over samples (weights
        ``sample_weights``), which goes into ``W`` — the rates are unchanged and ``W`` stays the
        loadings of an average sample.

        Parameters
        ----------
        sample_totals
            ``Y_sd``: the counts of every gene summed over each sample's training cells (S x D).
        sample_weights
            Weight of each sample in the normalization (S,), e.g. its share of the cells.
        pseudocount
            ``a``.
        """
        S, D = sample_totals.shape
        L = self.n_factors
        ref = self.W
        self.register_buffer("gene_offset", torch.ones(S, D, dtype=ref.dtype, device=ref.device))
        self.register_buffer("offset_totals", sample_totals.to(device=ref.device, dtype=ref.dtype))
        w = sample_weights.to(device=ref.device, dtype=ref.dtype)
        self.register_buffer("offset_weights", w / w.sum())
        self.register_buffer("mm_den_sample", torch.zeros(S, L, dtype=ref.dtype, device=ref.device))
        self.register_buffer(
            "offset_pseudocount", torch.tensor(float(pseudocount), dtype=ref.dtype, device=ref.device)
        )

    def _offset_loadings(self, W: Tensor, genes: Tensor | None) -> Tensor:
        """``Σ_d g_sd W_dl`` (S x L) over all genes or the batch's ``genes``."""
        if genes is None:
            return self.gene_offset @ W
        return self.gene_offset[:, genes] @ W[genes]

    def _sample_stats(self, mu: Tensor, var: Tensor, s: Tensor, sample: Tensor) -> Tensor:
        """``Σ_{n in s} s_n e^{μ_nl+σ²_nl/2}`` of the batch, per sample (S x L)."""
        E = s[:, None] * torch.exp(mu + 0.5 * var)
        return torch.zeros_like(self.mm_den_sample).index_add_(0, sample, E)

    @torch.no_grad()
    def update_gene_offsets(
        self,
        mu: Tensor | None = None,
        var: Tensor | None = None,
        s: Tensor | None = None,
        sample: Tensor | None = None,
        *,
        rho: float = 1.0,
        scale: float = 1.0,
        genes: Tensor | None = None,
        check_finite: bool = True,
        reduce: Callable[[list[Tensor]], list[Tensor]] | None = None,
    ) -> Tensor:
        """Closed-form update of the gene offsets with ``q`` and ``W`` fixed (see :meth:`enable_gene_offsets`).

        With a batch (``mu``, ``var``, ``s``, ``sample``) its per-sample statistics first enter
        the running average (``rho``, ``scale``, ``reduce`` as in :meth:`multiplicative_update`); without,
        the running statistics of the last loadings update are used. ``genes``: update only
        these (gene-subsampled steps).

        Returns whether the new offsets are finite, as a boolean tensor on the device. With
        ``check_finite`` (default) non-finite offsets raise :class:`FloatingPointError` and
        nothing is written; without, they are written and the caller checks the flag (the
        training loop, once per iteration: the check needs the host to wait for the device).
        """
        if mu is not None:
            A = self._sample_stats(mu, var, s, sample) * scale
            self._accumulate_sample_stats(A if reduce is None else reduce([A])[0], rho)
            self.mm_initialized.fill_(True)
        W = self.loadings()
        rows = slice(None) if genes is None else genes
        a = self.offset_pseudocount
        lam = (self.mm_den_sample @ W[rows].T).clamp_min(0.0)  # (S, D_b): Σ_{n in s} E[λ_nd] / g_sd
        g = (self.offset_totals[:, rows] + a) / (lam + a)
        c = torch.exp((self.offset_weights[:, None] * torch.log(g)).sum(0))  # geometric mean per gene
        finite = torch.isfinite(g).all() & torch.isfinite(c).all()
        if check_finite and not bool(finite):
            raise FloatingPointError("non-finite gene offsets")
        self.gene_offset[:, rows] = g / c
        self.set_loadings(W[rows] * c[:, None], rows)
        return finite

    def _accumulate_sample_stats(self, A: Tensor, rho: float) -> None:
        if rho >= 1.0:
            self.mm_den_sample.copy_(A)
        else:
            # the first batch starts the running average: chosen on the device, no sync
            blend = self.mm_den_sample * (1 - rho) + rho * A
            self.mm_den_sample.copy_(torch.where(self.mm_initialized, blend, A))

    def param_groups(self) -> list[tuple[float, list[nn.Parameter]]]:
        """Trainable parameters by learning-rate multiplier, ascending; module order within a group.

        The multipliers come from :meth:`Prior.lr_scales` (1 for everything else).
        """
        scales = {f"prior.{k}": v for k, v in self.prior.lr_scales().items()}
        groups: dict[float, list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups.setdefault(float(scales.get(name, 1.0)), []).append(p)
        return sorted(groups.items(), key=lambda kv: kv[0])

    def expected_loglik(
        self,
        mu: Tensor,
        var: Tensor,
        s: Tensor,
        batch: CountBatch,
        *,
        mode: ElboMode = "lower-bound",
        n_samples: int = 1,
        generator: torch.Generator | None = None,
        gene_scale: float = 1.0,
        sample: Tensor | None = None,
    ) -> Tensor:
        """``Σ_{n in batch} E_q[log p(y_n | F_n)]`` (genes subsampled and rescaled by ``gene_scale``).

        Includes the ``-log y!`` constant so values are comparable to a true log-likelihood.
        ``sample``: the sample code of every cell of the batch (with gene offsets).
        """
        return self._expected_loglik(
            mu,
            var,
            s,
            batch,
            mode=mode,
            n_samples=n_samples,
            generator=generator,
            gene_scale=gene_scale,
            sample=sample,
        )[0]

    def _expected_loglik(
        self,
        mu: Tensor,
        var: Tensor,
        s: Tensor,
        batch: CountBatch,
        *,
        mode: ElboMode,
        n_samples: int,
        generator: torch.Generator | None,
        gene_scale: float,
        sample: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`expected_loglik` and ``Σ_n y_nd φ_ndl`` (``lower-bound`` mode, else ``None``)."""
        W = self.loadings()
        r, c, y = batch.rows, batch.cols, batch.values
        offsets = self.has_gene_offsets
        if offsets and sample is None:
            raise ValueError("A model with gene offsets needs the sample of every cell.")
        if offsets:
            # Σ_d g_{s(n),d} W_dl per cell, and the offsets' share of log λ at the non-zeros
            Wsum_cell = self._offset_loadings(W, batch.genes)[sample]  # (B, L)
            t_off = (y * torch.log(self.gene_offset[sample[r], c])).sum()
        else:
            Wsum = W.sum(0) if batch.genes is None else W[batch.genes].sum(0)
            t_off = 0.0
        num = None
        if mode == "lower-bound":
            t1, num = sparse_log_rate(mu, W, batch)  # num: Σ_n y_nd φ_ndl, reused by the W update
            E = s[:, None] * torch.exp(mu + 0.5 * var)
            t2 = (E * Wsum_cell).sum() if offsets else (E.sum(0) * Wsum).sum()
        elif mode in ("expanded", "simple"):
            gen_device = mu.device if generator is None else generator.device
            eps = torch.randn(
                (n_samples, *mu.shape), generator=generator, dtype=mu.dtype, device=gen_device
            ).to(mu.device)
            F = mu + torch.sqrt(var) * eps  # (E, B, L)
            logW = torch.log(W)
            t1 = (y * torch.logsumexp(F[:, r] + logW[c], dim=-1)).sum(-1).mean(0)
            E = (
                (s[:, None] * torch.exp(F)).mean(0)
                if mode == "simple"
                else s[:, None] * torch.exp(mu + 0.5 * var)
            )
            t2 = (E * Wsum_cell).sum() if offsets else (E.sum(0) * Wsum).sum()
        else:
            raise ValueError(f"`elbo_mode` must be one of {ELBO_MODES}, received {mode!r}.")
        if batch.row_totals is not None and batch.genes is None:
            t0 = (batch.row_totals * torch.log(s)).sum() - batch.lgamma_sum
        else:
            t0 = (y * torch.log(s[r])).sum() - torch.lgamma(y + 1).sum()
        return (t1 + t_off + t0 - t2) * gene_scale, num

    def elbo(
        self,
        inp: PriorInput,
        s: Tensor,
        batch: CountBatch,
        *,
        mode: ElboMode = "lower-bound",
        n_samples: int = 1,
        generator: torch.Generator | None = None,
        gene_scale: float = 1.0,
        kl_weight: float = 1.0,
        sample: Tensor | None = None,
    ) -> ElboTerms:
        """Unbiased mini-batch estimate of the full-data ELBO (see :class:`ElboTerms`).

        ``sample``: the sample code of every cell of the batch (models with gene offsets).
        """
        mu, var = self.prior.marginals(inp)
        ll, num = self._expected_loglik(
            mu,
            var,
            s,
            batch,
            mode=mode,
            n_samples=n_samples,
            generator=generator,
            gene_scale=gene_scale,
            sample=sample,
        )
        ll = ll * (inp.n_total / inp.idx.numel())
        kl = self.prior.kl(inp)
        return ElboTerms(elbo=ll - kl_weight * kl, loglik=ll, kl=kl, mu=mu, var=var, mm_numerator=num)

    @torch.no_grad()
    def multiplicative_update(
        self,
        mu: Tensor,
        var: Tensor,
        s: Tensor,
        batch: CountBatch,
        *,
        rho: float = 1.0,
        scale: float = 1.0,
        numerator: Tensor | None = None,
        sample: Tensor | None = None,
        check_finite: bool = True,
        reduce: Callable[[list[Tensor]], list[Tensor]] | None = None,
    ) -> Tensor:
        """KL-NMF majorize-minimize step of ``W`` with ``q`` fixed.

        ``W_dl <- Σ_n y_nd φ_ndl / Σ_n s_n e^{μ_nl+σ²_nl/2}`` with responsibilities
        ``φ_ndl = W_dl e^{μ_nl} / Σ_l' W_dl' e^{μ_nl'}`` on the non-zeros: the exact maximizer of
        the Jensen surrogate, so with ``rho=1`` the lower bound never decreases. With ``rho<1``
        the statistics are running averages over mini-batches (stochastic MM); ``scale`` (N/B)
        puts each batch's statistics on the full-data scale. ``numerator``: ``Σ_n y_nd φ_ndl``
        if already at hand (:attr:`ElboTerms.mm_numerator`), else computed here. With gene offsets
        (``sample``: the batch's sample codes) the denominator is
        ``Σ_s g_sd Σ_{n in s} s_n e^{μ_nl+σ²_nl/2}`` and the offsets are updated right after
        (:meth:`update_gene_offsets`). ``reduce``: sums the scaled statistics over the processes
        of data-parallel training, whose shares of the batch these cells are
        (:meth:`sfact._core.distributed.DataParallel.sum_statistics`).

        Returns whether the new loadings (and offsets) are finite, as a boolean tensor on the
        device. With ``check_finite`` (default) non-finite loadings raise
        :class:`FloatingPointError` before they are written; without, they are written and the
        caller checks the flag (the training loop, once per iteration, so that no step waits for
        the device).
        """
        W = self.loadings()
        r, c, y = batch.rows, batch.cols, batch.values
        num = numerator
        if num is None or num.shape != W.shape:
            phi = torch.softmax(mu[r] + torch.log(W)[c], dim=1)
            num = torch.zeros_like(W).index_add_(0, c, y[:, None] * phi)
        num = num * scale
        den = (s[:, None] * torch.exp(mu + 0.5 * var)).sum(0) * scale
        if batch.genes is not None:
            rows = batch.genes
        else:
            rows = slice(None)
        offsets = self.has_gene_offsets
        if offsets and sample is None:
            raise ValueError("A model with gene offsets needs the sample of every cell.")
        A = self._sample_stats(mu, var, s, sample) * scale if offsets else None
        if reduce is not None:  # the whole batch's statistics, from every process's share of it
            num, den, *rest = reduce([num, den, *([A] if offsets else [])])
            A = rest[0] if offsets else None
        if offsets:
            self._accumulate_sample_stats(A, rho)
        if rho >= 1.0:
            self.mm_num[rows] = num[rows]
            self.mm_den.copy_(den)
        else:
            # running averages, started by the first batch: chosen on the device, no sync
            init = self.mm_initialized
            self.mm_num[rows] = torch.where(init, (1 - rho) * self.mm_num[rows] + rho * num[rows], num[rows])
            self.mm_den.copy_(torch.where(init, self.mm_den * (1 - rho) + rho * den, den))
        self.mm_initialized.fill_(True)
        if offsets:
            den_dl = self.gene_offset[:, rows].T @ self.mm_den_sample  # (D_b, L)
            W_new = self.mm_num[rows] / den_dl.clamp_min(1e-30)
        else:
            W_new = self.mm_num[rows] / self.mm_den.clamp_min(1e-30)
        finite = torch.isfinite(W_new).all()
        if check_finite and not bool(finite):
            raise FloatingPointError("non-finite loadings in the multiplicative update")
        self.set_loadings(W_new, rows)
        if offsets:
            finite = finite & self.update_gene_offsets(genes=batch.genes, check_finite=check_finite)
        return finite

    @torch.no_grad()
    def reorder(self, perm: Tensor) -> None:
        """Permute the factors of the prior and the loadings."""
        self.prior.reorder(perm)
        self.W.copy_(self.W[:, perm])
        self.mm_num.copy_(self.mm_num[:, perm])
        self.mm_den.copy_(self.mm_den[perm])
        if self.has_gene_offsets:
            self.mm_den_sample.copy_(self.mm_den_sample[:, perm])
