"""The parent side's state of every job of a run: :class:`Row` and :class:`Tracker`.

The scheduling loop (:func:`._runner.run_jobs`) and the workers' progress events update it;
the display (:mod:`._display`) reads it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from ._eta import Remaining, add_point, criterion, estimate_remaining
from ._jobs import STAGES, Job, JobResult

#: the statuses a job ends with
FINAL = ("done", "skipped", "failed", "cancelled")


@dataclass
class Row:
    """One job's state: status, device, progress (epoch, ELBO), times, outcome."""

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
    trace: list[tuple[float, int, float]] = field(default_factory=list)
    """``(worker time, epoch, ELBO)`` of the training progress events, for :meth:`remaining_estimate`."""
    epochs_over: bool = False
    """A step after the epochs was reported (a message once epochs ran): no time estimate."""
    elapsed_s: float | None = None
    error: str | None = None
    output: dict = field(default_factory=dict)
    last_line_at: float = 0.0
    last_line_epoch: int | None = None

    @property
    def final(self) -> bool:
        """Whether the job reached one of the :data:`FINAL` statuses."""
        return self.status in FINAL

    def priority(self) -> tuple[int, int]:
        """Sort key among jobs that may start: pipeline stage first, then plan order."""
        stage = STAGES.index(self.job.task) if self.job.task in STAGES else len(STAGES)
        return stage, self.index

    def elapsed(self, now: float) -> float | None:
        """Seconds the job ran (so far), ``None`` before it started."""
        if self.elapsed_s is not None:
            return self.elapsed_s
        if self.started_at is not None:
            return now - self.started_at
        return None

    def seconds_per_epoch(self) -> float | None:
        """The current speed, from the epochs reported (``None`` before two points)."""
        if self.rate_last is None:
            return None
        t1, e1 = self.rate_last
        t0, e0 = self.rate_ref if self.rate_ref and self.rate_ref[1] < e1 else (self.worker_t0, 0)
        if t0 is None or e1 <= e0:
            return None
        return (t1 - t0) / (e1 - e0)

    def remaining_estimate(self) -> Remaining | None:
        """Estimated seconds left of a running job's epochs (:func:`._eta.estimate_remaining`).

        Predicted from the job's convergence criterion (``training.tol`` of a pipeline train
        job) and the ELBO reported; otherwise, or while unpredictable, the time to
        ``max_epoch`` as an upper bound. ``None`` once a step after the epochs has begun.
        """
        if self.status != "running" or self.epoch is None or self.epochs_over:
            return None
        crit = criterion(self.job)
        tol, min_iter = crit if crit is not None else (None, 0)
        return estimate_remaining(
            self.trace,
            epoch=self.epoch,
            max_epoch=self.max_epoch or self.job.max_epoch,
            seconds_per_epoch=self.seconds_per_epoch(),
            tol=tol,
            min_iter=min_iter,
        )

    def remaining(self) -> float | None:
        """Estimated seconds left of a running job (see :meth:`remaining_estimate`)."""
        estimate = self.remaining_estimate()
        return None if estimate is None else estimate.seconds


class Tracker:
    """The state of every job; updated by the scheduling loop (and worker events)."""

    def __init__(self, jobs: list[Job]) -> None:
        self.rows = [Row(job, i) for i, job in enumerate(jobs)]
        self.by_name = {row.job.name: row for row in self.rows}
        self.lock = threading.RLock()
        self.t0 = time.monotonic()
        self.notes: list[tuple[str, Row]] = []
        """Jobs that started or finished, for the display (printed outside the lock)."""

    def _notify(self, what: str, row: Row) -> None:
        self.notes.append((what, row))

    def pop_notes(self) -> list[tuple[str, Row]]:
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
    def _progress(row: Row, event: dict) -> None:
        if event.get("max_epoch") is not None:
            row.max_epoch = event["max_epoch"]
        if event.get("elbo") is not None:
            row.elbo = event["elbo"]
        if event.get("message") is not None:
            row.message = event["message"]
            if row.epoch:  # a new step once epochs ran (e.g. saving the model)
                row.epochs_over = True
        if event.get("epoch") is not None:
            row.epoch = event["epoch"]
            point = (event.get("time", time.time()), row.epoch)
            if row.rate_ref is None:
                row.rate_ref = point
            row.rate_last = point
            if event.get("elbo") is not None and event.get("message") is None:
                add_point(row.trace, (point[0], row.epoch, float(event["elbo"])))

    # scheduling
    def submitted(self, row: Row, device: str | None) -> None:
        with self.lock:
            row.status = "starting"
            row.device = device
            row.submitted_at = time.monotonic()

    def finish(self, row: Row, outcome: dict) -> None:
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

    def cancel(self, row: Row, reason: str) -> None:
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

    def ready(self) -> list[Row]:
        rows = [
            row
            for row in self.rows
            if row.status == "pending"
            and all(self.by_name[dep].status in ("done", "skipped") for dep in row.job.depends_on)
        ]
        return sorted(rows, key=Row.priority)

    def all_final(self) -> bool:
        return all(row.final for row in self.rows)

    def results(self) -> list[JobResult]:
        return [
            JobResult.for_job(
                row.job,
                row.status if row.final else "cancelled",  # type: ignore[arg-type]
                device=row.device,
                elapsed_s=row.elapsed_s or 0.0,
                error=row.error,
                output=row.output,
            )
            for row in self.rows
        ]
