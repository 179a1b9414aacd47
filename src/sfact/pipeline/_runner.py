"""The parallel job runner: local worker processes, a Dask cluster, or in-process.

:func:`run_jobs` runs a plan of :class:`~sfact.pipeline._jobs.Job` objects, respecting their
dependencies, one job per device slot, with a live status table (or plain progress lines when
the output is not a terminal) and one log file per job.

Progress events
---------------
Workers send dicts back to the parent (a :func:`multiprocessing.Manager` queue locally, Dask
events on a cluster)::

    {"kind": "started", "job": name, "time": t, "device": "cuda:0", "host": "node1", "pid": 123}
    {"kind": "progress", "job": name, "time": t, "epoch": 40, "max_epoch": 1000, "elbo": -3.45,
     "message": "training"}                     # the fields the job passed to ``report``
    {"kind": "finished", "job": name, "time": t, "status": "done", "elapsed_s": 12.3, "error": None}

``time`` is the worker's :func:`time.time`. Progress events are throttled to a few per second;
the last one is always sent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue as queue_mod
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ._jobs import STAGES, Job, JobResult

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import Console
    from rich.table import Table

Executor = Literal["local", "dask", "serial"]

#: seconds between two plain progress lines of one job
_PLAIN_PROGRESS_INTERVAL = 10.0
#: seconds between two progress events a worker sends (the last one is always sent)
_EVENT_INTERVAL = 0.25
#: seconds a terminated local worker gets to write its log footer before it is killed
_TERMINATE_GRACE_S = 5.0
#: loggers whose records do not belong in a job's log (a Dask worker's own chatter)
_FOREIGN_LOGGERS = ("distributed", "tornado", "asyncio", "bokeh")

_FINAL = ("done", "skipped", "failed", "cancelled")


# --------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------


class _Cancelled(BaseException):
    """Raised inside a local worker when the runner terminates it (SIGTERM)."""


def _raise_cancelled(signum, frame):  # pragma: no cover - runs in a child process
    raise _Cancelled("terminated by the runner")


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    if len(msg) > 300:
        msg = msg[:297] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def _limit_threads(n: int, *, override: bool) -> None:
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


def _execute(job: Job, device: str, emit: Callable[[dict], Any]) -> dict[str, Any]:
    """Run ``job`` on ``device`` with its output in its log; return the outcome.

    The outcome is ``{"status", "output", "error", "device", "elapsed_s", "host", "pid",
    "progress"}``. ``KeyboardInterrupt`` (in-process runs) is re-raised after the log footer.
    """
    log_path = Path(job.log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    host, pid = socket.gethostname(), os.getpid()
    last: dict[str, Any] = {}
    throttle = {"sent": 0.0, "pending": None}
    emit_failed = []

    def send(event: dict) -> None:
        try:
            emit(event)
        except Exception as exc:  # the job must not die because the display is gone
            if not emit_failed:
                emit_failed.append(exc)
                print(f"[sfact runner] could not send progress: {_one_line(exc)}", file=sys.stderr)

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
            status, error = "failed", _one_line(exc)
            log.write(traceback.format_exc())
        finally:
            root.removeHandler(handler)
            root.setLevel(old_level)
            sys.stdout.flush()
            sys.stderr.flush()
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


def _local_entry(job_bytes: bytes, name: str, log_path: str, device: str, events, threads: int) -> None:
    """Entry point of a spawned local worker process (one per job)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates us
    signal.signal(signal.SIGTERM, _raise_cancelled)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _limit_threads(threads, override=False)
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
        outcome = _execute(job, device, events.put)
    except _Cancelled:
        outcome = {"status": "cancelled", "error": "interrupted", "device": device}
    except BaseException as exc:  # e.g. the job's module cannot be imported here
        traceback.print_exc()
        outcome = {"status": "failed", "error": f"could not load the job: {_one_line(exc)}", "device": device}
    try:
        events.put({"kind": "outcome", "job": name, "outcome": outcome})
    except Exception as exc:  # e.g. an output that cannot be pickled
        traceback.print_exc()
        failed = {
            **outcome,
            "status": "failed",
            "output": {},
            "error": f"could not send the result: {_one_line(exc)}",
        }
        events.put({"kind": "outcome", "job": name, "outcome": failed})


def _dask_entry(
    job_bytes: bytes, topic: str, device: str | None, gpu: bool, workers_per_host: dict[str, int]
) -> dict[str, Any]:
    """Run a job on a Dask worker; progress goes out as Dask events under ``topic``."""
    from distributed import get_worker
    from distributed.comm.addressing import get_address_host

    worker = get_worker()

    def emit(event: dict) -> None:
        worker.log_event(topic, event)

    if device is None:
        device = "cpu"
        if gpu:
            import torch

            if torch.cuda.is_available():
                device = "cuda:0"
    host = get_address_host(worker.address)  # as the scheduler's "host" of this worker
    n_workers = max(1, workers_per_host.get(host, 1))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # the nanny sets OMP_NUM_THREADS=1; a job gets its share of the host's cores instead
    _limit_threads(max(1, _available_cpus() // n_workers), override=True)
    job = pickle.loads(job_bytes)
    return _execute(job, device, emit)


# --------------------------------------------------------------------------------------------
# parent side: state of every job
# --------------------------------------------------------------------------------------------


@dataclass
class _Row:
    job: Job
    index: int
    status: str = "pending"  # plus "starting": submitted, not started yet (display only)
    device: str | None = None
    submitted_at: float | None = None
    started_at: float | None = None  # parent's monotonic clock
    worker_t0: float | None = None  # worker's clock at "started"
    epoch: int | None = None
    max_epoch: int | None = None
    elbo: float | None = None
    message: str | None = None
    rate_ref: tuple[float, int] | None = None  # (worker time, epoch) of the first progress
    rate_last: tuple[float, int] | None = None
    elapsed_s: float | None = None
    error: str | None = None
    output: dict = field(default_factory=dict)
    last_line_at: float = 0.0
    last_line_epoch: int | None = None

    @property
    def final(self) -> bool:
        return self.status in _FINAL

    def priority(self) -> tuple[int, int]:
        stage = STAGES.index(self.job.task) if self.job.task in STAGES else len(STAGES)
        return stage, self.index

    def elapsed(self, now: float) -> float | None:
        if self.elapsed_s is not None:
            return self.elapsed_s
        if self.started_at is not None:
            return now - self.started_at
        return None

    def remaining(self) -> float | None:
        if self.status != "running" or self.epoch is None:
            return None
        max_epoch = self.max_epoch or self.job.max_epoch
        if not max_epoch or self.rate_last is None:
            return None
        t1, e1 = self.rate_last
        t0, e0 = self.rate_ref if self.rate_ref and self.rate_ref[1] < e1 else (self.worker_t0, 0)
        if t0 is None or e1 <= e0:
            return None
        return max(0.0, (max_epoch - self.epoch) * (t1 - t0) / (e1 - e0))


class _Tracker:
    """The state of every job; updated by the scheduling loop (and worker events)."""

    def __init__(self, jobs: list[Job]) -> None:
        self.rows = [_Row(job, i) for i, job in enumerate(jobs)]
        self.by_name = {row.job.name: row for row in self.rows}
        self.lock = threading.RLock()
        self.t0 = time.monotonic()
        self.notes: list[tuple[str, _Row]] = []
        """Jobs that started or finished, for the display (printed outside the lock)."""

    def _notify(self, what: str, row: _Row) -> None:
        self.notes.append((what, row))

    def pop_notes(self) -> list[tuple[str, _Row]]:
        with self.lock:
            notes, self.notes = self.notes, []
        return notes

    # events from workers
    def handle(self, event: dict) -> None:
        row = self.by_name.get(event.get("job"))
        if row is None:
            return
        with self.lock:
            kind = event.get("kind")
            if kind == "started" and row.status in ("pending", "starting"):
                row.status = "running"
                row.device = event.get("device", row.device)
                row.started_at = time.monotonic()
                row.worker_t0 = event.get("time")
                self._notify("started", row)
            elif kind == "progress" and row.status in ("starting", "running"):
                self._progress(row, event)

    @staticmethod
    def _progress(row: _Row, event: dict) -> None:
        if event.get("max_epoch") is not None:
            row.max_epoch = event["max_epoch"]
        if event.get("elbo") is not None:
            row.elbo = event["elbo"]
        if event.get("message") is not None:
            row.message = event["message"]
        if event.get("epoch") is not None:
            row.epoch = event["epoch"]
            point = (event.get("time", time.time()), row.epoch)
            if row.rate_ref is None:
                row.rate_ref = point
            row.rate_last = point

    # scheduling
    def submitted(self, row: _Row, device: str | None) -> None:
        with self.lock:
            row.status = "starting"
            row.device = device
            row.submitted_at = time.monotonic()

    def finish(self, row: _Row, outcome: dict) -> None:
        with self.lock:
            if row.final:
                return
            if row.started_at is None:
                row.started_at = row.submitted_at or time.monotonic()
            row.status = outcome.get("status", "failed")
            row.device = outcome.get("device") or row.device
            row.error = outcome.get("error")
            row.output = outcome.get("output") or {}
            elapsed = outcome.get("elapsed_s")
            row.elapsed_s = elapsed if elapsed is not None else time.monotonic() - row.started_at
            progress = outcome.get("progress") or {}
            if progress:
                self._progress(row, progress)
            self._notify("finished", row)

    def cancel(self, row: _Row, reason: str) -> None:
        with self.lock:
            if row.final:
                return
            if row.started_at is not None:
                row.elapsed_s = time.monotonic() - row.started_at
            row.status = "cancelled"
            row.error = reason
            self._notify("finished", row)

    def cancel_blocked(self) -> None:
        """Cancel pending jobs whose dependency failed or was cancelled (transitively)."""
        changed = True
        while changed:
            changed = False
            for row in self.rows:
                if row.status != "pending":
                    continue
                for dep in row.job.depends_on:
                    dep_status = self.by_name[dep].status
                    if dep_status in ("failed", "cancelled"):
                        self.cancel(row, f"dependency {dep} {dep_status}")
                        changed = True
                        break

    def ready(self) -> list[_Row]:
        rows = [
            row
            for row in self.rows
            if row.status == "pending"
            and all(self.by_name[dep].status in ("done", "skipped") for dep in row.job.depends_on)
        ]
        return sorted(rows, key=_Row.priority)

    def all_final(self) -> bool:
        return all(row.final for row in self.rows)

    def results(self) -> list[JobResult]:
        return [
            JobResult(
                name=row.job.name,
                task=row.job.task,
                status=row.status if row.final else "cancelled",  # type: ignore[arg-type]
                device=row.device,
                elapsed_s=row.elapsed_s or 0.0,
                log_path=Path(row.job.log_path),
                error=row.error,
                output=row.output,
                dataset=row.job.dataset,
                prior=row.job.prior,
            )
            for row in self.rows
        ]


# --------------------------------------------------------------------------------------------
# display
# --------------------------------------------------------------------------------------------

_STATUS_STYLE = {
    "pending": "dim",
    "starting": "cyan",
    "running": "bold cyan",
    "done": "green",
    "skipped": "green",
    "failed": "bold red",
    "cancelled": "yellow",
}


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return ""
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(round(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def _fmt_elbo(elbo: float | None) -> str:
    if elbo is None:
        return ""
    return f"{elbo:.4f}" if abs(elbo) < 1e6 else f"{elbo:.4e}"


def _fmt_epoch(row: _Row) -> str:
    if row.epoch is None:
        return ""
    max_epoch = row.max_epoch or row.job.max_epoch
    return f"{row.epoch}/{max_epoch}" if max_epoch else str(row.epoch)


def _info(row: _Row) -> str:
    if row.status in ("failed", "cancelled"):
        return row.error or ""
    if row.status == "running":
        return row.message or ""
    return ""


def _build_table(cells: list[tuple], info_width: int) -> Table:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("job", "task", "device", "status"):
        table.add_column(name, no_wrap=True)
    for name in ("epoch", "ELBO", "elapsed", "remaining"):
        table.add_column(name, justify="right", no_wrap=True)
    if info_width > 0:
        table.add_column("info", no_wrap=True, overflow="ellipsis", max_width=info_width)
    for *first, status, info in cells:
        extra = [info] if info_width > 0 else []
        table.add_row(*first[:3], Text(status, style=_STATUS_STYLE.get(status, "")), *first[3:], *extra)
    return table


class _StatusTable:
    """The status table (job, task, device, status, epoch, ELBO, elapsed, remaining, info).

    A renderable that reads the jobs' state when it is drawn; the info column (messages,
    errors) gets the width the other columns leave, at most 60, and none below 10.
    """

    def __init__(self, tracker: _Tracker) -> None:
        self.tracker = tracker

    def _cells(self) -> list[tuple]:
        now = time.monotonic()
        with self.tracker.lock:
            return [
                (
                    row.job.name,
                    row.job.task,
                    row.device or "",
                    _fmt_epoch(row),
                    _fmt_elbo(row.elbo),
                    _fmt_seconds(row.elapsed(now)),
                    _fmt_seconds(row.remaining()),
                    row.status,
                    _info(row),
                )
                for row in self.tracker.rows
            ]

    def table(self, console, max_width: int) -> Table:
        from rich.measure import Measurement

        cells = self._cells()
        core = _build_table(cells, 0)
        used = Measurement.get(console, console.options.update_width(10_000), core).maximum
        info_width = min(60, max_width - used - 2)
        return _build_table(cells, info_width if info_width >= 10 else 0)

    def __rich_console__(self, console, options):
        yield self.table(console, options.max_width)

    def __rich_measure__(self, console, options):
        from rich.measure import Measurement

        return Measurement.get(console, options, self.table(console, options.max_width))


def _plain_text(renderable) -> str:
    import io

    from rich.console import Console
    from rich.measure import Measurement

    console = Console(file=io.StringIO(), width=10_000, color_system=None, force_terminal=False)
    width = Measurement.get(console, console.options, renderable).maximum
    console = Console(file=io.StringIO(), width=max(width, 20), color_system=None, force_terminal=False)
    console.print(renderable)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())


class _Display:
    """A live ``rich`` table on a terminal, plain progress lines otherwise."""

    def __init__(self, tracker: _Tracker, console: Console, live: bool) -> None:
        self.tracker = tracker
        self.console = console
        self.live = live
        self._live = None
        self._name_width = max((len(row.job.name) for row in tracker.rows), default=0)

    def start(self) -> None:
        if self.live:
            from rich.live import Live

            self._live = Live(
                console=self.console,
                refresh_per_second=4,
                transient=True,
                get_renderable=lambda: _StatusTable(self.tracker),
            )
            self._live.start()

    def _line(self, row: _Row, text: str) -> None:
        stamp = _fmt_seconds(time.monotonic() - self.tracker.t0)
        device = row.device or "?"
        self.console.print(
            f"[{stamp:>7}] {row.job.name:<{self._name_width}}  {device:<6}  {text}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )

    def job_event(self, what: str, row: _Row) -> None:
        """A job started or reached a final status."""
        if what == "started":
            if not self.live:
                self._line(row, "started")
            return
        elapsed = _fmt_seconds(row.elapsed_s)
        if row.status == "failed":
            text = f"FAILED after {elapsed}: {row.error}  (log: {row.job.log_path})"
        elif row.status == "cancelled":
            text = f"cancelled: {row.error}"
        elif row.status == "skipped":
            text = f"skipped (outputs exist) in {elapsed}"
        else:
            text = f"{row.status} in {elapsed}"
        if not self.live or row.status == "failed":
            self._line(row, text)

    def tick(self) -> None:
        """Print what happened; plain mode: progress lines, per job at most every ``_PLAIN_PROGRESS_INTERVAL``.

        Never called with the tracker's lock held: the live display's refresh thread takes it.
        """
        for what, row in self.tracker.pop_notes():
            self.job_event(what, row)
        if self.live:
            return
        now = time.monotonic()
        lines = []
        with self.tracker.lock:
            for row in self.tracker.rows:
                if row.status != "running" or row.started_at is None:
                    continue
                if now - max(row.last_line_at, row.started_at) < _PLAIN_PROGRESS_INTERVAL:
                    continue
                parts = []
                if row.epoch is not None:
                    parts.append(f"epoch {_fmt_epoch(row)}")
                if row.elbo is not None:
                    parts.append(f"elbo {_fmt_elbo(row.elbo)}")
                remaining = row.remaining()
                if remaining is not None:
                    parts.append(f"~{_fmt_seconds(remaining)} left")
                if row.message and row.epoch is None:
                    parts.append(row.message)
                if row.epoch is not None and row.epoch == row.last_line_epoch:
                    continue  # nothing new to say
                row.last_line_at, row.last_line_epoch = now, row.epoch
                lines.append((row, "  ".join(parts) or "running"))
        for row, text in lines:
            self._line(row, text)

    def stop(self) -> None:
        """Stop the live display; print the final table and a summary."""
        for what, row in self.tracker.pop_notes():
            self.job_event(what, row)
        if self._live is not None:
            self._live.stop()
            self._live = None
        table = _StatusTable(self.tracker)
        if self.live and self.console.is_terminal:  # plain mode (`--plain`, logs) stays plain
            self.console.print(table)
        else:  # plain text, as wide as the table needs (logs have no width)
            self.console.out(_plain_text(table), highlight=False)
        counts: dict[str, int] = {}
        for row in self.tracker.rows:
            counts[row.status] = counts.get(row.status, 0) + 1
        summary = ", ".join(f"{counts[status]} {status}" for status in _FINAL if status in counts)
        total = _fmt_seconds(time.monotonic() - self.tracker.t0)
        self.console.print(
            f"{len(self.tracker.rows)} jobs in {total}: {summary}", markup=False, highlight=False
        )
        for row in self.tracker.rows:
            if row.status == "failed":
                self.console.print(
                    f"  log of {row.job.name}: {row.job.log_path}", markup=False, highlight=False
                )


# --------------------------------------------------------------------------------------------
# placement: which device a job gets
# --------------------------------------------------------------------------------------------


def _is_gpu(device: str) -> bool:
    return device != "cpu"


class _SlotPool:
    """Fixed slots (``"cuda:0"``, ..., ``"cpu"``): one running job per slot."""

    def __init__(self, devices: list[str]) -> None:
        self.devices = devices
        self.busy: dict[int, str] = {}  # slot index -> job name

    def acquire(self, job: Job) -> int | None:
        free = [i for i in range(len(self.devices)) if i not in self.busy]
        gpus = [i for i in free if _is_gpu(self.devices[i])]
        cpus = [i for i in free if not _is_gpu(self.devices[i])]
        choice = (gpus or cpus) if job.use_gpu else cpus
        if not choice:
            return None
        self.busy[choice[0]] = job.name
        return choice[0]

    def release(self, name: str) -> None:
        for i, busy in list(self.busy.items()):
            if busy == name:
                del self.busy[i]


class _SerialPool(_SlotPool):
    """One job at a time: on the first GPU when it may use one, else on the CPU."""

    def acquire(self, job: Job) -> int | None:
        if self.busy:
            return None
        gpus = [i for i, d in enumerate(self.devices) if _is_gpu(d)]
        cpus = [i for i, d in enumerate(self.devices) if not _is_gpu(d)]
        i = (gpus or cpus)[0] if job.use_gpu else cpus[0]
        self.busy[i] = job.name
        return i


class _OpenPool:
    """No limit: the cluster's scheduler decides where and when (device chosen on the worker)."""

    def __init__(self) -> None:
        self.devices: list[str] = []

    def acquire(self, job: Job) -> int | None:
        return -1

    def release(self, name: str) -> None:
        pass


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------


class _SerialBackend:
    """Runs each job in this process, when it is submitted."""

    def __init__(self, tracker: _Tracker, display: _Display) -> None:
        self.tracker = tracker
        self.display = display
        self.done: list[tuple[_Row, dict]] = []

    def submit(self, row: _Row, device: str | None, slot: int) -> None:
        def emit(event: dict) -> None:
            self.tracker.handle(event)
            self.display.tick()

        outcome = _execute(row.job, device or "cpu", emit)
        self.done.append((row, outcome))

    def wait(self, timeout: float) -> list[tuple[_Row, dict]]:
        done, self.done = self.done, []
        return done

    def interrupt(self) -> None:
        pass

    def close(self) -> None:
        pass


class _LocalBackend:
    """One spawned process per running job; events through a manager queue."""

    def __init__(self, tracker: _Tracker, n_slots: int) -> None:
        import multiprocessing as mp

        self.tracker = tracker
        self.ctx = mp.get_context("spawn")
        self.manager = self.ctx.Manager()
        self.events = self.manager.Queue()
        self.procs: dict[str, Any] = {}
        self.outcomes: dict[str, dict] = {}
        self.terminated: set[str] = set()
        self.threads = max(1, _available_cpus() // max(1, n_slots))

    def submit(self, row: _Row, device: str | None, slot: int) -> None:
        job = row.job
        proc = self.ctx.Process(
            target=_local_entry,
            args=(pickle.dumps(job), job.name, str(job.log_path), device or "cpu", self.events, self.threads),
            name=f"sfact-{job.name}",
            daemon=False,
        )
        # The child starts with SIGINT ignored (inherited through exec), so that a Ctrl-C while
        # it boots prints no traceback: the parent handles Ctrl-C and terminates children. It
        # also starts with the thread limits in its environment, before numpy/torch load (a
        # limit the user set is kept).
        env = {"OMP_WAIT_POLICY": "PASSIVE"}
        env.update(
            dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"), str(self.threads))
        )
        env = {k: v for k, v in env.items() if k not in os.environ}
        ignore = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if ignore else None
        os.environ.update(env)
        try:
            proc.start()
        finally:
            for k in env:
                os.environ.pop(k, None)
            if ignore:
                signal.signal(signal.SIGINT, old)
        self.procs[job.name] = proc

    def _drain(self) -> None:
        while True:
            try:
                event = self.events.get_nowait()
            except queue_mod.Empty:
                return
            if event.get("kind") == "outcome":
                self.outcomes[event["job"]] = event["outcome"]
            else:
                self.tracker.handle(event)

    def wait(self, timeout: float) -> list[tuple[_Row, dict]]:
        from multiprocessing.connection import wait

        if self.procs:
            wait([p.sentinel for p in self.procs.values()], timeout=timeout)
        else:
            time.sleep(timeout)
        exited = [name for name, p in self.procs.items() if p.exitcode is not None]
        self._drain()  # after the exit check: what an exited process sent is in the queue now
        finished = []
        for name in exited:
            proc = self.procs.pop(name)
            proc.join()
            outcome = self.outcomes.pop(name, None)
            if outcome is None:
                code = proc.exitcode
                why = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
                outcome = {"status": "failed", "error": f"worker process {why} before reporting a result"}
            finished.append((self.tracker.by_name[name], outcome))
        return finished

    def interrupt(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        deadline = time.monotonic() + _TERMINATE_GRACE_S
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        self.procs.clear()

    def close(self) -> None:
        self.interrupt()
        self.manager.shutdown()


def _import_distributed():
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(
            'The Dask executor needs `dask.distributed`; install it with `pip install "sfact[dask]"`.'
        ) from exc
    return distributed


class _DaskBackend:
    """Jobs as tasks on a ``dask.distributed`` cluster; progress as Dask events."""

    def __init__(self, tracker: _Tracker, scheduler: str | None, devices: list[str]) -> None:
        # `devices`: the slots of our own LocalCluster (unused with a scheduler address)
        distributed = _import_distributed()
        self.tracker = tracker
        self.events: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
        self.futures: dict[str, Any] = {}
        self.cluster = None
        if scheduler is None:
            self.cluster = distributed.LocalCluster(
                n_workers=len(devices), threads_per_worker=1, processes=True, dashboard_address=None
            )
            self.client = distributed.Client(self.cluster)
            self.client.wait_for_workers(len(devices))
            workers = self.client.scheduler_info(n_workers=-1)["workers"]
            by_name = {info["name"]: address for address, info in workers.items()}
            self.slot_workers = [by_name[i] for i in range(len(devices))]
            self.per_host, _ = self._workers_per_host()
        else:
            self.client = distributed.Client(scheduler)
            self.slot_workers = []
        self.topic = f"sfact-runner-{uuid.uuid4().hex}"
        self.client.subscribe_topic(self.topic, self._on_event)

    def _on_event(self, event) -> None:  # on the client's event loop thread
        self.events.put(event[1])

    def _workers_per_host(self) -> tuple[dict[str, int], bool]:
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        per_host: dict[str, int] = {}
        for info in workers.values():
            per_host[info["host"]] = per_host.get(info["host"], 0) + 1
        has_gpu = any((info.get("resources") or {}).get("GPU", 0) > 0 for info in workers.values())
        return per_host, has_gpu

    def submit(self, row: _Row, device: str | None, slot: int) -> None:
        job = row.job
        key = f"sfact-{job.name}-{uuid.uuid4().hex[:8]}"
        if self.cluster is not None:  # our own LocalCluster: one worker per slot, like "local"
            future = self.client.submit(
                _dask_entry,
                pickle.dumps(job),
                self.topic,
                device,
                False,
                self.per_host,
                key=key,
                pure=False,
                workers=[self.slot_workers[slot]],
                allow_other_workers=False,
            )
        else:
            per_host, has_gpu = self._workers_per_host()
            gpu = job.use_gpu and has_gpu
            stage, index = row.priority()
            future = self.client.submit(
                _dask_entry,
                pickle.dumps(job),
                self.topic,
                None,
                gpu,
                per_host,
                key=key,
                pure=False,
                resources={"GPU": 1} if gpu else None,
                priority=(len(STAGES) - stage) * 1_000_000 - index,
            )
        self.futures[job.name] = future

    def wait(self, timeout: float) -> list[tuple[_Row, dict]]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.tracker.handle(self.events.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue_mod.Empty:
                break
        finished = []
        for name, future in list(self.futures.items()):
            if not future.done():
                continue
            del self.futures[name]
            if future.status == "finished":
                outcome = future.result()
            elif future.status == "cancelled":
                outcome = {"status": "cancelled", "error": "cancelled on the cluster"}
            else:
                exc = future.exception()
                outcome = {"status": "failed", "error": f"on the cluster: {_one_line(exc)}"}
            finished.append((self.tracker.by_name[name], outcome))
        return finished

    def interrupt(self) -> None:
        # Dask cannot stop a task that runs; our own LocalCluster's workers die when it closes
        if self.futures:
            self.client.cancel(list(self.futures.values()))
        self.futures.clear()

    def close(self) -> None:
        self.interrupt()
        with contextlib.suppress(Exception):
            self.client.unsubscribe_topic(self.topic)
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


# --------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------


def _check_plan(jobs: list[Job]) -> None:
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


def _auto_devices() -> list[str]:
    n_gpus = 0
    try:
        import torch

        n_gpus = torch.cuda.device_count()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return [f"cuda:{i}" for i in range(n_gpus)] + ["cpu"]


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
        one, else a free ``"cpu"`` slot. Ignored with a ``scheduler`` address.
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
    if executor not in ("local", "dask", "serial"):
        raise ValueError(f"`executor` must be 'local', 'dask' or 'serial', received {executor!r}.")
    if devices is None:
        devices = _auto_devices()
    else:
        devices = [str(d) for d in devices]
        if "cpu" not in devices:
            devices = [*devices, "cpu"]
    if executor != "serial":
        for job in jobs:
            try:
                pickle.dumps(job)
            except Exception as exc:
                raise TypeError(
                    f"Job {job.name!r} cannot be sent to a worker ({_one_line(exc)}); its function "
                    "must be a top-level function and its kwargs picklable."
                ) from exc
    if console is None:
        console = Console(file=sys.stdout)
    if live is None:
        live = console.is_terminal

    tracker = _Tracker(jobs)
    display = _Display(tracker, console, live)
    if executor == "dask":
        if scheduler is None:
            pool = _SlotPool(devices)
        else:
            pool = _OpenPool()
        backend = _DaskBackend(tracker, scheduler, devices)
    elif executor == "serial":
        pool = _SerialPool(devices)
        backend = _SerialBackend(tracker, display)
    else:
        pool = _SlotPool(devices)
        backend = _LocalBackend(tracker, len(devices))

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
