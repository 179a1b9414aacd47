"""Per-sample gene offsets: ``λ_nd = s_n g_{s(n),d} Σ_l W_dl exp(F_nl)``.

Dense reference computations of the expected log-likelihood and of the closed-form updates,
recovery of known per-section detection efficiencies, the rates used by prediction and the
held-out deviance, save/load, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.special import gammaln

import sfact
from sfact._core.data import SparseCounts
from sfact._core.factory import make_prior
from sfact._core.module import FactorModule
from sfact.models import SpatialFactorization
from sfact.models._config import PNMFConfig

# one torch thread: the session fixture in conftest.py
pytestmark = pytest.mark.usefixtures("no_progress_bar")


def _module(N=40, D=12, L=3, S=3, seed=0, pseudocount=10.0):
    rng = np.random.default_rng(seed)
    Y = rng.poisson(2.0, (N, D)).astype(np.float64)
    Y[rng.random((N, D)) < 0.4] = 0
    sample = rng.integers(0, S, N)
    prior = make_prior("pnmf", L, PNMFConfig(), n_obs=N)
    module = FactorModule(prior, D, loadings_mode="multiplicative").double()
    W = rng.gamma(2.0, 0.5, (D, L))
    with torch.no_grad():
        module.W.copy_(torch.as_tensor(W))
    totals = np.stack([Y[sample == k].sum(0) for k in range(S)])
    weights = np.bincount(sample, minlength=S).astype(float)
    module.enable_gene_offsets(torch.as_tensor(totals), torch.as_tensor(weights), pseudocount)
    g = rng.uniform(0.5, 2.0, (S, D))
    with torch.no_grad():
        module.gene_offset.copy_(torch.as_tensor(g))
    mu = rng.normal(0, 0.5, (N, L))
    var = rng.uniform(0.05, 0.3, (N, L))
    s = rng.uniform(0.5, 1.5, N)
    return module, Y, sample, W, g, mu, var, s, totals, weights


def test_expected_loglik_with_offsets_matches_a_dense_computation():
    module, Y, sample, W, g, mu, var, s, _, _ = _module()
    counts = SparseCounts(sp.csr_matrix(Y), dtype=torch.float64)
    batch = counts.batch(None)
    t = torch.as_tensor
    got = module.expected_loglik(t(mu), t(var), t(s), batch, sample=t(sample)).item()
    # Jensen bound: Σ y log(s g Σ_l W e^μ) − Σ s g Σ_l W e^{μ+σ²/2} − Σ log y!
    G = g[sample]  # (N, D)
    log_rate = np.log(s[:, None] * G * (np.exp(mu) @ W.T))
    expected = s[:, None] * G * (np.exp(mu + 0.5 * var) @ W.T)
    ref = (Y * log_rate).sum() - expected.sum() - gammaln(Y + 1).sum()
    assert got == pytest.approx(ref, rel=1e-10)
    with pytest.raises(ValueError, match="sample of every cell"):
        module.expected_loglik(t(mu), t(var), t(s), batch)


def test_loadings_and_offset_updates_match_their_closed_forms():
    module, Y, sample, W, g, mu, var, s, totals, weights = _module()
    counts = SparseCounts(sp.csr_matrix(Y), dtype=torch.float64)
    t = torch.as_tensor
    module.multiplicative_update(t(mu), t(var), t(s), counts.batch(None), sample=t(sample))
    # W: Σ_n y φ / Σ_s g_sd Σ_{n in s} s_n e^{μ+σ²/2}, φ ∝ W e^μ
    E0 = np.exp(mu)
    phi_num = np.einsum("nd,dl,nl->dl", Y / (E0 @ W.T), W, E0)
    A = np.stack([(s[:, None] * np.exp(mu + 0.5 * var))[sample == k].sum(0) for k in range(3)])  # (S, L)
    W1 = phi_num / (g.T @ A)
    # then g: (Y_sd + a) / (Σ_{n in s} Σ_l W_dl E_nl + a), normalized to a weighted geometric mean of 1
    a = 10.0
    g1 = (totals + a) / (A @ W1.T + a)
    c = np.exp((weights[:, None] / weights.sum() * np.log(g1)).sum(0))
    np.testing.assert_allclose(module.gene_offset.numpy(), g1 / c, rtol=1e-10)
    np.testing.assert_allclose(module.W.numpy(), W1 * c[:, None], rtol=1e-10)
    # the normalization moves nothing: the rates are those of (W1, g1)
    rates = g1[sample] * (np.exp(mu + 0.5 * var) @ W1.T)
    new = module.gene_offset.numpy()[sample] * (np.exp(mu + 0.5 * var) @ module.W.numpy().T)
    np.testing.assert_allclose(new, rates, rtol=1e-10)


def _thinned_sections(seed=0):
    """Three sections with per-section, per-gene detection efficiencies in (0.3, 1)."""
    adata = sfact.datasets.simulate(
        n_obs=900, n_vars=40, n_factors=3, n_groups=1, n_samples=3, lengthscale=15.0, random_state=seed
    )
    rng = np.random.default_rng(seed)
    codes = adata.obs["sample"].cat.codes.to_numpy()
    eff = rng.uniform(0.3, 1.0, (3, adata.n_vars))
    X = adata.X.toarray()
    adata.X = sp.csr_matrix(rng.binomial(X.astype(np.int64), eff[codes]).astype(np.float32))
    sfact.pp.prepare(adata, sample_key="sample")
    return adata, eff


@pytest.mark.parametrize("prior", ["pnmf", "svgp"])
def test_offsets_recover_per_section_efficiencies_and_predict_better(prior):
    adata, eff = _thinned_sections()
    train, test = sfact.tl.heldout_split(adata, fraction=0.1, random_state=0)
    kw = {
        "prior": prior,
        "n_factors": 3,
        "random_state": 0,
        "prior_kwargs": None if prior == "pnmf" else {"num_inducing": 80, "sample_distance": None},
    }
    with_g = SpatialFactorization(train, gene_offsets=True, **kw).train(max_iter=150)
    without = SpatialFactorization(train, gene_offsets=False, **kw).train(max_iter=150)
    assert without.get_gene_offsets() is None
    g = with_g.get_gene_offsets()
    assert g.shape == (3, adata.n_vars)
    w = np.bincount(train.obs["sample"].cat.codes, minlength=3) / train.n_obs
    np.testing.assert_allclose((w[:, None] * np.log(g)).sum(0), 0.0, atol=1e-5)  # geometric mean 1
    truth = np.log(eff) - (w[:, None] * np.log(eff)).sum(0)
    assert np.corrcoef(np.log(g).ravel(), truth.ravel())[0, 1] > 0.9
    if prior != "pnmf":  # pnmf's held-out deviance fits the factors to the counts scored
        assert sfact.tl.heldout_deviance(with_g, test) < sfact.tl.heldout_deviance(without, test)


def test_prediction_deviance_and_save_load_use_the_offsets(tmp_path):
    adata, _ = _thinned_sections(seed=1)
    train, test = sfact.tl.heldout_split(adata, fraction=0.1, random_state=0)
    model = SpatialFactorization(
        train, prior="svgp", n_factors=3, gene_offsets=True, prior_kwargs={"num_inducing": 60}, random_state=0
    ).train(max_iter=20)
    rates = model.predict(test)
    g, codes = model.gene_offsets_of(test)
    np.testing.assert_array_equal(codes, test.obs["sample"].cat.codes.to_numpy())
    # the rates are the offset-free rates times the cells' own samples' offsets
    mu, var = model.get_log_factors(test)
    s = model.size_factors(test, test.X)
    plain = s[:, None] * (np.exp(mu + 0.5 * var) @ model.get_loadings().T)
    np.testing.assert_allclose(rates, plain * g[codes], rtol=1e-5)
    # the held-out deviance scores exactly these rates
    Y = test.X.toarray().astype(np.float64)
    lam = np.maximum(rates, 1e-300)
    dense = 2 * (np.where(Y > 0, Y * np.log(np.maximum(Y, 1e-300) / lam), 0.0) - Y + lam).mean()
    assert sfact.tl.heldout_deviance(model, test) == pytest.approx(dense, rel=1e-5)
    model.save(tmp_path / "m")
    back = SpatialFactorization.load(tmp_path / "m", train)
    assert back.setup.gene_offsets
    np.testing.assert_allclose(back.get_gene_offsets(), model.get_gene_offsets())
    np.testing.assert_allclose(back.predict(test), rates, rtol=1e-6)
    back.train(max_iter=2)  # resumes with the offsets


def test_gene_offsets_need_several_samples():
    adata = sfact.datasets.simulate(n_obs=200, n_vars=20, n_factors=2, random_state=0)
    sfact.pp.prepare(adata)
    with pytest.raises(ValueError, match="several samples"):
        SpatialFactorization(adata, prior="pnmf", n_factors=2, gene_offsets=True)
    with pytest.raises(TypeError, match="gene_offsets"):
        SpatialFactorization(adata, prior="pnmf", n_factors=2, gene_offsets="yes")
    assert not SpatialFactorization(adata, prior="pnmf", n_factors=2).setup.gene_offsets  # one sample


def test_several_samples_get_offsets_by_default():
    adata, _ = _thinned_sections()
    assert SpatialFactorization(adata, prior="pnmf", n_factors=2).setup.gene_offsets
    assert not SpatialFactorization(adata, prior="pnmf", n_factors=2, gene_offsets=False).setup.gene_offsets


def test_reconstruction_error_and_deviance_with_offsets_match_dense():
    from sfact.tl._analysis import poisson_deviance_sparse, reconstruction_error

    rng = np.random.default_rng(3)
    N, D, L, S = 50, 9, 3, 2
    Y = rng.poisson(1.5, (N, D)).astype(float)
    E = rng.gamma(2.0, 0.5, (N, L))
    W = rng.gamma(2.0, 0.5, (D, L))
    s = rng.uniform(0.5, 1.5, N)
    g = rng.uniform(0.5, 2.0, (S, D))
    codes = rng.integers(0, S, N)
    Yhat = s[:, None] * g[codes] * (E @ W.T)
    ref = np.linalg.norm(Y - Yhat) / np.linalg.norm(Y)
    got = reconstruction_error(sp.csr_matrix(Y), E, W, s, batch_size=7, offsets=(g, codes))
    assert got == pytest.approx(ref, rel=1e-10)
    term = np.where(Y > 0, Y * np.log(np.where(Y > 0, Y, 1.0) / Yhat), 0.0) - Y + Yhat
    cell, gene = poisson_deviance_sparse(sp.csr_matrix(Y), E, W, s, batch_size=7, offsets=(g, codes))
    np.testing.assert_allclose(cell, 2 * term.sum(1), rtol=1e-10)
    np.testing.assert_allclose(gene, 2 * term.sum(0), rtol=1e-10)
