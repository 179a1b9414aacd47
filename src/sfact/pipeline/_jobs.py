"""The unit of work of the pipeline: a :class:`Job`, its :class:`JobResult`, and progress events.

A job is a call of a top-level (picklable) function of :mod:`sfact.pipeline._stages`::

    result = job.fn(**job.kwargs, device=device, report=report)

``device`` is the device string the runner assigned (``"cpu"``, ``"cuda:0"``, ...);
``report`` is a callable the function calls with progress, e.g. ``report(epoch=12,
max_epoch=1000, elbo=-3.41)`` or ``report(message="writing results")``. The function returns a
JSON-serializable dict (what it wrote, metrics) or raises; the runner turns that into a
:class:`JobResult`. The same jobs run in local worker processes or on a Dask cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

Task = Literal["preprocess", "select", "train", "analyze", "figures"]
#: pipeline order of the stages
STAGES: tuple[Task, ...] = ("preprocess", "select", "train", "analyze", "figures")
#: the stages of ``run all``: model selection (``select``, many fits) runs only when asked for
ALL_STAGES: tuple[Task, ...] = ("preprocess", "train", "analyze", "figures")
Status = Literal["pending", "running", "done", "skipped", "failed", "cancelled"]


class Reporter(Protocol):
    """What a job function calls to report progress (every argument optional)."""

    def __call__(
        self,
        *,
        epoch: int | None = None,
        max_epoch: int | None = None,
        elbo: float | None = None,
        message: str | None = None,
    ) -> None: ...


def null_reporter(**kwargs: Any) -> None:
    """A :class:`Reporter` that ignores everything (direct calls outside a runner)."""


@dataclass
class Job:
    """One task of one data set (and prior): preprocess, train, analyze or figures."""

    name: str
    """Unique name, e.g. ``"osmfish/mggp_svgp/train"`` (``"osmfish/preprocess"`` for preprocessing)."""
    task: Task
    fn: Callable[..., dict]
    """Top-level function called as ``fn(**kwargs, device=..., report=...)``."""
    kwargs: dict[str, Any]
    log_path: Path
    """The job's log file (appended to): everything the job prints and logs goes there."""
    depends_on: tuple[str, ...] = ()
    """Names of jobs that must finish (``done`` or ``skipped``) first; a failed dependency cancels it."""
    use_gpu: bool = False
    """May run on a GPU slot (training and analysis); ``False`` jobs always get ``"cpu"``."""
    needs_gpu: bool = False
    """Must run on a GPU slot (``training.device: cuda``): never given ``"cpu"``."""
    dataset: str = ""
    prior: str | None = None
    max_epoch: int | None = None
    """For the status table's remaining-time estimate (training jobs)."""


@dataclass
class JobResult:
    """What became of a :class:`Job`."""

    name: str
    task: Task
    status: Status
    device: str | None = None
    elapsed_s: float = 0.0
    log_path: Path | None = None
    error: str | None = None
    """One-line error (exception type and message) when ``status == "failed"``."""
    output: dict[str, Any] = field(default_factory=dict)
    """The dict the job function returned."""
    dataset: str = ""
    prior: str | None = None

    @classmethod
    def for_job(cls, job: Job, status: Status, **fields: Any) -> JobResult:
        """The result of ``job`` (its name, task, log, data set and prior) with ``status`` and ``fields``."""
        return cls(
            name=job.name,
            task=job.task,
            status=status,
            log_path=Path(job.log_path),
            dataset=job.dataset,
            prior=job.prior,
            **fields,
        )
