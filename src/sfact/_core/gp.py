"""Base class of the Gaussian-process priors (``svgp``, ``lcgp`` and their multi-group versions).

:class:`GPPrior` holds what they share: the kernel (:class:`~sfact._core.kernels.Kernel`), the
mean ``β``, the variational mean ``m`` and scale (``raw_Lu_diag`` and optionally
``Lu_offdiag``), permuting the factors, the constructor arguments (:meth:`config`), the kernel
summary (:meth:`gp_info`) and a counter of hyperparameter changes that keys every cache.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .kernels import Kernel
from .priors import Prior

JITTER = 1e-4


def cholesky_jitter(K: Tensor, jitter: float = JITTER, max_tries: int = 6) -> Tensor:
    """Cholesky of ``K + ε·mean(diag)·I``, growing ε tenfold until it succeeds."""
    scale = K.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)[..., None, None]
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    eps = jitter
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(K + eps * scale * eye)
        if not bool((info > 0).any()):
            return L
        eps *= 10
    raise FloatingPointError(f"K_zz is not positive definite even with jitter {eps / 10:g}.")


# the kernel options every GP prior takes (validated values, no defaults here: see
# sfact.models._config.GPConfig)
KERNEL_OPTIONS = (
    "kernel",
    "lengthscale",
    "sigma",
    "group_diff_param",
    "per_factor_kernel",
    "train_lengthscale",
    "train_sigma",
    "train_group_diff_param",
)


class GPPrior(Prior):
    """A GP prior on each log-factor: ``F_l(x) = β_l + f_l(x)``, ``f_l ~ GP(0, k)``.

    Subclasses call :meth:`_init_variational` after registering their buffers, and add their
    own entries to ``self._config``.

    Parameters
    ----------
    n_factors
        Number of factors L.
    n_dims
        Spatial dimension p.
    kernel
        ``"matern32"`` or ``"rbf"``.
    lengthscale, sigma
        Kernel hyperparameters (scalar, or one per factor with ``per_factor_kernel``).
    group_embedding
        (G, q) group coordinates of the multi-group kernel; ``None`` for a single group.
    group_diff_param
        α of the multi-group kernel.
    per_factor_kernel
        One set of hyperparameters per factor.
    train_lengthscale, train_sigma, train_group_diff_param
        Which hyperparameters are trained.
    diagonal_only
        Diagonal variational scale (no ``Lu_offdiag``).
    """

    spatial = True

    def __init__(
        self,
        n_factors: int,
        *,
        n_dims: int,
        kernel: str,
        lengthscale: float | list[float] | np.ndarray,
        sigma: float | list[float] | np.ndarray,
        group_embedding: np.ndarray | None,
        group_diff_param: float,
        per_factor_kernel: bool,
        train_lengthscale: bool,
        train_sigma: bool,
        train_group_diff_param: bool,
        diagonal_only: bool,
    ):
        super().__init__(n_factors)
        self.multigroup = group_embedding is not None
        self.kernel = Kernel(
            kernel,  # type: ignore[arg-type]
            n_dims=n_dims,
            lengthscale=np.asarray(lengthscale),
            sigma=np.asarray(sigma),
            n_factors=n_factors,
            per_factor=per_factor_kernel,
            group_embedding=group_embedding,
            group_diff_param=group_diff_param,
            train_lengthscale=train_lengthscale,
            train_sigma=train_sigma,
            train_group_diff_param=train_group_diff_param,
        )
        self.diagonal_only = bool(diagonal_only)
        #: bumped whenever the hyperparameters (or the stored training inputs) change; every
        #: cache of a GP prior is keyed on it
        self.hyper_version = 0
        self._config: dict[str, Any] = {
            "n_factors": int(n_factors),
            "kernel": kernel,
            "lengthscale": np.asarray(lengthscale, dtype=float).tolist(),
            "sigma": np.asarray(sigma, dtype=float).tolist(),
            "group_embedding": None if group_embedding is None else np.asarray(group_embedding).tolist(),
            "group_diff_param": float(group_diff_param),
            "per_factor_kernel": bool(per_factor_kernel),
            "train_lengthscale": bool(train_lengthscale),
            "train_sigma": bool(train_sigma),
            "train_group_diff_param": bool(train_group_diff_param),
            "diagonal_only": bool(diagonal_only),
        }

    def _init_variational(self, n_units: int, n_offdiag: int) -> None:
        """Register ``β`` (L,), ``m`` (L, n_units), ``raw_Lu_diag`` and, unless diagonal, ``Lu_offdiag``.

        ``Lu_offdiag`` is (L, n_units, n_offdiag); its rows have ``n_offdiag`` entries moving
        together, so its Adam steps are damped by ``1/√n_offdiag`` (see :meth:`lr_scales`).
        """
        L = self.n_factors
        self.beta = nn.Parameter(torch.zeros(L))
        self.m = nn.Parameter(torch.zeros(L, n_units))
        self.raw_Lu_diag = nn.Parameter(torch.full((L, n_units), math.log(0.1)))
        self._offdiag_lr_scale = 1.0 / math.sqrt(n_offdiag)
        if not self.diagonal_only:
            self.Lu_offdiag = nn.Parameter(torch.zeros(L, n_units, n_offdiag))

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers of parameters (by name) that do not use the base rate."""
        return {} if self.diagonal_only else {"Lu_offdiag": self._offdiag_lr_scale}

    def _groups(self, g: Tensor | None) -> Tensor | None:
        return g if self.multigroup else None

    # ------------------------------------------------------------------ caches
    def hyperparameters_changed(self) -> None:
        """Record that hyperparameters (or stored inputs) changed: every cache is recomputed."""
        self.hyper_version += 1
        self._drop_caches()

    def _drop_caches(self) -> None:
        """Free cached tensors (subclasses); the counter alone already makes them stale."""

    def _apply(self, fn, recurse: bool = True):  # moving devices/dtypes invalidates the caches
        self._drop_caches()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):  # loaded values: new hyperparameters
        super()._load_from_state_dict(*args, **kwargs)
        self.hyperparameters_changed()

    # ------------------------------------------------------------------ bookkeeping
    @torch.no_grad()
    def reorder(self, perm: Tensor) -> None:
        """Permute the factors (variational parameters, per-factor kernels and what derives from them)."""
        self.beta.copy_(self.beta[perm])
        self.m.copy_(self.m[perm])
        self.raw_Lu_diag.copy_(self.raw_Lu_diag[perm])
        if not self.diagonal_only:
            self.Lu_offdiag.copy_(self.Lu_offdiag[perm])
        if self.kernel.n_sets > 1:
            for p in (self.kernel.raw_lengthscale, self.kernel.raw_sigma, self.kernel.raw_alpha):
                p.copy_(p[perm])
            self._reorder_kernel_sets(perm)
            self.hyperparameters_changed()

    def _reorder_kernel_sets(self, perm: Tensor) -> None:
        """Permute what is stored per kernel set (subclasses), after the kernel's own parameters."""

    def gp_info(self) -> dict[str, Any]:
        """Kernel hyperparameters, inducing-point count, ``diagonal_only`` and prior name as plain values."""
        return {
            **self.kernel.info(),
            **self._gp_info_extra(),
            "diagonal_only": self.diagonal_only,
            "prior": self.name,
        }

    def _gp_info_extra(self) -> dict[str, Any]:
        return {}

    def config(self) -> dict[str, Any]:
        """Constructor arguments as plain values (current hyperparameters)."""
        cfg = dict(self._config)
        cfg["lengthscale"] = self.kernel.lengthscale.detach().cpu().double().numpy().tolist()
        cfg["sigma"] = self.kernel.sigma.detach().cpu().double().numpy().tolist()
        if self.multigroup:
            cfg["group_diff_param"] = float(self.kernel.alpha.detach().cpu().double().mean())
        if not cfg["per_factor_kernel"]:
            cfg["lengthscale"], cfg["sigma"] = cfg["lengthscale"][0], cfg["sigma"][0]
        return cfg
