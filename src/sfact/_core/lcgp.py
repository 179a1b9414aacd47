"""Locally conditioned GP priors ``lcgp`` and ``mggp_lcgp`` (every training cell an inducing point).

For each factor l, ``F_l(x) = β_l + u_l(x)``. Every training cell j carries an inducing value
``u_j`` (M = N) whose prior is a nearest-neighbour (Vecchia) factorization, as in VNNGP (Wu,
Pleiss & Cunningham, AISTATS 2022)::

    p(u) = Π_j N(u_j | b_jᵀ u_{n(j)}, τ²_j),
    b_j = K_nn⁻¹ k_nj,   τ²_j = k_jj − k_jnK_nn⁻¹k_nj.

**Ordering.** A product of conditionals is a valid joint density only when every cell
conditions on cells that come *before* it in some ordering (the factors are then the chain
rule of a Gaussian whose precision is ``(I − B)ᵀ D⁻¹ (I − B)``, ``B`` strictly lower-triangular
in that order, ``D = diag(τ²)``). sfact orders the cells by a random permutation (``order_seed``;
random orderings approximate the GP far better than coordinate orderings, Guinness 2018) and
takes ``n(j)`` = the K nearest training cells *earlier in the ordering* than j. Self is excluded
by construction (a cell is never earlier than itself), including when other cells share its
exact coordinates: a duplicate that comes earlier is a legitimate neighbour at distance 0.
Ties in distance are broken by cell index, so the sets are deterministic. The first cell has
an empty set (``b = 0``, ``τ² = k_jj``), the next K cells condition on all earlier cells.

**Nugget.** The prior covariance is ``k + δσ²·I`` (``nugget`` = δ, default 0.03): cells are
points of a GP plus a small independent cell-level term. It keeps every ``τ²_j >= δσ²`` — also
for the ~900 osmFISH cells that share their exact coordinates with another cell, where the
conditional variance of the GP alone is 0 — and doubles as the jitter of the K x K solves. (On
osmFISH and Visium prostate the held-out deviance improves from δ = 1e-4 up to ~0.03-0.1, at
the price of less smooth factors; ``benchmarks/bench_lcgp.py``.)

**Variational posterior.** ``q(u_l) = N(m_l, L_u L_uᵀ)`` with L_u lower-triangular in the same
ordering and row j non-zero only on j and its (earlier) neighbours n(j): stored as a positive
diagonal (L, N) and off-diagonal values (L, N, K), i.e. (L, N, K+1) numbers. Because L_u uses
the earlier-neighbour sets it is lower-triangular in the ordering, so
``log|S| = 2 Σ_j log L_u[j, j]``. ``diagonal_only`` keeps only the diagonal (mean field).

**Marginals** (the likelihood's input): ``q(u_j) = N(m_j, Σ_k L_u[j, k]²)``.

**KL.** With ``τ̃²_j = L_u[j, j]²``, ``KL(q || p) = Σ_j ½[log(τ²_j / τ̃²_j) − 1 +
E_q(u_j − b_jᵀu_{n(j)})² / τ²_j]`` per factor, where
``E_q(u_j − b_jᵀu_{n(j)})² = (m_j − b_jᵀ m_{n(j)})² + ‖L_uᵀ a_j‖²`` and ``a_j`` is 1 at j and
``−b_j`` on n(j). ``L_uᵀ a_j`` is a combination of K+1 sparse rows of L_u, so it has at most
(K+1)² non-zeros: computed exactly by grouping the entries by column (O(K² log K) index work
per cell, cached for small N) in fixed-size chunks by a custom autograd function, so memory
stays O(chunk·K²·L). The sum over j is estimated on the batch's cells and scaled by N/B.

**Prediction** at a new location x: condition on the K nearest training cells (all of them,
any order): ``w = (K_nn + δσ²I)⁻¹ k_n*``, mean ``β + wᵀ m_n``, variance
``k_** + δσ² − wᵀ k_n* + wᵀ S_nn w`` with the exact block ``S_nn`` of ``q`` (``wᵀ S_nn w =
‖L_uᵀ w‖²``, the same sparse computation as the KL). A query at a training cell's exact
coordinates (and, for ``mggp_lcgp``, in the same group) returns that cell's marginals.

With fixed hyperparameters ``b`` and ``τ²`` are computed once (float64, batched Cholesky
solves) and kept as buffers; memory is O(N·K·n_sets + N·K·L), never N² or N·M.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .gp import GPPrior, cholesky_jitter
from .kernels import Kernel
from .neighbors import NEIGHBOR_METHODS, NEIGHBOR_SELECTIONS, vecchia_neighbors
from .priors import MIN_VAR, PriorInput
from .sparse_quad import _row_columns, _slots, sparse_row_quad

__all__ = ["LCGPPrior", "sparse_row_quad", "vecchia_neighbors"]
_COND_ELEMENTS = 2_000_000  # kernel entries per batched K x K solve (cells x K²)
NUGGET_BOUNDS = (1e-4, 1.0)  # of a learned nugget δ (a fraction of σ²)


# ============================================================================ the prior
class LCGPPrior(GPPrior):
    """Locally conditioned (nearest-neighbour Vecchia) GP prior: ``lcgp``; ``mggp_lcgp`` with groups.

    Parameters
    ----------
    n_factors
        Number of factors L.
    X
        (N, p) scaled coordinates of the training cells (every cell is an inducing point).
        ``None`` builds an empty shell of the right shapes (``n_obs``, ``n_dims``) whose buffers
        are then filled by ``load_state_dict`` — how saved models are loaded without recomputing
        the neighbour graph.
    groups
        (N,) group codes of the training cells (multi-group kernel).
    n_obs, n_dims
        N and p when ``X`` is ``None``.
    n_neighbors
        K, the size of the conditioning sets (capped at N - 1).
    nugget
        δ: the prior covariance is ``k + δσ²I`` (see the module notes).
    train_nugget
        Train δ too (log-scale, inside :data:`NUGGET_BOUNDS`).
    neighbor_method
        ``"auto"``, ``"exact"`` or ``"pynndescent"`` for the conditioning sets.
    neighbor_selection
        ``"spatial"``: n(j) = the K nearest earlier cells. ``"correlation"`` (multi-group kernel
        only; ``"auto"`` picks it there): the K earlier cells most correlated with j under the
        kernel, among the K nearest earlier cells overall and the K nearest earlier cells of j's
        group — with many groups the spatially nearest cells are mostly of other groups, which the
        multi-group kernel correlates only weakly with j.
    order_seed
        Seed of the random ordering of the cells.
    slot_cache_budget
        Cache the column grouping of the KL's sparse rows when N·(K+1)² is at most this.
    **gp_options
        The kernel options and ``diagonal_only`` of :class:`~sfact._core.gp.GPPrior`, all
        required. Trained hyperparameters make the conditionals be recomputed for each batch
        (O(B·K³) per step); ``diagonal_only`` gives a mean-field ``q`` (diagonal L_u): O(B·K·L)
        per step instead of O(B·K²·L).
    """

    name = "lcgp"
    per_cell = True  # variational parameters per training cell (marginals need only the index)

    def __init__(
        self,
        n_factors: int,
        X: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        *,
        n_obs: int | None = None,
        n_dims: int | None = None,
        n_neighbors: int,
        nugget: float,
        neighbor_method: str,
        neighbor_selection: str,
        order_seed: int,
        slot_cache_budget: int = 50_000_000,
        train_nugget: bool = False,
        **gp_options: Any,
    ):
        if X is not None:
            X = np.asarray(X, dtype=np.float64)
            n_obs, n_dims = X.shape
        if n_obs is None or n_dims is None:
            raise ValueError("LCGPPrior needs the training coordinates `X` (or `n_obs` and `n_dims`).")
        N, p = int(n_obs), int(n_dims)
        if N < 2:
            raise ValueError(f"The lcgp prior needs at least 2 cells, received {N}.")
        if nugget <= 0:
            raise ValueError(f"`nugget` must be positive, received {nugget}.")
        if neighbor_method not in NEIGHBOR_METHODS:
            raise ValueError(
                f"`neighbor_method` must be one of {NEIGHBOR_METHODS}, received {neighbor_method!r}."
            )
        if neighbor_selection not in NEIGHBOR_SELECTIONS:
            raise ValueError(
                f"`neighbor_selection` must be one of {NEIGHBOR_SELECTIONS}, received {neighbor_selection!r}."
            )
        K = int(min(int(n_neighbors), N - 1))
        if K < 1:
            raise ValueError(f"`n_neighbors` must be positive, received {n_neighbors}.")
        super().__init__(n_factors, n_dims=p, **gp_options)
        self.n_obs, self.n_dims, self.n_neighbors = N, p, K
        if self.multigroup:
            self.name = "mggp_lcgp"
            if X is not None and groups is None:
                raise ValueError("A multi-group prior needs the group of every training cell.")
        S = self.kernel.n_sets
        #: log δ (learned with ``train_nugget``, inside :data:`NUGGET_BOUNDS`)
        self.log_nugget = torch.nn.Parameter(
            torch.tensor(math.log(float(nugget)), dtype=torch.float32), requires_grad=bool(train_nugget)
        )
        self.slot_cache_budget = int(slot_cache_budget)
        # training inputs, ordering and conditioning sets (saved with the model)
        self.register_buffer("X_train", torch.zeros(N, p, dtype=torch.float64))
        self.register_buffer("groups_train", torch.zeros(N, dtype=torch.int64))
        self.register_buffer("rank", torch.arange(N, dtype=torch.int64))
        self.register_buffer("nbr", torch.full((N, K), -1, dtype=torch.int64))
        self.register_buffer("b", torch.zeros(S, N, K, dtype=torch.float64))
        self.register_buffer("tau2", torch.ones(S, N, dtype=torch.float64))
        self._init_variational(N, K)
        self._config.update(
            n_obs=N,
            n_dims=p,
            n_neighbors=K,
            nugget=float(nugget),
            train_nugget=bool(train_nugget),
            neighbor_method=neighbor_method,
            neighbor_selection=neighbor_selection,
            order_seed=int(order_seed),
            slot_cache_budget=int(slot_cache_budget),
        )
        self.by_correlation = self.multigroup and neighbor_selection in ("auto", "correlation")
        self._tree = None
        self._slot_cache: Tensor | None = None
        if X is not None:
            with torch.no_grad():
                self.X_train.copy_(torch.as_tensor(X))
                if groups is not None:
                    self.groups_train.copy_(torch.as_tensor(np.asarray(groups, dtype=np.int64)))
                rank = np.empty(N, dtype=np.int64)
                rank[np.random.default_rng(int(order_seed)).permutation(N)] = np.arange(N)
                self.rank.copy_(torch.as_tensor(rank))
                nbr = vecchia_neighbors(X, K, rank, method=neighbor_method)
                if self.by_correlation:
                    # candidates: the K nearest earlier cells overall and the K nearest earlier cells of
                    # the same group; keep the K most correlated under the multi-group kernel
                    g = np.asarray(groups, dtype=np.int64)
                    same = np.full_like(nbr, -1)
                    for gg in np.unique(g):
                        members = np.flatnonzero(g == gg)
                        if len(members) < 2:
                            continue
                        sub_rank = np.argsort(np.argsort(rank[members]))
                        sub = vecchia_neighbors(X[members], K, sub_rank, method=neighbor_method)
                        same[members, : sub.shape[1]] = np.where(sub >= 0, members[np.maximum(sub, 0)], -1)
                    nbr = self._most_correlated(
                        torch.as_tensor(X), self.groups_train, torch.as_tensor(np.concatenate([nbr, same], 1))
                    ).numpy()
                self.nbr.copy_(torch.as_tensor(nbr))
                self.update_conditionals()

    # ------------------------------------------------------------------ hyperparameters
    @property
    def nugget_value(self) -> float:
        """δ as a float."""
        return float(torch.exp(self.log_nugget.detach().double()))

    @property
    def nugget(self) -> Tensor | float:
        """δ: a float when fixed, a tensor (with its gradient) while it is trained."""
        if self.log_nugget.requires_grad:
            return torch.exp(self.log_nugget)
        return float(torch.exp(self.log_nugget.detach().double()))

    def hyper_parameter_names(self) -> list[str]:
        """Kernel hyperparameters and ``log_nugget``."""
        return [*super().hyper_parameter_names(), "log_nugget"]

    @property
    def hyper_trainable(self) -> bool:
        """Whether some hyperparameter (the nugget included) is being trained."""
        return self.kernel.trainable or self.log_nugget.requires_grad

    @torch.no_grad()
    def after_step(self) -> None:
        """Keep trained hyperparameters (the nugget included) inside their bounds."""
        super().after_step()
        if self.log_nugget.requires_grad:
            self.log_nugget.clamp_(math.log(NUGGET_BOUNDS[0]), math.log(NUGGET_BOUNDS[1]))

    def config(self) -> dict[str, Any]:
        """Constructor arguments as plain values (current hyperparameters, the nugget included)."""
        cfg = super().config()
        cfg["nugget"] = self.nugget_value
        return cfg

    def _freeze_extra(self) -> None:
        self.log_nugget.requires_grad_(False)
        self.update_conditionals()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "log_nugget" not in state_dict:  # saved before the nugget could be learned
            state_dict[prefix + "log_nugget"] = self.log_nugget.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ conditionals
    @torch.no_grad()
    def _most_correlated(self, Xq: Tensor, gq: Tensor, cand: Tensor) -> Tensor:
        """The K candidates (n, C; -1 = none; duplicates allowed) most correlated with each query.

        Correlation under the kernel (averaged over kernel sets); ties by distance, then index.
        """
        K = self.n_neighbors
        k64 = copy.deepcopy(self.kernel).to(dtype=torch.float64, device=cand.device)
        X = self.X_train.to(device=cand.device, dtype=torch.float64)
        Xq = Xq.to(device=cand.device, dtype=torch.float64)
        # every operand on the candidates' device (prediction runs the selection on the CPU for a
        # model trained on CUDA)
        g_train = self.groups_train.to(cand.device)
        gq = gq.to(cand.device)
        out = torch.empty(cand.shape[0], K, dtype=torch.int64, device=cand.device)
        q = self.kernel.group_embedding.shape[1]  # the kernel gathers (chunk, C, q) group coordinates
        chunk = max(1, _COND_ELEMENTS // (cand.shape[1] * (1 + q)))
        for start in range(0, cand.shape[0], chunk):
            sl = slice(start, min(start + chunk, cand.shape[0]))
            c = cand[sl]
            srt = torch.sort(c, dim=1).values  # drop repeated candidates
            dup = torch.zeros_like(srt, dtype=torch.bool)
            dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
            c = torch.where(dup | (srt < 0), torch.full_like(srt, -1), srt)
            cc = c.clamp_min(0)
            corr = k64(X[cc], Xq[sl, None, :], g_train[cc], gq[sl, None])[..., 0].mean(0)
            corr = torch.where(c >= 0, corr, torch.full_like(corr, -math.inf))
            dist = torch.where(
                c >= 0, (X[cc] - Xq[sl, None, :]).pow(2).sum(-1), torch.full_like(corr, math.inf)
            )
            # lexicographic: correlation (desc), distance, index — three stable sorts
            o = torch.argsort(cc, dim=1, stable=True)
            o = o.gather(1, torch.argsort(dist.gather(1, o), dim=1, stable=True))
            o = o.gather(1, torch.argsort(-corr.gather(1, o), dim=1, stable=True))
            take = o[:, :K]
            chosen = c.gather(1, take)
            out[sl] = chosen
        return out

    def _conditionals_of(
        self, kernel: Kernel, Xj: Tensor, gj: Tensor | None, nb: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``b`` (S, c, K) and ``τ²`` (S, c) of cells at ``Xj`` (c, p) given training cells ``nb``."""
        dtype = Xj.dtype
        mask = nb >= 0
        nbc = nb.clamp_min(0)
        Xn = self.X_train.to(dtype)[nbc]  # (c, K, p)
        gn = self.groups_train[nbc] if self.multigroup else None
        g1 = None if gj is None else gj[:, None]
        Knn = kernel(Xn, Xn, self._groups(gn), self._groups(gn))  # (S, c, K, K)
        knj = kernel(Xn, Xj[:, None, :], self._groups(gn), self._groups(g1))[..., 0]  # (S, c, K)
        s2 = (kernel.sigma.to(dtype) ** 2).view(-1, 1, 1)
        mm = (mask[:, :, None] & mask[:, None, :]).to(dtype)
        eye = torch.eye(nb.shape[1], dtype=dtype, device=Xj.device)
        nug = self.nugget
        if isinstance(nug, Tensor):
            nug = nug.to(dtype)
        Knn = Knn * mm + eye * (1.0 - mm) * s2[..., None] + nug * s2[..., None] * eye
        knj = knj * mask.to(dtype)
        Lc = cholesky_jitter(Knn, jitter=1e-10)
        b = torch.cholesky_solve(knj[..., None], Lc)[..., 0] * mask.to(dtype)
        tau2 = (s2[..., 0] * (1.0 + nug) - (knj * b).sum(-1)).clamp_min(nug * s2[..., 0])
        return b, tau2

    @torch.no_grad()
    def update_conditionals(self) -> None:
        """Compute ``b`` and ``τ²`` of every training cell in float64 (once, with fixed hyperparameters)."""
        k64 = copy.deepcopy(self.kernel).to(device=self.X_train.device, dtype=torch.float64)
        X = self.X_train.double()
        chunk = max(1, _COND_ELEMENTS // self.n_neighbors**2)
        for start in range(0, self.n_obs, chunk):
            sl = slice(start, min(start + chunk, self.n_obs))
            gj = self.groups_train[sl] if self.multigroup else None
            b, tau2 = self._conditionals_of(k64, X[sl], gj, self.nbr[sl])
            self.b[:, sl] = b.to(self.b.dtype)
            self.tau2[:, sl] = tau2.to(self.tau2.dtype)

    def conditionals(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """``b`` (S, B, K) and ``τ²`` (S, B) of training cells ``idx``."""
        if self.hyper_trainable:
            dtype = self.m.dtype
            gj = self.groups_train[idx] if self.multigroup else None
            return self._conditionals_of(self.kernel, self.X_train[idx].to(dtype), gj, self.nbr[idx])
        return self.b[:, idx].to(self.m.dtype), self.tau2[:, idx].to(self.m.dtype)

    # ------------------------------------------------------------------ variational factors
    def _off(self) -> Tensor:
        return self.Lu_offdiag * (self.nbr >= 0).to(self.Lu_offdiag.dtype)

    def _row_var(self, idx: Tensor) -> Tensor:
        """Σ_k L_u[j, k]² of rows ``idx``: (L, B)."""
        var = torch.exp(2 * self.raw_Lu_diag[:, idx])
        if not self.diagonal_only:
            off = self.Lu_offdiag[:, idx] * (self.nbr[idx] >= 0).to(self.m.dtype)
            var = var + off.pow(2).sum(-1)
        return var

    def _slots_kl(self, idx: Tensor) -> Tensor | None:
        """Cached column grouping of rows ``[j, n(j)]`` for the KL (None when over budget)."""
        N, K = self.n_obs, self.n_neighbors
        if N * (K + 1) ** 2 > self.slot_cache_budget:
            return None
        c = self._slot_cache
        if c is None or c.device != self.nbr.device:
            dt = torch.int16 if (K + 1) ** 2 < 32767 else torch.int32
            parts = []
            for start in range(0, N, 2048):
                j = torch.arange(start, min(start + 2048, N), device=self.nbr.device)
                rows = torch.cat([j[:, None], self.nbr[j].clamp_min(0)], 1)
                parts.append(_slots(_row_columns(rows, self.nbr)).to(dt))
            c = self._slot_cache = torch.cat(parts)
        return c[idx]

    def _drop_caches(self) -> None:
        self._slot_cache = None
        self._tree = None

    # ------------------------------------------------------------------ prior interface
    def marginals(self, inp: PriorInput) -> tuple[Tensor, Tensor]:
        """Mean and variance of ``q(F)`` at the batch's (training) cells, each (B, L)."""
        idx = inp.idx
        mu = self.m[:, idx] + self.beta_rows(self.groups_train[idx] if self.multigroup else None)
        var = self._row_var(idx).clamp_min(MIN_VAR)
        return mu.T, var.T

    def kl_terms(self, idx: Tensor) -> Tensor:
        """Per-cell KL terms (L, B) of cells ``idx``: ½[log(τ²/τ̃²) − 1 + E_q(u_j − b_jᵀu_n)²/τ²]."""
        b, tau2 = self.conditionals(idx)  # (S, B, K), (S, B)
        nb = self.nbr[idx]
        nbc = nb.clamp_min(0)
        resid = self.m[:, idx] - (b * self.m[:, nbc]).sum(-1)  # (L, B)
        if self.diagonal_only:
            d2 = torch.exp(2 * self.raw_Lu_diag)
            quad = d2[:, idx] + (b.pow(2) * d2[:, nbc]).sum(-1)
        else:
            rows = torch.cat([idx[:, None], nbc], 1)  # (B, K+1)
            coef = torch.cat([torch.ones_like(b[..., :1]), -b], -1)  # (S, B, K+1)
            quad = sparse_row_quad(
                torch.exp(self.raw_Lu_diag), self.Lu_offdiag, coef, rows, self.nbr, self._slots_kl(idx)
            )
        return 0.5 * (torch.log(tau2) - 2 * self.raw_Lu_diag[:, idx] - 1.0 + (resid.pow(2) + quad) / tau2)

    def kl(self, inp: PriorInput) -> Tensor:
        """KL(q || p) estimated on the batch's cells and scaled by N/B."""
        return self.kl_terms(inp.idx).sum() * (inp.n_total / inp.idx.numel())

    def kl_full(self, batch_size: int = 4096) -> Tensor:
        """The exact KL over all cells (in batches)."""
        tot = self.m.new_zeros(())
        for start in range(0, self.n_obs, batch_size):
            idx = torch.arange(start, min(start + batch_size, self.n_obs), device=self.m.device)
            tot = tot + self.kl_terms(idx).sum()
        return tot

    # ------------------------------------------------------------------ prediction
    def _trees(self) -> tuple:
        """kd-trees of the training cells (all, and per group with correlation-based selection)."""
        key = (self.X_train, self.hyper_version)
        if self._tree is None or self._tree[0] is not key[0] or self._tree[1] != key[1]:
            from scipy.spatial import cKDTree

            X = self.X_train.cpu().double().numpy()
            per_group = {}
            if self.by_correlation:
                g = self.groups_train.cpu().numpy()
                for gg in np.unique(g):
                    members = np.flatnonzero(g == gg)
                    per_group[int(gg)] = (members, cKDTree(X[members]))
            self._tree = (*key, cKDTree(X), per_group)
        return self._tree[2], self._tree[3]

    def _neighbors_of(self, X: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
        """Conditioning sets (n, K) of query points: the K nearest training cells (ties by index).

        With correlation-based selection (multi-group kernel), the K most correlated among the K
        nearest training cells and the K nearest training cells of the query's group.
        """
        tree, per_group = self._trees()
        K = self.n_neighbors
        dist, idx = tree.query(X, k=K)
        dist, idx = np.asarray(dist).reshape(len(X), K), np.asarray(idx).reshape(len(X), K)
        idx = np.take_along_axis(idx, np.lexsort((idx, dist), axis=-1), 1)
        if not self.by_correlation:
            return idx
        same = np.full_like(idx, -1)
        for gg in np.unique(groups):
            if int(gg) not in per_group:
                continue
            members, gtree = per_group[int(gg)]
            q = np.flatnonzero(groups == gg)
            k = min(K, len(members))
            _, sub = gtree.query(X[q], k=k)
            same[q, :k] = members[np.asarray(sub).reshape(len(q), k)]
        cand = torch.as_tensor(np.concatenate([idx, same], 1))
        return self._most_correlated(torch.as_tensor(X), torch.as_tensor(groups), cand).numpy()

    @torch.no_grad()
    def predict(self, X: Tensor, groups: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Predictive mean and variance of ``F`` at new coordinates (and groups), each (n, L).

        Conditions on the K nearest training cells (for ``mggp_lcgp`` with correlation-based
        selection: the K most correlated among the nearest cells overall and of the query's group);
        a query at a training cell's exact coordinates (and group) returns that cell's marginals —
        of the lowest-index one where several training cells share them.
        """
        if self.multigroup and groups is None:
            raise ValueError("The multi-group prior needs the groups of the new cells.")
        n = X.shape[0]
        dtype, dev = X.dtype, X.device
        Xq = X.detach().double()
        gq = None if not self.multigroup else groups.to(dev)
        nn_idx = self._neighbors_of(Xq.cpu().numpy(), None if gq is None else gq.cpu().numpy())
        nn_t = torch.as_tensor(nn_idx, device=dev)
        # exact coincidence with a training cell (same group): its marginals
        valid = nn_t >= 0
        nn_c = nn_t.clamp_min(0)
        zero = valid & (self.X_train.double()[nn_c] == Xq[:, None, :]).all(-1)
        if self.multigroup:
            zero &= self.groups_train[nn_c] == gq[:, None]
        hit = zero.any(1)
        first = torch.where(zero, nn_c, torch.full_like(nn_c, self.n_obs)).min(1).values
        mu = torch.empty(n, self.n_factors, dtype=torch.float64, device=dev)
        var = torch.empty_like(mu)
        if hit.any():
            j = first[hit]
            mu[hit] = (self.m[:, j] + self.beta_rows(None if gq is None else gq[hit])).T.double()
            var[hit] = self._row_var(j).T.double().clamp_min(MIN_VAR)
        rest = torch.nonzero(~hit).flatten()
        if rest.numel():
            k64 = copy.deepcopy(self.kernel).to(device=dev, dtype=torch.float64)
            m64 = self.m.double()
            d64 = torch.exp(self.raw_Lu_diag.double())
            off64 = None if self.diagonal_only else self._off().double()
            chunk = max(1, _COND_ELEMENTS // self.n_neighbors**2)
            for start in range(0, rest.numel(), chunk):
                sel = rest[start : start + chunk]
                w, tau2 = self._conditionals_of(k64, Xq[sel], None if gq is None else gq[sel], nn_t[sel])
                nb = nn_c[sel]  # w = 0 where there is no neighbour
                # τ² = k** + δσ² − wᵀk: the variance of u* given u_n; add the q uncertainty of u_n
                mean = (w * m64[:, nb]).sum(-1)  # (L, c)
                if self.diagonal_only:
                    quad = (w.pow(2) * d64[:, nb].pow(2)).sum(-1)
                else:
                    quad = sparse_row_quad(d64, off64, w, nb, self.nbr)
                v = tau2 + quad  # (L, c) by broadcasting S
                mu[sel] = (mean + self.beta_rows(None if gq is None else gq[sel]).double()).T
                var[sel] = v.expand(self.n_factors, -1).T.clamp_min(MIN_VAR)
        return mu.to(dtype), var.to(dtype)

    # ------------------------------------------------------------------ bookkeeping
    @torch.no_grad()
    def _reorder_kernel_sets(self, perm: Tensor) -> None:
        self.b.copy_(self.b[perm])
        self.tau2.copy_(self.tau2[perm])

    def _precision_matvec(self, x: Tensor, bT: Tensor, tau2T: Tensor) -> Tensor:
        """``Λ x`` with the Vecchia precision ``Λ = (I − B)ᵀ D⁻¹ (I − B)``.

        Factor-last layout: ``x`` (N, L), ``bT`` (N, K, S), ``tau2T`` (N, S); in chunks of cells.
        """
        nbc = self.nbr.clamp_min(0)
        N, L = x.shape
        chunk = max(1, _COND_ELEMENTS // max(1, nbc.shape[1] * L))
        y = torch.empty_like(x)
        for start in range(0, N, chunk):
            sl = slice(start, min(start + chunk, N))
            y[sl] = (x[sl] - (bT[sl] * x[nbc[sl]]).sum(1)) / tau2T[sl]
        out = y.clone()
        for start in range(0, N, chunk):
            sl = slice(start, min(start + chunk, N))
            out.index_add_(0, nbc[sl].reshape(-1), (-(bT[sl] * y[sl, None, :])).reshape(-1, L))
        return out

    @torch.no_grad()
    def init_from_log_factors(
        self, log_factors: Tensor, inp: PriorInput, *, noise: float = 0.1, n_iter: int = 100
    ) -> None:
        """Initialize from log-factors (N, L) of the training cells.

        ``β`` = their mean; ``m`` = the Vecchia-GP smoothing of the centred log-factors, i.e.
        the posterior mean of u under Gaussian observations with variance ``noise·σ²``
        (``(Λ + I/(noise·σ²)) m = F/(noise·σ²)``, Jacobi-preconditioned conjugate gradients with
        O(N·K·L) matrix-vector products, ~25 of them); L_u diagonal = the matching mean-field
        standard deviations, off-diagonal 0.
        """
        F = log_factors.to(self.m)
        if inp is not None and inp.idx is not None and inp.idx.numel() == F.shape[0]:
            order = torch.argsort(inp.idx.to(F.device))
            F = F[order]
        f = self.set_means(F, self.groups_train if self.multigroup else None).double()  # (N, L)
        bT = self.b.double().permute(1, 2, 0).contiguous()  # (N, K, S)
        tau2T = self.tau2.double().T.contiguous()  # (N, S)
        s2 = (self.kernel.sigma.detach().double() ** 2).to(f.device)
        lam = (1.0 / (noise * s2)).expand(self.n_factors)[None, :]  # (1, L)
        nbc = self.nbr.clamp_min(0)
        # diag(Λ) + λ: Jacobi preconditioner and mean-field precision
        down = torch.zeros_like(tau2T).index_add_(
            0, nbc.reshape(-1), (bT.pow(2) / tau2T[:, None, :]).reshape(-1, bT.shape[-1])
        )
        diag = 1.0 / tau2T + down + lam  # (N, L)

        def A(x):
            return self._precision_matvec(x, bT, tau2T) + lam * x

        rhs = lam * f
        x = rhs / diag
        r = rhs - A(x)
        z = r / diag
        p = z.clone()
        rz = (r * z).sum(0, keepdim=True)
        norm0 = rhs.norm(dim=0, keepdim=True).clamp_min(1e-30)
        for _ in range(n_iter):
            Ap = A(p)
            alpha = rz / (p * Ap).sum(0, keepdim=True).clamp_min(1e-300)
            x = x + alpha * p
            r = r - alpha * Ap
            if bool((r.norm(dim=0, keepdim=True) / norm0 < 1e-6).all()):
                break
            z = r / diag
            rz_new = (r * z).sum(0, keepdim=True)
            p = z + (rz_new / rz.clamp_min(1e-300)) * p
            rz = rz_new
        self.m.copy_(x.T.to(self.m))
        self.raw_Lu_diag.copy_((-0.5 * torch.log(diag.expand_as(x))).T.to(self.raw_Lu_diag))
        if not self.diagonal_only:
            self.Lu_offdiag.zero_()

    def _gp_info_extra(self) -> dict[str, Any]:
        return {
            "n_neighbors": int(self.n_neighbors),
            "num_inducing": int(self.n_obs),
            "nugget": self.nugget_value,
        }
