"""Learned kernel hyperparameters: gradients (finite differences), bounds, the learning phase and
the caches rebuilt when it ends, loading models saved with the softplus parametrization."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from sfact._core.kernels import Kernel
from sfact._core.lcgp import LCGPPrior
from sfact._core.module import FactorModule
from sfact._core.priors import PriorInput
from sfact._core.svgp import SVGPPrior
from sfact._core.train import make_optimizer

KERNEL_KW = {
    "kernel": "matern32",
    "lengthscale": 3.0,
    "sigma": 1.2,
    "group_embedding": None,
    "group_diff_param": 1.0,
    "per_factor_kernel": False,
    "train_lengthscale": True,
    "train_sigma": True,
    "train_group_diff_param": False,
    "diagonal_only": False,
}


def _X(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 10, (n, 2))


def _svgp(Z, **kw) -> SVGPPrior:
    return SVGPPrior(2, Z, **{**KERNEL_KW, "cache_budget": 10**7, **kw})


def _lcgp(X, **kw) -> LCGPPrior:
    opts = {
        **KERNEL_KW,
        "n_neighbors": 4,
        "nugget": 0.05,
        "neighbor_method": "exact",
        "neighbor_selection": "spatial",
        "order_seed": 0,
        **kw,
    }
    return LCGPPrior(2, X, **opts)


def _randomize(prior, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (prior.m, prior.raw_Lu_diag, getattr(prior, "Lu_offdiag", None)):
            if p is not None:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ---------------------------------------------------------------- gradients vs finite differences
@pytest.mark.parametrize("name", ["matern32", "rbf"])
def test_kernel_hyperparameter_gradcheck(name):
    k = Kernel(
        name,
        n_dims=2,
        lengthscale=np.array([2.0, 3.0]),
        sigma=np.array([1.0, 0.7]),
        n_factors=2,
        per_factor=True,
        group_embedding=np.eye(3) / np.sqrt(2.0),
        group_diff_param=0.5,
        train_lengthscale=True,
        train_sigma=True,
        train_group_diff_param=True,
    ).double()
    X1, X2 = torch.as_tensor(_X(5)), torch.as_tensor(_X(4, 1))
    g1, g2 = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([2, 2, 0, 1])

    names = ("log_lengthscale", "log_sigma", "log_alpha")
    params = tuple(getattr(k, n).detach().clone().requires_grad_(True) for n in names)
    saved = {n: getattr(k, n) for n in names}
    for n in saved:
        delattr(k, n)
    try:

        def g(a, b, c):
            k.log_lengthscale, k.log_sigma, k.log_alpha = a, b, c  # type: ignore[assignment]
            return k(X1, X2, g1, g2)

        assert torch.autograd.gradcheck(g, params, eps=1e-6, atol=1e-6)
    finally:
        for n, p in saved.items():
            setattr(k, n, p)


def _loss_svgp(prior: SVGPPrior, X: torch.Tensor) -> torch.Tensor:
    inp = PriorInput(idx=torch.arange(X.shape[0]), n_total=X.shape[0], X=X, groups=None)
    mu, var = prior.marginals(inp)
    return (mu.sin() * var.sqrt()).sum() + prior.kl(inp)


def test_svgp_hyperparameter_gradient_matches_finite_differences():
    X = torch.as_tensor(_X(30))
    prior = _svgp(_X(8, 2)).double()
    _randomize(prior)
    for p in (prior.kernel.log_lengthscale, prior.kernel.log_sigma):
        prior.zero_grad()
        _loss_svgp(prior, X).backward()
        grad = p.grad.clone()
        eps = 1e-6
        with torch.no_grad():
            p += eps
            up = _loss_svgp(prior, X).item()
            p -= 2 * eps
            down = _loss_svgp(prior, X).item()
            p += eps
        assert grad.item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-7)


def test_lcgp_hyperparameter_gradients_match_finite_differences():
    X = _X(25)
    prior = _lcgp(X, train_nugget=True).double()
    _randomize(prior)
    idx = torch.arange(25)
    params = [prior.kernel.log_lengthscale, prior.kernel.log_sigma, prior.log_nugget]
    for p in params:
        prior.zero_grad()
        prior.kl_terms(idx).sum().backward()
        grad = p.grad.clone().reshape(-1)[0].item()
        eps = 1e-6
        with torch.no_grad():
            p += eps
            up = prior.kl_terms(idx).sum().item()
            p -= 2 * eps
            down = prior.kl_terms(idx).sum().item()
            p += eps
        assert grad == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------- parametrization, groups, bounds
def test_hyperparameters_have_their_own_step_size_and_bounds():
    prior = _svgp(_X(9), hyper_lr_scale=0.25, lengthscale_bounds=(1.0, 6.0))
    module = FactorModule(prior, 5, loadings_mode="multiplicative")
    opt = make_optimizer(module, 0.1)
    hyper = [g for g in opt.param_groups if g["lr_scale"] == 0.25]
    assert len(hyper) == 1
    assert hyper[0]["params"] == [prior.kernel.log_lengthscale, prior.kernel.log_sigma]
    assert hyper[0]["lr"] == pytest.approx(0.025)
    with torch.no_grad():
        prior.kernel.log_lengthscale.fill_(math.log(50.0))
        prior.kernel.log_sigma.fill_(math.log(1e-6))
    prior.after_step()
    assert prior.kernel.lengthscale.item() == pytest.approx(6.0)
    assert prior.kernel.sigma.item() == pytest.approx(prior.kernel.bounds["sigma"][0])
    # fixed hyperparameters are never clamped
    fixed = _svgp(_X(9), train_lengthscale=False, lengthscale=50.0, lengthscale_bounds=(1.0, 6.0))
    fixed.after_step()
    assert fixed.kernel.lengthscale.item() == pytest.approx(50.0)


def test_softplus_state_dict_of_older_models_loads():
    k = Kernel(
        "matern32",
        n_dims=2,
        lengthscale=4.0,
        sigma=0.8,
        n_factors=1,
        per_factor=False,
        group_embedding=None,
        group_diff_param=1.0,
        train_lengthscale=False,
        train_sigma=False,
        train_group_diff_param=False,
    )
    inv_softplus = lambda x: x + math.log(-math.expm1(-x))  # noqa: E731
    old = {
        "raw_lengthscale": torch.tensor([inv_softplus(7.0)]),
        "raw_sigma": torch.tensor([inv_softplus(1.5)]),
        "raw_alpha": torch.zeros(1),
        "group_embedding": torch.zeros(1, 1),
    }
    k.load_state_dict(old)
    assert k.lengthscale.item() == pytest.approx(7.0, rel=1e-5)
    assert k.sigma.item() == pytest.approx(1.5, rel=1e-5)
    assert float(F.softplus(torch.tensor(inv_softplus(7.0)))) == pytest.approx(7.0)


# ---------------------------------------------------------------- learning phase and caches
def _fake_history(n: int):
    from sfact._core.train import History

    h = History()
    h.elbo.extend([0.0] * n)
    return h


def test_svgp_cache_rebuilt_after_the_learning_phase():
    X = torch.as_tensor(_X(40))
    prior = _svgp(_X(10, 3), hyper_iter=2).double()
    _randomize(prior)
    inp = PriorInput(idx=torch.arange(40), n_total=40, X=X, groups=None, X_all=X, groups_all=None)
    assert prior.hyper_trainable and not prior.hyper_phase_over(1) and prior.hyper_phase_over(2)
    version = prior.hyper_version
    with torch.no_grad():
        prior.kernel.log_lengthscale.add_(0.3)  # as a learning step would
    prior.freeze_hyperparameters()
    assert not prior.hyper_trainable and prior.hyper_version > version
    cached = prior.marginals(inp)
    assert prior._A_cache is not None  # the frozen prior caches again
    uncached = prior._marginals_from_A(prior._A(X, None), X, None)
    for a, b in zip(cached, uncached, strict=True):
        torch.testing.assert_close(a, b)
    # a changed hyperparameter, announced: never the stale cache
    with torch.no_grad():
        prior.kernel.log_lengthscale.add_(0.5)
    prior.hyperparameters_changed()
    again = prior.marginals(inp)
    fresh = prior._marginals_from_A(prior._A(X, None), X, None)
    torch.testing.assert_close(again[1], fresh[1])
    assert not torch.allclose(again[1], cached[1])


def test_lcgp_conditionals_rebuilt_after_the_learning_phase():
    X = _X(30)
    prior = _lcgp(X, train_nugget=True, hyper_iter=1).double()
    b0 = prior.b.clone()
    with torch.no_grad():
        prior.kernel.log_lengthscale.add_(0.4)
        prior.log_nugget.add_(0.5)
    prior.freeze_hyperparameters()
    assert not prior.hyper_trainable
    assert not torch.allclose(prior.b, b0)
    b, tau2 = prior._conditionals_of(prior.kernel, prior.X_train, None, prior.nbr)
    torch.testing.assert_close(prior.b, b)
    torch.testing.assert_close(prior.tau2, tau2)
    assert prior.config()["nugget"] == pytest.approx(0.05 * math.exp(0.5))


def test_train_loop_freezes_after_hyper_iter():
    import scipy.sparse as sp

    from sfact._core.data import SparseCounts
    from sfact._core.train import History, TrainConfig, TrainData, train_loop

    rng = np.random.default_rng(0)
    Xn = _X(60)
    Y = sp.csr_matrix(rng.poisson(2.0, (60, 8)).astype(np.float64))
    prior = _svgp(_X(12, 4), hyper_iter=3)
    module = FactorModule(prior, 8, loadings_mode="multiplicative")
    data = TrainData(
        counts=SparseCounts(Y, device="cpu", dtype=torch.float32),
        s=torch.ones(60),
        X=torch.as_tensor(Xn, dtype=torch.float32),
    )
    opt = make_optimizer(module, 0.1)
    ls0 = prior.kernel.lengthscale.item()
    hist = History()
    train_loop(
        module,
        data,
        TrainConfig(max_iter=6, min_iter=100),
        optimizer=opt,
        history=hist,
        generator=torch.Generator().manual_seed(0),
        progress_bar=False,
    )
    assert not prior.hyper_trainable
    ls = prior.kernel.lengthscale.item()
    assert ls != pytest.approx(ls0)
    # after the phase the hyperparameters no longer move
    train_loop(
        module,
        data,
        TrainConfig(max_iter=2, min_iter=100),
        optimizer=opt,
        history=hist,
        generator=torch.Generator().manual_seed(0),
        progress_bar=False,
    )
    assert prior.kernel.lengthscale.item() == ls


def test_no_convergence_stop_during_or_right_after_the_phase():
    import scipy.sparse as sp

    from sfact._core.data import SparseCounts
    from sfact._core.train import History, TrainConfig, TrainData, train_loop

    rng = np.random.default_rng(1)
    Y = sp.csr_matrix(rng.poisson(2.0, (50, 6)).astype(np.float64))
    prior = _svgp(_X(10, 5), hyper_iter=6)
    module = FactorModule(prior, 6, loadings_mode="multiplicative")
    data = TrainData(
        counts=SparseCounts(Y, device="cpu", dtype=torch.float32),
        s=torch.ones(50),
        X=torch.as_tensor(_X(50), dtype=torch.float32),
    )
    hist = History()
    out = train_loop(
        module,
        data,
        TrainConfig(max_iter=40, min_iter=1, tol=1.0, window=2),  # converges as soon as allowed
        optimizer=make_optimizer(module, 0.1),
        history=hist,
        generator=torch.Generator().manual_seed(0),
        progress_bar=False,
    )
    assert out["converged"] and len(hist) == 6 + 2 * 2
    assert prior.hyper_phase_end() == 6 and not prior.hyper_trainable
