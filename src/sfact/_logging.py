"""Logging through scanpy's logger, imported lazily so ``import sfact`` stays cheap."""

from __future__ import annotations

from datetime import datetime
from typing import Any


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
