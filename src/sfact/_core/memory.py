"""Training defaults chosen from the device's memory: batch size, inducing points, ``S``, cache budget.

:func:`available_memory` reports what the device has free; :func:`estimate_peak` is an explicit
model of the peak memory of a training step; :func:`device_defaults` fills the options the user left
``None`` so that the estimate stays within a safety fraction of the free memory. Data that fit
comfortably get exactly the plain defaults (:data:`PLAIN_CPU`, :data:`PLAIN_GPU`); only a problem
whose plain defaults would not fit gets smaller batches, a smaller (or larger) cache budget, fewer
inducing points. Everything here is plain arithmetic except :func:`available_memory`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "CACHE_SHARE",
    "MIN_BATCH",
    "MIN_INDUCING",
    "PLAIN_CPU",
    "PLAIN_GPU",
    "SAFETY",
    "DeviceDefaults",
    "available_memory",
    "device_defaults",
    "estimate_peak",
]

PriorFamily = Literal["pnmf", "svgp", "lcgp"]

#: the defaults of a problem that fits (today's fixed numbers): inducing points, diagonal ``S``,
#: cache budget of ``L_zz⁻¹K_zx`` in numbers (5·10⁷ float32 = 200 MB; 5·10⁸ = 2 GB)
PLAIN_CPU: dict[str, Any] = {"num_inducing": 1000, "diagonal_only": True, "cache_budget": 50_000_000}
PLAIN_GPU: dict[str, Any] = {"num_inducing": 3000, "diagonal_only": False, "cache_budget": 500_000_000}
#: share of the free memory the estimated peak may use (the rest: the estimate's error, the
#: allocator's fragmentation, other processes)
SAFETY: dict[str, float] = {"cpu": 0.5, "gpu": 0.7}
#: with memory short, the cache of ``L_zz⁻¹K_zx`` may take this share of the budget
CACHE_SHARE = 0.5
#: the smallest batch and number of inducing points the memory choice goes down to
MIN_BATCH = 1000
MIN_INDUCING = 250
#: Parameter copies held during a step: the value, its gradient, Adam's two moments, the
#: iteration's copy of the value and of the moments (undoes a non-finite iteration)
PARAM_COPIES = 7
#: working copies of ``A = L_zz⁻¹K_zx`` (s, M, B) per step: gathered from the cache, recomputed
#: (kernel temporaries), recomputed with learned hyperparameters (kept for the backward pass)
A_COPIES = {"cached": 4, "computed": 6, "learned": 12}
#: working copies of ``Aᵀ L_u`` (L, B, M) per step with a full ``S`` (forward and backward)
FULL_S_COPIES = 3
#: the LCGP's sparse quadratic form works in chunks of this many numbers (x 8 working copies)
LCGP_CHUNK = 4_000_000
#: the LCGP caches its KL's column grouping (int16) when N (K+1)² is at most this
LCGP_SLOT_CACHE = 50_000_000

_GIB = 2.0**30


def available_memory(device: str) -> int:
    """Bytes of memory free for training on ``device``.

    Parameters
    ----------
    device
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns
    -------
    On a GPU, the driver's free memory (:func:`torch.cuda.mem_get_info`) plus what torch's
    allocator holds unused; on the CPU, the system's available memory (``MemAvailable`` of
    ``/proc/meminfo``, else free pages from :func:`os.sysconf`), capped by a cgroup (container)
    limit when one is set.
    """
    if str(device).startswith("cuda"):
        import torch

        dev = torch.device(device)
        free, _total = torch.cuda.mem_get_info(dev)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return int(free + max(cached, 0))
    avail = _meminfo_available()
    limit = _cgroup_free()
    return int(avail if limit is None else min(avail, limit))


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return 8 * 2**30  # unknown: assume a small workstation


def _cgroup_free() -> int | None:
    """Limit minus usage of this process's memory cgroup (v2, then v1); ``None`` without a limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file) as fh:
                text = fh.read().strip()
            if text == "max":
                return None
            limit = int(text)
            with open(usage_file) as fh:
                usage = int(fh.read().strip())
        except (OSError, ValueError):
            continue
        if limit >= 2**60:  # v1's "no limit"
            return None
        return max(limit - usage, 0)
    return None


def estimate_peak(
    *,
    n_obs: int,
    n_vars: int,
    n_factors: int,
    nnz: int,
    prior: PriorFamily,
    batch_size: int | None,
    num_inducing: int = 0,
    diagonal_only: bool = True,
    cached: bool = False,
    n_sets: int = 1,
    n_neighbors: int = 50,
    n_dims: int = 2,
    itemsize: int = 4,
    learned_hyper: bool = False,
    sampled: int = 0,
) -> int:
    r"""Estimated peak bytes of training (data, parameters and one step) on the device.

    With N cells, D genes, L factors, ``nnz`` non-zero counts, a batch of B cells (all cells when
    ``batch_size`` is ``None``) holding :math:`z = \mathrm{nnz}\,B/N` non-zeros, M inducing
    points, s kernel sets (1, or L with ``per_factor_kernel``), K neighbours (LCGP), p coordinate
    dimensions and f bytes per number (4 in float32):

    .. math::

        \text{peak} = \text{data} + \text{parameters} + \text{buffers}
                      + \max(2\,\text{cache},\ \text{cache} + \text{step}(B))

    - data: :math:`(24 + f)\,\mathrm{nnz} + (56 + p f)\,N` (the counts as CSR, their transpose
      order, per-cell vectors), plus :math:`(24 + f)\,\mathrm{nnz} + 16 N + 8 D (N/B + 1)`
      for the fixed batches when :math:`B < N`;
    - parameters: :data:`PARAM_COPIES` x f x (the loadings' :math:`4 D L` plus the prior's:
      :math:`2NL` for ``pnmf``, :math:`LM(2 + M)` for ``svgp`` with a full ``S``, :math:`2LM`
      with a diagonal one, :math:`LN(2 + K)` / :math:`2LN` for ``lcgp``);
    - buffers: :math:`24\,s M^2` (``K_zz`` and its Cholesky factor in float64) for ``svgp``;
      :math:`N(8p + 24 + 8K(1 + s) + 8s)` (conditioning sets and conditionals) for ``lcgp``, plus
      :math:`2N(K+1)^2` for its cached column grouping (full posterior, when it is cached);
    - cache (``svgp``, when ``cached``): :math:`s M N f` for ``A = L_zz⁻¹K_zx`` of every cell,
      twice while it is built;
    - step: the likelihood's :math:`(16 + 4f)\,z + 12 f B L` (plus :math:`3 E z L f` with ``sampled``
      = E draws of the sampled ELBO modes); for ``svgp``
      :math:`c_A\, s M B f` with :math:`c_A` from :data:`A_COPIES` (4 gathered from the cache,
      6 recomputed, 12 with learned hyperparameters), plus :math:`3 L M B f` for ``Aᵀ L_u`` with
      a full ``S``; for ``lcgp`` :math:`3 L K B f`, plus with the full posterior
      :math:`2 N K L f` (the transposed off-diagonal and its gradient) and :math:`8 f` x
      :data:`LCGP_CHUNK`.

    The constants were checked against the peak RSS growth of CPU fits of 20,000-100,000 cells
    (``svgp``, ``lcgp``, ``pnmf``; 0.8-1.1x the measured growth above 0.5 GiB) and the peak GPU
    memory of ``benchmarks/gpu_check.py`` on an H200 (``svgp`` 0.93-1.11x; ``lcgp`` with the full
    posterior 1.46x); the safety fraction of :func:`device_defaults` covers the rest.
    """
    N, D, L = int(n_obs), int(n_vars), int(n_factors)
    B = N if batch_size is None else max(1, min(int(batch_size), N))
    f = int(itemsize)
    M, s, K, p = int(num_inducing), int(n_sets), int(min(n_neighbors, max(N - 1, 1))), int(n_dims)
    z = nnz * B / max(N, 1)
    data = (24 + f) * nnz + (56 + p * f) * N
    if B < N:
        data += (24 + f) * nnz + 16 * N + 8 * D * (N / B + 1)
    n_params = 4 * D * L
    buffers = 0.0
    cache = 0.0
    step = (16 + 4 * f) * z + 12 * f * B * L
    if sampled:  # the sampled ELBO modes: log-rates of every draw at every non-zero
        step += 3 * int(sampled) * z * L * f
    if prior == "pnmf":
        n_params += 2 * N * L
    elif prior == "svgp":
        n_params += L * M * (2 if diagonal_only else 2 + M)
        buffers += 24 * s * M * M
        if cached and not learned_hyper:
            cache = s * M * N * f
            c_a = A_COPIES["cached"]
        else:
            c_a = A_COPIES["learned" if learned_hyper else "computed"]
        step += c_a * s * M * B * f
        if not diagonal_only:
            step += FULL_S_COPIES * L * M * B * f
    elif prior == "lcgp":
        n_params += L * N * (2 if diagonal_only else 2 + K)
        buffers += N * (8 * p + 24 + 8 * K * (1 + s) + 8 * s)
        step += 3 * L * K * B * f
        if not diagonal_only:
            step += 2 * N * K * L * f + 8 * f * LCGP_CHUNK
            if N * (K + 1) ** 2 <= LCGP_SLOT_CACHE:
                buffers += 2 * N * (K + 1) ** 2
    else:
        raise ValueError(f"`prior` must be 'pnmf', 'svgp' or 'lcgp', received {prior!r}.")
    params = PARAM_COPIES * f * n_params
    return int(data + params + buffers + max(2 * cache, cache + step))


@dataclass(frozen=True)
class DeviceDefaults:
    """The options :func:`device_defaults` chose, and why.

    Attributes
    ----------
    num_inducing
        Inducing points M (``svgp``); 0 for the other priors.
    diagonal_only
        Diagonal ``S`` (or mean-field LCGP posterior).
    cache_budget
        Largest ``L_zz⁻¹K_zx`` cached, in numbers (``svgp``).
    batch_size
        Cells per step; ``None``: all cells.
    memory_bytes, budget_bytes, estimated_peak_bytes
        The free memory, the part of it the fit may use, the estimate at the chosen options.
    reduced
        Whether the options differ from the plain defaults (the plain ones did not fit).
    reasons
        What was changed, in words (empty when nothing was).
    """

    num_inducing: int
    diagonal_only: bool
    cache_budget: int
    batch_size: int | None
    memory_bytes: int
    budget_bytes: int
    estimated_peak_bytes: int
    reduced: bool = False
    reasons: tuple[str, ...] = field(default_factory=tuple)

    def summary(self) -> str:
        """One line: the chosen options, the estimate and the budget, and why."""
        parts = [f"batch_size={'all cells' if self.batch_size is None else f'{self.batch_size:,}'}"]
        if self.num_inducing:
            parts += [
                f"num_inducing={self.num_inducing}",
                f"diagonal_only={self.diagonal_only}",
                f"cache_budget={self.cache_budget:.3g}",
            ]
        why = "; ".join(self.reasons)
        return (
            f"{', '.join(parts)} (estimated peak {self.estimated_peak_bytes / _GIB:.2f} GiB of a "
            f"{self.budget_bytes / _GIB:.2f} GiB budget, {self.memory_bytes / _GIB:.2f} GiB free"
            + (f"; {why})" if why else ")")
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values (for ``train_info``; ``batch_size`` 0 stands for all cells)."""
        return {
            "num_inducing": int(self.num_inducing),
            "diagonal_only": bool(self.diagonal_only),
            "cache_budget": int(self.cache_budget),
            "batch_size": 0 if self.batch_size is None else int(self.batch_size),
            "free_memory_gib": round(self.memory_bytes / _GIB, 3),
            "budget_gib": round(self.budget_bytes / _GIB, 3),
            "estimated_peak_gib": round(self.estimated_peak_bytes / _GIB, 3),
            "reasons": "; ".join(self.reasons),
        }


def _round_down(n: int) -> int:
    """``n`` rounded down to two significant digits (137,482 -> 130,000)."""
    if n < 100:
        return max(int(n), 1)
    step = 10 ** (len(str(int(n))) - 2)
    return int(n) // step * step


def device_defaults(
    memory_bytes: int,
    *,
    is_gpu: bool,
    n_obs: int,
    n_vars: int,
    n_factors: int,
    nnz: int,
    prior: PriorFamily = "svgp",
    n_sets: int = 1,
    n_neighbors: int = 50,
    n_dims: int = 2,
    itemsize: int = 4,
    learned_hyper: bool = False,
    sampled: int = 0,
    num_inducing: int | None = None,
    diagonal_only: bool | None = None,
    cache_budget: int | None = None,
    batch_size: int | None = None,
) -> DeviceDefaults:
    r"""Fill the options left ``None`` so that the estimated peak fits the device's memory.

    The budget is :data:`SAFETY` (0.5 on the CPU, 0.7 on a GPU) times ``memory_bytes``; the
    estimate is :func:`estimate_peak`. Options given (not ``None``) are kept as they are.

    1. The plain defaults (:data:`PLAIN_CPU`: M = 1000, diagonal ``S``, cache budget 5·10⁷;
       :data:`PLAIN_GPU`: M = 3000, full ``S``, 5·10⁸; all cells per step) are used when their
       estimate fits the budget: every data set of the size of osmFISH or a Visium section gets
       exactly these.
    2. Otherwise (``reduced``), in this order and only for options left ``None``:

       - the cache budget of ``L_zz⁻¹K_zx`` becomes :data:`CACHE_SHARE` of the budget (in
         numbers of ``itemsize`` bytes: the cache is then used when :math:`sMN` fits in it);
       - the batch is the largest B with ``estimate_peak(B)`` within the budget, rounded down to
         two significant digits; all cells when they fit;
       - if that is under :data:`MIN_BATCH` cells: no cache (budget 0), then on a GPU a diagonal
         ``S``, then M halved down to :data:`MIN_INDUCING`, until it is not;
       - if nothing fits, the smallest options (``MIN_BATCH`` cells, ``MIN_INDUCING`` points, no
         cache), with the reason saying so (:func:`device_defaults` does not raise: the estimate is
         conservative, and the fit may still run).

    Parameters
    ----------
    memory_bytes
        Free memory of the device (:func:`available_memory`).
    is_gpu
        Whether the device is a GPU (plain defaults and safety fraction).
    n_obs, n_vars, n_factors, nnz
        Cells N, genes D, factors L and non-zero counts.
    prior
        ``"pnmf"``, ``"svgp"`` or ``"lcgp"`` (the family: ``mggp_*`` are the same here).
    n_sets
        Kernel sets s: 1, or L with ``per_factor_kernel``.
    n_neighbors, n_dims, itemsize, learned_hyper, sampled
        LCGP neighbours K, coordinate dimensions, bytes per number, hyperparameters learned,
        draws of a sampled ELBO mode (0 for the default lower bound).
    num_inducing, diagonal_only, cache_budget, batch_size
        The user's values; ``None`` is filled. ``batch_size=None`` may stay ``None`` (all cells).

    Returns
    -------
    The chosen options (``num_inducing`` and ``cache_budget`` are 0 for priors without them).

    Examples
    --------
    >>> d = device_defaults(16 * 2**30, is_gpu=False, n_obs=5000, n_vars=33, n_factors=10, nnz=150_000)
    >>> d.num_inducing, d.diagonal_only, d.cache_budget, d.batch_size, d.reduced
    (1000, True, 50000000, None, False)
    >>> d = device_defaults(
    ...     24 * 2**30, is_gpu=False, n_obs=10**6, n_vars=500, n_factors=10, nnz=10**7
    ... )
    >>> d.reduced, d.batch_size < 10**6, d.estimated_peak_bytes <= d.budget_bytes
    (True, True, True)
    """
    N = int(n_obs)
    if N < 1:
        raise ValueError(f"`n_obs` must be positive, received {n_obs}.")
    plain = PLAIN_GPU if is_gpu else PLAIN_CPU
    svgp = prior == "svgp"
    budget = int(SAFETY["gpu" if is_gpu else "cpu"] * int(memory_bytes))
    fixed_B = None if batch_size is None else min(int(batch_size), N)
    M_given = (plain["num_inducing"] if num_inducing is None else int(num_inducing)) if svgp else 0
    M = min(M_given, N)  # the prior caps M by the number of cells (and says so)
    diag = plain["diagonal_only"] if diagonal_only is None else bool(diagonal_only)
    cache = (plain["cache_budget"] if cache_budget is None else int(cache_budget)) if svgp else 0

    def peak(B: int | None, M: int, diag: bool, cache: int) -> int:
        return estimate_peak(
            n_obs=N,
            n_vars=n_vars,
            n_factors=n_factors,
            nnz=nnz,
            prior=prior,
            batch_size=B,
            num_inducing=M,
            diagonal_only=diag,
            cached=svgp and n_sets * M * N <= cache,
            n_sets=n_sets,
            n_neighbors=n_neighbors,
            n_dims=n_dims,
            itemsize=itemsize,
            learned_hyper=learned_hyper,
            sampled=sampled,
        )

    def result(B, M, diag, cache, reasons=(), reduced=False) -> DeviceDefaults:
        return DeviceDefaults(
            num_inducing=M_given if M == min(M_given, N) else M,
            diagonal_only=diag,
            cache_budget=cache,
            batch_size=B,
            memory_bytes=int(memory_bytes),
            budget_bytes=budget,
            estimated_peak_bytes=peak(B, M, diag, cache),
            reduced=reduced,
            reasons=tuple(reasons),
        )

    if peak(fixed_B, M, diag, cache) <= budget:
        return result(fixed_B, M, diag, cache)

    if svgp and cache_budget is None:
        cache = int(CACHE_SHARE * budget / itemsize)
    min_B = min(N, MIN_BATCH)

    def largest_batch(M: int, diag: bool, cache: int) -> int | None:
        """The largest batch that fits (``None``: all cells), or 0 when not even ``min_B`` does."""
        if fixed_B is not None:
            return fixed_B if peak(fixed_B, M, diag, cache) <= budget else 0
        if peak(None, M, diag, cache) <= budget:
            return None
        if peak(min_B, M, diag, cache) > budget:
            return 0
        lo, hi = min_B, N - 1  # the peak grows with B: bisect for the largest B that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if peak(mid, M, diag, cache) <= budget else (lo, mid - 1)
        return max(_round_down(lo), min_B)

    B = largest_batch(M, diag, cache)
    if B == 0 and svgp and cache_budget is None and cache > 0:
        cache = 0
        B = largest_batch(M, diag, cache)
    if B == 0 and svgp and is_gpu and diagonal_only is None and not diag:
        diag = True
        B = largest_batch(M, diag, cache)
    while B == 0 and svgp and num_inducing is None and M > min(MIN_INDUCING, N):
        M = max(M // 2, min(MIN_INDUCING, N))
        B = largest_batch(M, diag, cache)
    reasons: list[str] = []
    if B == 0:
        B = fixed_B if fixed_B is not None else min_B
        reasons.append("the estimate exceeds the budget even with the smallest options")
    if B is not None and B >= N:
        B = None
    if B is not None and fixed_B is None:
        reasons.append(f"{B:,} of {N:,} cells per step")
    if svgp and cache_budget is None:
        kept = n_sets * M * N <= cache
        reasons.append(f"L_zz⁻¹K_zx {'cached' if kept else 'recomputed every step'}")
    if diag != plain["diagonal_only"] and diagonal_only is None:
        reasons.append("diagonal S")
    if svgp and num_inducing is None and M != min(M_given, N):
        reasons.append(f"{M} inducing points")
    return result(B, M, diag, cache, reasons, reduced=True)
