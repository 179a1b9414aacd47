"""Sparse variational GP priors ``svgp`` and ``mggp_svgp`` (whitened).

For each factor l, ``F_l(x) = β_l + f_l(x)`` with ``f_l ~ GP(0, k)``, inducing values
``u = L_zz v`` at fixed inducing points Z (``K_zz = L_zz L_zzᵀ``), and ``q(v) = N(m, S)``,
``S = L_u L_uᵀ``. With ``A = L_zz⁻¹ K_zx``:

- mean ``μ(x) = β + Aᵀ m``;
- variance ``σ²(x) = k_xx − Σ_M A² + Σ_M (Aᵀ L_u)²``;
- ``KL(q(v) || N(0, I)) = ½ (tr S + mᵀm − M − log|S|)`` per factor (not scaled by the batch).

With fixed hyperparameters ``L_zz`` is computed once, and ``A`` — shared by every factor when
they share the kernel — is cached for the training cells when it fits the memory budget.

``matmul_precision`` sets the precision of the products with ``A`` (the mean, the explained
variance and their gradients; see :mod:`sfact._core.precision`): ``"auto"`` (default) and
``"high"`` run them on TF32 tensor cores on CUDA. ``K_zx``, ``L_zz``, the triangular solve for ``A``, ``Σ_M A²`` and the KL
stay in FP32 (float64 for the cached ``L_zz``) in every mode, with TF32 switched off for the
forward computations on CUDA even when the user switched it on globally.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .gp import JITTER, GPPrior, cholesky_jitter
from .precision import MatmulPrecision, check_matmul_precision, cuda_tf32, matmul
from .priors import MIN_VAR, PriorInput

__all__ = ["JITTER", "SVGPPrior", "cholesky_jitter"]


class SVGPPrior(GPPrior):
    """Whitened sparse variational GP prior on each log-factor (``svgp``; ``mggp_svgp`` with groups).

    Every argument is required: the defaults live in :class:`sfact.models._config.SVGPConfig`.

    Parameters
    ----------
    n_factors
        Number of factors L.
    Z
        (M, p) inducing points (scaled coordinates).
    Z_groups
        (M,) group codes of the inducing points (multi-group kernel), or ``None``.
    cache_budget
        Cache ``A`` for the training cells when M·N is at most this many numbers.
    matmul_precision
        Precision of the products with ``A`` (forward and backward): ``"auto"`` (TF32 on CUDA,
        FP32 elsewhere), ``"highest"`` (FP32), ``"high"`` (TF32 on CUDA) or ``"tf32-emulated"``
        (testing: TF32 rounding emulated in FP32 on any device); see
        :mod:`sfact._core.precision`. The default (the config's) also serves models saved before
        this option existed.
    **gp_options
        The kernel options and ``diagonal_only`` of :class:`~sfact._core.gp.GPPrior`, all
        required (``hyper_iter``, ``hyper_lr_scale``, ``lengthscale_bounds``: the learning
        phase, optional). Trained hyperparameters refactorize ``K_zz`` every step; ``diagonal_only``
        makes ``S`` diagonal (O(B·M·L) variance instead of O(B·M²·L)).
    """

    name = "svgp"

    def __init__(
        self,
        n_factors: int,
        Z: np.ndarray,
        Z_groups: np.ndarray | None = None,
        *,
        cache_budget: int,
        matmul_precision: MatmulPrecision = "auto",
        **gp_options: Any,
    ):
        Z = np.asarray(Z, dtype=np.float64)
        super().__init__(n_factors, n_dims=Z.shape[1], **gp_options)
        self.register_buffer("Z", torch.as_tensor(Z).float())
        if self.multigroup:
            if Z_groups is None:
                raise ValueError("A multi-group prior needs the group of each inducing point.")
            self.register_buffer("Z_groups", torch.as_tensor(np.asarray(Z_groups, dtype=np.int64)))
            self.name = "mggp_svgp"
        else:
            self.register_buffer("Z_groups", torch.zeros(len(Z), dtype=torch.int64))
        M = Z.shape[0]
        self.n_inducing = M
        self.cache_budget = int(cache_budget)
        self.matmul_precision = check_matmul_precision(matmul_precision)
        self._budget_noted = False  # the "over cache_budget" note is logged once per model
        self._init_variational(M, M)
        self._config.update(
            Z=Z.tolist(),
            Z_groups=None if Z_groups is None else np.asarray(Z_groups).astype(int).tolist(),
            cache_budget=int(cache_budget),
            matmul_precision=self.matmul_precision,
        )
        self._Lzz: Tensor | None = None
        self._Lzz_key: tuple | None = None
        self._A_cache: Tensor | None = None
        self._A_cache_key: tuple | None = None
        self._A_cache_src: tuple | None = None

    # ------------------------------------------------------------------ variational factors
    def Lu(self) -> Tensor:
        """Lower-triangular ``L_u`` (L, M, M) with a positive diagonal."""
        diag = torch.exp(self.raw_Lu_diag)
        if self.diagonal_only:
            return torch.diag_embed(diag)
        return torch.tril(self.Lu_offdiag, -1) + torch.diag_embed(diag)

    def Lzz(self) -> Tensor:
        """Cholesky factor of ``K_zz`` (n_sets, M, M); computed once when hyperparameters are fixed."""
        if self.hyper_trainable:
            with self._fp32():
                return cholesky_jitter(
                    self.kernel(self.Z, self.Z, self._groups(self.Z_groups), self._groups(self.Z_groups))
                )
        key = (self.hyper_version, self.Z.device, self.Z.dtype)
        if self._Lzz is None or self._Lzz_key != key:
            with torch.no_grad(), self._fp32():
                K = self.kernel(self.Z, self.Z, self._groups(self.Z_groups), self._groups(self.Z_groups))
                self._Lzz = cholesky_jitter(K.double()).to(self.Z.dtype)
                self._Lzz_key = key
        return self._Lzz

    def _A(self, X: Tensor, g: Tensor | None) -> Tensor:
        """``A = L_zz⁻¹ K_zx`` (n_sets, M, B), in FP32 on CUDA whatever torch's global TF32 flag."""
        Lzz = self.Lzz()
        with self._fp32():
            Kzx = self.kernel(self.Z, X, self._groups(self.Z_groups), self._groups(g))
            return torch.linalg.solve_triangular(Lzz, Kzx, upper=False)

    def _fp32(self):
        """Context of the kernel and the solves: TF32 off for CUDA matmuls (nothing to do on a CPU)."""
        return cuda_tf32(False) if self.Z.is_cuda else contextlib.nullcontext()

    def _A_train(self, inp: PriorInput) -> Tensor:
        """``A`` for training cells, from the cache when it is valid and fits the budget."""
        if self.hyper_trainable or inp.X_all is None:
            return self._A(inp.X, inp.groups)
        N = inp.X_all.shape[0]
        if self.n_inducing * N * self.kernel.n_sets > self.cache_budget:
            if not self._budget_noted:
                from scanpy import logging as logg

                need = self.n_inducing * N * self.kernel.n_sets
                logg.info(
                    f"    `L_zz⁻¹K_zx` of all {N} cells ({need:.2g} numbers) exceeds "
                    f"`cache_budget={self.cache_budget:.2g}`: recomputed every step (slower); "
                    f"raise `prior_kwargs['cache_budget']` if memory allows"
                )
                self._budget_noted = True
            return self._A(inp.X, inp.groups)
        # valid for these very input tensors (identity, not address) and these hyperparameters
        g_all = inp.groups_all
        key = (self.hyper_version, self.Z.device, self.Z.dtype)
        src = self._A_cache_src
        same = src is not None and src[0] is inp.X_all and src[1] is g_all
        if self._A_cache is None or not same or self._A_cache_key != key:
            with torch.no_grad():
                parts = []
                for start in range(0, N, 8192):
                    sl = slice(start, min(start + 8192, N))
                    g = None if inp.groups_all is None else inp.groups_all[sl]
                    parts.append(self._A(inp.X_all[sl], g))
                self._A_cache = torch.cat(parts, dim=-1)
                self._A_cache_key = key
                self._A_cache_src = (inp.X_all, g_all)
        return self._A_cache[..., inp.idx]

    def invalidate_cache(self) -> None:
        """Forget ``L_zz`` and cached ``A`` (after changing hyperparameters or inducing points)."""
        self.hyperparameters_changed()

    def _drop_caches(self) -> None:
        self._Lzz = None
        self._A_cache = None
        self._A_cache_key = None
        self._A_cache_src = None

    # ------------------------------------------------------------------ prior interface
    def _marginals_from_A(self, A: Tensor, X: Tensor, g: Tensor | None) -> tuple[Tensor, Tensor]:
        # A: (n_sets, M, B), n_sets in {1, L}; the products with A run at `matmul_precision`
        prec = self.matmul_precision
        A2 = A.pow(2)
        kxx = self.kernel.diag(X, g)  # (n_sets, B)
        resid = (kxx - A2.sum(1)).clamp_min(0.0)  # (n_sets, B), FP32 in every mode
        mean = self._rows_times(self.m, A, prec)  # (L, B)
        if self.diagonal_only:
            explained = self._rows_times(torch.exp(2 * self.raw_Lu_diag), A2, prec)  # (L, B)
        else:
            AtLu = matmul(A.transpose(-1, -2), self.Lu(), prec)  # (L, B, M)
            explained = AtLu.pow(2).sum(-1)
        var = (resid + explained).clamp_min(MIN_VAR)
        mu = mean + self.beta_rows(g)
        return mu.T, var.T

    @staticmethod
    def _rows_times(w: Tensor, A: Tensor, precision: str) -> Tensor:
        """``Σ_m w[l, m] A[s, m, b]`` (L, B) for ``A`` (n_sets, M, B), ``s = 0`` or ``s = l``."""
        if A.shape[0] == 1:
            return matmul(w, A[0], precision)  # one (L, M) x (M, B) product
        return matmul(w[:, None, :], A, precision)[:, 0]  # L products (1, M) x (M, B)

    def marginals(self, inp: PriorInput) -> tuple[Tensor, Tensor]:
        """Mean and variance of ``q(F)`` at the batch's cells, each (B, L)."""
        A = self._A_train(inp)
        return self._marginals_from_A(A, inp.X, inp.groups)

    def predict(self, X: Tensor, groups: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Predictive mean and variance of ``F`` at new coordinates (and groups), each (n, L)."""
        if self.multigroup and groups is None:
            raise ValueError("The multi-group prior needs the groups of the new cells.")
        A = self._A(X, groups)
        return self._marginals_from_A(A, X, groups)

    def kl(self, inp: PriorInput | None = None) -> Tensor:
        """Σ_l KL(N(m_l, S_l) || N(0, I)) — a global term, not scaled by the batch size."""
        M = self.n_inducing
        if self.diagonal_only:
            tr = torch.exp(2 * self.raw_Lu_diag).sum(-1)
        else:
            tr = self.Lu().pow(2).sum((-1, -2))
        logdet = 2 * self.raw_Lu_diag.sum(-1)
        return 0.5 * (tr + self.m.pow(2).sum(-1) - M - logdet).sum()

    @torch.no_grad()
    def init_from_log_factors(self, log_factors: Tensor, inp: PriorInput, ridge: float = 1.0) -> None:
        """Project log-factors onto the inducing points: ``β`` = mean, ``m`` by ridge regression.

        Solves ``min_m ‖Aᵀ m − (F − β)‖² + ridge·N/M ‖m‖²`` (``A`` of all training cells, in
        batches), so the initial posterior mean approximates a non-negative factorization.
        """
        F = log_factors.to(self.m)
        Fc = self.set_means(F, inp.groups if self.multigroup else None)
        N = F.shape[0]
        M = self.n_inducing
        n_sets = self.kernel.n_sets
        AAt = torch.zeros(n_sets, M, M, dtype=torch.float64, device=self.m.device)
        AF = torch.zeros(n_sets, M, self.n_factors, dtype=torch.float64, device=self.m.device)
        for start in range(0, N, 8192):
            sl = slice(start, min(start + 8192, N))
            g = None if inp.groups is None else inp.groups[sl]
            A = self._A(inp.X[sl], g).double()  # (n_sets, M, b)
            AAt += A @ A.transpose(-1, -2)
            AF += A @ Fc[sl].double()
        reg = ridge * N / M * torch.eye(M, dtype=torch.float64, device=self.m.device)
        sol = torch.linalg.solve(AAt + reg, AF)  # (n_sets, M, L)
        if n_sets == 1:
            m = sol[0].T
        else:
            m = torch.stack([sol[k, :, k] for k in range(self.n_factors)])
        self.m.copy_(m.to(self.m))

    def _gp_info_extra(self) -> dict[str, Any]:
        return {"num_inducing": int(self.n_inducing)}
