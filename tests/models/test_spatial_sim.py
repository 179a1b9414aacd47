"""Spatial priors against pnmf, and multi-group against single-group, on simulated data."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial import cKDTree

import sfact
from sfact.tl._analysis import poisson_deviance_sparse

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def split():
    adata = sfact.datasets.simulate(
        n_obs=1500, n_vars=60, n_factors=3, n_groups=2, group_effect=1.5, lengthscale=20.0, random_state=3
    )
    sfact.pp.prepare(adata, group_key="group")
    train, test = sfact.tl.heldout_split(adata, fraction=0.1, random_state=0)
    return adata, train, test


def _fit(train, prior, **kw):
    model = sfact.models.SpatialFactorization(
        train,
        prior=prior,
        n_factors=3,
        group_key="group" if prior.startswith("mggp") else None,
        prior_kwargs={"num_inducing": 150, "lengthscale": 15.0, **kw} if prior != "pnmf" else None,
        random_state=0,
    )
    return model.train(max_iter=150)


def _pnmf_knn_deviance(model, train, test, k=10):
    """pnmf has no spatial model: predict held-out log-factors from the k nearest training cells."""
    mu, var = model.get_log_factors()
    _, nn = cKDTree(train.obsm["spatial"]).query(test.obsm["spatial"], k)
    mu_t, var_t = mu[nn].mean(1), var[nn].mean(1)
    Y = sp.csr_matrix(test.X)
    s = model.size_factors(test, Y)
    per_cell, _ = poisson_deviance_sparse(Y, np.exp(mu_t + 0.5 * var_t), model.get_loadings(), s)
    return per_cell.sum() / (test.n_obs * test.n_vars)


def test_svgp_beats_pnmf_on_smooth_factors(split):
    _, train, test = split
    pnmf = _fit(train, "pnmf")
    svgp = _fit(train, "svgp")
    dev_pnmf = _pnmf_knn_deviance(pnmf, train, test)
    dev_svgp = sfact.tl.heldout_deviance(svgp, test)
    assert dev_svgp < dev_pnmf, (dev_svgp, dev_pnmf)
    coords = train.obsm["spatial"]
    moran_pnmf = sfact.tl.morans_i(pnmf.get_factors(), coords)["I"].mean()
    moran_svgp = sfact.tl.morans_i(svgp.get_factors(), coords)["I"].mean()
    assert moran_svgp > moran_pnmf + 0.1, (moran_svgp, moran_pnmf)


def test_mggp_recovers_group_specific_patterns(split):
    _, train, test = split
    svgp = _fit(train, "svgp")
    mggp = _fit(train, "mggp_svgp", group_diff_param=1.0)
    dev_svgp = sfact.tl.heldout_deviance(svgp, test)
    dev_mggp = sfact.tl.heldout_deviance(mggp, test)
    assert dev_mggp < 0.97 * dev_svgp, (dev_mggp, dev_svgp)
    # group-wise maps: each cell's expression profile predicted as if it were in group g
    # follows group g's true profile rather than the other group's (svgp cannot tell them apart)
    gw, names = mggp.groupwise_factors()
    assert names == ["g0", "g1"]
    truth = train.obsm["log_factors_true_groupwise"]  # (N, G, L)
    W_true = train.varm["loadings_true"]
    W = mggp.get_loadings()

    def log_comp(rates):
        return np.log(rates / rates.sum(1, keepdims=True))

    est = [log_comp(gw[g] @ W.T) for g in range(2)]
    true = [log_comp(np.exp(truth[:, g, :]) @ W_true.T) for g in range(2)]
    for g in range(2):
        own = np.corrcoef(est[g].ravel(), true[g].ravel())[0, 1]
        other = np.corrcoef(est[g].ravel(), true[1 - g].ravel())[0, 1]
        assert own > other + 0.2, (g, own, other)
    # the two groups' predicted profiles differ about as much as the true ones do
    gap_est = np.abs(est[0] - est[1]).mean()
    gap_true = np.abs(true[0] - true[1]).mean()
    assert gap_est > 0.6 * gap_true, (gap_est, gap_true)
