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

__all__ = ["coordinate_spacing", "group_embedding", "make_module", "make_prior", "torch_dtype"]


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


def coordinate_spacing(X: np.ndarray, max_cells: int = 5000, seed: int = 0) -> dict[str, float]:
    """Median distances from a cell to its nearest and 10th nearest other cell (``nn1``, ``nn10``).

    Zero distances (cells sharing coordinates) are skipped; at most ``max_cells`` query cells
    (a seeded subsample) against all cells. Both are 1 with fewer than 2 cells.
    """
    from scipy.spatial import cKDTree

    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    if n < 2:
        return {"nn1": 1.0, "nn10": 1.0}
    q = X if n <= max_cells else X[np.random.default_rng(seed).choice(n, max_cells, replace=False)]
    k = min(n, 11)
    d, _ = cKDTree(X).query(q, k=k)
    d = np.asarray(d).reshape(len(q), k)[:, 1:]
    first = np.where(d > 0, d, np.inf).min(1)  # nearest cell at a positive distance
    first = first[np.isfinite(first)]
    nn1 = float(np.median(first)) if first.size else 1.0
    nn10 = float(np.median(d[:, -1])) if np.any(d[:, -1] > 0) else nn1
    return {"nn1": nn1, "nn10": max(nn10, nn1)}


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
    embedding: np.ndarray | None = None,
    sample_of_group: np.ndarray | None = None,
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
        Number of groups G of a multi-group prior (or of the kernel's groups with ``embedding``).
    seed
        Seed of the inducing points' k-means.
    embedding
        (n_groups, q) coordinates of the kernel's groups, given when they are not those of a
        multi-group prior (several samples: see :meth:`sfact.models.ModelSetup.kernel_embedding`);
        the prior then uses the multi-group kernel whatever its name.
    sample_of_group
        The sample of each of the kernel's groups (several samples): a mean per sample.
    """
    cls = prior_class(name)
    if cls is PNMFPrior:
        return PNMFPrior(n_factors, n_obs, init_scale=cfg.init_scale)
    from .inducing import inducing_points

    Xn = X.detach().cpu().double().numpy()
    multigroup = is_multigroup(name) or embedding is not None
    g = groups.detach().cpu().numpy() if (multigroup and groups is not None) else None
    if embedding is None and multigroup:
        embedding = group_embedding(n_groups, cfg.group_distances)
    spacing = coordinate_spacing(Xn)
    extent = float(np.ptp(Xn, axis=0).max()) if len(Xn) > 1 else 1.0
    lo_mult, hi_mult = cfg.LENGTHSCALE_BOUNDS
    ls_bounds = (lo_mult * spacing["nn1"], hi_mult * max(extent, spacing["nn1"]))
    lengthscale = cfg.lengthscale
    if lengthscale is None or isinstance(lengthscale, str):  # not resolved by a search
        lengthscale = float(np.clip(cfg.LENGTHSCALE_NN_MULTIPLE * spacing["nn10"], *ls_bounds))
    kernel_kw = {
        "kernel": cfg.kernel,
        "lengthscale": lengthscale,
        "sigma": cfg.SIGMA_START if cfg.sigma is None else cfg.sigma,
        "group_embedding": embedding,
        "group_diff_param": cfg.GROUP_DIFF_START if cfg.group_diff_param is None else cfg.group_diff_param,
        "per_factor_kernel": cfg.per_factor_kernel,
        "train_lengthscale": cfg._trained("lengthscale"),
        "train_sigma": cfg._trained("sigma"),
        # α: a multi-group prior's, or (several samples) the one that scales their distance
        "train_group_diff_param": multigroup and cfg._trained("group_diff_param"),
        "diagonal_only": bool(cfg.diagonal_only),
        "hyper_iter": cfg.hyper_iter,
        "hyper_lr_scale": cfg.hyper_lr_scale,
        "lengthscale_bounds": ls_bounds,
        "sample_of_group": sample_of_group,
    }
    if prior_family(name) == "lcgp":
        prior = cls(
            n_factors,
            Xn,
            g,
            n_neighbors=cfg.n_neighbors,
            nugget=cfg.NUGGET_START if cfg.nugget is None else cfg.nugget,
            train_nugget=cfg._trained("nugget"),
            neighbor_method=cfg.neighbor_method,
            neighbor_selection=cfg.neighbor_selection,
            order_seed=cfg.order_seed,
            **kernel_kw,
        )
        prior.name = name  # the multi-group kernel of several samples keeps the prior's name
        return prior
    M = int(cfg.num_inducing)
    if M > n_obs:
        logg.info(f"    `num_inducing={M}` is more than the {n_obs} cells; using {n_obs}.")
        M = n_obs
    Z, Zg = inducing_points(Xn, M, groups=g, n_groups=n_groups, allocation=cfg.allocation, random_state=seed)
    prior = cls(
        n_factors,
        Z,
        Zg,
        cache_budget=int(cfg.cache_budget),
        matmul_precision=cfg.matmul_precision,
        **kernel_kw,
    )
    prior.name = name
    return prior


def make_module(prior: Prior, n_vars: int, loadings_mode: str, *, device: str, dtype: str) -> FactorModule:
    """A :class:`FactorModule` of ``prior`` and ``n_vars`` genes on ``device`` in ``dtype``."""
    module = FactorModule(prior, n_vars, loadings_mode=loadings_mode)  # type: ignore[arg-type]
    module.to(device=device, dtype=torch_dtype(dtype))
    return module
