"""What the user reads of a plan and its run: the printed plan and ``run_summary.json``."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from ._config_schema import PRIORS
from ._jobs import STAGES
from ._layout import Layout, _jsonable, _write_json

if TYPE_CHECKING:
    from ._jobs import JobResult
    from ._plan import Plan


def print_plan(plan: Plan, file: IO[str] | None = None) -> None:
    """Print the plan: for each data set its jobs (run or skipped, dependencies, device kind).

    Examples
    --------
    >>> from sfact.pipeline import print_plan
    >>> print_plan(plan)  # doctest: +SKIP
    """
    file = sys.stdout if file is None else file
    n_run, n_skip = len(plan.jobs), len(plan.skipped)
    print(
        f"Plan: {n_run} job{'s' if n_run != 1 else ''} to run, {n_skip} skipped (outputs exist), "
        f"{len(plan.datasets)} data set{'s' if len(plan.datasets) != 1 else ''}",
        file=file,
    )
    rows: dict[str, list[tuple[str, str]]] = {d: [] for d in plan.datasets}
    width = max([len(j.name) for j in plan.jobs] + [len(r.name) for r in plan.skipped] + [20])
    for j in plan.jobs:
        extra = []
        if j.depends_on:
            # within a data set and prior, the stage is enough ("after train")
            deps = [d.rsplit("/", 1)[-1] if d.startswith(f"{j.dataset}/") else d for d in j.depends_on]
            extra.append(f"after {', '.join(deps)}")
        extra.append("gpu" if j.needs_gpu else "gpu/cpu" if j.use_gpu else "cpu")
        if j.task == "train":
            extra.append(f"max_iter {j.max_epoch}")
            if j.kwargs.get("resume"):
                extra.append("resume")
        if j.name in plan.redo:
            extra.append(f"redo: outputs exist but {plan.redo[j.name].rsplit('/', 1)[-1]} runs first")
        elif j.kwargs.get("force"):
            extra.append("force")
        rows[j.dataset].append((j.name, f"run   {j.name:<{width}s}  {'  '.join(extra)}"))
    for r in plan.skipped:
        rows[r.dataset].append((r.name, f"skip  {r.name:<{width}s}  {r.output.get('reason', '')}"))
    order = {j.name: i for i, j in enumerate(plan.jobs)}
    order.update({r.name: i for i, r in enumerate(plan.skipped, start=len(order))})
    stage_rank = {s: i for i, s in enumerate(STAGES)}
    for ds, out_dir in plan.datasets.items():
        print(f"  {ds}  ->  {out_dir}", file=file)
        items = rows[ds]

        def key(item: tuple[str, str]) -> tuple:
            parts = item[0].split("/")
            prior = "" if len(parts) == 2 else parts[1]
            prank = PRIORS.index(prior) if prior in PRIORS else -1
            return (prank, stage_rank.get(parts[-1], 9))

        for _, line in sorted(items, key=key):
            print(f"    {line}".rstrip(), file=file)
        logs = sorted({str(j.log_path) for j in plan.jobs if j.dataset == ds})
        if logs:
            print(f"    logs: {Path(logs[0]).parent}/", file=file)
    if plan.notes:
        print("Notes:", file=file)
        for n in plan.notes:
            print(f"  - {n}", file=file)


def write_summaries(plan: Plan, results: Sequence[JobResult], *, command: str | None = None) -> list[Path]:
    """Update ``run_summary.json`` in every output folder with this run's results.

    Entries of jobs not in this run are kept; a skipped job keeps its earlier entry under
    ``previous``.

    Returns
    -------
    The summary files written.

    Examples
    --------
    >>> write_summaries(plan, results, command="sfact run all -c general.yaml")  # doctest: +SKIP
    """
    from .._version import __version__

    by_dir: dict[str, list[JobResult]] = {}
    for r in results:
        d = plan.output_dirs.get(r.name)
        if d is not None:
            by_dir.setdefault(d, []).append(r)
    written = []
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    for d, rs in by_dir.items():
        path = Layout(Path(d)).summary
        try:
            summary = json.loads(path.read_text())
            if not isinstance(summary.get("jobs"), dict):
                raise ValueError
        except (OSError, ValueError):
            summary = {"jobs": {}}
        jobs = summary["jobs"]
        for r in rs:
            entry = {
                "task": r.task,
                "prior": r.prior,
                "status": r.status,
                "device": r.device,
                "elapsed_s": round(float(r.elapsed_s), 3),
                "log_path": None if r.log_path is None else str(r.log_path),
                "error": r.error,
                "output": r.output,
                "config": plan.sources.get(r.name),
                "finished_at": now,
            }
            if r.status == "skipped":
                prev = jobs.get(r.name)
                if isinstance(prev, dict):
                    prev = {k: v for k, v in prev.items() if k != "previous"}
                    entry["previous"] = (
                        prev if prev.get("status") != "skipped" else prev.get("previous", prev)
                    )
            jobs[r.name] = entry
        summary.update({"updated": now, "sfact_version": __version__, "command": command, "jobs": jobs})
        counts: dict[str, int] = {}
        for e in jobs.values():
            counts[e["status"]] = counts.get(e["status"], 0) + 1
        summary["counts"] = counts
        Path(d).mkdir(parents=True, exist_ok=True)
        _write_json(path, _jsonable(summary))
        written.append(path)
    return written
