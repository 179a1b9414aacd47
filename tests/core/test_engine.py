"""Numerical checks of the likelihood engine against dense reference computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sfact._core.data import SparseCounts
from sfact._core.init import kl_nmf
from sfact._core.module import FactorModule
from sfact._core.priors import PNMFPrior, PriorInput


def _data(N=40, D=12, L=3, seed=0, density_scale=1.0):
    rng = np.random.default_rng(seed)
    F = rng.normal(0, 0.7, (N, L))
    W = rng.gamma(1.0, 1.0, (D, L)) * density_scale
    s = rng.lognormal(0, 0.3, N)
    lam = s[:, None] * (np.exp(F) @ W.T)
    Y = rng.poisson(lam).astype(np.float64)
    return Y, F, W, s


def _module(N, D, L, seed=0, mode="multiplicative"):
    g = torch.Generator().manual_seed(seed)
    prior = PNMFPrior(L, N, init_scale=0.1)
    module = FactorModule(prior, D, loadings_mode=mode).double()
    with torch.no_grad():
        prior.mu.copy_(torch.randn(N, L, generator=g, dtype=torch.float64) * 0.5)
        prior.log_sigma.copy_(torch.log(0.2 + 0.5 * torch.rand(N, L, generator=g, dtype=torch.float64)))
        module.W.copy_(0.2 + torch.rand(D, L, generator=g, dtype=torch.float64))
    return module


def _dense_expected_loglik_lb(Y, mu, var, W, s):
    """Dense reference of the lower-bound expected log-likelihood (torch, differentiable)."""
    Yt = torch.as_tensor(Y)
    log_rate_lb = torch.log(s)[:, None] + torch.logsumexp(mu[:, None, :] + torch.log(W)[None, :, :], dim=2)
    Elam = s[:, None] * (torch.exp(mu + var / 2) @ W.T)
    return (Yt * log_rate_lb - Elam - torch.lgamma(Yt + 1)).sum()


def _full(module, counts, s):
    N = counts.n_obs
    idx = torch.arange(N)
    inp = PriorInput(idx=idx, n_total=N)
    return inp, counts.batch(None)


def test_sparse_counts_batch_matches_scipy():
    Y, *_ = _data(N=30, D=9)
    Y[3] = 0  # an empty row
    counts = SparseCounts(sp.csr_matrix(Y), dtype=torch.float64)
    idx = torch.tensor([5, 3, 0, 29, 7])
    b = counts.batch(idx)
    dense = np.zeros((len(idx), Y.shape[1]))
    dense[b.rows.numpy(), b.cols.numpy()] = b.values.numpy()
    np.testing.assert_array_equal(dense, Y[idx.numpy()])
    genes = torch.tensor([0, 4, 8])
    bg = counts.batch(idx, genes)
    dense = np.zeros((len(idx), Y.shape[1]))
    dense[bg.rows.numpy(), bg.cols.numpy()] = bg.values.numpy()
    expected = np.zeros_like(dense)
    expected[:, genes.numpy()] = Y[idx.numpy()][:, genes.numpy()]
    np.testing.assert_array_equal(dense, expected)


def test_lower_bound_matches_dense_reference_and_gradients():
    Y, _, _, s_np = _data()
    N, D = Y.shape
    L = 3
    module = _module(N, D, L, mode="projected")
    s = torch.as_tensor(s_np)
    counts = SparseCounts(sp.csr_matrix(Y), dtype=torch.float64)
    inp, batch = _full(module, counts, s)

    mu, var = module.prior.marginals(inp)
    sparse_val = module.expected_loglik(mu, var, s, batch)
    g_sparse = torch.autograd.grad(sparse_val, [module.prior.mu, module.prior.log_sigma, module.W])

    mu, var = module.prior.marginals(inp)
    dense_val = _dense_expected_loglik_lb(Y, mu, var, module.W, s)
    g_dense = torch.autograd.grad(dense_val, [module.prior.mu, module.prior.log_sigma, module.W])

    assert torch.allclose(sparse_val, dense_val, rtol=1e-10)
    for a, b in zip(g_sparse, g_dense, strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def test_lower_bound_below_monte_carlo_true_elbo():
    Y, _, _, s_np = _data(N=25, D=8, seed=3)
    N, D = Y.shape
    module = _module(N, D, 3, seed=1)
    with torch.no_grad():
        module.prior.log_sigma.fill_(np.log(0.8))  # wide posteriors: a visible Jensen gap
    s = torch.as_tensor(s_np)
    counts = SparseCounts(sp.csr_matrix(Y), dtype=torch.float64)
    inp, batch = _full(module, counts, s)
    with torch.no_grad():
        mu, var = module.prior.marginals(inp)
        lb = float(module.expected_loglik(mu, var, s, batch))
        # large-sample Monte Carlo of E_q[log p(Y | F)], dense
        g = torch.Generator().manual_seed(0)
        vals = []
        Yt = torch.as_tensor(Y)
        for _ in range(40):
            F = mu + var.sqrt() * torch.randn((500, N, 3), generator=g, dtype=torch.float64)
            lam = s[None, :, None] * (torch.exp(F) @ module.W.T)
            vals.append((Yt * torch.log(lam) - lam - torch.lgamma(Yt + 1)).sum((1, 2)))
        vals = torch.cat(vals)
        mc, se = float(vals.mean()), float(vals.std() / np.sqrt(vals.numel()))
    assert lb <= mc + 3 * se
    assert mc - lb > 10 * se  # the gap is real, not noise: the test can fail


@pytest.mark.parametrize("mode", ["expanded", "simple"])
def test_monte_carlo_modes_are_unbiased_for_their_terms(mode):
    Y, _, _, s_np = _data(N=20, D=6, seed=4)
    N, D = Y.shape
    module = _module(N, D, 2, seed=2)
    s = torch.as_tensor(s_np)
    counts = SparseCounts(sp.csr_matrix(Y), dtype=torch.float64)
    inp, batch = _full(module, counts, s)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        mu, var = module.prior.marginals(inp)
        est = torch.stack(
            [
                module.expected_loglik(mu, var, s, batch, mode=mode, n_samples=200, generator=g)
                for _ in range(20)
            ]
        )
        Yt = torch.as_tensor(Y)
        F = mu + var.sqrt() * torch.randn((20000, N, 2), generator=g, dtype=torch.float64)
        lam = s[None, :, None] * (torch.exp(F) @ module.W.T)
        truth = float((Yt * torch.log(lam) - lam - torch.lgamma(Yt + 1)).sum((1, 2)).mean())
        lb = float(module.expected_loglik(mu, var, s, batch))
    assert abs(float(est.mean()) - truth) < 0.01 * abs(truth)
    assert float(est.mean()) > lb


def test_multiplicative_update_never_lowers_the_bound():
    Y, _, _, s_np = _data(N=50, D=15, seed=5)
    N, D = Y.shape
    module = _module(N, D, 4, seed=3)
    s = torch.as_tensor(s_np)
    counts = SparseCounts(sp.csr_matrix(Y), dtype=torch.float64)
    inp, batch = _full(module, counts, s)
    with torch.no_grad():
        mu, var = module.prior.marginals(inp)
        prev = float(module.expected_loglik(mu, var, s, batch))
        gains = []
        for _ in range(15):
            module.multiplicative_update(mu, var, s, batch, rho=1.0)
            cur = float(module.expected_loglik(mu, var, s, batch))
            assert cur >= prev - 1e-9 * abs(prev)
            gains.append(cur - prev)
            prev = cur
    assert gains[0] > 0  # it does improve from a random start


def test_minibatch_estimates_average_to_full_elbo():
    Y, _, _, s_np = _data(N=60, D=10, seed=6)
    N, D = Y.shape
    module = _module(N, D, 3, seed=4)
    s = torch.as_tensor(s_np)
    counts = SparseCounts(sp.csr_matrix(Y), dtype=torch.float64)
    with torch.no_grad():
        inp, batch = _full(module, counts, s)
        full = float(module.elbo(inp, s, batch).elbo)
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))
        ests = []
        for k in range(4):  # a partition into 4 batches of 15
            idx = perm[k * 15 : (k + 1) * 15]
            ests.append(float(module.elbo(PriorInput(idx=idx, n_total=N), s[idx], counts.batch(idx)).elbo))
        assert np.mean(ests) == pytest.approx(full, rel=1e-10)
        # gene batches: a partition of the genes, each rescaled by D / B_y
        genes = torch.randperm(D, generator=torch.Generator().manual_seed(1))
        gests = []
        for k in range(2):
            gk = genes[k * 5 : (k + 1) * 5]
            gests.append(float(module.elbo(inp, s, counts.batch(None, gk), gene_scale=D / 5).elbo))
        assert np.mean(gests) == pytest.approx(full, rel=1e-10)


def test_pnmf_kl_matches_torch_distributions():
    N, L = 30, 4
    prior = PNMFPrior(L, N, init_scale=0.1).double()
    with torch.no_grad():
        prior.mu.normal_()
        prior.log_sigma.uniform_(-2, 1)
    idx = torch.arange(10, 20)
    kl = prior.kl(PriorInput(idx=idx, n_total=N))
    q = torch.distributions.Normal(prior.mu[idx], prior.log_sigma[idx].exp())
    p = torch.distributions.Normal(
        torch.zeros(10, L, dtype=torch.float64), torch.ones(10, L, dtype=torch.float64)
    )
    ref = torch.distributions.kl_divergence(q, p).sum() * N / 10
    assert torch.allclose(kl, ref)


def test_kl_nmf_decreases_divergence_and_fits_low_rank_data():
    Y, *_ = _data(N=80, D=20, seed=7, density_scale=5.0)
    counts = SparseCounts(sp.csr_matrix(Y), dtype=torch.float64)

    def kl_div(H, W):
        lam = (H @ W.T).numpy()
        m = Y > 0
        return float((Y[m] * np.log(Y[m] / lam[m])).sum() - Y.sum() + lam.sum())

    g = torch.Generator().manual_seed(0)
    d5 = kl_div(*kl_nmf(counts, 3, n_iter=5, generator=g))
    g = torch.Generator().manual_seed(0)
    H, W = kl_nmf(counts, 3, n_iter=200, generator=g)
    d200 = kl_div(H, W)
    assert d200 < d5
    assert (H >= 0).all() and (W >= 0).all()
    assert torch.allclose(H.mean(0), torch.ones(3, dtype=H.dtype))
    # rank-3 data is fitted far better than by the rank-1 "cell total x gene share" model
    tot = Y.sum(1, keepdims=True) * Y.sum(0, keepdims=True) / Y.sum()
    m = Y > 0
    d_base = float((Y[m] * np.log(Y[m] / tot[m])).sum() - Y.sum() + tot.sum())
    assert d200 < 0.8 * d_base


def test_elbo_returns_its_terms():
    """``FactorModule.elbo`` returns an :class:`ElboTerms` with the W update's numerator."""
    import dataclasses

    from sfact._core.module import ElboTerms

    Y, _, _, s_np = _data(N=30, D=9, seed=8)
    N, D = Y.shape
    module = _module(N, D, 3)
    counts = SparseCounts(sp.csr_matrix(Y), device="cpu", dtype=torch.float64)
    s = torch.as_tensor(s_np)
    inp = PriorInput(idx=torch.arange(N), n_total=N)
    terms = module.elbo(inp, s, counts.full_batch(), kl_weight=0.5)
    assert isinstance(terms, ElboTerms)
    assert [f.name for f in dataclasses.fields(terms)] == [
        "elbo",
        "loglik",
        "kl",
        "mu",
        "var",
        "mm_numerator",
    ]
    torch.testing.assert_close(terms.elbo, terms.loglik - 0.5 * terms.kl)
    assert terms.mu.shape == terms.var.shape == (N, 3)
    assert terms.mm_numerator is not None and terms.mm_numerator.shape == (D, 3)
    assert not hasattr(module, "_mm_numerator")  # no hidden state on the module
    # the numerator handed over equals the one the update computes itself
    twin = _module(N, D, 3)
    module.multiplicative_update(
        terms.mu.detach(), terms.var.detach(), s, counts.full_batch(), numerator=terms.mm_numerator
    )
    twin.multiplicative_update(terms.mu.detach(), terms.var.detach(), s, counts.full_batch())
    torch.testing.assert_close(module.W, twin.W)
    mc = module.elbo(inp, s, counts.full_batch(), mode="expanded", generator=torch.Generator().manual_seed(0))
    assert mc.mm_numerator is None


def test_registry_has_every_prior():
    from sfact._constants import GP_PRIORS, PRIOR_NAMES
    from sfact._core.gp import GPPrior
    from sfact._core.registry import PRIORS, prior_class

    assert set(PRIORS) == set(PRIOR_NAMES)
    for name in PRIOR_NAMES:
        cls = prior_class(name)
        assert issubclass(cls, GPPrior) == (name in GP_PRIORS)
    with pytest.raises(ValueError, match="Unknown prior"):
        prior_class("gaussian")


def test_optimizer_groups_are_explicit():
    """One Adam group per learning-rate multiplier, from the prior's ``lr_scales``, ascending."""
    import math

    from sfact._core.svgp import SVGPPrior
    from sfact._core.train import make_optimizer

    Z = np.random.default_rng(0).uniform(0, 10, (9, 2))
    kw = dict(
        kernel="matern32",
        lengthscale=2.0,
        sigma=1.0,
        group_embedding=None,
        group_diff_param=1.0,
        per_factor_kernel=False,
        train_lengthscale=True,
        train_sigma=False,
        train_group_diff_param=False,
        cache_budget=10**6,
    )
    full = FactorModule(SVGPPrior(2, Z, diagonal_only=False, **kw), 5, loadings_mode="projected")
    opt = make_optimizer(full, 0.1)
    assert [g["lr_scale"] for g in opt.param_groups] == [1 / math.sqrt(9), 1.0]
    assert opt.param_groups[0]["params"] == [full.prior.Lu_offdiag]
    assert opt.param_groups[1]["params"] == [
        full.W,
        full.prior.beta,
        full.prior.m,
        full.prior.raw_Lu_diag,
        full.prior.kernel.log_lengthscale,
    ]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 3)
    diag = FactorModule(SVGPPrior(2, Z, diagonal_only=True, **kw), 5, loadings_mode="multiplicative")
    assert [g["lr_scale"] for g in make_optimizer(diag, 0.1).param_groups] == [1.0]
