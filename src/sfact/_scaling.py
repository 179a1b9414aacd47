"""Coordinate scaling shared by :func:`sfact.pp.prepare` and the model (``scaled = (coords - offset) / factor``).

Torch-free; imported by both ``pp`` and ``models`` (so the model does not import ``pp``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

import numpy as np

__all__ = ["ScaleMethod", "apply_scaling", "fit_scaling", "unscale"]

ScaleMethod = Literal["box", "none"]


def fit_scaling(coords: np.ndarray, method: ScaleMethod, box_size: float = 100.0) -> dict[str, Any]:
    """Fit the coordinate scaling ``scaled = (coords - offset) / factor``.

    Parameters
    ----------
    coords
        Finite coordinates (n_obs, n_dims).
    method
        ``"box"``: offset the per-dimension minimum and divide by (largest range) / ``box_size``,
        so the longer side spans ``box_size`` units. ``"none"``: offset 0 and factor 1.
    box_size
        Length of the longer side for ``"box"``.

    Returns
    -------
    A dict of plain values: ``scale`` (the method), ``offset`` (list of floats, one per
    dimension), ``factor`` (float) and ``box_size`` (float); pass it to :func:`apply_scaling`.

    Examples
    --------
    >>> import numpy as np
    >>> s = fit_scaling(np.array([[10.0, 0.0], [30.0, 5.0]]), "box", 100.0)
    >>> s["offset"], s["factor"]
    ([10.0, 0.0], 0.2)
    """
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2:
        raise ValueError(f"`coords` must be (n_obs, n_dims), received shape {coords.shape}.")
    if method not in get_args(ScaleMethod):
        raise ValueError(f"`scale` must be one of {get_args(ScaleMethod)}, received {method!r}.")
    n_dims = coords.shape[1]
    if method == "none" or coords.shape[0] == 0:
        offset, factor = np.zeros(n_dims), 1.0
    else:
        offset = coords.min(axis=0)
        extent = float((coords.max(axis=0) - offset).max())
        factor = extent / float(box_size) if extent > 0 else 1.0
    return {
        "scale": str(method),
        "offset": [float(v) for v in offset],
        "factor": float(factor),
        "box_size": float(box_size),
    }


def apply_scaling(coords: np.ndarray, scaling: Mapping[str, Any]) -> np.ndarray:
    """Scale coordinates as recorded by :func:`fit_scaling` (or in ``uns['sfact_prepare']``).

    Parameters
    ----------
    coords
        Coordinates (n_obs, n_dims) in the original units.
    scaling
        Mapping with ``offset`` (n_dims values) and ``factor``.

    Returns
    -------
    ``(coords - offset) / factor`` as a float64 array.

    Examples
    --------
    >>> import numpy as np
    >>> apply_scaling(np.array([[20.0, 5.0]]), {"offset": [10.0, 0.0], "factor": 0.2})
    array([[50., 25.]])
    """
    coords = np.asarray(coords, dtype=np.float64)
    offset = np.asarray(scaling["offset"], dtype=np.float64).ravel()
    factor = float(scaling["factor"])
    if coords.ndim != 2 or coords.shape[1] != offset.size:
        raise ValueError(
            f"Expected coordinates with {offset.size} dimensions, received shape {coords.shape}."
        )
    return (coords - offset) / factor


def unscale(scaled: np.ndarray, scaling: Mapping[str, Any]) -> np.ndarray:
    """Inverse of :func:`apply_scaling`: ``scaled * factor + offset`` (float64)."""
    scaled = np.asarray(scaled, dtype=np.float64)
    return scaled * float(scaling["factor"]) + np.asarray(scaling["offset"], dtype=float)[None, :]
