"""Covariance functions: Matérn-3/2 and RBF, and their multi-group (MGGP) versions.

Multi-group kernel (Li, Jones, Banerjee & Engelhardt, arXiv:2110.08411): with ``d²_gg'`` the
squared distance between groups (1 between different groups by default, 0 within a group),
``ν = 1 / (α d²_gg' + 1)`` and ``p`` the spatial dimension,

- Matérn-3/2: ``r̃ = √3 ‖x − x'‖ / ℓ · √ν``, ``k = σ² (1 + r̃) e^{−r̃} ν^{(3+p)/2}``;
- RBF: ``k = σ² exp(−ν ‖x − x'‖² / (2ℓ²)) ν^{p/2}``.

Both are products of a stationary kernel rescaled by a conditionally negative definite
function of the groups and a completely monotone function of ``d²``, hence positive
semi-definite. ``α = group_diff_param``; α = 0 makes all groups one.

Hyperparameters can be shared by all factors (one kernel; ``K_zz`` and ``L_zz⁻¹ K_zx`` are then
computed once for all factors) or per factor (a leading factor dimension).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from .._constants import KERNELS, KernelName

#: bounds of learned amplitudes σ and group differences α
SIGMA_BOUNDS = (0.05, 20.0)
ALPHA_BOUNDS = (1e-3, 1e3)


def mds_embedding(group_distances: np.ndarray, *, tol: float = 1e-9) -> np.ndarray:
    """Classical MDS: points whose squared Euclidean distances approximate ``group_distances``².

    Parameters
    ----------
    group_distances
        Symmetric (G, G) matrix of non-negative distances with a zero diagonal.

    Returns
    -------
    (G, q) embedding, ``q`` the number of positive eigenvalues.
    """
    D = np.asarray(group_distances, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] != D.shape[1]:
        raise ValueError(f"`group_distances` must be square, received shape {D.shape}.")
    if not np.allclose(D, D.T) or (D < 0).any() or not np.allclose(np.diag(D), 0):
        raise ValueError("`group_distances` must be symmetric, non-negative, with a zero diagonal.")
    G = D.shape[0]
    J = np.eye(G) - 1.0 / G
    B = -0.5 * J @ (D**2) @ J
    w, V = np.linalg.eigh(B)
    keep = w > tol * max(1.0, float(np.abs(w).max()))
    if not keep.any():
        return np.zeros((G, 1))
    return V[:, keep] * np.sqrt(w[keep])[None, :]


class Kernel(nn.Module):
    """Matérn-3/2 or RBF kernel, optionally multi-group, with one or ``n_factors`` hyperparameter sets.

    Parameters
    ----------
    name
        ``"matern32"`` or ``"rbf"``.
    n_dims
        Spatial dimension ``p``.
    lengthscale, sigma
        Initial values (scalars, or one per factor).
    n_factors
        Number of hyperparameter sets when not shared.
    per_factor
        One set of hyperparameters per factor instead of one shared set.
    group_embedding
        (G, q) group coordinates whose squared distances are ``d²_gg'``; ``None`` for a
        single-group kernel.
    group_diff_param
        α of the multi-group kernel.
    train_lengthscale, train_sigma, train_group_diff_param
        Which hyperparameters are trainable.

    Every argument is required (validated values; the defaults live in
    :class:`sfact.models._config.GPConfig`).
    """

    def __init__(
        self,
        name: KernelName,
        *,
        n_dims: int,
        lengthscale: float | np.ndarray,
        sigma: float | np.ndarray,
        n_factors: int,
        per_factor: bool,
        group_embedding: np.ndarray | None,
        group_diff_param: float,
        train_lengthscale: bool,
        train_sigma: bool,
        train_group_diff_param: bool,
    ):
        super().__init__()
        if name not in KERNELS:
            raise ValueError(f"`kernel` must be one of {KERNELS}, received {name!r}.")
        self.name = name
        self.n_dims = int(n_dims)
        n_sets = int(n_factors) if per_factor else 1
        self.n_sets = n_sets
        ls = torch.as_tensor(np.broadcast_to(np.asarray(lengthscale, dtype=np.float64), (n_sets,)).copy())
        sg = torch.as_tensor(np.broadcast_to(np.asarray(sigma, dtype=np.float64), (n_sets,)).copy())
        if (ls <= 0).any() or (sg <= 0).any():
            raise ValueError("`lengthscale` and `sigma` must be positive.")
        #: (low, high) of each hyperparameter; learned values are kept inside (:meth:`clamp_`)
        self.bounds: dict[str, tuple[float, float]] = {
            "lengthscale": (1e-3, 1e4),
            "sigma": SIGMA_BOUNDS,
            "alpha": ALPHA_BOUNDS,
        }
        # log-parametrized: an Adam step changes a hyperparameter by a fraction of itself
        self.log_lengthscale = nn.Parameter(torch.log(ls).float(), requires_grad=train_lengthscale)
        self.log_sigma = nn.Parameter(torch.log(sg).float(), requires_grad=train_sigma)
        self.multigroup = group_embedding is not None
        if self.multigroup:
            if group_diff_param < 0:
                raise ValueError(f"`group_diff_param` must be >= 0, received {group_diff_param}.")
            emb = torch.as_tensor(np.asarray(group_embedding, dtype=np.float64)).float()
            self.register_buffer("group_embedding", emb)
            self.log_alpha = nn.Parameter(
                torch.full((n_sets,), math.log(max(float(group_diff_param), 1e-12))),
                requires_grad=train_group_diff_param,
            )
        else:
            self.register_buffer("group_embedding", torch.zeros(1, 1))
            self.log_alpha = nn.Parameter(torch.zeros(n_sets), requires_grad=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # models saved before 0.x stored softplus-parametrized ``raw_*`` values: convert them
        for old, new in (
            ("raw_lengthscale", "log_lengthscale"),
            ("raw_sigma", "log_sigma"),
            ("raw_alpha", "log_alpha"),
        ):
            if prefix + old in state_dict and prefix + new not in state_dict:
                raw = state_dict.pop(prefix + old)
                val = nn.functional.softplus(raw.double()).clamp_min(1e-12)
                state_dict[prefix + new] = torch.log(val).to(raw.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ hyperparameters
    @property
    def lengthscale(self) -> Tensor:
        """(n_sets,) lengthscales."""
        return torch.exp(self.log_lengthscale)

    @property
    def sigma(self) -> Tensor:
        """(n_sets,) amplitudes σ (k(x, x) = σ²)."""
        return torch.exp(self.log_sigma)

    @property
    def alpha(self) -> Tensor:
        """(n_sets,) group difference parameter α (0 without groups)."""
        if not self.multigroup:
            return torch.zeros_like(self.log_alpha)
        return torch.exp(self.log_alpha)

    def hyper_parameters(self) -> dict[str, nn.Parameter]:
        """The (log-scale) hyperparameter tensors by name (``alpha`` only for a multi-group kernel)."""
        out = {"lengthscale": self.log_lengthscale, "sigma": self.log_sigma}
        if self.multigroup:
            out["alpha"] = self.log_alpha
        return out

    @property
    def trainable(self) -> bool:
        """Whether any hyperparameter is trained (then nothing can be cached)."""
        return any(p.requires_grad for p in (self.log_lengthscale, self.log_sigma, self.log_alpha))

    def set_trainable(self, flag: bool) -> None:
        """Stop (``False``) training every hyperparameter; ``True`` is not allowed here (see the prior)."""
        for p in (self.log_lengthscale, self.log_sigma, self.log_alpha):
            p.requires_grad_(bool(flag) and p.requires_grad)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep every hyperparameter inside its :attr:`bounds` (after an optimizer step)."""
        for name, p in self.hyper_parameters().items():
            if not p.requires_grad:
                continue
            lo, hi = self.bounds[name]
            p.clamp_(math.log(lo), math.log(hi))

    @property
    def n_groups(self) -> int:
        """Number of groups of a multi-group kernel (1 otherwise)."""
        return int(self.group_embedding.shape[0]) if self.multigroup else 1

    def info(self) -> dict:
        """Hyperparameters as plain values."""
        out = {
            "kernel": self.name,
            "lengthscale": self.lengthscale.detach().cpu().double().numpy().tolist(),
            "sigma": self.sigma.detach().cpu().double().numpy().tolist(),
        }
        if self.multigroup:
            out["group_diff_param"] = self.alpha.detach().cpu().double().numpy().tolist()
        return out

    # ------------------------------------------------------------------ evaluation
    def _nu(self, g1: Tensor | None, g2: Tensor | None) -> Tensor | None:
        """(n_sets, n1, n2) ν, or None for a single-group kernel."""
        if not self.multigroup:
            return None
        if g1 is None or g2 is None:
            raise ValueError("A multi-group kernel needs the group of every point.")
        e1, e2 = self.group_embedding[g1], self.group_embedding[g2]
        d2 = torch.cdist(e1, e2).pow(2)  # (..., n1, n2)
        return 1.0 / (self.alpha.view(-1, *([1] * d2.dim())) * d2[None] + 1.0)

    def forward(self, X1: Tensor, X2: Tensor, g1: Tensor | None = None, g2: Tensor | None = None) -> Tensor:
        """Covariance matrix (n_sets, n1, n2); batched inputs (..., n, p) give (n_sets, ..., n1, n2)."""
        r = torch.cdist(X1, X2)  # (..., n1, n2)
        shape = (-1, *([1] * r.dim()))
        ls = self.lengthscale.view(shape)
        s2 = self.sigma.view(shape) ** 2
        nu = self._nu(g1, g2)
        p = self.n_dims
        if self.name == "matern32":
            rt = math.sqrt(3.0) * r[None] / ls
            if nu is not None:
                rt = rt * torch.sqrt(nu)
            K = s2 * (1.0 + rt) * torch.exp(-rt)
            if nu is not None:
                K = K * nu ** ((3.0 + p) / 2.0)
        else:
            q = r[None].pow(2) / (2.0 * ls**2)
            if nu is not None:
                K = s2 * torch.exp(-q * nu) * nu ** (p / 2.0)
            else:
                K = s2 * torch.exp(-q)
        return K

    def diag(self, X: Tensor, g: Tensor | None = None) -> Tensor:
        """``k(x, x)`` for each point: (n_sets, n) (σ², since ν = 1 within a group)."""
        return (self.sigma**2)[:, None].expand(self.n_sets, X.shape[0])
