"""How long a training job has left, from its convergence criterion rather than from ``max_iter``.

Training stops at the first iteration ``k >= min_iter`` where the per-iteration relative change
of the ELBO, smoothed over windows of :data:`WINDOW` iterations, falls below ``tol``
(:func:`sfact._core.train.relative_change`), or at ``max_iter``. The runner sees only what the
training callback reports: ``(time, epoch, ELBO)`` a few times a second. From those points
:func:`stop_epoch` fits how fast the relative change of the ELBO shrinks (geometrically, and
as a power of the iteration, which bracket what training runs show) and predicts the iteration
where it crosses ``tol``;
:func:`estimate_remaining` turns that into seconds. When no prediction can be made (too few
points, an ELBO whose changes do not shrink yet, a job without a criterion), the estimate is
the time to ``max_iter``, marked as an upper bound.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from ._jobs import Job

#: iterations per smoothing window of the convergence check (``sfact._core.train.TrainConfig.window``;
#: not imported from there, which would import torch in the runner)
WINDOW = 5
#: slopes (between consecutive reported points) fitted, at most; at least ``_MIN_SLOPES``
_MAX_SLOPES = 16
_MIN_SLOPES = 3
#: points a trace keeps (older ones are thinned out)
_CAP = 512


class Remaining(NamedTuple):
    """Estimated seconds left of a training job."""

    seconds: float
    """Seconds left."""
    bound: bool
    """``True`` when ``seconds`` is only an upper bound: the time to ``max_iter`` at the current
    speed, while when the criterion will be met is not predictable yet."""


def criterion(job: Job) -> tuple[float, int] | None:
    """``(tol, min_iter)`` of a ``train`` job of the pipeline, from its config; ``None`` otherwise."""
    if job.task != "train":
        return None
    config = job.kwargs.get("config")
    training = config.get("training") if isinstance(config, Mapping) else None
    if not isinstance(training, Mapping) or training.get("tol") is None:
        return None
    try:
        return float(training["tol"]), int(training.get("min_iter") or 0)
    except (TypeError, ValueError):
        return None


def add_point(
    trace: list[tuple[float, int, float]], point: tuple[float, int, float], cap: int = _CAP
) -> None:
    """Append ``point`` to ``trace``, halving the trace (every other point, the last kept) at ``cap``."""
    trace.append(point)
    if len(trace) > cap:
        trace[:] = trace[::-1][::2][::-1]


def stop_epoch(
    trace: Sequence[tuple[float, int, float]], *, tol: float, min_iter: int = 0, window: int = WINDOW
) -> float | None:
    """The iteration where the convergence check is predicted to pass; ``None`` when unknown.

    Parameters
    ----------
    trace
        ``(time, epoch, elbo)`` points as reported, in order (the time is not used here).
        Slopes between at most 17 points spread over the second half of the epochs are fitted.
    tol
        The criterion's tolerance on the per-iteration relative change of the ELBO.
    min_iter
        Iterations before the criterion is checked.
    window
        Iterations per smoothing window of the criterion.

    Returns
    -------
    The predicted iteration (a float), or ``None`` before ``4 * window`` epochs, with fewer
    than 4 points in the second half of the epochs so far, or while the ELBO's relative
    changes do not shrink.
    """
    if not tol > 0:
        return None
    points: list[tuple[int, float]] = []
    for _, k, e in trace:
        if points and k <= points[-1][0]:
            continue
        if math.isfinite(e):
            points.append((int(k), float(e)))
    if not points:
        return None
    last = points[-1][0]
    if last < 4 * window:  # too early to tell
        return None
    points = [p for p in points if p[0] >= last / 2]  # the recent behaviour
    stride = -(-(len(points) - 1) // _MAX_SLOPES) or 1  # spread over it, the last point kept
    points = points[::-1][::stride][::-1]
    ks, ys = [], []
    for (k0, e0), (k1, e1) in itertools.pairwise(points):
        rel = abs(e1 - e0) / (k1 - k0) / max(abs(e1), 1e-300)
        if rel > 0:
            ks.append((k0 + k1) / 2)
            ys.append(math.log(rel))
    if len(ks) < _MIN_SLOPES:
        return None
    # the relative change shrinking geometrically (log-linear in k) or as a power of k (log-log);
    # the first tends to predict too early, the second too late: their geometric mean is used
    predictions = []
    for xs, back in ((ks, lambda x: x), ([math.log(k) for k in ks], math.exp)):
        crossing = _crossing(xs, ys, math.log(tol))
        if crossing is not None:
            try:
                predictions.append(back(crossing))
            except OverflowError:
                predictions.append(math.inf)
    if len(predictions) < 2:  # the relative changes do not shrink (yet): no prediction
        return None
    crossing = math.sqrt(predictions[0] * predictions[1])
    # the criterion compares the means of the last two windows: it sees a change about one
    # window after it happens, and needs two windows of history
    return max(crossing + window, float(min_iter), 2.0 * window)


def _crossing(xs: list[float], ys: list[float], level: float) -> float | None:
    """Where the least-squares line through ``(xs, ys)`` reaches ``level``; ``None`` unless it falls."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    if slope >= 0:
        return None
    return mx + (level - my) / slope


def estimate_remaining(
    trace: Sequence[tuple[float, int, float]],
    *,
    epoch: int,
    max_epoch: int | None,
    seconds_per_epoch: float | None,
    tol: float | None = None,
    min_iter: int = 0,
    window: int = WINDOW,
) -> Remaining | None:
    """Seconds a training job has left, predicted from its convergence criterion.

    Parameters
    ----------
    trace
        ``(time, epoch, elbo)`` points as reported by the training callback, in order.
    epoch
        The epoch reached.
    max_epoch
        ``max_iter`` of the training; ``None`` when not known.
    seconds_per_epoch
        The current speed; ``None`` when not known yet.
    tol
        The criterion's tolerance; ``None`` when the job has no known criterion.
    min_iter
        Iterations before the criterion is checked.
    window
        Iterations per smoothing window of the criterion.

    Returns
    -------
    ``None`` without a speed or ``max_epoch``. The seconds to the predicted convergence when
    it comes before ``max_epoch``; the seconds to ``max_epoch`` with ``tol=0`` (which never
    converges); otherwise (no criterion, no prediction, or one at or beyond ``max_epoch`` or
    already passed) the seconds to ``max_epoch`` marked as an upper bound.

    Examples
    --------
    >>> import math
    >>> trace = [(0.1 * k, k, -3 - 2 * math.exp(-k / 40)) for k in range(10, 121, 10)]
    >>> r = estimate_remaining(trace, epoch=120, max_epoch=1000, seconds_per_epoch=0.1, tol=1e-4)
    >>> r.bound, round(r.seconds)  # it stops at iteration 210: 9 s, not the 88 s to max_epoch
    (False, 15)
    """
    if seconds_per_epoch is None or not max_epoch or not math.isfinite(seconds_per_epoch):
        return None
    to_max = max(0.0, (max_epoch - epoch) * seconds_per_epoch)
    if tol is None:
        return Remaining(to_max, bound=True)
    if tol <= 0:  # the relative change is never below 0: training runs to max_epoch
        return Remaining(to_max, bound=False)
    stop = stop_epoch(trace, tol=tol, min_iter=min_iter, window=window)
    if stop is None or stop < epoch or stop >= max_epoch:
        return Remaining(to_max, bound=True)
    return Remaining((stop - epoch) * seconds_per_epoch, bound=False)
