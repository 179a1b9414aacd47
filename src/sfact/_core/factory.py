"""Building the torch objects of a model: the prior and the :class:`~sfact._core.module.FactorModule`.

Takes validated plain values (a prior config from :mod:`sfact.models._config`, already resolved
for the device) and the training inputs; holds no defaults of its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import _logging as logg
from .._constants import is_multigroup, prior_family
from .module import FactorModule
from .priors import PNMFPrior, Prior
from .registry import prior_class

__all__ = ["group_embedding", "make_module", "make_prior", "torch_dtype"]


def torch_dtype(name: str) -> torch.dtype:
    """``"float32"`` / ``"float64"`` as a torch dtype."""
    return {"float32": torch.float32, "float64": torch.float64}[name]


def group_embedding(n_groups: int, group_distances: Any) -> np.ndarray:
    """Group coordinates of the multi-group kernel: MDS of ``group_distances``, or all pairs at distance 1."""
    from .kernels import mds_embedding

    if group_distances is not None:
        Dg = np.asarray(group_distances, dtype=np.float64)
        if Dg.shape != (n_groups, n_groups):
            raise ValueError(
                f"`group_distances` must be ({n_groups}, {n_groups}) for the {n_groups} groups, "
                f"received {Dg.shape}."
            )
        return mds_embedding(Dg)
    return np.eye(n_groups) / np.sqrt(2.0)  # every pair of groups at squared distance 1


def make_prior(
    name: str,
    n_factors: int,
    cfg: Any,
    *,
    n_obs: int,
    X: Tensor | None = None,
    groups: Tensor | None = None,
    n_groups: int | None = None,
    seed: int = 0,
) -> Prior:
    """The prior ``name`` for training cells with scaled coordinates ``X`` (and group codes).

    Parameters
    ----------
    name
        A prior of :data:`sfact._constants.PRIOR_NAMES`.
    n_factors
        L.
    cfg
        The prior's config (:mod:`sfact.models._config`), resolved for the device
        (no ``None`` left for ``diagonal_only``, ``num_inducing``, ``cache_budget``).
    n_obs
        Number of cells.
    X, groups
        Scaled coordinates (N, p) and group codes (N,) of the cells (spatial priors).
    n_groups
        Number of groups G of a multi-group prior.
    seed
        Seed of the inducing points' k-means.
    """
    cls = prior_class(name)
    if cls is PNMFPrior:
        return PNMFPrior(n_factors, n_obs, init_scale=cfg.init_scale)
    from .inducing import inducing_points

    Xn = X.detach().cpu().double().numpy()
    multigroup = is_multigroup(name)
    g = groups.detach().cpu().numpy() if (multigroup and groups is not None) else None
    embedding = group_embedding(n_groups, cfg.group_distances) if multigroup else None
    kernel_kw = {
        "kernel": cfg.kernel,
        "lengthscale": cfg.lengthscale,
        "sigma": cfg.sigma,
        "group_embedding": embedding,
        "group_diff_param": cfg.group_diff_param,
        "per_factor_kernel": cfg.per_factor_kernel,
        "train_lengthscale": cfg.train_lengthscale,
        "train_sigma": cfg.train_sigma,
        "train_group_diff_param": cfg.train_group_diff_param,
        "diagonal_only": bool(cfg.diagonal_only),
    }
    if prior_family(name) == "lcgp":
        return cls(
            n_factors,
            Xn,
            g,
            n_neighbors=cfg.n_neighbors,
            nugget=cfg.nugget,
            neighbor_method=cfg.neighbor_method,
            neighbor_selection=cfg.neighbor_selection,
            order_seed=cfg.order_seed,
            **kernel_kw,
        )
    M = int(cfg.num_inducing)
    if M > n_obs:
        logg.info(f"    `num_inducing={M}` is more than the {n_obs} cells; using {n_obs}.")
        M = n_obs
    Z, Zg = inducing_points(Xn, M, groups=g, n_groups=n_groups, allocation=cfg.allocation, random_state=seed)
    return cls(n_factors, Z, Zg, cache_budget=int(cfg.cache_budget), **kernel_kw)


def make_module(prior: Prior, n_vars: int, loadings_mode: str, *, device: str, dtype: str) -> FactorModule:
    """A :class:`FactorModule` of ``prior`` and ``n_vars`` genes on ``device`` in ``dtype``."""
    module = FactorModule(prior, n_vars, loadings_mode=loadings_mode)  # type: ignore[arg-type]
    module.to(device=device, dtype=torch_dtype(dtype))
    return module
