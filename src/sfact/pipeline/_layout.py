"""Where a data set's outputs go (:class:`Layout`) and how they are written: atomically.

Output layout of a data set (``output_dir``)::

    prepared.h5ad, prepared.json          preprocess
    <prior>/model/, <prior>/config.yaml   train
    <prior>/results.h5ad, factors.npy, scales.npy, loadings.npy, names.json, metrics.json
                                          analyze
    <prior>/figures/*.png                 figures
    selection/selection.csv, selection.json, model_selection.png
                                          select (``sfact select``)
    logs/preprocess.log, logs/select.log, logs/<prior>.log
    run_summary.json                      written by the command line after each run

Files and folders are written to a temporary sibling (``.NAME.tmp-PID``; a folder being
replaced is moved to ``.NAME.old-PID`` for the moment of the swap) and renamed into place
(:mod:`sfact._atomic`, which :meth:`sfact.models.SpatialFactorization.save` uses too), so a
failure never leaves half an output nor destroys an earlier good one. The siblings a killed
process leaves behind are removed by the next run (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._atomic import atomic_file, swap_dir, tmp_sibling

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

    @property
    def select_log(self) -> Path:
        """Log of the model selection."""
        return self.logs / "select.log"

    @property
    def selection_dir(self) -> Path:
        """Folder of the model selection's outputs (:func:`sfact.tl.select_model`)."""
        return self.root / "selection"

    @property
    def selection_table(self) -> Path:
        """The selection's table, one row per setting and fold (CSV)."""
        return self.selection_dir / "selection.csv"

    @property
    def selection_json(self) -> Path:
        """The table, the best setting and the parameters (JSON); written last, it marks a finished selection."""
        return self.selection_dir / "selection.json"

    @property
    def selection_figure(self) -> Path:
        """The figure of :func:`sfact.pl.model_selection`."""
        return self.selection_dir / "model_selection.png"

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
        if task == "select":
            return self.selection_json
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
    return tmp_sibling(path, tag)


#: a temporary sibling written by :func:`_tmp_sibling`: ``.NAME.tmp-PID`` or ``.NAME.old-PID``
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<tag>tmp|old)-(?P<pid>[0-9]+)$")


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from ``/proc``; ``None`` if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        btime = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks after boot
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _writer_alive(pid: int, since: float) -> bool:
    """Whether process ``pid`` runs and may have written a file last modified at ``since``.

    A process that started after that (a reused PID) cannot be the writer; a zombie is dead.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    except OverflowError:
        return False
    with contextlib.suppress(OSError, IndexError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    start = _process_start(pid)
    return start is None or start <= since + 2.0  # /proc's boot time has whole seconds


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary siblings in ``folder`` that a killed process left behind.

    A ``.NAME.tmp-PID`` file or folder whose process ``PID`` is gone (or is a later process
    with the same number) is removed. A ``.NAME.old-PID`` folder (an earlier output moved
    aside while a new one was put in place) is moved back to ``NAME`` when that is missing,
    and removed otherwise. Siblings of running processes are left alone.

    Returns
    -------
    The paths removed or moved back.
    """
    if not folder.is_dir():
        return []
    done = []
    for entry in sorted(folder.iterdir()):
        m = _SIBLING.match(entry.name)
        if m is None:
            continue
        try:
            since = entry.lstat().st_mtime
        except OSError:
            continue
        if _writer_alive(int(m["pid"]), since):
            continue
        target = entry.with_name(m["name"])
        with contextlib.suppress(OSError):
            if m["tag"] == "old" and not target.exists() and not target.is_symlink():
                os.replace(entry, target)
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            done.append(entry)
    return done


def check_output_dir(root: Path, *, create: bool) -> None:
    """Raise :class:`OSError` with a readable message unless ``root`` is (or can be made) a writable folder.

    With ``create``, the folder and its ``logs`` folder are made; without, nothing is written:
    the nearest existing folder above must be a folder this process may write to.
    """
    path = root
    while not path.exists() and not path.is_symlink():
        if path.parent == path:
            break
        path = path.parent
    if not path.is_dir():
        raise OSError(f"{path} is not a folder" if path != root else "it is not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise OSError(f"{path} is not writable" if path != root else "it is not writable")
    if create:
        try:
            (root / "logs").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"cannot create it ({exc.strerror or exc})") from exc


def _write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


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
    swap_dir(tmp, final)


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
