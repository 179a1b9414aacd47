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
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .._constants import ELBO_MODES
from .._exceptions import TrainingError
from .data import SparseCounts
from .module import FactorModule
from .priors import PriorInput

if TYPE_CHECKING:
    from .distributed import DataParallel


@dataclass
class TrainData:
    """Training data on the device."""

    counts: SparseCounts
    s: Tensor  # (N,) size factors
    X: Tensor | None = None  # (N, p) scaled coordinates
    groups: Tensor | None = None  # (N,) group codes
    sample: Tensor | None = None  # (N,) sample codes (models with gene offsets)

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


#: relative changes over which :func:`estimate_iterations_left` fits the trend
TREND_SPAN = 10


def estimate_iterations_left(changes: list[float], tol: float, *, at_least: int = 0) -> float | None:
    """Iterations until the relative ELBO change falls below ``tol``, from its recent trend.

    The relative change (:func:`relative_change`, one value per iteration) shrinks roughly
    geometrically as a fit converges: a straight line fitted to its logarithm over the last
    ``TREND_SPAN`` iterations is extended down to ``log(tol)``. ``None`` when there is no trend to
    extend: too few values yet, a change that is not shrinking (a plateau) or whose shrinking is lost
    in its scatter (noise from mini-batches), or ``tol`` 0. At least ``at_least`` (iterations before convergence may be declared).

    Examples
    --------
    >>> changes = [1e-2 * 0.5**i for i in range(12)]  # halves every iteration
    >>> round(estimate_iterations_left(changes, tol=changes[-1] / 8))
    3
    """
    recent = np.asarray(changes[-TREND_SPAN:], dtype=np.float64)
    if tol <= 0 or recent.size < TREND_SPAN or not np.all(np.isfinite(recent)):
        return None
    if recent[-1] < tol:
        return float(max(at_least, 0))
    y = np.log(np.maximum(recent, 1e-300))
    x = np.arange(recent.size, dtype=np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    noise = float(np.std(y - (intercept + slope * x)))
    # a trend: shrinking by 0.01 % per iteration at least, and by more than the scatter around it
    if not (slope < -1e-4 and -slope * (recent.size - 1) > 2 * noise):
        return None
    now = min(float(intercept + slope * x[-1]), float(y[-1]))  # the trend's value now, or the last one
    return float(max(at_least, (now - math.log(tol)) / -slope, 1.0))


def seconds_per_iteration(times: list[float], span: int = TREND_SPAN) -> float | None:
    """Mean seconds per iteration over the last ``span`` iterations (cumulative ``times``)."""
    if len(times) < 2:
        return times[0] if times else None
    recent = times[-(span + 1) :]
    return (recent[-1] - recent[0]) / (len(recent) - 1)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_text(
    elbo: float,
    change: float,
    tol: float,
    left: float | None,
    max_left: int,
    per_iteration: float | None,
) -> str:
    """The training bar's postfix: ELBO, relative change against ``tol``, time left (or ``?``).

    The time left is the iterations left to convergence (:func:`estimate_iterations_left`) at the
    recent pace; when that goes past ``max_iter``, the time to ``max_iter``, marked as such; ``?``
    while there is no trend to go by (the bar never counts down to ``max_iter`` as if it were the
    end).

    Examples
    --------
    >>> progress_text(-1.23456, 3.2e-4, 1e-4, 12.0, 900, 0.5)
    'elbo=-1.2346, change=3.2e-04 (tol 1e-04), ~6s left'
    >>> progress_text(-1.23456, 3.2e-4, 1e-4, None, 900, 0.5)
    'elbo=-1.2346, change=3.2e-04 (tol 1e-04), time left ?'
    """
    tol_text = f"{tol:.0e}" if tol > 0 else "0"
    text = f"elbo={elbo:.5g}, "
    text += (
        f"change={change:.1e} (tol {tol_text})" if math.isfinite(change) else "change=? (too few iterations)"
    )
    if left is None or per_iteration is None:
        return text + ", time left ?"
    if left > max_left:
        return text + f", ~{_duration(max_left * per_iteration)} to max_iter"
    return text + f", ~{_duration(left * per_iteration)} left"


def _closing(bar, n: int):
    """``range(n)`` that closes ``bar`` when the loop over it ends, also by an exception or Ctrl-C.

    (An open sfact bar would make the next bars nest in it: see :func:`sfact._logging.progress_bar`.)
    """
    try:
        yield from range(n)
    finally:
        bar.close()


def device_generator(generator: torch.Generator, device: torch.device | str) -> torch.Generator:
    """``generator`` itself when it is on ``device``, else a generator there, seeded from it.

    The step loop draws its random numbers (permutations of cells and genes, samples of ``q``)
    where the data are, so no step copies them from the host; on the CPU (the data's device and
    the generator's) nothing changes: the same stream, bit for bit.
    """
    device = torch.device(device)
    if generator.device.type == device.type and (
        device.type == "cpu" or device.index is None or generator.device.index == device.index
    ):
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed)


class _LastFinite:
    """What an iteration changes, copied at its start: restored if the iteration is not finite.

    The trainable parameters, the module's own buffers (loadings, their running statistics, gene
    offsets) and the optimizer's state. Device-to-device copies, no sync; about 3x the trainable
    parameters in memory (Adam keeps two moments per parameter).
    """

    def __init__(self, module: FactorModule, optimizer: torch.optim.Optimizer):
        tensors = {id(p): p for p in module.parameters() if p.requires_grad}
        tensors.update({id(b): b for _, b in module.named_buffers(recurse=False)})
        with torch.no_grad():
            self.tensors = [(t, t.detach().clone()) for t in tensors.values()]
            self.optimizer_state = {
                p: {k: v.clone() if isinstance(v, Tensor) else v for k, v in st.items()}
                for p, st in optimizer.state.items()
            }

    @torch.no_grad()
    def all_finite(self) -> Tensor:
        """Whether the current values are all finite (a boolean tensor on the device)."""
        return torch.stack([torch.isfinite(t).all() for t, _ in self.tensors]).all()

    @torch.no_grad()
    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        """Put the values copied at the start back, into the same tensors."""
        for t, saved in self.tensors:
            t.copy_(saved)
        for p in list(optimizer.state):
            if p not in self.optimizer_state:
                del optimizer.state[p]
        for p, st in self.optimizer_state.items():
            optimizer.state[p] = st


def _first_bad(first: Tensor, finite: Tensor, step: int) -> Tensor:
    """The first step (of this iteration) whose ``finite`` flag was false; on the device."""
    return torch.where(finite, first, first.clamp(max=step))


def _finiteness(bad_elbo: Tensor, bad_loadings: Tensor, last_finite: _LastFinite) -> Tensor:
    """The iteration's flags (float64, on the device): first bad ELBO step, loadings step, parameters."""
    flags = torch.stack([bad_elbo, bad_loadings, (~last_finite.all_finite()).to(torch.int64)])
    return flags.to(torch.float64)


def _raise_if_not_finite(
    flags: np.ndarray,
    n_steps: int,
    iteration: int,
    last_finite: _LastFinite,
    optimizer: torch.optim.Optimizer,
    cause: BaseException | None = None,
) -> None:
    """Undo the iteration and raise :class:`TrainingError` if ``flags`` (:func:`_finiteness`) say so."""
    bad_elbo, bad_loadings, bad_params = flags
    if bad_elbo >= n_steps and bad_loadings >= n_steps and bad_params == 0:
        return
    last_finite.restore(optimizer)
    where = f"iteration {iteration}"
    if bad_elbo < n_steps and bad_elbo <= bad_loadings:
        what = f"The ELBO became non-finite at {where} (step {int(bad_elbo) + 1} of {n_steps})"
    elif bad_loadings < n_steps:
        what = f"The loadings became non-finite at {where} (step {int(bad_loadings) + 1} of {n_steps})"
    else:
        what = f"The parameters became non-finite at {where}"
    raise TrainingError(
        f"{what}; the model keeps its parameters from before this iteration. Try a smaller `learning_rate`."
    ) from cause


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
    parallel: DataParallel | None = None,
) -> dict:
    """Train ``module`` on ``data`` until convergence or ``cfg.max_iter`` iterations.

    ``parallel``: this process's part in data-parallel training (:mod:`sfact._core.distributed`:
    every process computes its share of each batch, gradients and loadings statistics are summed);
    ``None``: one process.

    Returns
    -------
    ``{"converged": bool, "n_iter": int}`` for this call.

    Raises
    ------
    TrainingError
        On a non-finite ELBO, loadings or parameters, naming the iteration; the model and the
        optimizer are put back as they were before that iteration (the end of the last finite
        one).

    Notes
    -----
    No step waits for the device: the ELBO terms and the finiteness of the ELBO, the loadings and
    the parameters are accumulated on the device and fetched once per iteration, after its last
    step (so a non-finite iteration is detected at its end, and undone). With ``y_batch_size``
    (genes subsampled per step) the size of each step's batch depends on the data, which costs a
    sync per step on a GPU.
    """
    if cfg.elbo_mode not in ELBO_MODES:
        raise ValueError(f"`elbo_mode` must be one of {ELBO_MODES}, received {cfg.elbo_mode!r}.")
    for group in optimizer.param_groups:
        group["lr"] = cfg.learning_rate * group.get("lr_scale", 1.0)
    if parallel is not None:  # the same problem and start (generator included) on every process
        parallel.start(module, data, cfg, optimizer=optimizer, generator=generator, n_iter=len(history))
    N, D = data.n_obs, data.n_vars
    dev = data.counts.device
    dgen = device_generator(generator, dev)  # the step loop's random numbers, drawn on the device
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
    from .._logging import log_thread_setup
    from .._logging import progress_bar as make_bar

    log_thread_setup()

    # no total: the fit ends at convergence, usually long before max_iter; the bar's postfix shows
    # the ELBO, its relative change against tol and the time left estimated from that change. In a
    # log (not a terminal or notebook) the bar writes a few lines, not one per redraw
    bar = make_bar(desc=f"training {module.prior.name}", disable=not progress_bar, total=None, unit="it")
    changes: list[float] = []  # the relative change after each iteration of this call
    it = -1
    # fixed random blocks of cells with precomputed CSR structures (all genes per step)
    blocks = data.counts.blocks(B, generator) if By >= D else None
    for it in _closing(bar, cfg.max_iter):
        if module.prior.hyper_phase_over(len(history)):
            # end of the hyperparameters' learning phase: freeze them, cache what derives from them
            module.prior.freeze_hyperparameters()
        if blocks is not None:
            # a host-side list (drawn on the host's generator: no device involved)
            block_order = (
                torch.randperm(len(blocks), generator=generator).tolist() if len(blocks) > 1 else [0]
            )
        else:
            perm = all_idx if B >= N else torch.randperm(N, generator=dgen, device=dev)
        last_finite = _LastFinite(module, optimizer)
        acc = torch.zeros(3, dtype=torch.float64, device=dev)
        # the first step with a non-finite ELBO / loadings (n_steps: none), kept on the device
        bad_elbo = torch.full((), n_steps, dtype=torch.int64, device=dev)
        bad_loadings = bad_elbo.clone()
        for step in range(n_steps):
            if blocks is not None:
                batch = blocks[block_order[step]]
                idx = batch.idx
            else:
                idx = perm[step * B : (step + 1) * B]
                genes = torch.randperm(D, generator=dgen, device=dev)[:By]
                batch = data.counts.batch(None if B >= N else idx, genes)
            n_b = idx.numel()  # cells in the batch (in data-parallel training: in all shares)
            if parallel is not None:
                batch, idx = parallel.shard(batch, data.counts)
            inp = data.prior_input(idx)
            s_b = data.s[idx]
            smp = None if data.sample is None else data.sample[idx]
            elbo = module.elbo if parallel is None else parallel.elbo(module, n_b)
            try:
                terms = elbo(
                    inp,
                    s_b,
                    batch,
                    mode=cfg.elbo_mode,  # type: ignore[arg-type]
                    n_samples=cfg.n_samples,
                    generator=dgen,
                    gene_scale=gene_scale,
                    kl_weight=cfg.kl_weight,
                    sample=smp,
                )
            except FloatingPointError as err:  # e.g. K_zz of non-finite hyperparameters
                flags = _finiteness(bad_elbo, bad_loadings, last_finite).cpu().numpy()
                _raise_if_not_finite(flags, n_steps, first_iter + it + 1, last_finite, optimizer, err)
                raise
            loss = -terms.elbo / n_entries
            bad_elbo = _first_bad(bad_elbo, torch.isfinite(loss.detach()), step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if parallel is not None:
                parallel.sum_gradients(optimizer)
            optimizer.step()
            module.prior.after_step()
            if module.loadings_mode == "projected":
                module.floor_loadings()
                if module.has_gene_offsets:
                    finite = module.update_gene_offsets(
                        terms.mu.detach(),
                        terms.var.detach(),
                        s_b,
                        smp,
                        rho=rho,
                        scale=N / n_b,
                        genes=batch.genes,
                        reduce=None if parallel is None else parallel.sum_statistics,
                        check_finite=False,
                    )
                    bad_loadings = _first_bad(bad_loadings, finite, step)
            elif module.loadings_mode == "multiplicative":
                finite = module.multiplicative_update(
                    terms.mu.detach(),
                    terms.var.detach(),
                    s_b,
                    batch,
                    rho=rho,
                    scale=N / n_b,
                    numerator=terms.mm_numerator,
                    sample=smp,
                    reduce=None if parallel is None else parallel.sum_statistics,
                    check_finite=False,
                )
                bad_loadings = _first_bad(bad_loadings, finite, step)
            ll, kl = terms.loglik.detach(), terms.kl.detach()
            acc += torch.stack([ll - kl, ll, kl]).to(torch.float64)
        # the iteration's one transfer: its ELBO terms, and whether everything stayed finite
        flags = _finiteness(bad_elbo, bad_loadings, last_finite)
        fetched = torch.cat([acc / n_steps / n_entries, flags]).cpu().numpy()
        vals = fetched[:3]
        _raise_if_not_finite(fetched[3:], n_steps, first_iter + it + 1, last_finite, optimizer)
        history.elbo.append(float(vals[0]))
        history.loglik.append(float(vals[1]))
        history.kl.append(float(vals[2]))
        history.time.append(t_offset + time.perf_counter() - t_start)
        change = relative_change(history.elbo, cfg.window)
        changes.append(change)
        # not converged while hyperparameters are still in their learning phase, nor in the
        # iterations right after it (the ELBO moves when they freeze)
        hyper_end = module.prior.hyper_phase_end()
        settled = hyper_end is None or len(history) >= hyper_end + 2 * cfg.window
        converged = it + 1 >= cfg.min_iter and settled and change < cfg.tol
        if progress_bar:
            # convergence is not checked before min_iter, nor before the hyperparameters settle
            wait = 0 if hyper_end is None else hyper_end + 2 * cfg.window - len(history)
            left = estimate_iterations_left(changes, cfg.tol, at_least=max(cfg.min_iter - it - 1, wait))
            text = progress_text(
                float(vals[0]),
                change,
                cfg.tol,
                left,
                cfg.max_iter - it - 1,
                seconds_per_iteration(history.time),
            )
            bar.set_postfix_str(text, refresh=False)
            bar.update()
        if callback is not None:
            callback(first_iter + it + 1, float(vals[0]))
        if converged:
            break
    bar.close()
    last = changes[-1] if changes else math.inf
    left = None if converged else estimate_iterations_left(changes, cfg.tol)
    return {"converged": converged, "n_iter": it + 1, "change": last, "iterations_left": left}
