"""What a user sees at the end of a fit: a one-line summary, and a warning with advice when it did not converge.

Torch-free, so the pipeline and the tools can import it cheaply.
"""

from __future__ import annotations

import inspect
import math
import sys

__all__ = ["ConvergenceWarning", "fit_summary", "warn_not_converged"]


class ConvergenceWarning(UserWarning):
    """Training stopped at ``max_iter`` before the ELBO converged.

    Issued by :meth:`sfact.models.SpatialFactorization.train` (and so :func:`sfact.tl.fit`) with
    advice that can be followed where the fit was started: a larger ``max_iter``, or training on
    from where it stopped. A :class:`UserWarning`; silence it with
    ``warnings.filterwarnings("ignore", category=sfact.models.ConvergenceWarning)``.

    Examples
    --------
    >>> import warnings
    >>> with warnings.catch_warnings():  # doctest: +SKIP
    ...     warnings.simplefilter("error", sfact.models.ConvergenceWarning)
    ...     model.train(max_iter=50)  # raises if it stops unconverged
    """


def _suggest_max_iter(n_iter: int, max_iter: int, left: float | None) -> int:
    """A ``max_iter`` that should reach convergence: the estimate with a margin, else twice as many."""
    need = 2 * max_iter if left is None or not math.isfinite(left) else n_iter + 1.5 * left
    step = 50 if need < 1000 else 500
    return int(max(step, math.ceil(need / step) * step))


def _called_from_fit() -> bool:
    """Whether this training runs inside :func:`sfact.tl.fit` (whose user has no model at hand)."""
    fit_module = sys.modules.get("sfact.tl._fit")
    fit = getattr(fit_module, "fit", None)
    if fit is None:
        return False
    code = inspect.unwrap(fit).__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def fit_summary(
    prior: str,
    *,
    n_iter: int,
    n_total: int,
    converged: bool,
    seconds: float,
    elbo: float | None,
    max_iter: int,
) -> str:
    """The line that ends every fit: iterations, converged or not, time, final ELBO per entry.

    Examples
    --------
    >>> fit_summary("svgp", n_iter=143, n_total=143, converged=True, seconds=12.34, elbo=-1.234567, max_iter=1000)
    'sfact svgp: 143 iterations in 12.3 s, converged, ELBO per entry -1.23457'
    >>> fit_summary("pnmf", n_iter=50, n_total=150, converged=False, seconds=3.0, elbo=-2.5, max_iter=50)
    'sfact pnmf: 50 iterations (150 in all) in 3.0 s, NOT converged (stopped at max_iter=50), ELBO per entry -2.5'
    """
    total = "" if n_total == n_iter else f" ({n_total} in all)"
    state = "converged" if converged else f"NOT converged (stopped at max_iter={max_iter})"
    value = "n/a" if elbo is None else f"{elbo:.6g}"
    return f"sfact {prior}: {n_iter} iterations{total} in {seconds:.1f} s, {state}, ELBO per entry {value}"


def not_converged_message(
    *,
    n_iter: int,
    n_total: int,
    max_iter: int,
    tol: float,
    change: float,
    left: float | None,
    from_fit: bool,
) -> str:
    """The warning's text, with advice for where the fit was started (``sfact.tl.fit`` or ``model.train``)."""
    if math.isfinite(change) and change >= tol:
        why = f"the ELBO still changes by {change:.1e} per iteration (relative), above `tol={tol:g}`"
    elif math.isfinite(change):
        why = (
            f"the ELBO changes by {change:.1e} per iteration (relative), below `tol={tol:g}`, but "
            "convergence is only declared after `min_iter` iterations (and after a learning phase of "
            "the hyperparameters)"
        )
    else:
        why = f"too few iterations to check convergence against `tol={tol:g}`"
    if left is not None and math.isfinite(left):
        why += f"; about {math.ceil(left)} more iterations are estimated"
    head = f"Training stopped at `max_iter={max_iter}` before converging: {why}."
    if from_fit:
        return (
            head
            + " Fit again with a larger `max_iter`, e.g. "
            + f"`sfact.tl.fit(..., max_iter={_suggest_max_iter(n_total, max_iter, left)})`, or keep the "
            + "model to train on from here: `model = sfact.tl.fit(..., return_model=True)`, then "
            + "`model.train(max_iter=...)` and `sfact.tl.analyze(adata, model)`."
        )
    more = _suggest_max_iter(0, max_iter, left)
    return (
        head + f" Continue from here with `model.train(max_iter={more})` (the history goes on), or train "
        f"afresh with a larger `max_iter`."
    )


def warn_not_converged(
    *,
    n_iter: int,
    n_total: int,
    max_iter: int,
    tol: float,
    change: float,
    left: float | None,
) -> None:
    """Issue a :class:`ConvergenceWarning` pointing at the user's line, with advice for their call."""
    from .._utils import warn

    message = not_converged_message(
        n_iter=n_iter,
        n_total=n_total,
        max_iter=max_iter,
        tol=tol,
        change=change,
        left=left,
        from_fit=_called_from_fit(),
    )
    warn(message, ConvergenceWarning)
