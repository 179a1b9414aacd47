"""What every stage does around its work: its config, its log context, skipping and inputs."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._layout import Layout, remove_stale_temporaries

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ._config import Config


def _config(config: dict[str, Any] | Config, config_file: str | None) -> Config:
    from ._config import Config

    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    if config_file is not None:
        cfg.source = config_file
    return cfg


@contextlib.contextmanager
def _stage_context(
    config: dict[str, Any] | Config, config_file: str | None, stage: str, prior: str | None = None
) -> Iterator[tuple[Config, Layout]]:
    """The stage's config and output layout, yielded inside its :func:`_job_context`.

    The job's title is ``name: stage``, or ``name/prior: stage`` for a prior's stage. The
    temporary outputs a killed run of the stage left behind are removed first.
    """
    cfg = _config(config, config_file)
    layout = Layout(Path(cfg.output_dir))
    with _job_context(f"{cfg.name}: {stage}" if prior is None else f"{cfg.name}/{prior}: {stage}"):
        folder = layout.root if prior is None else layout.prior_dir(prior)
        for path in remove_stale_temporaries(folder):
            _say(f"removed {path} (left by a run that was killed)")
        yield cfg, layout


@contextlib.contextmanager
def _job_context(title: str) -> Iterator[None]:
    """Info-level logs, no progress bars; the title and the time taken printed around the block.

    Where the output goes is the runner's business (:func:`._worker.route_output`).
    """
    import scanpy as sc

    from .._settings import settings

    old_verbosity, old_progress_bar = sc.settings.verbosity, settings.progress_bar
    sc.settings.verbosity = 2
    settings.progress_bar = False
    t0 = time.perf_counter()
    _say(f"--- {title} ({time.strftime('%Y-%m-%d %H:%M:%S')})")
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sc.settings.verbosity, settings.progress_bar = old_verbosity, old_progress_bar
        _say(f"--- {title}: {time.perf_counter() - t0:.1f} s")


def _say(msg: str) -> None:
    print(msg, flush=True)


def _device(device: str | None, cfg: Config, *, honour_gpu: bool = True) -> str:
    """The stage's device: the CPU when ``training.device`` says so, else the runner's (or the config's).

    ``training.device: cuda`` (or ``cuda:N``) is honoured: a GPU, never a silent CPU fallback
    (the runner picks which GPU). Without ``honour_gpu`` (model selection, whose fits run in a
    CPU process pool) the runner's device is used as it is.
    """
    from .._constants import is_gpu
    from .._utils import resolve_device

    wanted = cfg.training.device
    if wanted == "cpu":
        return resolve_device("cpu")
    if not honour_gpu and device is not None:
        return resolve_device(device)
    if is_gpu(wanted) and device is not None and not is_gpu(device):
        where = f" in {cfg.source}" if cfg.source else ""
        raise RuntimeError(
            f"`training.device` is {wanted!r}{where}, but this job was given {device!r}: run it where "
            "a GPU is free, or set `training.device: auto` (a GPU when there is one, else the CPU) or `cpu`."
        )
    if is_gpu(wanted) and device is None:
        try:
            return resolve_device(wanted)
        except RuntimeError as exc:
            where = f" in {cfg.source}" if cfg.source else ""
            raise RuntimeError(
                f"`training.device` is {wanted!r}{where}, but CUDA is not available: set "
                "`training.device: auto` (a GPU when there is one, else the CPU) or `cpu`."
            ) from exc
    return resolve_device(wanted if device is None else device)


def _skipped(reason: str, **extra: Any) -> dict[str, Any]:
    _say(f"skipped: {reason}")
    return {"skipped": True, "reason": reason, **extra}


def _require(path: Path, what: str, run_first: str, cfg: Config) -> None:
    if not path.exists():
        src = f" -c {cfg.source}" if cfg.source else ""
        raise FileNotFoundError(f"{what} not found ({path}): run `sfact {run_first}{src}` first.")


def _read_prepared(layout: Layout, cfg: Config, device: str | None, *, honour_gpu: bool = True):
    """The prepared data (``preprocess`` must have run) and the stage's device (:func:`_device`)."""
    import anndata as ad

    _require(layout.prepared, "prepared data", "preprocess", cfg)
    dev = _device(device, cfg, honour_gpu=honour_gpu)
    return ad.read_h5ad(layout.prepared), dev
