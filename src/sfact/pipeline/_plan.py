"""From configs and requested stages to a plan of :class:`~sfact.pipeline.Job` s, and running it.

:func:`make_plan` sorts the stages into pipeline order, expands each config into its priors,
preprocesses once per output folder, gives every job a unique name and its dependencies, and
leaves out (as ``skipped``) the jobs whose outputs exist unless ``force``. :func:`run_plan`
hands the jobs to the parallel runner (:mod:`sfact.pipeline._runner`) or runs them one after
the other in this process (``executor="serial"``), then :func:`write_summaries` records the
outcome in each output folder's ``run_summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ._config import MULTIGROUP_PRIORS, PRIORS, Config, ConfigError, find_configs, load_config
from ._jobs import STAGES, Job, JobResult
from ._stages import STAGE_FUNCTIONS, Layout, _jsonable, _write_json

if TYPE_CHECKING:
    from ._jobs import Task


@dataclass
class Plan:
    """Jobs to run, jobs left out because their outputs exist, and notes for the user."""

    jobs: list[Job] = field(default_factory=list)
    skipped: list[JobResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    output_dirs: dict[str, str] = field(default_factory=dict)
    """Output folder of every job (run or skipped), by job name."""
    datasets: dict[str, str] = field(default_factory=dict)
    """Output folder of every data set, by data set name."""
    sources: dict[str, str | None] = field(default_factory=dict)
    """Config file of every job, by job name."""
    redo: dict[str, str] = field(default_factory=dict)
    """Jobs whose outputs exist but are redone because the job they follow runs (name -> that job)."""


def collect_configs(paths: Sequence[str | os.PathLike], config_name: str = "general.yaml") -> list[Config]:
    """Load configs from files and folders (every ``config_name`` file below a folder).

    Parameters
    ----------
    paths
        Config files or folders.
    config_name
        File name (glob pattern allowed) searched for below folders.

    Returns
    -------
    The validated configs, each file once, in the order given (folders sorted).

    Examples
    --------
    >>> from sfact.pipeline import collect_configs
    >>> cfgs = collect_configs(["configs/"], "general_test.yaml")  # doctest: +SKIP
    """
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = find_configs(p, config_name)
            if not found:
                raise ConfigError(
                    f"no file named {config_name!r} below this folder (see --config-name).", file=p
                )
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise ConfigError("config file not found.", file=p)
    seen: set[Path] = set()
    out = []
    for f in files:
        r = f.resolve()
        if r in seen:
            continue
        seen.add(r)
        out.append(load_config(f))
    return out


def _stages_in_order(stages: Sequence[str]) -> list[Task]:
    if "all" in stages:
        return list(STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"Unknown stage(s) {unknown}; stages: {', '.join(STAGES)} or all.")
    return [s for s in STAGES if s in stages]


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _command_hint(cfg: Config, stage: str) -> str:
    return f"sfact {stage}" + (f" -c {cfg.source}" if cfg.source else "")


def make_plan(
    configs: Sequence[Config],
    stages: Sequence[str],
    *,
    priors: Sequence[str] | None = None,
    force: bool = False,
    resume: bool = False,
) -> Plan:
    """Turn configs and stages into jobs.

    Parameters
    ----------
    configs
        Validated configs (:func:`load_config`, :func:`collect_configs`).
    stages
        Stages to run, in any order (``"all"`` for every stage); they run in pipeline order,
        and nothing unrequested is added.
    priors
        Priors to run; each config's ``model.prior`` when ``None``, or every prior that applies
        when that is unset (the multi-group priors need a group key).
    force
        Redo stages whose outputs exist.
    resume
        Continue training from saved models (history appended); train afresh without one.

    Returns
    -------
    The :class:`Plan`: ``preprocess`` once per output folder, then ``train``, ``analyze`` and
    ``figures`` per prior, each depending on the previous stage when that runs too. A stage
    whose outputs exist is skipped unless ``force`` (``train`` also runs with ``resume``), and
    reruns when the stage before it runs in the same plan (``analyze`` after a new
    ``train``, ``figures`` after a new ``analyze``).

    Raises
    ------
    ConfigError
        When two configs write to one output folder with different data settings, or the
        same prior there with different settings.

    Examples
    --------
    >>> from sfact.pipeline import load_config, make_plan
    >>> plan = make_plan([load_config("configs/osmfish/general_test.yaml")], ["all"])  # doctest: +SKIP
    >>> [j.name for j in plan.jobs][:3]  # doctest: +SKIP
    ['osmfish_test/preprocess', 'osmfish_test/pnmf/train', 'osmfish_test/pnmf/analyze']
    """
    order = _stages_in_order(stages)
    if priors is not None:
        bad = [p for p in priors if p not in PRIORS]
        if bad:
            raise ValueError(f"Unknown prior(s) {bad}; priors: {', '.join(PRIORS)}.")
    plan = Plan()
    if resume and "train" not in order:
        plan.notes.append("--resume only affects training, which is not in this run.")

    # group the configs by output folder: one preprocessing each, priors unique within
    groups: dict[str, dict[str, Any]] = {}
    for cfg in configs:
        g = groups.setdefault(cfg.output_dir, {"configs": [], "fits": {}})
        if g["configs"]:
            first: Config = g["configs"][0]
            diff = _differences(first.data_dict(), cfg.data_dict())
            if diff:
                raise ConfigError(
                    f"{first.source} and {cfg.source} write to the same output folder {cfg.output_dir} but "
                    f"prepare the data differently ({', '.join(diff)}); give them different `output_dir`s.",
                    key="output_dir",
                    file=cfg.source,
                )
            if first.name != cfg.name:
                raise ConfigError(
                    f"{first.source} (name {first.name!r}) and {cfg.source} (name {cfg.name!r}) write to the "
                    f"same output folder {cfg.output_dir}; give them one name or different `output_dir`s.",
                    key="name",
                    file=cfg.source,
                )
        g["configs"].append(cfg)
        if priors is not None:
            wanted = [p for p in PRIORS if p in priors]
        elif cfg.model.prior is not None:
            wanted = [cfg.model.prior]
        else:
            wanted = list(PRIORS)
        for p in wanted:
            if p in MULTIGROUP_PRIORS and cfg.group_key is None:
                plan.notes.append(
                    f"{cfg.name}: {p} left out, the data set has no group key (set `dataset.group_key`)."
                )
                continue
            pc = cfg.with_prior(p)
            other = g["fits"].get(p)
            if other is not None:
                diff = _differences(other.fit_dict(), pc.fit_dict())
                if diff:
                    raise ConfigError(
                        f"{other.source} and {cfg.source} both train {p} into {cfg.output_dir} with different "
                        f"settings ({', '.join(diff)}); run them separately or give them different `output_dir`s.",
                        key="model.prior",
                        file=cfg.source,
                    )
                continue
            g["fits"][p] = pc
    # drop notes repeated by several configs of one data set
    plan.notes = list(dict.fromkeys(plan.notes))

    used_names: set[str] = set()
    for out_dir, g in groups.items():
        cfg0: Config = g["configs"][0]
        name = cfg0.name
        k = 2
        while name in used_names:
            name = f"{cfg0.name}-{k}"
            k += 1
        if name != cfg0.name:
            plan.notes.append(
                f"two data sets are named {cfg0.name!r}; the one in {out_dir} is {name!r} here."
            )
        used_names.add(name)
        plan.datasets[name] = out_dir
        layout = Layout(Path(out_dir))

        def add(job: Job, *, run: bool, reason: str, source: str | None, out_dir: str = out_dir) -> bool:
            plan.output_dirs[job.name] = out_dir
            plan.sources[job.name] = source
            if run:
                plan.jobs.append(job)
            else:
                plan.skipped.append(
                    JobResult(
                        name=job.name,
                        task=job.task,
                        status="skipped",
                        log_path=job.log_path,
                        output={"reason": reason},
                        dataset=job.dataset,
                        prior=job.prior,
                    )
                )
            return run

        pre_name = f"{name}/preprocess"
        pre_runs = False
        if "preprocess" in order:
            job = Job(
                name=pre_name,
                task="preprocess",
                fn=STAGE_FUNCTIONS["preprocess"],
                kwargs={"config": cfg0.to_dict(), "config_file": cfg0.source, "force": force},
                log_path=layout.log(None),
                dataset=name,
            )
            done = layout.done("preprocess")
            pre_runs = add(
                job,
                run=force or not done,
                reason=f"outputs exist ({layout.prepared})",
                source=cfg0.source,
            )
            if done and not force:
                stale = _stale_prepared(layout, cfg0)
                if stale:
                    plan.notes.append(
                        f"{name}: prepared.h5ad was made with other settings ({', '.join(stale)}); "
                        "it is kept: use --force to redo it."
                    )
        elif any(t in order for t in ("train", "analyze")) and not layout.prepared.exists() and g["fits"]:
            first_needing = "train" if "train" in order else "analyze"
            plan.notes.append(
                f"{name}: {layout.prepared} is missing, so {first_needing} will fail: run "
                f"`{_command_hint(cfg0, 'preprocess')}` first (or `sfact run all`)."
            )

        for prior, pc in g["fits"].items():
            upstream = pre_name if pre_runs else None
            upstream_runs = pre_runs
            for task in ("train", "analyze", "figures"):
                if task not in order:
                    if upstream_runs and layout.done(task, prior):
                        plan.notes.append(
                            f"{name}/{prior}: the {task} outputs will be older than the new "
                            f"{upstream.rsplit('/', 1)[-1]} outputs: redo them with "
                            f"`{_command_hint(pc, task)} --force`."
                        )
                    upstream, upstream_runs = None, False
                    continue
                job_name = f"{name}/{prior}/{task}"
                done = layout.done(task, prior)
                kwargs: dict[str, Any] = {
                    "config": pc.to_dict(),
                    "prior": prior,
                    "config_file": pc.source,
                    "force": force,
                }
                if task == "train":
                    kwargs["resume"] = resume
                    run = force or resume or not done
                    reason = f"a saved model exists ({layout.model_dir(prior)}); --resume continues it"
                    stale = _stale_model(layout, prior, pc) if done and not force else []
                    if stale:
                        plan.notes.append(
                            f"{job_name}: the saved model was trained with other settings ({', '.join(stale)}); "
                            f"it is {'continued' if resume else 'kept'}: use --force to train afresh."
                        )
                else:
                    run = force or not done or upstream_runs
                    reason = f"outputs exist ({layout.marker(task, prior)})"
                    if done and upstream_runs and not force:
                        # the outputs would be stale once the stage before runs: redo them
                        kwargs["force"] = True
                        plan.redo[job_name] = upstream
                job = Job(
                    name=job_name,
                    task=task,
                    fn=STAGE_FUNCTIONS[task],
                    kwargs=kwargs,
                    log_path=layout.log(prior),
                    depends_on=(upstream,) if (upstream is not None and upstream_runs) else (),
                    use_gpu=task in ("train", "analyze") and pc.training.device != "cpu",
                    dataset=name,
                    prior=prior,
                    max_epoch=pc.training.max_iter if task == "train" else None,
                )
                ran = add(job, run=run, reason=reason, source=pc.source)
                if ran and not upstream_runs:
                    need = {"train": "preprocess", "analyze": "train", "figures": "analyze"}[task]
                    need_done = layout.done(need, prior if need != "preprocess" else None)
                    if not need_done and need not in order:
                        plan.notes.append(
                            f"{job_name} needs the outputs of {need}, which are missing: run "
                            f"`{_command_hint(pc, need)}` first."
                        )
                upstream, upstream_runs = job_name, ran
    return plan


def _stale_prepared(layout: Layout, cfg: Config) -> list[str]:
    """Keys whose settings differ from those ``prepared.h5ad`` was made with."""
    try:
        info = json.loads(layout.prepared_info.read_text())
    except (OSError, ValueError):
        return []
    old = {"dataset": info.get("dataset"), "preprocessing": info.get("preprocessing")}
    return _differences(old, json.loads(json.dumps(cfg.data_dict())))


def _stale_model(layout: Layout, prior: str, cfg: Config) -> list[str]:
    """``model`` keys whose settings differ from those the saved model was trained with.

    Data settings are checked against ``prepared.json``; ``training`` may differ (training longer
    or differently is what ``--resume`` is for).
    """
    import yaml

    try:
        old = Config.from_dict(yaml.safe_load(layout.fit_config(prior).read_text()))
    except (OSError, ValueError, yaml.YAMLError):
        return []
    a, b = {"model": old.fit_dict()["model"]}, {"model": cfg.fit_dict()["model"]}
    return _differences(json.loads(json.dumps(a)), json.loads(json.dumps(b)))


# ---------------------------------------------------------------------------------------------
# printing
# ---------------------------------------------------------------------------------------------
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
        extra.append("gpu/cpu" if j.use_gpu else "cpu")
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


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
def _topological(jobs: Sequence[Job]) -> list[Job]:
    by_name = {j.name: j for j in jobs}
    done: set[str] = set()
    out: list[Job] = []
    pending = list(jobs)
    while pending:
        progressed = False
        rest = []
        for j in pending:
            if all(d in done or d not in by_name for d in j.depends_on):
                out.append(j)
                done.add(j.name)
                progressed = True
            else:
                rest.append(j)
        if not progressed:
            raise ValueError(f"Jobs depend on each other in a cycle: {[j.name for j in rest]}.")
        pending = rest
    return out


class _ConsoleReporter:
    """Progress of a serial job: a line to the console at most every few seconds."""

    def __init__(self, name: str, console: IO[str], every_s: float = 5.0):
        self.name, self.console, self.every_s = name, console, every_s
        self.last = time.monotonic()

    def __call__(self, *, epoch=None, max_epoch=None, elbo=None, message=None) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        self.last = now
        parts = []
        if epoch is not None:
            parts.append(f"epoch {epoch}" + (f"/{max_epoch}" if max_epoch else ""))
        if elbo is not None:
            parts.append(f"ELBO {elbo:.5g}")
        if message:
            parts.append(message)
        print(f"      {self.name}: {', '.join(parts)}", file=self.console, flush=True)


def _serial_device(job: Job, devices: Sequence[str] | None) -> str:
    if not job.use_gpu:
        return "cpu"
    if devices:
        gpus = [d for d in devices if d != "cpu"]
        return gpus[0] if gpus else "cpu"
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _run_serial(
    jobs: Sequence[Job], *, devices: Sequence[str] | None = None, console: IO[str] | None = None
) -> list[JobResult]:
    """Run jobs one after the other in this process (``--executor serial``).

    Dependencies are honoured (a failed or cancelled dependency cancels the job; other jobs
    go on); each job's output (stdout, stderr, sfact's log) is appended to its log file, and
    an exception becomes a ``failed`` result with the traceback in the log.
    """
    console = sys.stdout if console is None else console
    results: dict[str, JobResult] = {}
    ordered = _topological(jobs)
    n = len(ordered)
    for i, job in enumerate(ordered, 1):
        prefix = f"  [{i}/{n}] {job.name}"
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        bad = [d for d in job.depends_on if d in results and results[d].status in ("failed", "cancelled")]
        if bad:
            with open(job.log_path, "a") as fh:
                fh.write(f"--- {job.name}: cancelled, {', '.join(bad)} did not finish\n")
            results[job.name] = JobResult(
                name=job.name,
                task=job.task,
                status="cancelled",
                log_path=job.log_path,
                error=f"dependency {', '.join(bad)} did not finish",
                dataset=job.dataset,
                prior=job.prior,
            )
            print(f"{prefix}: cancelled ({', '.join(bad)} did not finish)", file=console, flush=True)
            continue
        device = _serial_device(job, devices)
        print(f"{prefix}: running on {device}", file=console, flush=True)
        t0 = time.perf_counter()
        status, error, output = "done", None, {}
        with open(job.log_path, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
            try:
                output = job.fn(**job.kwargs, device=device, report=_ConsoleReporter(job.name, console)) or {}
                if output.get("status") == "skipped":
                    status = "skipped"
            except Exception as e:
                traceback.print_exc(file=fh)
                status, error = "failed", _one_line(e)
        elapsed = time.perf_counter() - t0
        results[job.name] = JobResult(
            name=job.name,
            task=job.task,
            status=status,
            device=device,
            elapsed_s=elapsed,
            log_path=job.log_path,
            error=error,
            output=output,
            dataset=job.dataset,
            prior=job.prior,
        )
        tail = f" ({error}; log: {job.log_path})" if error else ""
        print(f"{prefix}: {status} in {elapsed:.1f} s{tail}", file=console, flush=True)
    return [results[j.name] for j in jobs]


def run_plan(
    plan: Plan,
    *,
    executor: str = "local",
    scheduler: str | None = None,
    devices: list[str] | None = None,
    live: bool | None = None,
    console: Any = None,
) -> list[JobResult]:
    """Run the plan's jobs and return every result, the skipped ones included.

    Parameters
    ----------
    plan
        From :func:`make_plan`.
    executor
        ``"local"`` (worker processes, one job per GPU and one CPU job at a time), ``"dask"``
        (a Dask cluster at ``scheduler``) or ``"serial"`` (one after the other in this process).
    scheduler
        Address of the Dask scheduler.
    devices
        Devices to use (``["cpu", "cuda:0", ...]``); all that are found when ``None``.
    live
        Show the live status table (default: when the console is a terminal).
    console
        Where progress goes.

    Returns
    -------
    One :class:`~sfact.pipeline.JobResult` per job, skipped jobs first.

    Examples
    --------
    >>> results = run_plan(plan, executor="serial")  # doctest: +SKIP
    """
    results: list[JobResult] = []
    if plan.jobs:
        if executor == "serial":
            results = _run_serial(plan.jobs, devices=devices, console=console)
        else:
            try:
                from ._runner import run_jobs
            except ModuleNotFoundError as e:
                if e.name != "sfact.pipeline._runner":
                    raise
                if executor == "dask":
                    raise RuntimeError(
                        "The Dask executor needs sfact.pipeline._runner, which is missing."
                    ) from e
                print(
                    "  (parallel runner not available: running the jobs one after the other)", file=sys.stderr
                )
                results = _run_serial(plan.jobs, devices=devices, console=console)
            else:
                results = run_jobs(
                    plan.jobs,
                    executor=executor,
                    scheduler=scheduler,
                    devices=devices,
                    live=live,
                    console=console,
                )
    for r in results:
        if r.status == "done" and isinstance(r.output, dict) and r.output.get("status") == "skipped":
            r.status = "skipped"
    return [*plan.skipped, *results]


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
    from .. import __version__

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
