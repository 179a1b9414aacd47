"""Raw counts and coordinates as every data set reader returns them: shared by the loaders and :func:`sfact.datasets.read`."""

from __future__ import annotations

from typing import Any

import numpy as np

from sfact import _logging as logg
from sfact._utils import warn

_DENSE_MAX = 10_000_000
"""Dense count matrices with more entries than this are stored sparse when at most half non-zero."""


def _is_integral(values: np.ndarray) -> np.ndarray:
    """Elementwise: ``values`` is an integer up to the float32 rounding of normalized data."""
    return np.abs(values - np.round(values)) <= 0.05 + 1e-5 * np.abs(values)


def _recover_counts(X: Any) -> tuple[Any, str, int] | None:
    """Undo a per-cell scaling of integer counts, or ``log1p`` of one.

    Normalized data are ``s_i * c_ij`` (e.g. counts divided by cell volume) or
    ``log1p(s_i * c_ij)`` (``normalize_total`` then ``log1p``) for integer counts ``c_ij`` and
    one factor ``s_i`` per cell. Dividing a cell's values (after ``expm1`` for the second form) by
    its smallest positive value gives its counts divided by its smallest count; when those are
    not integers, multiplying by the smallest ``k`` in 2..10 that makes them integers recovers
    them. The first form is tried first; a form is accepted only if every value of every cell
    comes out an integer.

    Parameters
    ----------
    X
        Non-negative, finite matrix (cells x genes), dense or sparse.

    Returns
    -------
    ``(counts, form, n_multiplied)``: the counts as a float64 :class:`scipy.sparse.csr_matrix`,
    ``"scaled"`` or ``"log1p"``, and the number of cells whose smallest count was above 1;
    ``None`` when neither form gives integers. A cell whose counts are all multiples of its
    smallest count ``m > 1`` (e.g. one gene with 3 counts) comes back divided by ``m``: one
    cell cannot tell its scale apart from its counts.
    """
    import scipy.sparse as sp

    M = sp.csr_matrix(X, dtype=np.float64, copy=True)
    n = M.shape[0]
    lengths = np.diff(M.indptr)
    rows = np.repeat(np.arange(n), lengths)
    nonempty = lengths > 0
    for form in ("scaled", "log1p"):
        v = M.data if form == "scaled" else np.expm1(M.data)
        rowmin = np.full(n, np.inf)
        if nonempty.any():
            rowmin[nonempty] = np.minimum.reduceat(np.where(v > 0, v, np.inf), M.indptr[:-1][nonempty])
        ratio = v / rowmin[rows]  # 0 for the explicit zeros of empty rows
        multiplier = np.ones(n)
        bad = np.bincount(rows[~_is_integral(ratio)], minlength=n) > 0
        for k in range(2, 11):
            if not bad.any():
                break
            sel = bad[rows]
            scaled = ratio[sel] * k
            still = np.bincount(rows[sel][~_is_integral(scaled)], minlength=n) > 0
            fixed = bad & ~still
            multiplier[fixed] = k
            bad = bad & still
        if bad.any():
            continue
        counts = np.round(ratio * multiplier[rows])
        out = sp.csr_matrix((counts, M.indices.copy(), M.indptr.copy()), shape=M.shape)
        out.eliminate_zeros()
        return out, form, int((multiplier > 1).sum())
    return None


def _as_counts(X: Any, slot: str, *, recover: bool = True, sparse: bool | None = None) -> Any:
    """Check (and if needed recover) raw counts; return them as float32.

    The result is a :class:`scipy.sparse.csr_matrix` if ``sparse``, dense if ``sparse is False``,
    and with ``None`` CSR unless ``X`` is dense and small (at most ``_DENSE_MAX`` entries) or
    more than half non-zero.
    """
    import scipy.sparse as sp

    sparse_in = sp.issparse(X)
    vals = np.asarray(X.data if sparse_in else X)
    if vals.dtype.kind not in "biuf":
        raise ValueError(f"`{slot}` must be numeric, received dtype {vals.dtype}.")
    all_finite = bool(np.isfinite(vals).all())
    finite = vals if all_finite else vals[np.isfinite(vals)]
    if (finite < 0).any():
        raise ValueError(
            f"`{slot}` has negative values: it holds scaled or centred data, not counts, and the counts "
            "cannot be recovered from it (pass the slot with the raw or log-normalized counts)."
        )
    out = X
    if not np.array_equal(finite, np.round(finite)):
        recovered = _recover_counts(X) if (recover and all_finite) else None
        if recovered is None:
            warn(
                f"`{slot}` is not integer-valued and is neither a per-cell scaling of integer counts "
                "nor log1p of one, so the counts cannot be recovered; it is returned as it is. sfact's "
                "Poisson likelihood expects raw counts."
            )
        else:
            out, form, n_mult = recovered
            what = "a per-cell scaling" if form == "scaled" else "log1p of a per-cell scaling"
            logg.info(
                f"    recovered integer counts from `{slot}` ({what} of them)"
                + (f"; {n_mult} cells have no gene with a single count" if n_mult else "")
            )
    n_obs, n_vars = out.shape
    if sparse is not None:
        dense_out = not sparse
    elif sp.issparse(out):
        dense_out = not sparse_in and n_obs * n_vars <= _DENSE_MAX
    else:
        dense_out = n_obs * n_vars <= _DENSE_MAX or np.count_nonzero(out) > 0.5 * out.size
    if dense_out:
        return np.asarray(out.toarray() if sp.issparse(out) else out, dtype=np.float32)
    return sp.csr_matrix(out, dtype=np.float32)


def _coordinates(value: Any, where: str) -> np.ndarray:
    import pandas as pd

    if isinstance(value, pd.DataFrame):
        cols = [c for c in ("x", "y") if c in value.columns]
        value = value[cols] if len(cols) == 2 else value.iloc[:, :2]
    coords = np.asarray(value, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise ValueError(f"`{where}` must be (n_obs, 2) coordinates, received shape {coords.shape}.")
    return np.ascontiguousarray(coords[:, :2])
