"""The worker side of the runner: how one job runs, in this process, a spawned process or on Dask.

:func:`execute_job` runs a job with everything it prints or logs routed to its log file
(:func:`route_output`), reports progress events through a callback, and returns its outcome;
:func:`local_entry` and :func:`dask_entry` are the entry points of a local worker process and of
a Dask task (thread limits, signals, where the output of C libraries goes).

Progress events
---------------
Workers send dicts back to the parent (a :func:`multiprocessing.Manager` queue locally, Dask
events on a cluster)::

    {"kind": "started", "job": name, "time": t, "device": "cuda:0", "host": "node1", "pid": 123}
    {"kind": "progress", "job": name, "time": t, "epoch": 40, "max_epoch": 1000, "elbo": -3.45,
     "message": "training"}                     # the fields the job passed to ``report``
    {"kind": "finished", "job": name, "time": t, "status": "done", "elapsed_s": 12.3, "error": None}

``time`` is the worker's :func:`time.time`. Progress events are throttled to a few per second;
the last one is always sent. A local worker ends with ``{"kind": "outcome", "job": name,
"outcome": {...}}``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._constants import is_gpu

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import TextIO

    from ._jobs import Job

#: seconds between two progress events a worker sends (the last one is always sent)
_EVENT_INTERVAL = 0.25
#: loggers whose records do not belong in a job's log (a Dask worker's own chatter)
_FOREIGN_LOGGERS = ("distributed", "tornado", "asyncio", "bokeh")


#: seconds an orphaned local worker gets to clean up after SIGTERM before it exits regardless
_ORPHAN_GRACE_S = 5.0
#: set in a local worker (or the runner's manager process) once the runner is gone
_ORPHANED = threading.Event()
_TERMINATING = threading.Event()


class _Cancelled(BaseException):
    """Raised inside a local worker when the runner terminates it (SIGTERM)."""


def _raise_cancelled(signum, frame):  # pragma: no cover - runs in a child process
    # once only: a second SIGTERM (the runner's and the parent-death one) must not interrupt
    # the clean-up the first one started
    if _TERMINATING.is_set():
        return
    _TERMINATING.set()
    import multiprocessing as mp

    parent = mp.parent_process()
    if parent is not None and not parent.is_alive():  # SIGTERM from PR_SET_PDEATHSIG
        _ORPHANED.set()
    raise _Cancelled("terminated by the runner" if not _ORPHANED.is_set() else "the runner is gone")


def _set_parent_death_signal(signum: int) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent dies; whether it worked."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(signum), 0, 0, 0) == 0  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - no prctl
        return False


def _watch_parent(sentinel: int, grace_s: float) -> None:  # pragma: no cover - child process
    from multiprocessing.connection import wait

    wait([sentinel])  # readable once the parent is gone
    _ORPHANED.set()
    with contextlib.suppress(OSError):
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os._exit(1)


def die_with_parent(grace_s: float = _ORPHAN_GRACE_S) -> None:
    """End this spawned process when the process that started it dies (even by ``SIGKILL``).

    Used by the local workers and the runner's manager process, so that killing the runner
    leaves no orphans (the resource tracker then ends on its own, as nothing holds its pipe).
    The process gets ``SIGTERM`` (a worker then cancels its job and removes its temporary
    outputs), and ends ``grace_s`` seconds later if it is still there. Linux sends the signal
    at once (``PR_SET_PDEATHSIG``); elsewhere a thread waiting on the parent's sentinel does.
    A no-op in a process that :mod:`multiprocessing` did not start.
    """
    import multiprocessing as mp

    parent = mp.parent_process()
    if parent is None:
        return
    _set_parent_death_signal(signal.SIGTERM)
    # the thread also covers a parent that died before the line above, and escalates
    thread = threading.Thread(
        target=_watch_parent, args=(parent.sentinel, grace_s), name="sfact-parent-watch", daemon=True
    )
    thread.start()


def one_line(exc: BaseException) -> str:
    """``"ValueError: message"`` on one line, at most 300 characters of message."""
    msg = " ".join(str(exc).split())
    if len(msg) > 300:
        msg = msg[:297] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def available_cpus() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def limit_threads(n: int, *, override: bool) -> None:
    """Limit OpenMP/BLAS and torch threads of this process to ``n``."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        if override or var not in os.environ:
            os.environ[var] = str(n)
    if "torch" in sys.modules:  # otherwise torch reads OMP_NUM_THREADS when it is imported
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


class _ForeignFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(_FOREIGN_LOGGERS)


@contextlib.contextmanager
def _route_scanpy(log):
    """Send scanpy's logger (which sfact logs through) to ``log`` while the job runs.

    scanpy binds its handler to ``sys.stderr`` when it is imported, so a job that imports it
    inside the redirect logs to the job's log already; afterwards the handler is put back.
    """
    before = sys.modules.get("scanpy")
    old = before.settings.logfile if before is not None else None
    if before is not None:
        before.settings.logfile = log
    try:
        yield
    finally:
        sc = sys.modules.get("scanpy")
        settings = getattr(sc, "settings", None)
        if settings is not None and getattr(settings, "logfile", None) is log:
            settings.logfile = old  # None: scanpy's default (the restored sys.stderr)


@contextlib.contextmanager
def route_output(log: TextIO) -> Iterator[None]:
    """Send everything the job prints or logs to ``log`` while the block runs.

    ``sys.stdout`` and ``sys.stderr``, Python's root logger (at level INFO at least; records
    of a Dask worker's own loggers left out) and scanpy's logger. Everything is put back after.
    """
    root = logging.getLogger()
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_ForeignFilter())
    old_level = root.level
    root.addHandler(handler)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        # scanpy's routing outermost: it is undone after stderr is back to the real one
        with _route_scanpy(log), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        sys.stdout.flush()
        sys.stderr.flush()


def execute_job(job: Job, device: str, emit: Callable[[dict], Any]) -> dict[str, Any]:
    """Run ``job`` on ``device`` with its output in its log; return the outcome.

    A job function that returns ``{"skipped": True, ...}`` found its outputs there already: its
    status is ``"skipped"``. The outcome is ``{"status", "output", "error", "device", "elapsed_s", "host", "pid",
    "progress"}``. ``KeyboardInterrupt`` (in-process runs) is re-raised after the log footer.
    """
    log_path = Path(job.log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    host, pid = socket.gethostname(), os.getpid()
    last: dict[str, Any] = {}
    throttle = {"sent": 0.0, "pending": None}
    emit_failed = []

    def send(event: dict) -> None:
        if _ORPHANED.is_set():  # nobody is listening any more
            return
        try:
            emit(event)
        except Exception as exc:  # the job must not die because the display is gone
            if not emit_failed:
                emit_failed.append(exc)
                print(f"[sfact runner] could not send progress: {one_line(exc)}", file=sys.stderr)

    def report(*, epoch=None, max_epoch=None, elbo=None, message=None) -> None:
        event: dict[str, Any] = {"kind": "progress", "job": job.name, "time": time.time()}
        if epoch is not None:
            event["epoch"] = last["epoch"] = int(epoch)
        if max_epoch is not None:
            event["max_epoch"] = last["max_epoch"] = int(max_epoch)
        if elbo is not None:
            event["elbo"] = last["elbo"] = float(elbo)
        if message is not None:
            event["message"] = last["message"] = str(message)
        now = time.monotonic()
        if message is not None or now - throttle["sent"] >= _EVENT_INTERVAL:
            throttle["sent"], throttle["pending"] = now, None
            send(event)
        else:
            throttle["pending"] = event

    status, output, error = "done", {}, None
    interrupted: BaseException | None = None
    start = time.perf_counter()
    with open(log_path, "a", buffering=1, encoding="utf-8") as log:
        log.write(
            f"===== {datetime.now().isoformat(timespec='seconds')}  {job.name}  ({job.task})  "
            f"device {device}  host {host}  pid {pid} =====\n"
        )
        send(
            {
                "kind": "started",
                "job": job.name,
                "time": time.time(),
                "device": device,
                "host": host,
                "pid": pid,
            }
        )
        try:
            with route_output(log):
                result = job.fn(**job.kwargs, device=device, report=report)
            if result is None:
                result = {}
            if not isinstance(result, dict):
                raise TypeError(f"job function returned {type(result).__name__}, expected a dict")
            output = result
            status = "skipped" if result.get("skipped") else "done"
        except (_Cancelled, KeyboardInterrupt) as exc:
            status, error, interrupted = "cancelled", "interrupted", exc
        except (Exception, SystemExit) as exc:
            status, error = "failed", one_line(exc)
            log.write(traceback.format_exc())
        if throttle["pending"] is not None:
            send(throttle["pending"])
        elapsed = time.perf_counter() - start
        log.write(
            f"===== {status} after {elapsed:.1f}s ({datetime.now().isoformat(timespec='seconds')})"
            + (f": {error}" if error else "")
            + " =====\n"
        )
    send(
        {
            "kind": "finished",
            "job": job.name,
            "time": time.time(),
            "status": status,
            "elapsed_s": elapsed,
            "error": error,
        }
    )
    if isinstance(interrupted, KeyboardInterrupt):
        raise interrupted
    return {
        "status": status,
        "output": output,
        "error": error,
        "device": device,
        "elapsed_s": elapsed,
        "host": host,
        "pid": pid,
        "progress": last,
    }


def local_entry(job_bytes: bytes, name: str, log_path: str, device: str, events, threads: int) -> None:
    """Entry point of a spawned local worker process (one per job); it ends when the runner does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates us
    signal.signal(signal.SIGTERM, _raise_cancelled)
    die_with_parent()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    limit_threads(threads, override=False)
    # everything this process writes, C libraries included, goes to the job's log
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        job = pickle.loads(job_bytes)
        outcome = execute_job(job, device, events.put)
    except _Cancelled:
        outcome = {"status": "cancelled", "error": "interrupted", "device": device}
    except BaseException as exc:  # e.g. the job's module cannot be imported here
        traceback.print_exc()
        outcome = {"status": "failed", "error": f"could not load the job: {one_line(exc)}", "device": device}
    if _ORPHANED.is_set():  # the runner and its queue are gone: the log says what happened
        return
    try:
        events.put({"kind": "outcome", "job": name, "outcome": outcome})
    except (BrokenPipeError, EOFError, ConnectionError):  # the runner died meanwhile: nobody to tell
        return
    except Exception as exc:  # e.g. an output that cannot be pickled
        traceback.print_exc()
        failed = {
            **outcome,
            "status": "failed",
            "output": {},
            "error": f"could not send the result: {one_line(exc)}",
        }
        events.put({"kind": "outcome", "job": name, "outcome": failed})


def dask_entry(
    job_bytes: bytes, topic: str, device: str | None, gpu: bool, workers_per_host: dict[str, int]
) -> dict[str, Any]:
    """Run a job on a Dask worker; progress goes out as Dask events under ``topic``."""
    from distributed import get_worker
    from distributed.comm.addressing import get_address_host

    worker = get_worker()

    def emit(event: dict) -> None:
        worker.log_event(topic, event)

    if device is None:  # the worker's one visible GPU when the job may use it and CUDA is there
        from .._utils import resolve_device

        device = "cuda:0" if gpu and is_gpu(resolve_device("auto")) else "cpu"
    host = get_address_host(worker.address)  # as the scheduler's "host" of this worker
    n_workers = max(1, workers_per_host.get(host, 1))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # the nanny sets OMP_NUM_THREADS=1; a job gets its share of the host's cores instead
    limit_threads(max(1, available_cpus() // n_workers), override=True)
    job = pickle.loads(job_bytes)
    return execute_job(job, device, emit)
