"""What the user sees of a run: a live ``rich`` status table, or plain progress lines.

The table has a row per job (job, task, device, status, epoch, ELBO, elapsed, remaining, and
messages or errors); plain mode (not a terminal, or ``--plain``) prints a line when a job starts
or ends and its progress every :data:`_PLAIN_PROGRESS_INTERVAL` seconds. Both end with the
final table and a summary.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ._state import FINAL

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from ._state import Row, Tracker

#: seconds between two plain progress lines of one job
_PLAIN_PROGRESS_INTERVAL = 10.0


_STATUS_STYLE = {
    "pending": "dim",
    "starting": "cyan",
    "running": "bold cyan",
    "done": "green",
    "skipped": "green",
    "failed": "bold red",
    "cancelled": "yellow",
}


def fmt_seconds(s: float | None) -> str:
    """``42.1s``, ``12m03s``, ``3h02m``; empty for ``None``."""
    if s is None:
        return ""
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(round(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def fmt_elbo(elbo: float | None) -> str:
    """The ELBO with 4 decimals (scientific notation from 1e6); empty for ``None``."""
    if elbo is None:
        return ""
    return f"{elbo:.4f}" if abs(elbo) < 1e6 else f"{elbo:.4e}"


def fmt_epoch(row: Row) -> str:
    """``epoch/max_epoch`` of a row; empty before the first epoch."""
    if row.epoch is None:
        return ""
    max_epoch = row.max_epoch or row.job.max_epoch
    return f"{row.epoch}/{max_epoch}" if max_epoch else str(row.epoch)


def _info(row: Row) -> str:
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

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def _cells(self) -> list[tuple]:
        now = time.monotonic()
        with self.tracker.lock:
            return [
                (
                    row.job.name,
                    row.job.task,
                    row.device or "",
                    fmt_epoch(row),
                    fmt_elbo(row.elbo),
                    fmt_seconds(row.elapsed(now)),
                    fmt_seconds(row.remaining()),
                    row.status,
                    _info(row),
                )
                for row in self.tracker.rows
            ]

    def table(self, console, max_width: int) -> Table:
        """The table at ``max_width`` (the info column gets what is left)."""
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


class Display:
    """A live ``rich`` table on a terminal, plain progress lines otherwise."""

    def __init__(self, tracker: Tracker, console: Console, live: bool) -> None:
        self.tracker = tracker
        self.console = console
        self.live = live
        self._live = None
        self._name_width = max((len(row.job.name) for row in tracker.rows), default=0)

    def start(self) -> None:
        """Start the live display (nothing in plain mode)."""
        if self.live:
            from rich.live import Live

            self._live = Live(
                console=self.console,
                refresh_per_second=4,
                transient=True,
                get_renderable=lambda: _StatusTable(self.tracker),
            )
            self._live.start()

    def _line(self, row: Row, text: str) -> None:
        stamp = fmt_seconds(time.monotonic() - self.tracker.t0)
        device = row.device or "?"
        self.console.print(
            f"[{stamp:>7}] {row.job.name:<{self._name_width}}  {device:<6}  {text}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )

    def job_event(self, what: str, row: Row) -> None:
        """A job started or reached a final status."""
        if what == "started":
            if not self.live:
                self._line(row, "started")
            return
        elapsed = fmt_seconds(row.elapsed_s)
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
                    parts.append(f"epoch {fmt_epoch(row)}")
                if row.elbo is not None:
                    parts.append(f"elbo {fmt_elbo(row.elbo)}")
                remaining = row.remaining()
                if remaining is not None:
                    parts.append(f"~{fmt_seconds(remaining)} left")
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
        summary = ", ".join(f"{counts[status]} {status}" for status in FINAL if status in counts)
        total = fmt_seconds(time.monotonic() - self.tracker.t0)
        self.console.print(
            f"{len(self.tracker.rows)} jobs in {total}: {summary}", markup=False, highlight=False
        )
        for row in self.tracker.rows:
            if row.status == "failed":
                self.console.print(
                    f"  log of {row.job.name}: {row.job.log_path}", markup=False, highlight=False
                )
