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
    "hyper_iter",
    "hyper_lr_scale",
    "lengthscale_bounds",
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
    hyper_iter
        Train the hyperparameters during the first ``hyper_iter`` iterations only, then freeze
        them and cache what derives from them (:meth:`freeze_hyperparameters`); ``None``: for the
        whole fit (nothing is cached).
    hyper_lr_scale
        Learning-rate multiplier of the (log-scale) hyperparameters.
    lengthscale_bounds
        (low, high) bounds of a learned lengthscale.
    diagonal_only
        Diagonal variational scale (no ``Lu_offdiag``).
    sample_of_group
        The sample (tissue section) of each of the kernel's groups: every sample gets its own
        mean of the log-factors, ``β + β_s`` (``beta_sample``, S x L, trained; ``β`` is then the
        fixed global mean of the initialization), so samples do not share a parameter of the
        prior; ``None`` for one sample.
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
        hyper_iter: int | None = None,
        hyper_lr_scale: float = 1.0,
        lengthscale_bounds: tuple[float, float] = (1e-3, 1e4),
        sample_of_group: np.ndarray | list[int] | None = None,
    ):
        super().__init__(n_factors)
        #: the sample of each of the kernel's groups (several samples), or None
        self._sample_of_group = (
            None if sample_of_group is None else np.asarray(sample_of_group, dtype=np.int64)
        )
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
        self.kernel.bounds["lengthscale"] = (float(lengthscale_bounds[0]), float(lengthscale_bounds[1]))
        self.hyper_iter = None if hyper_iter is None else int(hyper_iter)
        self.hyper_lr_scale = float(hyper_lr_scale)
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
            "hyper_iter": self.hyper_iter,
            "hyper_lr_scale": self.hyper_lr_scale,
            "lengthscale_bounds": [float(lengthscale_bounds[0]), float(lengthscale_bounds[1])],
        }
        if self._sample_of_group is not None:
            self._config["sample_of_group"] = self._sample_of_group.tolist()

    def _init_variational(self, n_units: int, n_offdiag: int) -> None:
        """Register ``β`` (L,), ``m`` (L, n_units), ``raw_Lu_diag`` and, unless diagonal, ``Lu_offdiag``.

        ``Lu_offdiag`` is (L, n_units, n_offdiag); its rows have ``n_offdiag`` entries moving
        together, so its Adam steps are damped by ``1/√n_offdiag`` (see :meth:`lr_scales`).
        """
        L = self.n_factors
        self.beta = nn.Parameter(torch.zeros(L))
        if self._sample_of_group is not None:
            self.beta.requires_grad_(False)
            n_s = int(self._sample_of_group.max()) + 1
            self.beta_sample = nn.Parameter(torch.zeros(n_s, L))
            self.register_buffer("beta_index", torch.as_tensor(self._sample_of_group))
        else:
            self.beta_sample = None
        self.m = nn.Parameter(torch.zeros(L, n_units))
        self.raw_Lu_diag = nn.Parameter(torch.full((L, n_units), math.log(0.1)))
        self._offdiag_lr_scale = 1.0 / math.sqrt(n_offdiag)
        if not self.diagonal_only:
            self.Lu_offdiag = nn.Parameter(torch.zeros(L, n_units, n_offdiag))

    def beta_rows(self, groups: Tensor | None) -> Tensor:
        """The mean of the log-factors of cells of the kernel's ``groups``: (L, B), or (L, 1) for all."""
        if self.beta_sample is None or groups is None:
            return self.beta[:, None]
        return (self.beta[None, :] + self.beta_sample[self.beta_index[groups]]).T

    @torch.no_grad()
    def set_means(self, F: Tensor, groups: Tensor | None) -> Tensor:
        """Set ``β`` (and ``β_s``) to the means of log-factors ``F`` (N, L); returns ``F`` centred."""
        beta = F.mean(0)
        self.beta.copy_(beta)
        if self.beta_sample is None or groups is None:
            return F - beta
        s = self.beta_index[groups]
        for k in range(self.beta_sample.shape[0]):
            cells = s == k
            self.beta_sample[k] = (F[cells].mean(0) - beta) if bool(cells.any()) else 0.0
        return F - self.beta_rows(groups).T

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers of parameters (by name) that do not use the base rate.

        The hyperparameters have their own (``hyper_lr_scale``): they are log-scale, so a step
        changes them by a fraction of themselves.
        """
        out = {} if self.diagonal_only else {"Lu_offdiag": self._offdiag_lr_scale}
        for name in self.hyper_parameter_names():
            out[name] = self.hyper_lr_scale
        return out

    def hyper_parameter_names(self) -> list[str]:
        """Names (in this module) of the log-scale hyperparameter tensors."""
        return [f"kernel.log_{k}" for k in self.kernel.hyper_parameters()]

    @property
    def hyper_trainable(self) -> bool:
        """Whether some hyperparameter is being trained (nothing derived from them is cached)."""
        return self.kernel.trainable

    @torch.no_grad()
    def after_step(self) -> None:
        """Keep trained hyperparameters inside their bounds (called after every optimizer step)."""
        if self.hyper_trainable:
            self.kernel.clamp_()

    def hyper_phase_over(self, n_iter: int) -> bool:
        """Whether the learning phase is over after ``n_iter`` iterations (and hyperparameters still train)."""
        return self.hyper_trainable and self.hyper_iter is not None and n_iter >= self.hyper_iter

    def hyper_phase_end(self) -> int | None:
        """``hyper_iter`` when hyperparameters are (or were) trained in a phase, else ``None``."""
        if self.hyper_iter is None or not (self.hyper_trainable or getattr(self, "_phase_done", False)):
            return None
        return self.hyper_iter

    def freeze_hyperparameters(self) -> None:
        """Stop training every hyperparameter and recompute what is cached from them."""
        self.kernel.set_trainable(False)
        self._phase_done = True
        self._freeze_extra()
        self.hyperparameters_changed()

    def _freeze_extra(self) -> None:
        """Stop training prior-specific hyperparameters (subclasses)."""

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
        if self.beta_sample is not None:
            self.beta_sample.copy_(self.beta_sample[:, perm])
        self.m.copy_(self.m[perm])
        self.raw_Lu_diag.copy_(self.raw_Lu_diag[perm])
        if not self.diagonal_only:
            self.Lu_offdiag.copy_(self.Lu_offdiag[perm])
        if self.kernel.n_sets > 1:
            for p in (self.kernel.log_lengthscale, self.kernel.log_sigma, self.kernel.log_alpha):
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
