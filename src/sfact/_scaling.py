"""Coordinate scaling shared by :func:`sfact.pp.prepare` and the model (``scaled = (coords - offset) / factor``).

Torch-free; imported by both ``pp`` and ``models`` (so the model does not import ``pp``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

import numpy as np

__all__ = ["ScaleMethod", "apply_scaling", "fit_scaling", "sample_extents", "unscale"]

ScaleMethod = Literal["box", "none"]


def fit_scaling(
    coords: np.ndarray,
    method: ScaleMethod,
    box_size: float = 100.0,
    samples: np.ndarray | None = None,
) -> dict[str, Any]:
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
    samples
        Sample (tissue section) of every cell, as strings; with ``"box"`` every sample gets its
        own offset (its own minimum corner) and all share one factor, set by the sample with
        the longest side, so a lengthscale means the same distance in every sample.

    Returns
    -------
    A dict of plain values: ``scale`` (the method), ``offset`` (list of floats, one per
    dimension: the minimum over all cells), ``factor`` (float) and ``box_size`` (float), and with
    ``samples`` also ``sample_offsets`` (sample -> list of floats); pass it to
    :func:`apply_scaling`.

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
    sample_offsets: dict[str, list[float]] | None = None
    if method == "none" or coords.shape[0] == 0:
        offset, factor = np.zeros(n_dims), 1.0
        if samples is not None:
            sample_offsets = {str(k): [0.0] * n_dims for k in dict.fromkeys(np.asarray(samples).astype(str))}
    else:
        offset = coords.min(axis=0)
        if samples is None:
            extent = float((coords.max(axis=0) - offset).max())
        else:
            labels = np.asarray(samples).astype(str)
            sample_offsets, extents = {}, []
            for k in dict.fromkeys(labels):
                xy = coords[labels == k]
                lo = xy.min(axis=0)
                sample_offsets[str(k)] = [float(v) for v in lo]
                extents.append(float((xy.max(axis=0) - lo).max()))
            extent = max(extents)
        factor = extent / float(box_size) if extent > 0 else 1.0
    out: dict[str, Any] = {
        "scale": str(method),
        "offset": [float(v) for v in offset],
        "factor": float(factor),
        "box_size": float(box_size),
    }
    if sample_offsets is not None:
        out["sample_offsets"] = sample_offsets
    return out


def sample_extents(coords: np.ndarray, samples: np.ndarray) -> dict[str, float]:
    """The longer side of every sample's bounding box (in the units of ``coords``)."""
    coords = np.asarray(coords, dtype=np.float64)
    labels = np.asarray(samples).astype(str)
    return {
        str(k): float((coords[labels == k].max(axis=0) - coords[labels == k].min(axis=0)).max())
        for k in dict.fromkeys(labels)
    }


def apply_scaling(
    coords: np.ndarray, scaling: Mapping[str, Any], samples: np.ndarray | None = None
) -> np.ndarray:
    """Scale coordinates as recorded by :func:`fit_scaling` (or in ``uns['sfact_prepare']``).

    Parameters
    ----------
    coords
        Coordinates (n_obs, n_dims) in the original units.
    scaling
        Mapping with ``offset`` (n_dims values) and ``factor``, and ``sample_offsets`` when the
        scaling was fitted per sample.
    samples
        Sample of every cell (strings), needed when ``scaling`` has ``sample_offsets``.

    Returns
    -------
    ``(coords - offset) / factor`` as a float64 array, ``offset`` the one of each cell's sample
    when the scaling is per sample.

    Raises
    ------
    ValueError
        For a per-sample scaling without ``samples``, or with a sample it does not know.

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
    offset = _offsets(scaling, coords.shape[0], samples)
    return (coords - offset) / factor


def _offsets(scaling: Mapping[str, Any], n: int, samples: np.ndarray | None) -> np.ndarray:
    """The offset of every cell: ``offset``, or its sample's with a per-sample scaling."""
    per_sample = scaling.get("sample_offsets")
    if not per_sample:
        return np.asarray(scaling["offset"], dtype=np.float64).ravel()[None, :]
    if samples is None:
        raise ValueError("The coordinates were scaled per sample: the sample of every cell is needed.")
    labels = np.asarray(samples).astype(str)
    if labels.shape != (n,):
        raise ValueError(f"Expected the sample of each of the {n} cells, received shape {labels.shape}.")
    unknown = sorted(str(u) for u in set(labels) - set(per_sample))
    if unknown:
        raise ValueError(
            f"Samples {unknown[:5]} were not scaled when the data were prepared (known: "
            f"{sorted(per_sample)[:10]}); prepare the new sample with `sfact.pp.prepare` first."
        )
    table = {k: np.asarray(v, dtype=np.float64) for k, v in per_sample.items()}
    out = np.empty((n, len(next(iter(table.values())))))
    for k in dict.fromkeys(labels):
        out[labels == k] = table[str(k)]
    return out


def unscale(scaled: np.ndarray, scaling: Mapping[str, Any], samples: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`apply_scaling`: ``scaled * factor + offset`` (float64)."""
    scaled = np.asarray(scaled, dtype=np.float64)
    return scaled * float(scaling["factor"]) + _offsets(scaling, scaled.shape[0], samples)
