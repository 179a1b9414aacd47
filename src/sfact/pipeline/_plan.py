"""From configs and requested stages to a plan of :class:`~sfact.pipeline.Job` s, and running it.

:func:`make_plan` sorts the stages into pipeline order, expands each config into its priors,
preprocesses once per output folder, gives every job a unique name and its dependencies, and
leaves out (as ``skipped``) the jobs whose outputs exist unless ``force``. :func:`run_plan`
hands the jobs to the runner (:func:`sfact.pipeline._runner.run_jobs`, whatever the executor),
then :func:`~sfact.pipeline.write_summaries` records the outcome in each output folder's
``run_summary.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._constants import is_gpu
from ._backends import worker_devices
from ._config import Config
from ._config_files import find_configs, load_config
from ._config_schema import MULTIGROUP_PRIORS, PRIORS, ConfigError
from ._jobs import ALL_STAGES, STAGES, Job, JobResult
from ._layout import Layout, check_output_dir, remove_stale_temporaries
from ._runner import run_jobs
from ._stages import STAGE_FUNCTIONS

if TYPE_CHECKING:
    from rich.console import Console

    from ._jobs import Task
    from ._runner import Executor

#: the stage whose outputs each stage reads
_NEEDS = {"train": "preprocess", "analyze": "train", "figures": "analyze"}


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
    unknown = [s for s in stages if s not in STAGES and s != "all"]
    if unknown:
        raise ValueError(f"Unknown stage(s) {unknown}; stages: {', '.join(STAGES)} or all.")
    wanted = set(stages) | (set(ALL_STAGES) if "all" in stages else set())
    return [s for s in STAGES if s in wanted]


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
    groups = _group_by_output(configs, priors, plan.notes)
    plan.notes = list(dict.fromkeys(plan.notes))  # notes repeated by several configs of one data set
    used_names: set[str] = set()
    for out_dir, group in groups.items():
        name = _unique_name(group.configs[0].name, out_dir, used_names, plan.notes)
        plan.datasets[name] = out_dir
        ds = _Dataset(plan, name, out_dir, order, force=force, resume=resume)
        pre_runs = _plan_preprocess(ds, group)
        if "select" in order:
            _plan_select(ds, group, priors, pre_runs)
        for prior, pc in group.fits.items():
            _plan_prior(ds, prior, pc, pre_runs)
    return plan


# ---------------------------------------------------------------------------------------------
# configs grouped by output folder
# ---------------------------------------------------------------------------------------------
@dataclass
class _Group:
    """The configs that write to one output folder, and the config of each prior trained there."""

    configs: list[Config] = field(default_factory=list)
    fits: dict[str, Config] = field(default_factory=dict)


def _group_by_output(
    configs: Sequence[Config], priors: Sequence[str] | None, notes: list[str]
) -> dict[str, _Group]:
    """One group per output folder: one preprocessing each, every prior trained once there."""
    groups: dict[str, _Group] = {}
    for cfg in configs:
        group = groups.setdefault(cfg.output_dir, _Group())
        if group.configs:
            _check_same_data(group.configs[0], cfg)
        group.configs.append(cfg)
        for p in _wanted_priors(cfg, priors):
            if p in MULTIGROUP_PRIORS and cfg.group_key is None:
                notes.append(
                    f"{cfg.name}: {p} left out, the data set has no group key (set `dataset.group_key`)."
                )
                continue
            _add_fit(group, p, cfg)
    return groups


def _check_same_data(first: Config, cfg: Config) -> None:
    """Two configs writing to one folder must prepare the data alike and share the name."""
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


def _wanted_priors(cfg: Config, priors: Sequence[str] | None) -> list[str]:
    """The priors asked for (in pipeline order), else the config's prior, else every prior."""
    if priors is not None:
        return [p for p in PRIORS if p in priors]
    if cfg.model.prior is not None:
        return [cfg.model.prior]
    return list(PRIORS)


def _add_fit(group: _Group, prior: str, cfg: Config) -> None:
    """Record ``cfg`` as the config of ``prior``; a second config must train it alike."""
    pc = cfg.with_prior(prior)
    other = group.fits.get(prior)
    if other is None:
        group.fits[prior] = pc
        return
    diff = _differences(other.fit_dict(), pc.fit_dict())
    if diff:
        raise ConfigError(
            f"{other.source} and {cfg.source} both train {prior} into {cfg.output_dir} with different "
            f"settings ({', '.join(diff)}); run them separately or give them different `output_dir`s.",
            key="model.prior",
            file=cfg.source,
        )


def _unique_name(name: str, out_dir: str, used: set[str], notes: list[str]) -> str:
    """``name``, or ``name-2``, ``name-3``, ... when another data set of the plan has it."""
    unique, k = name, 2
    while unique in used:
        unique = f"{name}-{k}"
        k += 1
    if unique != name:
        notes.append(f"two data sets are named {name!r}; the one in {out_dir} is {unique!r} here.")
    used.add(unique)
    return unique


# ---------------------------------------------------------------------------------------------
# the jobs of one data set
# ---------------------------------------------------------------------------------------------
@dataclass
class _Dataset:
    """One data set being planned: its job-name prefix, output folder, stages and flags."""

    plan: Plan
    name: str
    out_dir: str
    order: list[Task]
    force: bool
    resume: bool

    @property
    def layout(self) -> Layout:
        return Layout(Path(self.out_dir))

    @property
    def preprocess_name(self) -> str:
        return f"{self.name}/preprocess"

    def add(self, job: Job, *, run: bool, reason: str, source: str | None) -> bool:
        """Add ``job`` to the jobs to run, or to the skipped ones with ``reason``; return ``run``."""
        self.plan.output_dirs[job.name] = self.out_dir
        self.plan.sources[job.name] = source
        if run:
            self.plan.jobs.append(job)
        else:
            self.plan.skipped.append(JobResult.for_job(job, "skipped", output={"reason": reason}))
        return run


def _plan_preprocess(ds: _Dataset, group: _Group) -> bool:
    """The preprocessing job of a data set, when asked for; whether it runs."""
    cfg0, layout = group.configs[0], ds.layout
    if "preprocess" not in ds.order:
        if any(t in ds.order for t in ("train", "analyze")) and not layout.prepared.exists() and group.fits:
            first_needing = "train" if "train" in ds.order else "analyze"
            ds.plan.notes.append(
                f"{ds.name}: {layout.prepared} is missing, so {first_needing} will fail: run "
                f"`{_command_hint(cfg0, 'preprocess')}` first (or `sfact run all`)."
            )
        return False
    job = Job(
        name=ds.preprocess_name,
        task="preprocess",
        fn=STAGE_FUNCTIONS["preprocess"],
        kwargs={"config": cfg0.to_dict(), "config_file": cfg0.source, "force": ds.force},
        log_path=layout.log(None),
        dataset=ds.name,
    )
    done = layout.done("preprocess")
    runs = ds.add(
        job, run=ds.force or not done, reason=f"outputs exist ({layout.prepared})", source=cfg0.source
    )
    if done and not ds.force:
        stale = _stale_prepared(layout, cfg0)
        if stale:
            ds.plan.notes.append(
                f"{ds.name}: prepared.h5ad was made with other settings ({', '.join(stale)}); "
                "it is kept: use --force to redo it."
            )
    return runs


def _plan_select(ds: _Dataset, group: _Group, priors: Sequence[str] | None, pre_runs: bool) -> None:
    """The model-selection job of a data set (``sfact select``), after preprocessing when that runs."""
    from ._stage_select import select_priors

    cfg0, layout = group.configs[0], ds.layout
    job = Job(
        name=f"{ds.name}/select",
        task="select",
        fn=STAGE_FUNCTIONS["select"],
        kwargs={
            "config": cfg0.to_dict(),
            "config_file": cfg0.source,
            "force": ds.force,
            "priors": select_priors(cfg0, priors),
        },
        log_path=layout.select_log,
        depends_on=(ds.preprocess_name,) if pre_runs else (),
        dataset=ds.name,
    )
    done = layout.done("select")
    ran = ds.add(
        job,
        run=ds.force or not done or pre_runs,
        reason=f"outputs exist ({layout.selection_json})",
        source=cfg0.source,
    )
    if ran and done and pre_runs and not ds.force:
        job.kwargs["force"] = True  # the selection would be stale once the data are prepared again
        ds.plan.redo[job.name] = ds.preprocess_name
    if ran and not pre_runs and not layout.prepared.exists():
        ds.plan.notes.append(
            f"{job.name} needs {layout.prepared}, which is missing: run "
            f"`{_command_hint(cfg0, 'preprocess')}` first."
        )


def _plan_prior(ds: _Dataset, prior: str, pc: Config, pre_runs: bool) -> None:
    """The train, analyze and figures jobs of one prior, each after the previous one when it runs."""
    after = ds.preprocess_name if pre_runs else None  # the job that runs just before, if any
    for task in ("train", "analyze", "figures"):
        if task in ds.order:
            ran = _plan_stage(ds, task, prior, pc, after)
            after = f"{ds.name}/{prior}/{task}" if ran else None
            continue
        if after is not None and ds.layout.done(task, prior):
            ds.plan.notes.append(
                f"{ds.name}/{prior}: the {task} outputs will be older than the new "
                f"{after.rsplit('/', 1)[-1]} outputs: redo them with "
                f"`{_command_hint(pc, task)} --force`."
            )
        after = None


def _plan_stage(ds: _Dataset, task: Task, prior: str, pc: Config, after: str | None) -> bool:
    """The job of one stage of one prior (after the job ``after`` when that runs); whether it runs."""
    job_name = f"{ds.name}/{prior}/{task}"
    layout = ds.layout
    done = layout.done(task, prior)
    kwargs: dict[str, Any] = {
        "config": pc.to_dict(),
        "prior": prior,
        "config_file": pc.source,
        "force": ds.force,
    }
    if task == "train":
        kwargs["resume"] = ds.resume
        run = ds.force or ds.resume or not done
        reason = f"a saved model exists ({layout.model_dir(prior)}); --resume continues it"
        stale = _stale_model(layout, prior, pc) if done and not ds.force else []
        if stale:
            ds.plan.notes.append(
                f"{job_name}: the saved model was trained with other settings ({', '.join(stale)}); "
                f"it is {'continued' if ds.resume else 'kept'}: use --force to train afresh."
            )
    else:
        run = ds.force or not done or after is not None
        reason = f"outputs exist ({layout.marker(task, prior)})"
        if done and after is not None and not ds.force:
            # the outputs would be stale once the stage before runs: redo them
            kwargs["force"] = True
            ds.plan.redo[job_name] = after
    job = Job(
        name=job_name,
        task=task,
        fn=STAGE_FUNCTIONS[task],
        kwargs=kwargs,
        log_path=layout.log(prior),
        depends_on=(after,) if after is not None else (),
        use_gpu=task in ("train", "analyze") and pc.training.device != "cpu",
        needs_gpu=task in ("train", "analyze") and is_gpu(pc.training.device),
        dataset=ds.name,
        prior=prior,
        max_epoch=pc.training.max_iter if task == "train" else None,
    )
    ran = ds.add(job, run=run, reason=reason, source=pc.source)
    if ran and after is None:
        need = _NEEDS[task]
        if not layout.done(need, prior if need != "preprocess" else None) and need not in ds.order:
            ds.plan.notes.append(
                f"{job_name} needs the outputs of {need}, which are missing: run "
                f"`{_command_hint(pc, need)}` first."
            )
    return ran


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
# what a run needs: output folders and devices
# ---------------------------------------------------------------------------------------------
def check_plan(
    plan: Plan,
    *,
    devices: Sequence[str] | None = None,
    executor: Executor = "local",
    scheduler: str | None = None,
    dry_run: bool = False,
) -> None:
    """Check, before anything runs, that the plan's devices and output folders can be used.

    Every output folder must be one this process can create and write to (it is created, with
    its ``logs`` folder, unless ``dry_run``); temporary outputs that killed runs left there are
    removed (:func:`~sfact.pipeline._layout.remove_stale_temporaries`, unless ``dry_run``). GPUs
    in ``devices`` must exist, and jobs whose config says ``training.device: cuda`` need a GPU
    slot (not checked with a Dask ``scheduler`` address: its workers decide).

    Parameters
    ----------
    plan
        From :func:`make_plan`.
    devices
        The device slots the run will use (``None``: every visible GPU and the CPU).
    executor
        The executor the run will use.
    scheduler
        The Dask scheduler's address, if any.
    dry_run
        Check without writing anything.

    Raises
    ------
    ConfigError
        Naming the folder, device or config key and the fix.

    Examples
    --------
    >>> check_plan(plan, devices=["cpu"], dry_run=True)  # doctest: +SKIP
    """
    _check_devices(plan, devices, executor=executor, scheduler=scheduler)
    _check_output_dirs(plan, create=not dry_run)


def _check_output_dirs(plan: Plan, *, create: bool) -> None:
    first_job = {}
    for name, out_dir in plan.output_dirs.items():
        first_job.setdefault(out_dir, name)
    for out_dir in plan.datasets.values():
        root = Path(out_dir)
        try:
            check_output_dir(root, create=create)
        except OSError as exc:
            raise ConfigError(
                f"{root} cannot be used as the output folder: {exc}; choose a folder you can write to.",
                key="output_dir",
                file=plan.sources.get(first_job.get(out_dir, "")),
            ) from None
        if not create:
            continue
        # what killed runs left behind, also next to outputs whose job is skipped now
        remove_stale_temporaries(root)
        for job in [*plan.jobs, *plan.skipped]:
            if job.prior is not None and plan.output_dirs.get(job.name) == out_dir:
                remove_stale_temporaries(root / job.prior)


def _check_devices(
    plan: Plan, devices: Sequence[str] | None, *, executor: Executor, scheduler: str | None
) -> None:
    if executor == "dask" and scheduler is not None:
        return  # the cluster's workers decide; a GPU job on a worker without one fails, saying why
    asked = [d for d in devices or () if is_gpu(d)]
    gpu_jobs = [job for job in plan.jobs if job.needs_gpu]
    if not asked and not gpu_jobs:
        return
    import torch

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = "CUDA is not available on this machine"
    bad = [d for d in asked if n_gpus == 0 or (d != "cuda" and int(d.split(":")[1]) >= n_gpus)]
    if bad:
        have = missing if n_gpus == 0 else f"only {n_gpus} GPU(s) are visible (cuda:0 to cuda:{n_gpus - 1})"
        raise ConfigError(
            f"{', '.join(bad)} asked for, but {have}: pass GPUs that exist, `--devices cpu`, "
            "or leave --devices out (every visible GPU and the CPU).",
            key="--devices",
        )
    if gpu_jobs and not any(is_gpu(d) for d in worker_devices(list(devices) if devices else None)):
        job = gpu_jobs[0]
        device = job.kwargs["config"]["training"]["device"]
        why = missing if n_gpus == 0 else "--devices gives no GPU"
        fix = "" if n_gpus == 0 else ", or add a GPU to --devices"
        raise ConfigError(
            f"is {device!r}, but {why}: set `training.device: auto` (a GPU when there is one, "
            f"else the CPU) or `cpu`{fix}.",
            key="training.device",
            file=plan.sources.get(job.name),
        )


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
def run_plan(
    plan: Plan,
    *,
    executor: Executor = "local",
    scheduler: str | None = None,
    devices: list[str] | None = None,
    live: bool | None = None,
    console: Console | None = None,
) -> list[JobResult]:
    """Run the plan's jobs with :func:`~sfact.pipeline._runner.run_jobs`; return every result.

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

    Raises
    ------
    ConfigError
        Before anything runs, when an output folder or a device cannot be used
        (:func:`check_plan`).

    Examples
    --------
    >>> results = run_plan(plan, executor="serial")  # doctest: +SKIP
    """
    check_plan(plan, devices=devices, executor=executor, scheduler=scheduler)
    results: list[JobResult] = []
    if plan.jobs:
        results = run_jobs(
            plan.jobs, executor=executor, scheduler=scheduler, devices=devices, live=live, console=console
        )
    return [*plan.skipped, *results]
