"""Recovery of known factors on simulated data."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

import sfact


def _best_match(est: np.ndarray, truth: np.ndarray) -> np.ndarray:
    L = est.shape[1]
    C = np.corrcoef(est.T, truth.T)[:L, L:]
    r, c = linear_sum_assignment(-C)
    return C[r, c]


def test_pnmf_recovers_simulated_factors_and_loadings():
    adata = sfact.datasets.simulate(
        n_obs=800, n_vars=150, n_factors=4, group_effect=0.0, size_factor_sd=0.0, random_state=1
    )
    model = sfact.models.SpatialFactorization(
        adata, prior="pnmf", n_factors=4, size_factors=None, random_state=0
    )
    model.train(max_iter=200)
    assert model.history["elbo"].iloc[-1] > model.history["elbo"].iloc[0]
    corr_f = _best_match(model.get_factors(), adata.obsm["factors_true"])
    corr_logf = _best_match(np.log(model.get_factors()), adata.obsm["log_factors_true"])
    corr_w = _best_match(model.get_loadings(), adata.varm["loadings_true"])
    assert corr_f.min() > 0.9, corr_f
    assert corr_logf.min() > 0.9, corr_logf
    assert corr_w.min() > 0.95, corr_w
