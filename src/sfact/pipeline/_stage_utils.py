"""What every stage does around its work: its config, its log context, skipping and inputs."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._layout import Layout

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

    The job's title is ``name: stage``, or ``name/prior: stage`` for a prior's stage.
    """
    cfg = _config(config, config_file)
    layout = Layout(Path(cfg.output_dir))
    with _job_context(f"{cfg.name}: {stage}" if prior is None else f"{cfg.name}/{prior}: {stage}"):
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


def _device(device: str | None, cfg: Config) -> str:
    """The stage's device: the CPU when ``training.device`` says so, else the runner's (or the config's)."""
    from .._utils import resolve_device

    if cfg.training.device == "cpu":
        return resolve_device("cpu")
    return resolve_device(cfg.training.device if device is None else device)


def _skipped(reason: str, **extra: Any) -> dict[str, Any]:
    _say(f"skipped: {reason}")
    return {"skipped": True, "reason": reason, **extra}


def _require(path: Path, what: str, run_first: str, cfg: Config) -> None:
    if not path.exists():
        src = f" -c {cfg.source}" if cfg.source else ""
        raise FileNotFoundError(f"{what} not found ({path}): run `sfact {run_first}{src}` first.")


def _read_prepared(layout: Layout, cfg: Config, device: str | None):
    """The prepared data (``preprocess`` must have run) and the stage's device (:func:`_device`)."""
    import anndata as ad

    _require(layout.prepared, "prepared data", "preprocess", cfg)
    dev = _device(device, cfg)
    return ad.read_h5ad(layout.prepared), dev
