"""The training loop: Adam on the variational parameters, multiplicative (or projected) loadings.

One *iteration* is one pass over the training cells (one epoch of ``ceil(N / batch_size)``
steps); the ELBO recorded per iteration is the mean of its steps' unbiased estimates,
divided by ``N·D`` (per matrix entry) and accumulated in float64, so convergence checks are
not fooled by float32 resolution.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .._constants import ELBO_MODES
from .._exceptions import TrainingError
from .data import SparseCounts
from .module import FactorModule
from .priors import PriorInput


@dataclass
class TrainData:
    """Training data on the device."""

    counts: SparseCounts
    s: Tensor  # (N,) size factors
    X: Tensor | None = None  # (N, p) scaled coordinates
    groups: Tensor | None = None  # (N,) group codes

    @property
    def n_obs(self) -> int:
        """Number of cells N."""
        return self.counts.n_obs

    @property
    def n_vars(self) -> int:
        """Number of genes D."""
        return self.counts.n_vars

    def prior_input(self, idx: Tensor) -> PriorInput:
        """The prior's view of the cells ``idx``."""
        return PriorInput(
            idx=idx,
            n_total=self.n_obs,
            X=None if self.X is None else self.X[idx],
            groups=None if self.groups is None else self.groups[idx],
            X_all=self.X,
            groups_all=self.groups,
        )


@dataclass
class TrainConfig:
    """Settings of one call to :func:`train_loop`."""

    max_iter: int = 1000
    tol: float = 1e-5
    learning_rate: float = 0.05
    batch_size: int | None = None
    y_batch_size: int | None = None
    elbo_mode: str = "lower-bound"
    n_samples: int = 4
    kl_weight: float = 1.0
    window: int = 5
    min_iter: int = 20


@dataclass
class History:
    """Per-iteration record (appended across calls, so training continues where it stopped)."""

    elbo: list[float] = field(default_factory=list)  # per matrix entry
    loglik: list[float] = field(default_factory=list)  # per matrix entry
    kl: list[float] = field(default_factory=list)  # per matrix entry
    time: list[float] = field(default_factory=list)  # cumulative seconds

    def as_dict(self) -> dict[str, np.ndarray]:
        """Plain arrays (for AnnData ``uns`` and JSON)."""
        return {k: np.asarray(v, dtype=np.float64) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> History:
        """Inverse of :meth:`as_dict`."""
        return cls(**{k: [float(x) for x in d.get(k, [])] for k in ("elbo", "loglik", "kl", "time")})

    def __len__(self) -> int:
        return len(self.elbo)


def relative_change(values: list[float], window: int) -> float:
    """Per-iteration relative change between the means of the last two windows."""
    if len(values) < 2 * window:
        return math.inf
    old = float(np.mean(values[-2 * window : -window]))
    new = float(np.mean(values[-window:]))
    return abs(new - old) / max(abs(old), 1e-300) / window


def make_optimizer(module: FactorModule, learning_rate: float) -> torch.optim.Optimizer:
    """Adam over every trainable parameter (the loadings too in ``projected`` mode).

    One parameter group per learning-rate multiplier (:meth:`FactorModule.param_groups`), in
    ascending order, each recording its ``lr_scale``.
    """
    return torch.optim.Adam(
        [{"params": ps, "lr": learning_rate * k, "lr_scale": k} for k, ps in module.param_groups()],
        lr=learning_rate,
    )


def train_loop(
    module: FactorModule,
    data: TrainData,
    cfg: TrainConfig,
    *,
    optimizer: torch.optim.Optimizer,
    history: History,
    generator: torch.Generator,
    progress_bar: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> dict:
    """Train ``module`` on ``data`` until convergence or ``cfg.max_iter`` iterations.

    Returns
    -------
    ``{"converged": bool, "n_iter": int}`` for this call.

    Raises
    ------
    TrainingError
        On a non-finite loss, naming the iteration; parameters are left at their last finite values.
    """
    if cfg.elbo_mode not in ELBO_MODES:
        raise ValueError(f"`elbo_mode` must be one of {ELBO_MODES}, received {cfg.elbo_mode!r}.")
    for group in optimizer.param_groups:
        group["lr"] = cfg.learning_rate * group.get("lr_scale", 1.0)
    N, D = data.n_obs, data.n_vars
    dev = data.counts.device
    B = N if cfg.batch_size is None else min(int(cfg.batch_size), N)
    By = D if cfg.y_batch_size is None else min(int(cfg.y_batch_size), D)
    n_steps = math.ceil(N / B)
    rho = 1.0 if B >= N else max(B / N, 0.1)
    gene_scale = D / By
    all_idx = torch.arange(N, device=dev)
    n_entries = float(N) * float(D)
    t_start = time.perf_counter()
    t_offset = history.time[-1] if history.time else 0.0
    first_iter = len(history)
    converged = False
    from .._logging import progress_bar as make_bar

    # in a log (not a terminal or notebook) the bar writes a few lines, not one per redraw
    bar = make_bar(range(cfg.max_iter), desc=f"training {module.prior.name}", disable=not progress_bar)
    it = -1
    # fixed random blocks of cells with precomputed CSR structures (all genes per step)
    blocks = data.counts.blocks(B, generator) if By >= D else None
    for it in bar:
        if module.prior.hyper_phase_over(len(history)):
            # end of the hyperparameters' learning phase: freeze them, cache what derives from them
            module.prior.freeze_hyperparameters()
        if blocks is not None:
            block_order = (
                torch.randperm(len(blocks), generator=generator).tolist() if len(blocks) > 1 else [0]
            )
        else:
            perm = all_idx if B >= N else torch.randperm(N, generator=generator).to(dev)
        acc = torch.zeros(3, dtype=torch.float64, device=dev)
        for step in range(n_steps):
            if blocks is not None:
                batch = blocks[block_order[step]]
                idx = batch.idx
            else:
                idx = perm[step * B : (step + 1) * B]
                genes = torch.randperm(D, generator=generator)[:By].to(dev)
                batch = data.counts.batch(None if B >= N else idx, genes)
            inp = data.prior_input(idx)
            s_b = data.s[idx]
            terms = module.elbo(
                inp,
                s_b,
                batch,
                mode=cfg.elbo_mode,  # type: ignore[arg-type]
                n_samples=cfg.n_samples,
                generator=generator,
                gene_scale=gene_scale,
                kl_weight=cfg.kl_weight,
            )
            loss = -terms.elbo / n_entries
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"The ELBO became non-finite at iteration {first_iter + it + 1} (step {step + 1} of "
                    f"{n_steps}); the model keeps its parameters from before this step. Try a smaller "
                    "`learning_rate`."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            module.prior.after_step()
            if module.loadings_mode == "projected":
                module.floor_loadings()
            elif module.loadings_mode == "multiplicative":
                try:
                    module.multiplicative_update(
                        terms.mu.detach(),
                        terms.var.detach(),
                        s_b,
                        batch,
                        rho=rho,
                        scale=N / idx.numel(),
                        numerator=terms.mm_numerator,
                    )
                except FloatingPointError as err:
                    raise TrainingError(
                        f"Non-finite loadings at iteration {first_iter + it + 1}; the loadings keep their "
                        "last finite values."
                    ) from err
            ll, kl = terms.loglik.detach(), terms.kl.detach()
            acc += torch.stack([ll - kl, ll, kl]).to(torch.float64)
        vals = (acc / n_steps / n_entries).cpu().numpy()
        history.elbo.append(float(vals[0]))
        history.loglik.append(float(vals[1]))
        history.kl.append(float(vals[2]))
        history.time.append(t_offset + time.perf_counter() - t_start)
        if progress_bar:
            bar.set_postfix(elbo=f"{vals[0]:.5g}", refresh=False)
        if callback is not None:
            callback(first_iter + it + 1, float(vals[0]))
        # not converged while hyperparameters are still in their learning phase, nor in the
        # iterations right after it (the ELBO moves when they freeze)
        hyper_end = module.prior.hyper_phase_end()
        settled = hyper_end is None or len(history) >= hyper_end + 2 * cfg.window
        if it + 1 >= cfg.min_iter and settled and relative_change(history.elbo, cfg.window) < cfg.tol:
            converged = True
            break
    bar.close()
    return {"converged": converged, "n_iter": it + 1}
