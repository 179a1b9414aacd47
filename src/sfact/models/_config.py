"""Typed configurations of the priors (validated from ``prior_kwargs``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

KernelName = Literal["matern32", "rbf"]
Allocation = Literal["proportional", "equal", "derived"]


@dataclass
class PNMFConfig:
    """Options of the ``pnmf`` prior (independent standard-normal log-factors).

    Attributes
    ----------
    init_scale
        Initial posterior standard deviation of the log-factors.
    """

    init_scale: float = 0.1


@dataclass
class SVGPConfig:
    """Options of the ``svgp`` and ``mggp_svgp`` priors.

    Attributes
    ----------
    num_inducing
        Number of inducing points M; ``None`` picks what the device affords (1000 on CPU,
        3000 on GPU), capped by the number of cells.
    kernel
        ``"matern32"`` or ``"rbf"``.
    lengthscale
        Kernel lengthscale in scaled units (coordinates span 100 units along the longer side
        after :func:`sfact.pp.prepare`); one value, or one per factor with ``per_factor_kernel``.
    sigma
        Kernel amplitude (prior standard deviation of the log-factors around their mean).
    group_diff_param
        α of the multi-group kernel: 0 makes all groups one; large values make them independent.
    group_distances
        Optional (G, G) distances between groups, embedded by classical MDS; all pairs of
        different groups are at distance 1 when ``None``.
    allocation
        How inducing points are split over groups: ``"proportional"``, ``"equal"``, ``"derived"``.
    per_factor_kernel
        One set of kernel hyperparameters per factor (slower: no sharing of ``L_zz⁻¹K_zx``).
    train_lengthscale, train_sigma, train_group_diff_param
        Learn these hyperparameters (``K_zz`` is then refactorized every step).
    diagonal_only
        Diagonal (whitened) variational covariance ``S``: O(B·M·L) per step instead of
        O(B·M²·L). ``None`` (default) uses it on the CPU and a full ``S`` on a GPU.
    cache_budget
        Cache ``L_zz⁻¹K_zx`` of all training cells when M·N is at most this many numbers.
    """

    num_inducing: int | None = None
    kernel: KernelName = "matern32"
    lengthscale: float | list[float] = 5.0
    sigma: float | list[float] = 1.0
    group_diff_param: float = 1.0
    group_distances: Any = None
    allocation: Allocation = "proportional"
    per_factor_kernel: bool = False
    train_lengthscale: bool = False
    train_sigma: bool = False
    train_group_diff_param: bool = False
    diagonal_only: bool | None = None
    cache_budget: int = 50_000_000
    extra: dict = field(default_factory=dict, repr=False)


CONFIGS = {
    "pnmf": PNMFConfig,
    "svgp": SVGPConfig,
    "mggp_svgp": SVGPConfig,
}


def make_config(prior: str, kwargs: dict[str, Any] | None) -> Any:
    """Validate ``kwargs`` into the prior's config; unknown keys raise a ``TypeError`` naming them."""
    cls = CONFIGS.get(prior)
    if cls is None:
        return None
    kwargs = dict(kwargs or {})
    names = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(
            f"Unknown option(s) {unknown} for the {prior!r} prior; valid options: {sorted(names)}."
        )
    cfg = cls(**kwargs)
    if isinstance(cfg, SVGPConfig):
        if cfg.num_inducing is not None and int(cfg.num_inducing) < 1:
            raise ValueError(f"`num_inducing` must be positive, received {cfg.num_inducing}.")
        if np.any(np.asarray(cfg.lengthscale, dtype=float) <= 0) or np.any(
            np.asarray(cfg.sigma, dtype=float) <= 0
        ):
            raise ValueError("`lengthscale` and `sigma` must be positive.")
        if cfg.kernel not in ("matern32", "rbf"):
            raise ValueError(f"`kernel` must be 'matern32' or 'rbf', received {cfg.kernel!r}.")
        if cfg.allocation not in ("proportional", "equal", "derived"):
            raise ValueError(
                f"`allocation` must be 'proportional', 'equal' or 'derived', received {cfg.allocation!r}."
            )
        if cfg.group_diff_param < 0:
            raise ValueError(f"`group_diff_param` must be >= 0, received {cfg.group_diff_param}.")
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-valued dict of a config (for JSON)."""
    if cfg is None:
        return {}
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name == "extra":
            continue
        v = getattr(cfg, f.name)
        if isinstance(v, np.ndarray):
            v = v.tolist()
        out[f.name] = v
    return out
