"""What the user sees of a run: a live ``rich`` status table, or plain progress lines.

The table has a row per job (job, task, device, status, epoch, ELBO, elapsed, remaining, and
messages or errors), laid out for the console's width (:func:`layout_cells`: at 80 columns
without the repeated data set and task, down to a block of lines per job), never cutting a
status, an epoch, an ELBO or a time. The remaining time is predicted from the job's convergence
criterion (``~1m02s``), or is the time to ``max_iter`` marked as an upper bound (``<2m06s``)
while that is not predictable (:mod:`._eta`). Plain mode (not a terminal, or ``--plain``)
prints a line when a job starts or ends and its progress every
:data:`_PLAIN_PROGRESS_INTERVAL` seconds. Both end with the final table and the run's one
summary line.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple

from ._state import FINAL

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from ._eta import Remaining
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


def fmt_remaining(estimate: Remaining | None) -> str:
    """``~1m02s`` for a prediction, ``<2m06s`` for an upper bound; empty for ``None``."""
    if estimate is None:
        return ""
    return ("<" if estimate.bound else "~") + fmt_seconds(estimate.seconds)


def _info(row: Row) -> str:
    if row.status in ("failed", "cancelled"):
        return row.error or ""
    if row.status == "running":
        return row.message or ""
    return ""


class _Cells(NamedTuple):
    name: str
    task: str
    device: str
    status: str
    epoch: str
    elbo: str
    elapsed: str
    remaining: str
    info: str


#: the info column (messages, errors) is at least this wide, else the info goes below the table
_MIN_INFO = 20
#: and at most this wide
_MAX_INFO = 60
#: the job column is folded to no fewer characters than this; below, one block of lines per job
_MIN_NAME = 12


def _compact_names(cells: list[_Cells]) -> tuple[bool, list[tuple[str | None, str]]]:
    """Whether the task column can go, and ``(data set, short name)`` of every row.

    The task is left out when every job name ends with it (``tiny/pnmf/train``); the data set
    prefix when every name has one (it is shown once, as the title of its rows).
    """
    drop_task = all(c.name == c.task or c.name.endswith(f"/{c.task}") for c in cells)
    if not all("/" in c.name for c in cells):
        return drop_task, [(None, c.name) for c in cells]
    return drop_task, [tuple(c.name.split("/", 1)) for c in cells]  # type: ignore[misc]


def _build_table(cells: list[_Cells], info_width: int) -> Table:
    """The full table: job, task, device, status, epoch, ELBO, elapsed, remaining, and info."""
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
    for c in cells:
        extra = [c.info] if info_width > 0 else []
        status = Text(c.status, style=_STATUS_STYLE.get(c.status, ""))
        table.add_row(c.name, c.task, c.device, status, c.epoch, c.elbo, c.elapsed, c.remaining, *extra)
    return table


def _compact_tables(cells: list[_Cells], info_width: int, name_width: int = 0):
    """The compact table, one per data set, every one with the same column widths.

    No task column when the names end with it; the data set's name as title; the headers
    once, short (``time``, ``left``); the job names folded at ``name_width`` when given.
    """
    from rich import box
    from rich.cells import cell_len
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    drop_task, names = _compact_names(cells)
    headers = ["job", *([] if drop_task else ["task"]), "device", "status", "epoch", "ELBO", "time", "left"]
    rows = [
        (
            dataset,
            [
                name,
                *([] if drop_task else [c.task]),
                c.device,
                c.status,
                c.epoch,
                c.elbo,
                c.elapsed,
                c.remaining,
            ],
            c.info,
        )
        for c, (dataset, name) in zip(cells, names, strict=True)
    ]
    widths = [max([cell_len(h)] + [cell_len(r[1][i]) for r in rows]) for i, h in enumerate(headers)]
    if name_width:
        widths[0] = name_width
    groups: list[tuple[str | None, list]] = []
    for row in rows:
        if not groups or groups[-1][0] != row[0]:
            groups.append((row[0], []))
        groups[-1][1].append(row)
    tables = []
    for i, (dataset, group) in enumerate(groups):
        table = Table(
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            show_edge=False,
            show_header=i == 0,
            title=dataset,
            title_justify="left",
            title_style="bold",
        )
        for j, (header, w) in enumerate(zip(headers, widths, strict=True)):
            right = header in ("epoch", "ELBO", "time", "left")
            fold = j == 0 and name_width
            table.add_column(
                header,
                width=w,
                no_wrap=not fold,
                overflow="fold" if fold else "ellipsis",
                justify="right" if right else "left",
            )
        if info_width > 0:
            table.add_column("info", width=info_width, no_wrap=True, overflow="ellipsis")
        status_at = headers.index("status")
        for _, values, info in group:
            values = list(values)
            values[status_at] = Text(values[status_at], style=_STATUS_STYLE.get(values[status_at], ""))
            table.add_row(*values, *([info] if info_width > 0 else []))
        tables.append(table)
    return Group(*tables)


def _info_lines(cells: list[_Cells]) -> list:
    """The info (messages, errors) of the jobs that have one, a line each (below the tables)."""
    from rich.text import Text

    _, names = _compact_names(cells)
    one = len({d for d, _ in names}) == 1
    return [
        Text(f" {name if one else c.name}: {c.info}", style="dim", no_wrap=True, overflow="ellipsis")
        for c, (_, name) in zip(cells, names, strict=True)
        if c.info
    ]


def _pack(words: list[str], width: int) -> list[str]:
    """``words`` joined by two spaces into lines of at most ``width`` (a longer word alone)."""
    lines: list[str] = []
    for word in words:
        if lines and len(lines[-1]) + 2 + len(word) <= width:
            lines[-1] += "  " + word
        else:
            lines.append(word)
    return lines


def _job_lines(cells: list[_Cells], max_width: int):
    """A block of lines per job (narrow consoles): name, status, device; numbers; info."""
    from rich.console import Group
    from rich.padding import Padding
    from rich.text import Text

    blocks = []
    for c in cells:
        blocks.append(Text(c.name, style="bold", overflow="fold"))
        status = Text(c.status, style=_STATUS_STYLE.get(c.status, ""))
        if c.device:
            status.append(f"  {c.device}")
        numbers = [
            f"epoch {c.epoch}" if c.epoch else "",
            f"ELBO {c.elbo}" if c.elbo else "",
            f"time {c.elapsed}" if c.elapsed else "",
            f"{c.remaining} left" if c.remaining else "",
        ]
        lines = [status, *(Text(line) for line in _pack([n for n in numbers if n], max_width - 2))]
        if c.info:
            lines.append(Text(c.info, style="dim", overflow="fold"))
        blocks.extend(Padding(line, (0, 0, 0, 2)) for line in lines)
    return Group(*blocks)


class _StatusTable:
    """The status table (job, task, device, status, epoch, ELBO, elapsed, remaining, info).

    A renderable that reads the jobs' state when it is drawn, laid out for the width it gets:
    every column in full when they fit, the info column (messages, errors) getting the width
    the others leave (at most 60, none below 10); otherwise without what repeats (the task,
    which ends each job name, and the data set, shown once) and with short headers; then with
    the job names folded; and below that one block of lines per job. Statuses, epochs, ELBOs
    and times are never cut.
    """

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def _cells(self) -> list[_Cells]:
        now = time.monotonic()
        with self.tracker.lock:
            return [
                _Cells(
                    row.job.name,
                    row.job.task,
                    row.device or "",
                    row.status,
                    fmt_epoch(row),
                    fmt_elbo(row.elbo),
                    fmt_seconds(row.elapsed(now)),
                    fmt_remaining(row.remaining_estimate()),
                    _info(row),
                )
                for row in self.tracker.rows
            ]

    def table(self, console, max_width: int):
        """The table (or the lines) at ``max_width``."""
        return layout_cells(self._cells(), console, max_width)

    def __rich_console__(self, console, options):
        yield self.table(console, options.max_width)

    def __rich_measure__(self, console, options):
        from rich.measure import Measurement

        return Measurement.get(console, options, self.table(console, options.max_width))


def layout_cells(cells: list[_Cells], console, max_width: int):
    """The widest layout of ``cells`` that fits ``max_width`` (see :class:`_StatusTable`)."""
    from rich.console import Group
    from rich.measure import Measurement

    options = console.options.update_width(10_000)

    def width(renderable) -> int:
        return Measurement.get(console, options, renderable).maximum

    has_info = any(c.info for c in cells)
    full = width(_build_table(cells, 0))
    if full + (_MIN_INFO + 2 if has_info else 0) <= max_width:
        return _build_table(cells, min(_MAX_INFO, max_width - full - 2) if has_info else 0)
    compact = width(_compact_tables(cells, 0))
    if compact <= max_width:
        if has_info and compact + _MIN_INFO + 2 <= max_width:
            return _compact_tables(cells, min(_MAX_INFO, max_width - compact - 2))
        return Group(_compact_tables(cells, 0), *_info_lines(cells))
    # the job names folded into what the other columns leave
    name_width = max_width - (width(_compact_tables(cells, 0, name_width=1)) - 1)
    if name_width >= _MIN_NAME:
        return Group(_compact_tables(cells, 0, name_width=name_width), *_info_lines(cells))
    return _job_lines(cells, max_width)


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
                remaining = row.remaining_estimate()
                if remaining is not None:
                    parts.append(f"{fmt_remaining(remaining)} left")
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
