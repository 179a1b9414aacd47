""":func:`train_distributed`: one model trained data-parallel by several processes of one machine."""

from __future__ import annotations

import inspect
import os
import pickle
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from ._model import SpatialFactorization

__all__ = ["train_distributed"]

#: options of :meth:`SpatialFactorization.train` that :func:`train_distributed` sets itself
_OWN = ("device", "distributed")


def _train_options() -> set[str]:
    from ._model import SpatialFactorization

    names = set(inspect.signature(SpatialFactorization.train).parameters) - {"self"}
    return names - set(_OWN)


def train_distributed(
    adata: AnnData,
    *,
    n_procs: int | None = None,
    devices: Sequence[str] | None = None,
    backend: Literal["gloo", "nccl"] | None = None,
    **kwargs: Any,
) -> SpatialFactorization:
    """Build and train one model data-parallel in ``n_procs`` processes on this machine.

    Starts the processes (:func:`torch.multiprocessing.spawn`), joins them in a
    :mod:`torch.distributed` group, and in each builds
    ``SpatialFactorization(adata, device=devices[rank], ...)`` and calls
    ``train(..., distributed=True)``: each step's batch of cells is cut into one share per process,
    and gradients and the loadings' statistics are summed over the processes, so the model equals
    the single-process one with the same seed up to float rounding (see
    :meth:`SpatialFactorization.train`). Worth it for one large model on several GPUs; on a CPU,
    one process with all threads is usually as fast. To fit *several* models, spread them over the
    GPUs instead (``devices=`` of the CLI).

    Parameters
    ----------
    adata
        The training data, as for :class:`~sfact.models.SpatialFactorization` (sent to every process).
    n_procs
        Number of processes; ``len(devices)`` when ``None``, else the number of GPUs when the device
        (:attr:`sfact.settings.device`) is a GPU.
    devices
        One device per process (``"cpu"`` or ``"cuda:N"``); when ``None``, ``"cuda:0"``,
        ``"cuda:1"``, ... on a GPU, else ``"cpu"`` for every process (each with its share of the
        CPU threads).
    backend
        The :mod:`torch.distributed` backend: ``"nccl"`` (GPUs; the default there) or ``"gloo"``
        (CPU, the default there).
    **kwargs
        Options of :class:`~sfact.models.SpatialFactorization` (``prior``, ``n_factors``,
        ``random_state``, ...) and of :meth:`~sfact.models.SpatialFactorization.train`
        (``max_iter``, ``batch_size``, ...; a ``callback`` runs in every process and must be picklable).
        ``random_state`` must be an int (or None for the default) so every process uses the same seed.

    Returns
    -------
    The trained model of process 0, on ``devices[0]``, with ``adata`` attached (``train`` continues
    in this process).

    Raises
    ------
    ValueError
        If ``n_procs`` or ``devices`` are inconsistent or unusable, or ``backend`` is unknown.
    TypeError
        For ``device=`` or ``distributed=`` (set here) or a ``random_state`` that is a generator.
    Exception
        What a process raised (the first one that failed), e.g. :class:`~sfact.models.TrainingError`.

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.simulate(n_obs=2000, n_vars=50)
    >>> sfact.pp.prepare(adata)
    >>> model = sfact.models.train_distributed(  # doctest: +SKIP
    ...     adata, prior="svgp", n_factors=5, batch_size=1000, max_iter=200, devices=["cuda:0", "cuda:1"]
    ... )
    """
    import torch

    from .._utils import check_int, resolve_device

    for name in _OWN:
        if name in kwargs:
            raise TypeError(
                f"`train_distributed` sets `{name}` itself: pass `devices=[...]` (one device per process)."
            )
    random_state = kwargs.get("random_state", 0)
    if random_state is not None and not isinstance(random_state, int):
        raise TypeError(
            "`random_state` must be an int for `train_distributed` (every process must draw the same "
            f"batches), received {type(random_state).__name__}."
        )
    n_procs = check_int(n_procs, "n_procs", minimum=1, none_ok=True)
    if devices is None:
        device = resolve_device(None)
        if device.startswith("cuda"):
            n_procs = torch.cuda.device_count() if n_procs is None else n_procs
            devices = [f"cuda:{i}" for i in range(n_procs)]
        else:
            if n_procs is None:
                raise ValueError("On the CPU pass `n_procs=` (the number of processes) or `devices=`.")
            devices = ["cpu"] * n_procs
    else:
        devices = [resolve_device(d) for d in devices]
        if n_procs is None:
            n_procs = len(devices)
        if len(devices) != n_procs:
            raise ValueError(
                f"`devices` has {len(devices)} devices for `n_procs={n_procs}`: give one per process."
            )
    if n_procs < 1:
        raise ValueError("`n_procs` must be at least 1 (and `devices` not empty).")
    gpu = [d.startswith("cuda") for d in devices]
    if any(gpu) and not all(gpu):
        raise ValueError(f"`devices` mixes CPU and GPU: {list(devices)}; use GPUs only or the CPU only.")
    if backend is None:
        backend = "nccl" if all(gpu) and torch.distributed.is_nccl_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"`backend` must be 'gloo' or 'nccl', received {backend!r}.")
    if backend == "nccl" and not all(gpu):
        raise ValueError("The 'nccl' backend needs GPUs: pass `devices=['cuda:0', ...]` or `backend='gloo'`.")
    if not (torch.distributed.is_available() and getattr(torch.distributed, f"is_{backend}_available")()):
        raise RuntimeError(f"This torch build has no `torch.distributed` {backend!r} backend.")
    if all(gpu) and len(set(devices)) != len(devices):
        raise ValueError(f"`devices` names a GPU twice: {list(devices)}; give each process its own GPU.")
    train_names = _train_options()
    train_kwargs = {k: v for k, v in kwargs.items() if k in train_names}
    model_kwargs = {k: v for k, v in kwargs.items() if k not in train_names}

    from ._model import SpatialFactorization

    with tempfile.TemporaryDirectory(prefix="sfact-ddp-") as tmp:
        job = {
            "adata": adata,
            "devices": list(devices),
            "backend": backend,
            "model_kwargs": model_kwargs,
            "train_kwargs": train_kwargs,
            "dir": tmp,
            "threads": max(1, (os.cpu_count() or 1) // n_procs) if not any(gpu) else None,
            "settings": _settings_state(),
        }
        try:
            torch.multiprocessing.spawn(_worker, args=(n_procs, job), nprocs=n_procs, join=True)
        except torch.multiprocessing.ProcessRaisedException as err:
            # the process that failed first (the others may have failed waiting for it)
            path = Path(tmp) / f"error_{err.error_index}.pkl"
            if path.exists():
                with open(path, "rb") as f:
                    raise pickle.load(f) from err
            raise
        return SpatialFactorization.load(Path(tmp) / "model", adata=adata, device=devices[0])


def _settings_state() -> dict[str, Any]:
    from .._settings import settings

    return {
        "device": settings.device,
        "dtype": settings.dtype,
        "progress_bar": settings.progress_bar,
        "deterministic": settings.deterministic,
        "verbosity": int(settings.verbosity),
    }


def _worker(rank: int, n_procs: int, job: dict[str, Any]) -> None:
    """One process of :func:`train_distributed`."""
    import torch
    import torch.distributed as dist

    from .._settings import settings
    from ._model import SpatialFactorization

    for key, value in job["settings"].items():
        setattr(settings, key, value)
    device = job["devices"][rank]
    if job["threads"] is not None:
        torch.set_num_threads(job["threads"])
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    init = "file://" + Path(job["dir"], "rendezvous").as_posix()
    dist.init_process_group(job["backend"], init_method=init, rank=rank, world_size=n_procs)
    try:
        model = SpatialFactorization(job["adata"], device=device, **job["model_kwargs"])
        model.train(distributed=True, **job["train_kwargs"])
        if rank == 0:
            model.save(Path(job["dir"]) / "model")
    except BaseException as err:
        try:
            with open(Path(job["dir"]) / f"error_{rank}.pkl", "wb") as f:
                pickle.dump(err, f)
        except Exception:  # an unpicklable error: its traceback still reaches the caller
            pass
        raise
    finally:
        dist.destroy_process_group()
