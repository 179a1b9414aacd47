"""Where a data set's outputs go (:class:`Layout`) and how they are written: atomically.

Output layout of a data set (``output_dir``)::

    prepared.h5ad, prepared.json          preprocess
    <prior>/model/, <prior>/config.yaml   train
    <prior>/results.h5ad, factors.npy, scales.npy, loadings.npy, names.json, metrics.json
                                          analyze
    <prior>/figures/*.png                 figures
    logs/preprocess.log, logs/<prior>.log
    run_summary.json                      written by the command line after each run

Files and folders are written to a temporary sibling and renamed into place, so a failure
never leaves half an output nor destroys an earlier good one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ._jobs import Task


@dataclass(frozen=True)
class Layout:
    """Paths of one data set's outputs below ``root`` (the config's ``output_dir``).

    Examples
    --------
    >>> from pathlib import Path
    >>> from sfact.pipeline import Layout
    >>> layout = Layout(Path("outputs/osmfish"))
    >>> layout.results("svgp"), layout.log("svgp")
    (PosixPath('outputs/osmfish/svgp/results.h5ad'), PosixPath('outputs/osmfish/logs/svgp.log'))
    """

    root: Path

    @property
    def prepared(self) -> Path:
        """The preprocessed data."""
        return self.root / "prepared.h5ad"

    @property
    def prepared_info(self) -> Path:
        """What ``prepared.h5ad`` was made from (dataset and preprocessing sections, sizes)."""
        return self.root / "prepared.json"

    @property
    def summary(self) -> Path:
        """The run summary (status of every job of the latest runs)."""
        return self.root / "run_summary.json"

    @property
    def logs(self) -> Path:
        """Folder of the job logs."""
        return self.root / "logs"

    def log(self, prior: str | None = None) -> Path:
        """Log of the preprocessing (``prior=None``) or of a prior's train/analyze/figures jobs."""
        return self.logs / ("preprocess.log" if prior is None else f"{prior}.log")

    def prior_dir(self, prior: str) -> Path:
        """Folder of one prior's outputs."""
        return self.root / prior

    def model_dir(self, prior: str) -> Path:
        """The saved model (:meth:`sfact.models.SpatialFactorization.save`)."""
        return self.root / prior / "model"

    def fit_config(self, prior: str) -> Path:
        """The full config the model was trained with."""
        return self.root / prior / "config.yaml"

    def results(self, prior: str) -> Path:
        """The prepared data with every result of the analysis."""
        return self.root / prior / "results.h5ad"

    def metrics(self, prior: str) -> Path:
        """Metrics of the analysis (JSON); written last, it marks a complete analysis."""
        return self.root / prior / "metrics.json"

    def figures(self, prior: str) -> Path:
        """Folder of the PNGs."""
        return self.root / prior / "figures"

    def marker(self, task: Task, prior: str | None = None) -> Path:
        """The path whose existence means ``task`` finished."""
        if task == "preprocess":
            return self.prepared
        if prior is None:
            raise ValueError(f"The {task!r} stage needs a prior.")
        return {
            "train": self.model_dir(prior) / "metadata.json",
            "analyze": self.metrics(prior),
            "figures": self.figures(prior),
        }[task]

    def done(self, task: Task, prior: str | None = None) -> bool:
        """Whether the outputs of ``task`` exist."""
        return self.marker(task, prior).exists()


def _tmp_sibling(path: Path, tag: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, _json_text(obj))


def _json_text(obj: Any) -> str:
    """The text of the pipeline's JSON files: plain values (:func:`_jsonable`), indented, a final newline."""
    return json.dumps(_jsonable(obj), indent=1) + "\n"


def _jsonable(obj: Any) -> Any:
    """Plain JSON values of numpy/pandas/path objects (NaN becomes ``null``)."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    return str(obj)


def _swap_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final``, replacing an existing one only on success."""
    old = None
    if final.exists():
        old = _tmp_sibling(final, "old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _tmp_dir(final: Path) -> Iterator[Path]:
    """A temporary sibling folder of ``final``, removed if the block fails."""
    tmp = _tmp_sibling(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
