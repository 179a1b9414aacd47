"""The job runner: a plan of :class:`~sfact.pipeline._jobs.Job` objects run in dependency order.

:func:`run_jobs` runs the jobs, respecting their dependencies, one job per device slot, with a
live status table (or plain progress lines when the output is not a terminal) and one log file
per job. The pieces: how a job runs and logs (:mod:`._worker`), the state of every job
(:mod:`._state`), the display (:mod:`._display`), the slots and the serial, local-process and
Dask backends (:mod:`._backends`).
"""

from __future__ import annotations

import pickle
import sys
from typing import TYPE_CHECKING, Literal, get_args

from .._constants import is_gpu
from ._backends import (
    DaskBackend,
    LocalBackend,
    OpenPool,
    SerialBackend,
    SerialPool,
    SlotPool,
    worker_devices,
)
from ._display import Display
from ._state import Tracker
from ._worker import one_line

if TYPE_CHECKING:
    from rich.console import Console

    from ._jobs import Job, JobResult

Executor = Literal["local", "dask", "serial"]


def _check_plan(jobs: list[Job]) -> None:
    """Raise :class:`ValueError` for repeated names, unknown dependencies or a dependency cycle."""
    names = [job.name for job in jobs]
    dupes = sorted({name for name in names if names.count(name) > 1})
    if dupes:
        raise ValueError(f"Job names must be unique; repeated: {', '.join(dupes)}.")
    known = set(names)
    for job in jobs:
        unknown = [dep for dep in job.depends_on if dep not in known]
        if unknown:
            raise ValueError(f"Job {job.name!r} depends on unknown job(s) {', '.join(map(repr, unknown))}.")
    deps = {job.name: tuple(job.depends_on) for job in jobs}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = [*path[path.index(name) :], name]
            raise ValueError(f"Job dependencies form a cycle: {' -> '.join(cycle)}.")
        state[name] = 1
        for dep in deps[name]:
            visit(dep, [*path, name])
        state[name] = 2

    for name in names:
        visit(name, [])


def run_jobs(
    jobs: list[Job],
    *,
    executor: Executor = "local",
    scheduler: str | None = None,
    devices: list[str] | None = None,
    live: bool | None = None,
    console: Console | None = None,
    poll_interval: float = 0.2,
) -> list[JobResult]:
    """Run a plan of jobs in parallel, respecting their dependencies, with a status display.

    A job starts when every job in its ``depends_on`` is ``done`` or ``skipped`` (a job function
    returning ``{"skipped": True, ...}`` found its outputs already there). A job whose
    dependency failed or was cancelled is ``cancelled``, with the reason in
    :attr:`JobResult.error`; every other job keeps running. Among the jobs that may start,
    preprocessing goes first, then training, analysis and figures, ties in plan order.

    Each job runs as ``job.fn(**job.kwargs, device=device, report=report)`` in a worker that
    appends to ``job.log_path`` a header, all the job prints and logs (Python ``logging`` and
    scanpy's logger), the traceback when it fails, and a footer with status and elapsed time.

    Parameters
    ----------
    jobs
        The plan. Job names must be unique; dependencies must name jobs of the plan and must
        not form a cycle (:class:`ValueError` before anything runs). ``job.fn`` must be a
        top-level function (workers import it by module path).
    executor
        ``"local"``: a spawned process per running job, one job per slot of ``devices``.
        ``"dask"``: tasks on a ``dask.distributed`` cluster (see below).
        ``"serial"``: one job at a time in this process (for debugging).
    scheduler
        With ``executor="dask"``, the address of a running scheduler (e.g.
        ``"tcp://node1:8786"``, or ``cluster.scheduler_address`` of a dask-jobqueue cluster).
        Without it, a :class:`~distributed.LocalCluster` with one single-threaded worker
        process per slot is started and closed, and jobs are placed exactly as ``"local"``
        places them.
    devices
        The slots: ``"cpu"`` or a GPU (``"cuda:0"``, ...), one running job each (repeat
        ``"cpu"`` for several CPU jobs). Default: one slot per visible CUDA GPU plus one
        ``"cpu"`` slot; a ``"cpu"`` slot is added when missing. Jobs with ``use_gpu=False``
        always run on a ``"cpu"`` slot; ``use_gpu=True`` jobs take a free GPU slot if there is
        one, else a free ``"cpu"`` slot; ``needs_gpu=True`` jobs only take a GPU slot (a
        :class:`ValueError` before anything runs when there is none). Ignored with a
        ``scheduler`` address.
    live
        A live table refreshed 4 times a second; otherwise plain lines (job started,
        finished or failed with its log, progress every 10 s). Default: whether ``console``
        is a terminal. Either way the final table is printed at the end.
    console
        Where the display goes; default a :class:`rich.console.Console` on ``sys.stdout``. For
        ``"serial"`` runs give it a fixed file (``Console(file=sys.stdout)``): while a job runs
        in this process, ``sys.stdout`` is the job's log.
    poll_interval
        Seconds between two looks at the workers.

    Returns
    -------
    One :class:`JobResult` per job, in the order of ``jobs``.

    Raises
    ------
    KeyboardInterrupt
        On Ctrl-C, after cancelling pending jobs, terminating running local workers and
        printing the final table; its ``results`` attribute holds the results so far.

    Notes
    -----
    Local workers are started with the ``spawn`` method, so a script that calls this must
    guard its entry point with ``if __name__ == "__main__":``. Each local job gets the
    available cores divided by the number of slots as its OpenMP/BLAS/torch threads (unless
    ``OMP_NUM_THREADS`` is set), and ``OMP_WAIT_POLICY=PASSIVE``.

    **Devices on a Dask cluster (with ``scheduler``).** Dask decides where and when each job
    runs (jobs are submitted as soon as their dependencies are met, with priorities in
    pipeline order). A ``use_gpu`` job asks for the worker resource ``GPU=1`` when some
    worker of the cluster advertises a ``GPU`` resource at the time it is submitted, and runs
    on ``"cuda:0"`` of that worker when torch sees CUDA there; otherwise it runs on any worker
    on ``"cpu"``. So start each GPU worker with one visible GPU, one thread and the resource,
    e.g. with dask-jobqueue ``SLURMCluster(..., worker_extra_args=["--resources", "GPU=1",
    "--nthreads", "1"])`` (or ``dask worker ADDRESS --nthreads 1 --resources GPU=1``), and
    have them running when the jobs are submitted. A job gets the host's cores divided by the
    number of workers on that host as torch threads. Outputs and logs are written by the
    workers, so they need a filesystem shared with this machine. Dask cannot stop a task that
    is running: on Ctrl-C, running jobs on an external cluster run to their end.
    """
    from rich.console import Console

    jobs = list(jobs)
    _check_plan(jobs)
    if executor not in get_args(Executor):
        raise ValueError(f"`executor` must be 'local', 'dask' or 'serial', received {executor!r}.")
    devices = worker_devices(devices)
    if not (executor == "dask" and scheduler is not None) and not any(is_gpu(d) for d in devices):
        gpu_only = [job.name for job in jobs if job.needs_gpu]
        if gpu_only:
            raise ValueError(
                f"Job(s) {', '.join(gpu_only)} must run on a GPU, but no device slot is one "
                f"({', '.join(devices)}): pass GPU slots in `devices` or let the jobs use the CPU."
            )
    if executor != "serial":
        for job in jobs:
            try:
                pickle.dumps(job)
            except Exception as exc:
                raise TypeError(
                    f"Job {job.name!r} cannot be sent to a worker ({one_line(exc)}); its function "
                    "must be a top-level function and its kwargs picklable."
                ) from exc
    if console is None:
        console = Console(file=sys.stdout)
    if live is None:
        live = console.is_terminal

    tracker = Tracker(jobs)
    display = Display(tracker, console, live)
    if executor == "dask":
        if scheduler is None:
            pool = SlotPool(devices)
        else:
            pool = OpenPool()
        backend = DaskBackend(tracker, scheduler, devices)
    elif executor == "serial":
        pool = SerialPool(devices)
        backend = SerialBackend(tracker, display)
    else:
        pool = SlotPool(devices)
        backend = LocalBackend(tracker, len(devices))

    display.start()
    interrupted: KeyboardInterrupt | None = None
    try:
        while not tracker.all_final():
            tracker.cancel_blocked()
            for row in tracker.ready():
                slot = pool.acquire(row.job)
                if slot is None:
                    continue
                device = pool.devices[slot] if slot >= 0 else None
                tracker.submitted(row, device)
                backend.submit(row, device, slot)
            if (
                not any(row.status in ("starting", "running") for row in tracker.rows)
                and not tracker.all_final()
            ):
                stuck = ", ".join(row.job.name for row in tracker.rows if not row.final)
                raise RuntimeError(f"No job can start (no free slot fits them): {stuck}.")
            for row, outcome in backend.wait(poll_interval):
                pool.release(row.job.name)
                tracker.finish(row, outcome)
            display.tick()
    except KeyboardInterrupt as exc:
        interrupted = exc
        backend.interrupt()
        for row in tracker.rows:
            tracker.cancel(row, "interrupted")
    finally:
        try:
            backend.close()
        finally:
            display.stop()
    results = tracker.results()
    if interrupted is not None:
        interrupted.results = results  # type: ignore[attr-defined]
        raise interrupted
    return results
