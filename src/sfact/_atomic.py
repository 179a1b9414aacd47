"""Atomic writes of files and folders: write a temporary sibling, then rename it into place.

Used by :meth:`sfact.models.SpatialFactorization.save` and meant for every writer of outputs
(the command line's stages too), so that a failure while writing (an exception, a full disk,
Ctrl-C) never leaves half a file or folder under the final name and never destroys the
previous good one.

* :func:`atomic_file` yields a temporary path ``.<name>.tmp-<pid>`` next to ``path``; when the
  block succeeds the file is flushed to disk and renamed onto ``path`` (one ``os.replace``:
  atomic on POSIX and Windows).
* :func:`atomic_dir` yields a temporary folder ``.<name>.tmp-<pid>`` next to ``path``; when the
  block succeeds the files are flushed and the folder is swapped in: the previous folder is
  renamed to ``.<name>.old-<pid>``, the new one to ``path``, and the previous one deleted. A
  failure of the second rename puts the previous folder back. Only a hard kill (SIGKILL, power
  loss) in the microseconds between the two renames can leave ``path`` missing; the previous
  folder is then intact under ``.<name>.old-<pid>`` and :func:`remove_stale_siblings` renames
  it back.
* On failure (any exception, :class:`KeyboardInterrupt` included) the temporary sibling is
  removed; a process killed outright leaves it behind, and :func:`remove_stale_siblings` removes
  the siblings of processes that no longer run.

Torch-free and sfact-free, so any layer can import it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["atomic_dir", "atomic_file", "remove_stale_siblings", "stale_siblings", "swap_dir", "tmp_sibling"]

#: the tags of the temporary siblings: ``tmp`` while writing, ``old`` the replaced folder during a swap
TAGS = ("tmp", "old")


def tmp_sibling(path: str | os.PathLike, tag: str = "tmp", pid: int | None = None) -> Path:
    """The temporary sibling ``.<name>.<tag>-<pid>`` of ``path`` (same folder, so renames stay atomic).

    Parameters
    ----------
    path
        The final path.
    tag
        ``"tmp"`` (being written) or ``"old"`` (the replaced folder during a swap).
    pid
        Process id in the name; this process's by default.

    Returns
    -------
    The sibling's path.

    Examples
    --------
    >>> tmp_sibling("out/model", pid=12)
    PosixPath('out/.model.tmp-12')
    """
    path = Path(path)
    if not path.name:
        raise ValueError(f"{str(path)!r} has no final component to write atomically; name a file or folder.")
    return path.with_name(f".{path.name}.{tag}-{os.getpid() if pid is None else pid}")


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    """Flush ``path`` to disk (best effort: some file systems and platforms cannot sync folders)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for f in filenames:
            _fsync_path(Path(dirpath) / f)
        _fsync_path(Path(dirpath), directory=True)


def _remove(path: Path) -> None:
    """Remove a file, link or folder if it exists (errors ignored)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Write a file atomically: the block writes the yielded temporary path, which then replaces ``path``.

    Parameters
    ----------
    path
        The final file; its folder is created if needed.
    fsync
        Flush the file to disk before the rename (so a crash cannot leave an empty file).

    Yields
    ------
    The temporary sibling ``.<name>.tmp-<pid>`` to write.

    Examples
    --------
    >>> with atomic_file("out/metrics.json") as tmp:  # doctest: +SKIP
    ...     tmp.write_text(text)
    """
    path = Path(path)
    tmp = tmp_sibling(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(
                f"Nothing was written to {str(tmp)!r}, so {str(path)!r} is left as it was."
            )
        if fsync:
            _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    if fsync:
        _fsync_path(path.parent, directory=True)


def swap_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the finished folder ``tmp`` to ``final``, replacing an existing ``final`` only on success.

    The previous ``final`` is renamed to ``.<name>.old-<pid>`` first and deleted after the swap;
    if the swap fails (any exception, :class:`KeyboardInterrupt` included) it is put back.

    Parameters
    ----------
    tmp
        The new folder, complete (a sibling of ``final``).
    final
        Where it goes.

    Examples
    --------
    >>> swap_dir("out/.model.tmp-12", "out/model")  # doctest: +SKIP
    """
    tmp, final = Path(tmp), Path(final)
    old = tmp_sibling(final, "old")
    _remove(old)
    try:
        if final.exists() or final.is_symlink():
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        # state-based, so an interrupt between the two renames is undone too
        if old.exists() and not (final.exists() or final.is_symlink()):
            os.replace(old, final)
        raise
    _fsync_path(final.parent, directory=True)
    _remove(old)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False, fsync: bool = True) -> Iterator[Path]:
    """Write a folder atomically: the block fills the yielded temporary folder, which then replaces ``path``.

    Parameters
    ----------
    path
        The final folder; its parent is created if needed.
    overwrite
        Replace an existing ``path`` (the whole folder: files the block does not write are gone
        afterwards). Without it an existing ``path`` raises :class:`FileExistsError` before
        anything is written.
    fsync
        Flush the files to disk before the swap.

    Yields
    ------
    The empty temporary folder ``.<name>.tmp-<pid>`` to fill.

    Examples
    --------
    >>> with atomic_dir("out/model", overwrite=True) as tmp:  # doctest: +SKIP
    ...     (tmp / "a.json").write_text("{}")
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{str(path)!r} exists and is not a folder; choose another path.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} already exists; pass `overwrite=True` to replace it.")
    tmp = tmp_sibling(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if fsync:
            _fsync_tree(tmp)
        swap_dir(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (on Windows, and whenever unsure: ``True``, so nothing is removed)."""
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def stale_siblings(path: str | os.PathLike) -> list[Path]:
    """Temporary siblings of ``path`` left by processes that no longer run (killed while writing).

    Parameters
    ----------
    path
        A final path written by :func:`atomic_file` or :func:`atomic_dir`.

    Returns
    -------
    The ``.<name>.tmp-<pid>`` and ``.<name>.old-<pid>`` siblings whose process is gone, sorted.

    Examples
    --------
    >>> stale_siblings("out/model")  # doctest: +SKIP
    [PosixPath('out/.model.tmp-4242')]
    """
    path = Path(path)
    if not path.name or not path.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.({'|'.join(TAGS)})-(\d+)$")
    found = []
    for entry in path.parent.iterdir():
        m = pattern.match(entry.name)
        if m and not _pid_alive(int(m.group(2))):
            found.append(entry)
    return sorted(found)


def remove_stale_siblings(path: str | os.PathLike) -> list[Path]:
    """Clean up after killed writers of ``path``: restore a lost folder, remove stale temporary siblings.

    If ``path`` is missing but a stale ``.<name>.old-<pid>`` holds the folder a killed swap had
    moved aside, that folder is renamed back to ``path`` first. Then every stale sibling
    (:func:`stale_siblings`) is removed. Siblings of running processes are never touched.

    Parameters
    ----------
    path
        A final path written by :func:`atomic_file` or :func:`atomic_dir`.

    Returns
    -------
    The siblings removed or restored.

    Examples
    --------
    >>> remove_stale_siblings("out/model")  # doctest: +SKIP
    [PosixPath('out/.model.tmp-4242')]
    """
    path = Path(path)
    stale = stale_siblings(path)
    olds = [p for p in stale if p.name.rsplit(".", 1)[-1].startswith("old-")]
    if olds and not (path.exists() or path.is_symlink()):
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        os.replace(newest, path)
    for p in stale:
        _remove(p)
    return stale
