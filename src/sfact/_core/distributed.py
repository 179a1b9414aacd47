"""Data-parallel training of one model over the processes of a :mod:`torch.distributed` group.

Every process holds the whole model and the whole data set, and draws the same batches in the
same order (the same generator, checked and made identical at the start). A step's batch of
``B`` cells is cut into contiguous shares, one per process (the first ``B mod P`` processes get
one cell more, so process 0 always has one); each process computes the ELBO terms of its share:

- the expected log-likelihood and, for priors with parameters per cell (``pnmf``, ``lcgp``),
  the KL of the share's cells are scaled to the full data set with the size of the **whole**
  batch, ``N / B`` (the module scales a share by ``N / b``; the share multiplies by ``b / B``);
- the KL of a prior with global parameters (``svgp``) is counted once, on process 0.

The gradients are summed over the processes before the optimizer's step, and so are the
statistics of the multiplicative update of the loadings (numerator D x L, denominator, and with
gene offsets the per-sample statistics S x L, already scaled by ``N / B``), so every process takes
the identical step and the parameters stay identical. The per-step log-likelihood and KL
(summed over the processes) go into the history, so every process records the same ELBO and stops
at the same iteration. Per-cell parameters get a zero gradient on the processes that do not hold
the cells, so the sum is the gradient of the whole batch.

The result equals the single-process fit with the same seed up to the order of float summation.
With the sampled ELBO modes (``expanded``, ``simple``) each process draws its Monte-Carlo noise
from its own generator (the shared one must stay in step for the batches), so the fit is a valid
one but not the single-process one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .module import ElboTerms

if TYPE_CHECKING:
    from collections.abc import Callable

    from .data import CountBatch, SparseCounts
    from .module import FactorModule

__all__ = ["DataParallel", "share_bounds"]


def share_bounds(n: int, n_procs: int, rank: int) -> tuple[int, int]:
    """``[lo, hi)`` of process ``rank``'s contiguous share of ``n`` items cut into ``n_procs`` shares.

    The first ``n mod n_procs`` processes get one item more, so process 0 has one whenever ``n >= 1``.

    Examples
    --------
    >>> [share_bounds(5, 2, r) for r in range(2)]
    [(0, 3), (3, 5)]
    >>> [share_bounds(1, 2, r) for r in range(2)]
    [(0, 1), (1, 1)]
    """
    q, r = divmod(int(n), int(n_procs))
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)


class DataParallel:
    """What :func:`sfact._core.train.train_loop` does differently in one process of data-parallel training.

    ``None`` in its place means a single process, whose results do not change at all. Made in
    every process of an initialized :mod:`torch.distributed` group (see the module's docstring).

    Parameters
    ----------
    group
        The process group; the default group when ``None``.

    Raises
    ------
    RuntimeError
        If :mod:`torch.distributed` is not available or its default group is not initialized.
    """

    def __init__(self, group=None):
        import torch.distributed as dist

        if not dist.is_available():
            raise RuntimeError(
                "Data-parallel training (`distributed=True`) needs torch.distributed, which this torch "
                "build lacks; train in one process (`distributed=False`)."
            )
        if not dist.is_initialized():
            raise RuntimeError(
                "`distributed=True` trains in the processes of a torch.distributed group, and none is "
                "initialized: call `torch.distributed.init_process_group(...)` in every process first "
                "(e.g. started by `torchrun`), or use `sfact.models.train_distributed`, which starts them."
            )
        self._dist = dist
        self.group = group
        self.rank = int(dist.get_rank(group))
        self.world_size = int(dist.get_world_size(group))
        self.backend = str(dist.get_backend(group))
        self._shards: dict[int, tuple[CountBatch, CountBatch]] = {}
        self._noise: torch.Generator | None = None
        self._empty = False  # whether this process had no cells in the current step's batch
        self._pattern: tuple[bool, ...] | None = None  # which parameters get a gradient

    # -- collectives ---------------------------------------------------------------------------

    def _all_reduce(self, t: Tensor) -> Tensor:
        self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM, group=self.group)
        return t

    def min_over_processes(self, value: float, device: torch.device | str) -> float:
        """The smallest of every process's ``value`` (e.g. free memory, so all choose alike)."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=device)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MIN, group=self.group)
        return float(t.item())

    def sum_statistics(self, tensors: list[Tensor]) -> list[Tensor]:
        """The sums over the processes of ``tensors`` (one collective per dtype), same shapes."""
        out: list[Tensor | None] = [None] * len(tensors)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        for ids in by_dtype.values():
            flat = self._all_reduce(torch.cat([tensors[i].reshape(-1) for i in ids]))
            for i, part in zip(ids, flat.split([tensors[i].numel() for i in ids]), strict=True):
                out[i] = part.view(tensors[i].shape)
        return out  # type: ignore[return-value]

    def sum_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Replace every parameter's gradient by its sum over the processes (one collective per dtype).

        Which parameters have a gradient is the same on every process with cells in the batch (the
        same graph); a process without cells in it (a batch smaller than the number of processes)
        uses the pattern of its last step with cells and counts zeros. A parameter without a gradient
        keeps none after the sum (Adam skips it, as in a single process). Nothing is read back to the
        host.
        """
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self._empty:  # (parameters frozen since that step have none)
            last = self._pattern or (True,) * len(params)
            pattern = tuple(had and p.requires_grad for had, p in zip(last, params, strict=True))
        else:
            pattern = self._pattern = tuple(p.grad is not None for p in params)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(params):
            by_dtype.setdefault(p.dtype, []).append(i)
        for ids in by_dtype.values():
            parts = [
                params[i].grad.reshape(-1)
                if params[i].grad is not None
                else torch.zeros_like(params[i]).reshape(-1)
                for i in ids
            ]
            flat = self._all_reduce(torch.cat(parts))
            for i, g in zip(ids, flat.split([params[i].numel() for i in ids]), strict=True):
                params[i].grad = g.view(params[i].shape) if pattern[i] else None

    # -- the batch -----------------------------------------------------------------------------

    def shard(self, batch: CountBatch, counts: SparseCounts) -> tuple[CountBatch, Tensor]:
        """The share of ``batch`` of this process, and its cell indices.

        The shares of the fixed blocks of a training call (all genes) are built once, with their CSR
        structures; those of gene-subsampled batches at every step.
        """
        key = id(batch)
        cached = self._shards.get(key)
        if cached is not None and cached[0] is batch:
            return cached[1], cached[1].idx
        lo, hi = share_bounds(batch.idx.numel(), self.world_size, self.rank)
        idx = batch.idx[lo:hi]
        if batch.genes is None:
            part = counts.batch(idx).with_csr(counts.n_vars)
            self._shards[key] = (batch, part)
        else:
            part = counts.batch(idx, batch.genes)
        return part, idx

    def elbo(self, module: FactorModule, n_batch: int) -> Callable[..., ElboTerms]:
        """:meth:`FactorModule.elbo` for this process's share of a batch of ``n_batch`` cells.

        The returned terms' ``elbo`` is this process's part of the objective (its gradient summed
        over the processes is the whole batch's); ``loglik`` and ``kl`` are the whole batch's (summed
        over the processes, detached, float64), for the history. When the objective is not finite on
        any process, ``elbo`` is NaN on all of them, so all stop together.
        """

        def elbo(inp, s: Tensor, batch: CountBatch, **kwargs) -> ElboTerms:
            mode = kwargs.get("mode", "lower-bound")
            if mode != "lower-bound":
                kwargs["generator"] = self._noise_generator(kwargs.get("generator"))
            kl_weight = float(kwargs.get("kl_weight", 1.0))
            b = int(inp.idx.numel())
            self._empty = b == 0
            W = module.loadings()
            if b == 0:  # a batch with fewer cells than processes: nothing to compute here
                zero = torch.zeros((), dtype=W.dtype, device=W.device, requires_grad=True)
                empty = W.new_zeros((0, module.n_factors))
                num = torch.zeros_like(W) if mode == "lower-bound" else None
                ll = kl = part = zero
                mu, var = empty, empty
            else:
                terms = module.elbo(inp, s, batch, **kwargs)
                share = b / n_batch
                ll = terms.loglik * share
                if module.prior.per_cell:
                    kl = terms.kl * share
                else:
                    # counted once; x 0 elsewhere keeps the graph (same parameters with gradients)
                    kl = terms.kl if self.rank == 0 else terms.kl * 0.0
                part = ll - kl_weight * kl
                mu, var, num = terms.mu, terms.var, terms.mm_numerator
            total = self._all_reduce(torch.stack([ll.detach(), kl.detach()]).to(torch.float64))
            # + 0 where every process's terms are finite, NaN where one is not (no host sync)
            guard = total.sum()
            part = part + (guard - guard).to(part.dtype)
            return ElboTerms(elbo=part, loglik=total[0], kl=total[1], mu=mu, var=var, mm_numerator=num)

        return elbo

    def _noise_generator(self, shared: torch.Generator | None) -> torch.Generator:
        """The own generator of this process for Monte-Carlo noise (the shared one draws the batches)."""
        if self._noise is None:
            device = "cpu" if shared is None else shared.device
            seed = 0 if shared is None else shared.initial_seed()
            self._noise = torch.Generator(device=device).manual_seed(
                (seed * 1_000_003 + 7_919 * (self.rank + 1)) % (2**63 - 1)
            )
        return self._noise

    # -- the start -----------------------------------------------------------------------------

    def start(
        self, module: FactorModule, data, cfg, *, optimizer, generator: torch.Generator, n_iter: int
    ) -> None:
        """Check that the processes train the same problem, then give them process 0's state.

        The data's shape and count total, the training options and the parameters' shapes must agree
        (else a :class:`ValueError` on every process, before any step could wait forever on another);
        the module's parameters and buffers, the optimizer's state and the generator's state are then
        broadcast from process 0, so rounding differences of the set-up cannot make the processes
        drift apart.
        """
        device = data.counts.device
        if self.backend == "nccl" and device.type != "cuda":
            raise ValueError(
                f"The NCCL backend needs the model on a GPU, and it is on {device}: pass "
                "`device='cuda:<local rank>'` to the model, or use the gloo backend on the CPU."
            )
        state = module.state_dict()
        checks = {
            "number of cells": data.n_obs,
            "number of genes": data.n_vars,
            "number of non-zero counts": data.counts.nnz,
            "sum of the counts": float(data.counts.values.double().sum()),
            "batch_size": -1 if cfg.batch_size is None else cfg.batch_size,
            "y_batch_size": -1 if cfg.y_batch_size is None else cfg.y_batch_size,
            "max_iter": cfg.max_iter,
            "min_iter": cfg.min_iter,
            "tol": cfg.tol,
            "learning_rate": cfg.learning_rate,
            "kl_weight": cfg.kl_weight,
            "n_samples": cfg.n_samples,
            "iterations already trained": n_iter,
            "model's parameters and buffers": sum(t.numel() for t in state.values()) + len(state),
        }
        values = torch.tensor(list(checks.values()), dtype=torch.float64, device=device)
        both = torch.cat([values, -values])
        self._dist.all_reduce(both, op=self._dist.ReduceOp.MAX, group=self.group)
        n = values.numel()
        differ = [
            name
            for name, hi, lo in zip(checks, both[:n].tolist(), both[n:].tolist(), strict=True)
            if hi != -lo
        ]
        if differ:
            raise ValueError(
                f"The {self.world_size} processes of data-parallel training differ in: {', '.join(differ)}. "
                "Every process must build the same model (same options and an integer `random_state`) "
                "on the same data and call `train` with the same options."
            )
        with torch.no_grad():
            tensors = list(state.values())
            for st in optimizer.state.values():
                tensors += [v for v in st.values() if isinstance(v, Tensor)]
            for t in tensors:
                self._broadcast_into(t, device)
        gen_state = generator.get_state().to(device)
        self._dist.broadcast(gen_state, src=0, group=self.group)
        generator.set_state(gen_state.cpu())

    def _broadcast_into(self, t: Tensor, device: torch.device) -> None:
        """Overwrite ``t`` with process 0's values (through ``device``, the one the backend talks to)."""
        buf = t.detach()
        inplace = buf.device == device and buf.dtype != torch.bool and buf.is_contiguous()
        if not inplace:
            buf = buf.to(
                device=device, dtype=torch.uint8 if buf.dtype == torch.bool else buf.dtype
            ).contiguous()
        self._dist.broadcast(buf, src=0, group=self.group)
        if not inplace:
            t.copy_(buf.to(device=t.device, dtype=t.dtype))
