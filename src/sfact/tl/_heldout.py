"""Held-out evaluation: fit on most cells, predict the rest from their coordinates."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._utils import check_random_state

if TYPE_CHECKING:
    from anndata import AnnData

    from ..models import SpatialFactorization


def heldout_split(
    adata: AnnData, *, fraction: float = 0.05, random_state: int | np.random.Generator | None = 0
) -> tuple[AnnData, AnnData]:
    """Split cells at random into a training and a held-out set.

    The held-out cells are the first ``round(fraction · N)`` of
    ``numpy.random.default_rng(random_state).permutation(N)`` — the protocol of sfact's
    benchmarks.

    Parameters
    ----------
    adata
        All cells.
    fraction
        Fraction of cells held out (0 < fraction < 1).
    random_state
        Seed or :class:`numpy.random.Generator`.

    Returns
    -------
    ``(train, test)`` copies, each in the original cell order.

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.osmfish()
    >>> train, test = sfact.tl.heldout_split(adata)
    >>> test.n_obs
    242
    """
    test = heldout_mask(adata.n_obs, fraction=fraction, random_state=random_state)
    return adata[~test].copy(), adata[test].copy()


def heldout_mask(
    n_obs: int, *, fraction: float, random_state: int | np.random.Generator | None
) -> np.ndarray:
    """The held-out cells of :func:`heldout_split` as a boolean mask of length ``n_obs``."""
    if not 0 < fraction < 1:
        raise ValueError(f"`fraction` must be in (0, 1), received {fraction}.")
    n_test = round(fraction * n_obs)
    if n_test < 1 or n_test >= n_obs:
        raise ValueError(f"`fraction={fraction}` of {n_obs} cells leaves no training or no held-out cells.")
    perm = check_random_state(random_state).permutation(n_obs)
    test = np.zeros(n_obs, dtype=bool)
    test[perm[:n_test]] = True
    return test


def heldout_deviance(model: SpatialFactorization, adata_test: AnnData, *, batch_size: int = 10000) -> float:
    """Mean Poisson deviance per matrix entry of held-out cells predicted by ``model``.

    The rates are ``E[λ_nd] = s_n Σ_l W_dl E[e^{F_nl}]`` with the factors predicted from the
    held-out cells' coordinates (and groups) for the spatial priors, or fitted to their counts
    with the loadings fixed for ``pnmf``; with ``size_factors="total"`` each held-out cell's own
    total count gives ``s_n`` (relative to the training median, as in training).

    For ``pnmf``, which has no model of space, the held-out cells' factors are fitted to the very
    counts being scored, so its value checks a fit but is *not* a prediction and cannot be
    ranked against the spatial priors (a warning says so); the benchmarks give ``pnmf`` the mean
    log-factors of each held-out cell's nearest training cells instead.

    Parameters
    ----------
    model
        A trained model.
    adata_test
        Held-out cells with counts, coordinates and (multi-group priors) groups.
    batch_size
        Cells per batch of the GP predictive.

    Returns
    -------
    ``2 Σ [y log(y/λ) − (y − λ)] / (n_test · D)``.

    Examples
    --------
    >>> train, test = sfact.tl.heldout_split(adata)  # doctest: +SKIP
    >>> model = sfact.models.SpatialFactorization(train, prior="svgp").train()  # doctest: +SKIP
    >>> sfact.tl.heldout_deviance(model, test)  # doctest: +SKIP
    """
    from ._analysis import _adata_counts, poisson_deviance_sparse

    model.check_vars(adata_test)
    if model.prior == "pnmf":
        from scanpy import logging as logg

        logg.warning(
            "`heldout_deviance` with `pnmf` fits the held-out cells' factors to the counts it scores: "
            "a check of the fit, not a prediction comparable with the spatial priors."
        )
    mu, var = model.get_log_factors(adata_test, batch_size=batch_size)
    Y = _adata_counts(adata_test, model.setup.layer)
    s = model.size_factors(adata_test, Y)
    per_cell, _ = poisson_deviance_sparse(Y, np.exp(mu + 0.5 * var), model.get_loadings(), s)
    return float(per_cell.sum() / (adata_test.n_obs * adata_test.n_vars))
