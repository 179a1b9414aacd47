"""Renamed keyword arguments: the old name keeps working for one release, with a :class:`FutureWarning`."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

F = TypeVar("F", bound="Callable")


def renamed_kwarg(old: str, new: str, *, why: str = "") -> Callable[[F], F]:
    """Accept the keyword ``old`` as ``new`` for one release, with a :class:`FutureWarning`.

    The decorated function's signature (:func:`inspect.signature` follows ``__wrapped__``) shows
    only ``new``, so the package-structure test checks the new convention. Passing both names
    raises :class:`TypeError`.

    Parameters
    ----------
    old
        The former name of the keyword.
    new
        Its name now.
    why
        A short reason, appended to the warning.

    Returns
    -------
    The decorator.
    """

    def decorator(func: F) -> F:
        name = f"sfact.{func.__module__.split('.')[1]}.{func.__name__}"

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            if old in kwargs:
                if new in kwargs:
                    raise TypeError(
                        f"{name}() received both `{old}=` and `{new}=`: `{old}` is the old name of "
                        f"`{new}`; pass only `{new}={kwargs[new]!r}`."
                    )
                from .._utils import warn

                warn(
                    f"`{old}=` of `{name}` is renamed `{new}=`{why}; `{old}=` still works in this "
                    f"release and will be removed in the next: pass `{new}={kwargs[old]!r}`.",
                    FutureWarning,
                )
                kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorator


KEY_ADDED_WHY = " (functions that write take `key_added`, functions that only read take `key`, as in scanpy)"
"""The reason given when a writer's ``key`` becomes ``key_added``."""
