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
    warnings.warn(message, category, stacklevel=level - 1)


def view_to_actual(adata: AnnData) -> None:
    """Make a view actual before writing to it, with a warning (as scanpy does)."""
    if adata.is_view:
        warn(
            "Received a view of an AnnData; making it a copy so results can be written to it. "
            "Pass `adata.copy()` to silence this."
        )
        adata._init_as_actual(adata.copy())


def get_counts(adata: AnnData, layer: str | None = None) -> Any:
    """Return the count matrix from ``adata.X`` or ``adata.layers[layer]``."""
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
    if vals.size == 0:
        return
    if not np.issubdtype(vals.dtype, np.number):
        raise ValueError(f"`{slot}` must be numeric, received dtype {vals.dtype}.")
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
    X = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
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
