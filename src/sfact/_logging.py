"""Logging through scanpy's logger, imported lazily so ``import sfact`` stays cheap; progress bars."""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
import sys
import weakref
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


def in_kernel() -> bool:
    """Whether this process is a Jupyter kernel (a notebook, JupyterLab, VS Code's notebooks)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # any failure means: not in a kernel
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def interactive(stream: Any = None) -> bool:
    """Whether progress shown on ``stream`` (default ``sys.stderr``) redraws in place.

    True for a terminal and in a Jupyter kernel (a widget, or a text bar redrawn in place without
    ipywidgets); false for a file, a pipe or a captured stream, where every redraw of a bar becomes
    a line of the log.
    """
    stream = sys.stderr if stream is None else stream
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        pass
    return in_kernel()


def bar_class(file: Any = None) -> type:
    """The :mod:`tqdm` class for a bar: the notebook widget where it can be drawn, else the text bar.

    :class:`tqdm.notebook.tqdm` in a Jupyter kernel with ipywidgets installed (the ``sfact[jupyter]``
    extra) and no ``file`` given; :class:`tqdm.std.tqdm` everywhere else, notably in a kernel
    without ipywidgets, where :mod:`tqdm.auto` would warn ``TqdmWarning: IProgress not found``:
    the text bar draws cleanly there, redrawn in place.
    """
    if file is None and in_kernel() and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import IProgress
        from tqdm.notebook import tqdm as notebook_tqdm

        if IProgress is not None:  # an ipywidgets that tqdm can draw with
            return notebook_tqdm
    from tqdm.std import tqdm

    return tqdm


#: sfact's open, visible progress bars (a closed tqdm bar has ``disable`` set), and their order
_OPEN_BARS: weakref.WeakSet = weakref.WeakSet()
_BAR_COUNTER = itertools.count()


def _outer_bar() -> Any:
    """The visible sfact bar that is open, if any (the most recently opened)."""
    open_bars = [b for b in list(_OPEN_BARS) if not getattr(b, "disable", True)]
    return max(open_bars, key=lambda b: b._sfact_order) if open_bars else None


def progress_bar(iterable: Any = None, *, desc: str, disable: bool, total: int | None = None, **kwargs: Any):
    """A :mod:`tqdm` bar over ``iterable`` that is clean in notebooks and short in logs, never nested.

    In a terminal this is ``tqdm(iterable, desc=desc, disable=disable, leave=False)``; in a Jupyter
    kernel a widget with ipywidgets installed and a text bar without (:func:`bar_class`, no
    ``TqdmWarning``). Elsewhere (:func:`interactive` is false: a log file, a pipe) the bar redraws at
    most every ``PLAIN_MININTERVAL`` seconds and ``PLAIN_UPDATES`` times in all, and its last state is
    kept, so a bar writes a few lines to the log instead of one every 0.1 s.

    A bar opened while another sfact bar is shown draws nothing itself (nested text bars move the
    cursor with ``ESC[A``, which stays as raw escapes in logs and saved notebooks): its progress
    (``desc n/total``) shows at the end of the outer bar instead.

    Parameters
    ----------
    iterable
        What to iterate over (``None`` for a manually updated bar with ``total``).
    desc
        The bar's label.
    disable
        No bar at all.
    total
        Number of items, if ``iterable`` has no length; ``None`` and no ``iterable``: unknown (the
        bar counts without a total or a remaining time).
    **kwargs
        Passed on to the :mod:`tqdm` class.

    Returns
    -------
    The :mod:`tqdm` bar.
    """
    if not disable:
        outer = _outer_bar()
        if outer is not None:
            return _nested_class()(iterable, outer=outer, desc=desc, total=total)
    file = kwargs.get("file")
    cls = bar_class(file)
    kwargs.setdefault("leave", False)
    plain = not disable and not interactive(file)
    if plain:
        n = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        kwargs["mininterval"] = max(float(kwargs.get("mininterval", 0.0)), PLAIN_MININTERVAL)
        kwargs["maxinterval"] = math.inf  # tqdm's monitor would otherwise force redraws
        if n:
            kwargs["miniters"] = max(int(kwargs.get("miniters") or 1), math.ceil(n / PLAIN_UPDATES))
        kwargs["leave"] = True  # the last state stays in the log
    bar = cls(iterable, desc=desc, total=total, disable=disable, **kwargs)
    if not disable:
        bar._sfact_order = next(_BAR_COUNTER)
        bar._sfact_plain = plain
        _OPEN_BARS.add(bar)
    return bar


@functools.cache
def _nested_class() -> type:
    from tqdm.std import tqdm

    class NestedBar(tqdm):
        """A bar inside another: no drawing of its own, its count at the end of the outer bar."""

        def __init__(self, iterable: Any = None, *, outer: Any, desc: str, total: int | None = None):
            super().__init__(iterable, desc=desc, total=total, disable=True)
            if total is None and hasattr(iterable, "__len__"):
                total = len(iterable)
            self.total, self._label = total, desc
            self._outer = outer
            self._base = outer.postfix or ""
            self._count = 0

        def __iter__(self):
            try:
                for item in self.iterable:
                    yield item
                    self.update()
            finally:
                self.close()

        def _show(self, text: str) -> None:
            if not getattr(self._outer, "disable", True):  # the outer bar is still open
                set_status(self._outer, text)

        def update(self, n: float = 1) -> bool | None:
            self._count += n
            of = f"/{self.total}" if self.total else ""
            count = f"{self._label} {self._count:g}{of}"
            base = self._base.lstrip(", ")
            self._show(count if not base or base == self._label else f"{base}: {count}")
            return None

        def close(self) -> None:
            if self._outer is not None:
                self._show(self._base.lstrip(", "))
                self._outer = None

    return NestedBar


def set_status(bar: Any, text: str) -> None:
    """Show ``text`` at the end of ``bar``.

    Redrawn at once in a terminal or a notebook; in a log, at the bar's next redraw, so that a change
    of status adds no line to the log.
    """
    bar.set_postfix_str(text, refresh=not getattr(bar, "_sfact_plain", True))


def summary(message: str, *, shown: bool) -> None:
    """Write the one line that ends a step (a fit's iterations, convergence, time, ELBO).

    An info message at verbosity 2 or more (through scanpy's logger, where the other messages go);
    at lower verbosity a line on ``sys.stderr``, where the progress bar was, when progress is
    ``shown``; nothing otherwise.
    """
    from scanpy import settings as sc_settings

    if int(sc_settings.verbosity) >= 2:
        info(message)
    elif shown:
        print(message, file=sys.stderr, flush=True)


@functools.cache
def log_thread_setup() -> None:
    """Log, once per process at debug level, what ``import sfact`` did about OpenMP's wait policy."""
    from ._threads import SETUP

    debug(f"threads: {SETUP}")
