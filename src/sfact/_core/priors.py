"""Priors on the log-factors ``F`` (N x L) and their variational posteriors.

Every prior answers two questions for a mini-batch of cells: the marginals
``q(F_nl) = N(mu_nl, var_nl)`` and its KL contribution to the ELBO, already scaled to the full
data set. The likelihood engine (:mod:`sfact._core.module`) needs nothing else, so spatial
priors are added as priors and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

MIN_VAR = 1e-8


@dataclass
class PriorInput:
    """What a prior sees of a mini-batch."""

    idx: Tensor  # (B,) indices of the cells in the training data
    n_total: int  # N, the number of training cells
    X: Tensor | None = None  # (B, p) scaled coordinates
    groups: Tensor | None = None  # (B,) group codes
    X_all: Tensor | None = None  # (N, p) coordinates of all training cells (for caches)
    groups_all: Tensor | None = None  # (N,) groups of all training cells


class Prior(nn.Module):
    """Base class of the priors."""

    name: str = ""
    spatial: bool = False
    per_cell: bool = False  # has free variational parameters per training cell

    def __init__(self, n_factors: int):
        super().__init__()
        self.n_factors = int(n_factors)

    def marginals(self, inp: PriorInput) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """Mean and variance of ``q(F)`` for the batch, each (B, L)."""
        raise NotImplementedError

    def kl(self, inp: PriorInput) -> Tensor:  # pragma: no cover - abstract
        """KL(q || p) contribution of the batch, scaled to the full data set."""
        raise NotImplementedError

    def reorder(self, perm: Tensor) -> None:  # pragma: no cover - abstract
        """Permute the factors in place (``perm[k]`` is the old index of new factor k)."""
        raise NotImplementedError

    def init_from_log_factors(self, log_factors: Tensor, inp: PriorInput) -> None:  # pragma: no cover
        """Initialize the posterior so its means approximate ``log_factors`` (N, L)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Plain-valued constructor arguments (saved as JSON)."""
        return {"n_factors": self.n_factors}

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers of parameters (by name) that do not use the base rate."""
        return {}

    def after_step(self) -> None:
        """Called after every optimizer step (GP priors keep learned hyperparameters in bounds)."""

    def hyper_phase_over(self, n_iter: int) -> bool:
        """Whether hyperparameters still train but their learning phase is over after ``n_iter`` iterations."""
        return False

    def freeze_hyperparameters(self) -> None:
        """Stop training the hyperparameters (nothing to do without them)."""

    def hyper_phase_end(self) -> int | None:
        """Iteration at which the hyperparameters' learning phase ends; ``None``: no phase."""
        return None


class PNMFPrior(Prior):
    """``F_nl ~ N(0, 1)`` independently; ``q`` has a free mean and scale per cell and factor.

    No spatial information: this is probabilistic (Poisson) NMF on the log scale.
    """

    name = "pnmf"
    per_cell = True

    def __init__(self, n_factors: int, n_obs: int, *, init_scale: float):
        super().__init__(n_factors)
        self.n_obs = int(n_obs)
        self.init_scale = float(init_scale)
        self.mu = nn.Parameter(torch.zeros(n_obs, n_factors))
        self.log_sigma = nn.Parameter(torch.full((n_obs, n_factors), math.log(init_scale)))

    def marginals(self, inp: PriorInput) -> tuple[Tensor, Tensor]:
        """Mean and variance of ``q(F)`` for the batch."""
        mu = self.mu[inp.idx]
        var = torch.exp(2 * self.log_sigma[inp.idx]).clamp_min(MIN_VAR)
        return mu, var

    def kl(self, inp: PriorInput) -> Tensor:
        """Σ KL(N(μ, σ²) || N(0, 1)) over the batch, scaled by N/B."""
        mu = self.mu[inp.idx]
        ls = self.log_sigma[inp.idx]
        kl = 0.5 * (torch.exp(2 * ls) + mu**2 - 1.0) - ls
        return kl.sum() * (inp.n_total / inp.idx.numel())

    @torch.no_grad()
    def reorder(self, perm: Tensor) -> None:
        """Permute the factors in place."""
        self.mu.copy_(self.mu[:, perm])
        self.log_sigma.copy_(self.log_sigma[:, perm])

    @torch.no_grad()
    def init_from_log_factors(self, log_factors: Tensor, inp: PriorInput) -> None:
        """Set the means to ``log_factors``."""
        self.mu.copy_(log_factors.to(self.mu))

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {"n_factors": self.n_factors, "n_obs": self.n_obs, "init_scale": self.init_scale}
