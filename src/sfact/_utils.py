"""Small shared helpers: warnings, input checks, device and seed handling."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

if TYPE_CHECKING:
    from anndata import AnnData

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))

#: labels that mean "no group" / "no sample": a missing value, also when written as text (``NaN``
#: becomes ``"nan"`` under ``astype(str)``); :func:`sfact.pp.prepare` drops these cells and the
#: model refuses them, so both treat them alike
MISSING_LABELS = frozenset({"None", "nan", "NaN"})


class SfactWarning(UserWarning):
    """Warnings issued by sfact about the user's data or settings."""


def warn(message: str, category: type[Warning] = SfactWarning) -> None:
    """Warn, pointing at the first frame outside sfact (the user's line)."""
    if sys.version_info >= (3, 12):
        warnings.warn(message, category, skip_file_prefixes=(_PKG_DIR,))  # type: ignore[call-arg]
        return
    frame = sys._getframe(1)
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_PKG_DIR):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def view_to_actual(adata: AnnData) -> None:
    """Make a view actual before writing to it, with a warning (as scanpy does)."""
    if adata.is_view:
        warn(
            "Received a view of an AnnData; making it a copy so results can be written to it. "
            "Pass `adata.copy()` to silence this."
        )
        adata._init_as_actual(adata.copy())


def check_in_memory(adata: AnnData) -> None:
    """Raise :class:`ValueError` for a backed AnnData (counts on disk), naming the fix."""
    if getattr(adata, "isbacked", False):
        raise ValueError(
            "`adata` is backed (opened with `read_h5ad(..., backed='r')`): sfact needs the counts in "
            "memory. Load them with `adata = adata.to_memory()` first."
        )


def get_counts(adata: AnnData, layer: str | None = None) -> Any:
    """Return the count matrix from ``adata.X`` or ``adata.layers[layer]`` (of an in-memory AnnData)."""
    check_in_memory(adata)
    if layer is None:
        if adata.X is None:
            raise ValueError("`adata.X` is empty: pass `layer=` naming the layer with raw counts.")
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"`adata.layers[{layer!r}]` not found; available layers: {list(adata.layers.keys())}.")
    return adata.layers[layer]


def slot_name(layer: str | None) -> str:
    """Human-readable name of the counts slot."""
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def _values(X: Any) -> np.ndarray:
    if sp.issparse(X):
        return np.asarray(X.data)
    return np.asarray(X)


def check_counts(X: Any, slot: str = "adata.X", *, allow_nan: bool = False) -> None:
    """Check that ``X`` holds counts: finite, non-negative, integer-valued (warn if not).

    Raises
    ------
    ValueError
        If ``X`` has negative, NaN or infinite values.
    """
    vals = _values(X)
    if not np.issubdtype(vals.dtype, np.number):
        raise ValueError(
            f"`{slot}` must be numeric, received dtype {vals.dtype}: store the raw counts as integers or "
            "floats (pass `layer=` if they are in a layer)."
        )
    if vals.dtype == np.float16:
        raise ValueError(
            f"`{slot}` is float16, which sfact cannot use (scipy.sparse does not support it, and it holds "
            f"integers above 2048 inexactly): convert it with `{slot} = {slot}.astype(np.float32)`, or run "
            "`sfact.pp.prepare`, which does so."
        )
    if vals.size == 0:
        return
    if not allow_nan:
        bad = ~np.isfinite(vals)
        if bad.any():
            raise ValueError(
                f"`{slot}` has {int(bad.sum())} NaN or infinite values. Remove those cells with "
                "`sfact.pp.prepare(adata, dropna=True)` or fix the counts."
            )
    finite = vals[np.isfinite(vals)]
    if (finite < 0).any():
        raise ValueError(
            f"`{slot}` has {int((finite < 0).sum())} negative values; sfact needs raw counts "
            "(pass `layer=` if the raw counts are in a layer)."
        )
    if np.issubdtype(vals.dtype, np.floating) and not np.all(finite == np.round(finite)):
        warn(
            f"`{slot}` is not integer-valued; sfact's Poisson likelihood expects raw counts "
            "(pass `layer=` if the raw counts are in a layer)."
        )


def get_coordinates(adata: AnnData, spatial_key: str = "spatial") -> np.ndarray:
    """Return ``adata.obsm[spatial_key]`` as a float array, with clear errors."""
    if spatial_key not in adata.obsm:
        raise KeyError(
            f"`adata.obsm[{spatial_key!r}]` not found: pass `spatial_key=` naming the coordinates "
            f"(available: {list(adata.obsm.keys())})."
        )
    raw = adata.obsm[spatial_key]
    try:
        X = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as err:
        dtype = getattr(raw, "dtype", None)
        dtype = getattr(raw, "dtypes", dtype) if dtype is None else dtype  # a DataFrame
        raise ValueError(
            f"`adata.obsm[{spatial_key!r}]` must hold numeric coordinates ({err}): convert them to numbers, "
            f"e.g. `adata.obsm[{spatial_key!r}] = adata.obsm[{spatial_key!r}].astype(float)`, or pass "
            "`spatial_key=` naming the coordinates."
        ) from None
    if X.ndim != 2 or X.shape[0] != adata.n_obs:
        raise ValueError(f"`adata.obsm[{spatial_key!r}]` must be (n_obs, n_dims), received {X.shape}.")
    return X


def group_codes(values: Any, categories: Any, *, unknown: Callable[[list], str] | None = None) -> np.ndarray:
    """Integer code of each value: its index in ``categories`` (unique), -1 where it is not there.

    The one rule by which groups become codes (model set-up, :func:`sfact.pp.prepare`,
    :mod:`sfact.tl` group tools). A missing value (NaN) gets -1. With ``unknown``, values not
    among the categories raise :class:`ValueError` with the message ``unknown(those values)``
    (in their order, repeats kept) instead.
    """
    codes = pd.Index(categories).get_indexer(values).astype(np.int64, copy=False)
    if unknown is not None and (codes < 0).any():
        raise ValueError(unknown([v for v, c in zip(values, codes, strict=True) if c < 0]))
    return codes


def _is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer: an int (not a bool), or a float with an integer value."""
    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, int | np.integer):
        return True
    return isinstance(value, float | np.floating) and bool(np.isfinite(value)) and float(value).is_integer()


def _bound(minimum: float | None, positive: bool) -> str:
    if positive or minimum == 1:
        return "positive"
    return "" if minimum is None else f">= {minimum}"


def check_int(value: Any, name: str, *, minimum: int | None = None, none_ok: bool = False) -> int | None:
    """``value`` as an int, after checking it is a whole number of at least ``minimum``.

    A float with an integer value (``100.0``) is accepted; ``50.5``, NaN, booleans and strings are
    not. Raises :class:`ValueError` (:class:`TypeError` for a non-number) naming the argument.

    Examples
    --------
    >>> check_int(100.0, "batch_size", minimum=1)
    100
    """
    if value is None and none_ok:
        return None
    if not _is_integer(value) or (minimum is not None and value < minimum):
        bound = _bound(minimum, False)
        what = f"{bound}, a whole number" if bound else "a whole number"
        number = isinstance(value, int | float | np.number) and not isinstance(value, bool | np.bool_)
        raise (ValueError if number else TypeError)(
            f"`{name}` must be {what}{' (or None)' if none_ok else ''}; received {value!r}."
        )
    return int(value)


def check_float(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    positive: bool = False,
    none_ok: bool = False,
) -> float | None:
    """``value`` as a float, after checking it is finite, ``> 0`` with ``positive``, ``>= minimum``.

    Raises :class:`ValueError` (:class:`TypeError` for a non-number) naming the argument.

    Examples
    --------
    >>> check_float(0.05, "learning_rate", positive=True)
    0.05
    """
    if value is None and none_ok:
        return None
    number = isinstance(value, int | float | np.number) and not isinstance(value, bool | np.bool_)
    ok = number and bool(np.isfinite(value))
    ok = ok and not (positive and not value > 0) and not (minimum is not None and value < minimum)
    if not ok:
        bound = _bound(minimum, positive)
        what = f"{bound} and finite" if bound else "a finite number"
        raise (ValueError if number else TypeError)(
            f"`{name}` must be {what}{' (or None)' if none_ok else ''}; received {value!r}."
        )
    return float(value)


def check_random_state(random_state: Any) -> np.random.Generator:
    """Turn ``None``, an int or a Generator into a :class:`numpy.random.Generator`."""
    if isinstance(random_state, np.random.Generator):
        return random_state
    if random_state is None or isinstance(random_state, int | np.integer):
        return np.random.default_rng(random_state)
    raise TypeError(
        f"`random_state` must be None, an int or a numpy Generator, received {type(random_state)}."
    )


def seed_of(random_state: Any) -> int:
    """An integer seed derived from ``random_state`` (recorded in params)."""
    if isinstance(random_state, int | np.integer):
        return int(random_state)
    rng = check_random_state(random_state)
    return int(rng.integers(0, 2**31 - 1))


def resolve_device(device: str | None) -> str:
    """Resolve ``"auto"``/``None`` to ``"cuda"`` or ``"cpu"``, checking CUDA when asked for."""
    from ._constants import check_device, is_gpu
    from ._settings import settings

    device = settings.device if device is None else device
    check_device(device)
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if is_gpu(device) and not torch.cuda.is_available():
        raise RuntimeError(f"`device={device!r}` was requested but CUDA is not available.")
    return device
