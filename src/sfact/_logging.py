"""Logging through scanpy's logger, imported lazily so ``import sfact`` stays cheap; progress bars."""

from __future__ import annotations

import math
import sys
from datetime import datetime
from typing import Any

#: where output is not a terminal nor a notebook (a log file, a pipe, a job's log), a progress bar
#: redraws at most every ``PLAIN_MININTERVAL`` seconds and at most ``PLAIN_UPDATES`` times over its
#: run, besides its first and last line: a few lines per bar instead of one every 0.1 s
PLAIN_MININTERVAL = 60.0
PLAIN_UPDATES = 4


def _logg():
    from scanpy import logging as logg

    return logg


def info(msg: str, **kwargs: Any) -> datetime:
    """Log at info level via :mod:`scanpy.logging`; returns the time for ``time=``."""
    return _logg().info(msg, **kwargs)


def warning(msg: str, **kwargs: Any) -> datetime:
    """Log a warning via :mod:`scanpy.logging` (job logs of the pipeline; :func:`sfact._utils.warn` for users)."""
    return _logg().warning(msg, **kwargs)


def hint(msg: str, **kwargs: Any) -> datetime:
    """Log a hint via :mod:`scanpy.logging`."""
    return _logg().hint(msg, **kwargs)


def debug(msg: str, **kwargs: Any) -> datetime:
    """Log at debug level via :mod:`scanpy.logging`."""
    return _logg().debug(msg, **kwargs)


def interactive(stream: Any = None) -> bool:
    """Whether progress shown on ``stream`` (default ``sys.stderr``) redraws in place.

    True for a terminal and in a Jupyter kernel (where :mod:`tqdm.auto` draws a widget); false for
    a file, a pipe or a captured stream, where every redraw of a bar becomes a line of the log.
    """
    stream = sys.stderr if stream is None else stream
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        pass
    ipython = sys.modules.get("IPython")
    if ipython is not None:
        try:
            shell = ipython.get_ipython()
        except Exception:  # any failure means: not in a kernel
            shell = None
        if shell is not None and "IPKernelApp" in getattr(shell, "config", {}):
            return True
    return False


def progress_bar(iterable: Any = None, *, desc: str, disable: bool, total: int | None = None, **kwargs: Any):
    """A :mod:`tqdm.auto` bar over ``iterable`` that stays short in logs.

    In a terminal or a notebook this is ``tqdm(iterable, desc=desc, disable=disable, leave=False)``.
    Elsewhere (:func:`interactive` is false: a log file, a pipe) the bar redraws at most every
    ``PLAIN_MININTERVAL`` seconds and ``PLAIN_UPDATES`` times in all, and its last state is kept,
    so a bar writes a few lines to the log instead of one every 0.1 s.

    Parameters
    ----------
    iterable
        What to iterate over (``None`` for a manually updated bar with ``total``).
    desc
        The bar's label.
    disable
        No bar at all.
    total
        Number of items, if ``iterable`` has no length.
    **kwargs
        Passed on to :class:`tqdm.auto.tqdm`.

    Returns
    -------
    The :class:`tqdm.auto.tqdm` bar.
    """
    from tqdm.auto import tqdm

    kwargs.setdefault("leave", False)
    if not disable and not interactive(kwargs.get("file")):
        n = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        kwargs["mininterval"] = max(float(kwargs.get("mininterval", 0.0)), PLAIN_MININTERVAL)
        kwargs["maxinterval"] = math.inf  # tqdm's monitor would otherwise force redraws
        if n:
            kwargs["miniters"] = max(int(kwargs.get("miniters") or 1), math.ceil(n / PLAIN_UPDATES))
        kwargs["leave"] = True  # the last state stays in the log
    return tqdm(iterable, desc=desc, total=total, disable=disable, **kwargs)
