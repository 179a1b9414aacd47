"""The sparse variational GP priors ``svgp`` / ``mggp_svgp``: exactness, KL, caches, inducing
points, initialization, reordering, and the model-level workflow (train, save/load, transform,
held-out deviance).

Exact checks run in float64 (``.double()`` modules) with small M and N.
"""

from __future__ import annotations

import math
import os

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.linalg import solve_triangular
from torch.distributions import MultivariateNormal, kl_divergence

import sfact
import sfact._core.svgp as svgp_mod
from sfact._core.inducing import inducing_points, kmeans_centers, largest_remainder
from sfact._core.priors import PriorInput
from sfact._core.svgp import SVGPPrior as _SVGPPrior
from sfact._utils import SfactWarning
from sfact.models import SpatialFactorization

# the core constructor takes every option explicitly (defaults live in SVGPConfig); these tests
# build priors directly with the values below unless they say otherwise
CORE_KWARGS = {
    "kernel": "matern32",
    "lengthscale": 10.0,
    "sigma": 1.0,
    "group_embedding": None,
    "group_diff_param": 1.0,
    "per_factor_kernel": False,
    "train_lengthscale": False,
    "train_sigma": False,
    "train_group_diff_param": False,
    "diagonal_only": False,
    "cache_budget": 50_000_000,
}


def SVGPPrior(*args, **kw) -> _SVGPPrior:  # stands in for the class
    return _SVGPPrior(*args, **{**CORE_KWARGS, **kw})


N_FACTORS = 3
NUM_INDUCING = 50


# one torch thread: the session fixture in conftest.py
pytestmark = pytest.mark.usefixtures("no_progress_bar")


# ====================================================================== helpers
def _t(a, dtype=torch.float64) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=dtype)


def _onehot(G: int) -> np.ndarray:
    return np.eye(G) / math.sqrt(2.0)


def _make_prior(case: str, Z: np.ndarray, Zg: np.ndarray | None, n_factors: int = 2, **kw) -> SVGPPrior:
    """A float64 prior for one of the test cases."""
    if case == "matern32":
        p = SVGPPrior(n_factors, Z, kernel="matern32", lengthscale=3.0, sigma=1.3, **kw)
    elif case == "rbf":
        p = SVGPPrior(n_factors, Z, kernel="rbf", lengthscale=2.5, sigma=0.9, **kw)
    elif case == "per_factor":
        ls = np.linspace(1.5, 6.0, n_factors)
        sg = np.linspace(0.7, 1.6, n_factors)
        p = SVGPPrior(n_factors, Z, lengthscale=ls, sigma=sg, per_factor_kernel=True, **kw)
    elif case == "mggp":
        p = SVGPPrior(
            n_factors,
            Z,
            Zg,
            lengthscale=3.0,
            sigma=1.1,
            group_embedding=_onehot(3),
            group_diff_param=1.5,
            **kw,
        )
    else:  # pragma: no cover
        raise AssertionError(case)
    return p.double()


def _kernel_sets(prior: SVGPPrior, X1, X2, g1=None, g2=None) -> np.ndarray:
    """(L, n1, n2) kernel matrix of each factor (shared kernel repeated)."""
    if not prior.multigroup:
        g1 = g2 = None
    K = prior.kernel(_t(X1), _t(X2), g1, g2).detach().numpy()
    return np.broadcast_to(K, (prior.n_factors, *K.shape[1:])) if K.shape[0] == 1 else K


def _jittered(K: np.ndarray) -> np.ndarray:
    """``K + JITTER·mean(diag K)·I``: what the prior factorizes for ``K_zz``."""
    return K + svgp_mod.JITTER * np.mean(np.diag(K)) * np.eye(len(K))


def _set_variational(prior: SVGPPrior, m: np.ndarray, Lu: np.ndarray, beta: np.ndarray | None = None) -> None:
    with torch.no_grad():
        prior.m.copy_(_t(m))
        prior.raw_Lu_diag.copy_(_t(np.log(np.diagonal(Lu, axis1=-2, axis2=-1))))
        if not prior.diagonal_only:
            prior.Lu_offdiag.copy_(_t(np.tril(Lu, -1)))
        prior.beta.copy_(_t(np.zeros(prior.n_factors) if beta is None else beta))


def _random_variational(prior: SVGPPrior, rng: np.random.Generator) -> None:
    L, M = prior.n_factors, prior.n_inducing
    with torch.no_grad():
        prior.m.copy_(_t(rng.normal(size=(L, M))))
        prior.raw_Lu_diag.copy_(_t(rng.normal(scale=0.4, size=(L, M)) - 0.5))
        if not prior.diagonal_only:
            prior.Lu_offdiag.copy_(_t(rng.normal(scale=0.3, size=(L, M, M))))  # upper part must be ignored
        prior.beta.copy_(_t(rng.normal(size=L)))


def _dense_Lu(prior: SVGPPrior) -> np.ndarray:
    d = np.exp(prior.raw_Lu_diag.detach().numpy())
    if prior.diagonal_only:
        return np.stack([np.diag(v) for v in d])
    return np.tril(prior.Lu_offdiag.detach().numpy(), -1) + np.stack([np.diag(v) for v in d])


CASES = ["matern32", "rbf", "per_factor", "mggp"]


def _points(rng, n, G=3):
    """Coordinates representable in float32 (the prior stores Z as a float32 buffer) and groups."""
    return rng.uniform(0, 10, (n, 2)).astype(np.float32).astype(np.float64), rng.integers(0, G, n)


# ====================================================================== exactness
@pytest.mark.parametrize("case", CASES)
def test_predict_equals_exact_gp_when_Z_is_X(case):
    """With Z = X and q(v) the exact posterior under Gaussian noise, the SVGP is the exact GP."""
    rng = np.random.default_rng(0)
    N, n_new, L, tau2 = 30, 12, 2, 0.3
    X, g = _points(rng, N)
    Xn, gn = _points(rng, n_new)
    prior = _make_prior(case, X, g, n_factors=L)
    gt, gnt = torch.as_tensor(g), torch.as_tensor(gn)
    K = _kernel_sets(prior, X, X, gt, gt)
    Ks = _kernel_sets(prior, X, Xn, gt, gnt)
    Kss = _kernel_sets(prior, Xn, Xn, gnt, gnt)
    KsX = K  # cross-covariance of f at the training points with u (no jitter)
    m, Lu, Y = [], [], []
    for ll in range(L):
        Kj = _jittered(K[ll])
        Lz = np.linalg.cholesky(Kj)
        y = Lz @ rng.normal(size=N) + math.sqrt(tau2) * rng.normal(size=N)
        # exact posterior of the whitened v (u = Lz v, y = u + ε): precision P = I + LzᵀLz/τ²
        Pm = np.eye(N) + Lz.T @ Lz / tau2
        S = np.linalg.inv(Pm)
        m.append(S @ Lz.T @ y / tau2)
        Lu.append(np.linalg.cholesky(0.5 * (S + S.T)))
        Y.append(y)
    _set_variational(prior, np.stack(m), np.stack(Lu))

    with torch.no_grad():
        mu_new, var_new = prior.predict(_t(Xn), gnt if prior.multigroup else None)
        mu_tr, var_tr = prior.predict(_t(X), gt if prior.multigroup else None)
    for ll in range(L):
        C = _jittered(K[ll]) + tau2 * np.eye(N)
        for Kx, kxx, mu, var in (
            (Ks[ll], np.diag(Kss[ll]), mu_new, var_new),
            (KsX[ll], np.diag(K[ll]), mu_tr, var_tr),
        ):
            mean_exact = Kx.T @ np.linalg.solve(C, Y[ll])
            var_exact = kxx - np.einsum("nk,nk->k", Kx, np.linalg.solve(C, Kx))
            np.testing.assert_allclose(mu[:, ll].numpy(), mean_exact, rtol=1e-6, atol=1e-8)
            np.testing.assert_allclose(var[:, ll].numpy(), var_exact, rtol=1e-6, atol=1e-8)
    # the variances are really shrunk at the training points (not just the prior variance)
    assert (var_tr.numpy() < 0.9 * np.diagonal(K, axis1=1, axis2=2).T).all()


# ====================================================================== KL
@pytest.mark.parametrize("diagonal_only", [False, True])
@pytest.mark.parametrize("case", ["matern32", "per_factor"])
def test_kl_equals_torch_kl(diagonal_only, case):
    rng = np.random.default_rng(1)
    Z, Zg = _points(rng, 12)
    prior = _make_prior(case, Z, Zg, n_factors=3, diagonal_only=diagonal_only)
    _random_variational(prior, rng)
    Lu = _t(_dense_Lu(prior))
    M = prior.n_inducing
    expected = sum(
        kl_divergence(
            MultivariateNormal(prior.m[ll].detach(), scale_tril=Lu[ll]),
            MultivariateNormal(
                torch.zeros(M, dtype=torch.float64), scale_tril=torch.eye(M, dtype=torch.float64)
            ),
        )
        for ll in range(prior.n_factors)
    )
    kl = prior.kl()
    assert kl.ndim == 0
    np.testing.assert_allclose(kl.item(), expected.item(), rtol=1e-10)
    # the Lu() the prior uses is the lower-triangular factor with a positive diagonal
    np.testing.assert_allclose(prior.Lu().detach().numpy(), Lu.numpy(), rtol=1e-14, atol=1e-15)


def test_kl_zero_at_prior():
    rng = np.random.default_rng(2)
    Z, _ = _points(rng, 10)
    prior = _make_prior("matern32", Z, None)
    with torch.no_grad():
        prior.raw_Lu_diag.zero_()
        prior.m.zero_()
    assert abs(prior.kl().item()) < 1e-12
    with torch.no_grad():
        prior.m.fill_(1.0)  # ½ Σ mᵀm = ½ · 2 factors · 10
    np.testing.assert_allclose(prior.kl().item(), 10.0, rtol=1e-12)


# ====================================================================== marginals
@pytest.mark.parametrize("diagonal_only", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_marginals_match_dense_computation(case, diagonal_only):
    rng = np.random.default_rng(3)
    M, N = 15, 40
    Z, Zg = _points(rng, M)
    X, g = _points(rng, N)
    prior = _make_prior(case, Z, Zg, n_factors=3, diagonal_only=diagonal_only)
    _random_variational(prior, rng)
    Zgt, gt = torch.as_tensor(Zg), torch.as_tensor(g)
    Kzz = _kernel_sets(prior, Z, Z, Zgt, Zgt)
    Kzx = _kernel_sets(prior, Z, X, Zgt, gt)
    kxx = np.stack([np.diag(k) for k in _kernel_sets(prior, X, X, gt, gt)])
    Lu = _dense_Lu(prior)
    m, beta = prior.m.detach().numpy(), prior.beta.detach().numpy()
    with torch.no_grad():
        mu, var = prior.predict(_t(X), gt if prior.multigroup else None)
    assert mu.shape == var.shape == (N, 3)
    for ll in range(3):
        A = solve_triangular(np.linalg.cholesky(_jittered(Kzz[ll])), Kzx[ll], lower=True)
        mean = beta[ll] + A.T @ m[ll]
        v = kxx[ll] - (A**2).sum(0) + ((A.T @ Lu[ll]) ** 2).sum(1)
        np.testing.assert_allclose(mu[:, ll].numpy(), mean, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(var[:, ll].numpy(), v, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("diagonal_only", [False, True])
def test_cached_marginals_equal_uncached(case, diagonal_only):
    rng = np.random.default_rng(4)
    Z, Zg = _points(rng, 14)
    X, g = _points(rng, 60)
    prior = _make_prior(case, Z, Zg, n_factors=3, diagonal_only=diagonal_only)
    _random_variational(prior, rng)
    X_all, g_all = _t(X), torch.as_tensor(g)
    for idx in (torch.as_tensor(rng.permutation(60)[:25]), torch.arange(60)):
        inp = PriorInput(idx=idx, n_total=60, X=X_all[idx], groups=g_all[idx], X_all=X_all, groups_all=g_all)
        with torch.no_grad():
            mu_c, var_c = prior.marginals(inp)
            mu_p, var_p = prior.predict(X_all[idx], g_all[idx] if prior.multigroup else None)
        np.testing.assert_allclose(mu_c.numpy(), mu_p.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(var_c.numpy(), var_p.numpy(), rtol=1e-10, atol=1e-12)
    assert prior._A_cache is not None  # the cached path was taken
    assert prior._A_cache.shape == (prior.kernel.n_sets, 14, 60)
    # and with a budget too small for the cache: same values, no cache
    small = _make_prior(case, Z, Zg, n_factors=3, diagonal_only=diagonal_only, cache_budget=0)
    small.load_state_dict(prior.state_dict())
    with torch.no_grad():
        mu_s, var_s = small.marginals(inp)
    assert small._A_cache is None
    np.testing.assert_allclose(mu_s.numpy(), mu_c.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(var_s.numpy(), var_c.numpy(), rtol=1e-10, atol=1e-12)


def test_cache_follows_groups_all():
    rng = np.random.default_rng(16)
    Z, Zg = _points(rng, 10)
    X, _ = _points(rng, 30)
    prior = _make_prior("mggp", Z, Zg, n_factors=2)
    _random_variational(prior, rng)
    X_all, idx = _t(X), torch.arange(30)
    for code in (0, 1):
        g_all = torch.full((30,), code)
        with torch.no_grad():
            mu_c, _ = prior.marginals(
                PriorInput(idx=idx, n_total=30, X=X_all, groups=g_all, X_all=X_all, groups_all=g_all)
            )
            mu_p, _ = prior.predict(X_all, g_all)
        np.testing.assert_allclose(mu_c.numpy(), mu_p.numpy(), rtol=1e-10, atol=1e-12)


def test_cache_keyed_on_the_hyperparameter_counter():
    """Caches of L_zz and A follow ``hyper_version``, bumped when the hyperparameters change."""
    rng = np.random.default_rng(17)
    Z, Zg = _points(rng, 12)
    X, g = _points(rng, 40)
    prior = _make_prior("per_factor", Z, Zg, n_factors=3)
    _random_variational(prior, rng)
    X_all, g_all, idx = _t(X), torch.as_tensor(g), torch.arange(40)
    inp = PriorInput(idx=idx, n_total=40, X=X_all, X_all=X_all)

    def cached():
        with torch.no_grad():
            return prior.marginals(inp)[0].numpy().copy()

    def fresh():
        with torch.no_grad():
            return prior.predict(X_all)[0].numpy().copy()

    before = cached()
    version = prior.hyper_version
    with torch.no_grad():
        prior.kernel.log_lengthscale.add_(0.5)  # changed behind the prior's back: cache still used
    np.testing.assert_array_equal(cached(), before)
    prior.hyperparameters_changed()
    assert prior.hyper_version == version + 1
    after = cached()
    assert not np.allclose(after, before)
    np.testing.assert_allclose(after, fresh(), rtol=1e-10, atol=1e-12)
    # reordering per-factor kernels bumps it (and the cached values follow the new order)
    prior.reorder(torch.tensor([2, 0, 1]))
    assert prior.hyper_version == version + 2
    np.testing.assert_allclose(cached(), fresh(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cached(), after[:, [2, 0, 1]], rtol=1e-10, atol=1e-12)
    # loading a state dict bumps it
    other = _make_prior("per_factor", Z, Zg, n_factors=3)
    _random_variational(other, np.random.default_rng(3))
    with torch.no_grad():
        other.kernel.log_lengthscale.add_(1.0)
    prior.load_state_dict(other.state_dict())
    assert prior.hyper_version == version + 3
    np.testing.assert_allclose(cached(), fresh(), rtol=1e-10, atol=1e-12)
    del g_all


def test_trainable_kernel_gets_gradients_and_no_cache():
    rng = np.random.default_rng(5)
    Z, _ = _points(rng, 10)
    X, _ = _points(rng, 30)
    prior = SVGPPrior(2, Z, lengthscale=2.0, train_lengthscale=True, train_sigma=True).double()
    _random_variational(prior, rng)
    X_all = _t(X)
    idx = torch.arange(30)
    mu, var = prior.marginals(PriorInput(idx=idx, n_total=30, X=X_all, X_all=X_all))
    (mu.sum() + var.sum() + prior.kl()).backward()
    assert prior.kernel.log_lengthscale.grad is not None and prior.kernel.log_lengthscale.grad.abs().sum() > 0
    assert prior.kernel.log_sigma.grad is not None and prior.kernel.log_sigma.grad.abs().sum() > 0
    assert prior._A_cache is None


# ====================================================================== inducing points
def _grouped(rng, sizes):
    X = rng.uniform(0, 10, (sum(sizes), 2))
    g = np.repeat(np.arange(len(sizes)), sizes)
    perm = rng.permutation(len(g))
    return X[perm], g[perm]


@pytest.mark.parametrize(
    ("sizes", "M"), [([50, 30, 15, 5], 40), ([7, 93], 20), ([33, 33, 34], 10), ([3, 200, 1], 60)]
)
def test_proportional_allocation(sizes, M):
    rng = np.random.default_rng(6)
    X, g = _grouped(rng, sizes)
    Z, Zg = inducing_points(X, M, groups=g, allocation="proportional")
    sizes = np.asarray(sizes)
    N = sizes.sum()
    alloc = np.bincount(Zg, minlength=len(sizes))
    assert Z.shape == (M, 2) and len(Zg) == M
    assert alloc.sum() == M
    assert (alloc <= sizes).all()
    assert (np.abs(alloc - M * sizes / N) < 1).all()
    np.testing.assert_array_equal(alloc, largest_remainder(sizes, M))
    # each group's inducing points lie within that group's cells' bounding box (k-means of its cells)
    for k in range(len(sizes)):
        Xg = X[g == k]
        assert (Z[Zg == k] >= Xg.min(0) - 1e-9).all() and (Z[Zg == k] <= Xg.max(0) + 1e-9).all()


def test_proportional_allocation_more_inducing_than_cells():
    rng = np.random.default_rng(7)
    X, g = _grouped(rng, [4, 6])
    Z, Zg = inducing_points(X, 50, groups=g)
    assert len(Z) == 10
    np.testing.assert_array_equal(np.bincount(Zg), [4, 6])
    # the inducing points are the cells themselves
    np.testing.assert_allclose(np.sort(Z, axis=0), np.sort(X, axis=0), atol=1e-8)


@pytest.mark.parametrize(
    ("sizes", "M", "expected"),
    [([50, 30, 20], 30, [10, 10, 10]), ([40, 40, 40], 10, [4, 3, 3]), ([2, 50], 20, [2, 10])],
)
def test_equal_allocation(sizes, M, expected):
    rng = np.random.default_rng(8)
    X, g = _grouped(rng, sizes)
    Z, Zg = inducing_points(X, M, groups=g, allocation="equal")
    np.testing.assert_array_equal(np.bincount(Zg, minlength=len(sizes)), expected)
    assert len(Z) == sum(expected)


def test_derived_allocation():
    rng = np.random.default_rng(9)
    X = rng.uniform(0, 10, (200, 2))
    g = (X[:, 0] > 5).astype(np.int64)  # group 0 on the left, 1 on the right
    M = 20
    Z, Zg = inducing_points(X, M, groups=g, n_groups=3, allocation="derived")
    assert Z.shape == (M, 2) and Zg.shape == (M,)
    assert set(Zg.tolist()) <= {0, 1, 2}
    assert len(np.unique(Z, axis=0)) == M
    # a centre away from the border takes the group of its side
    clear = np.abs(Z[:, 0] - 5) > 1.0
    assert clear.sum() >= M // 2
    np.testing.assert_array_equal(Zg[clear], (Z[clear, 0] > 5).astype(int))


def test_inducing_points_without_groups():
    rng = np.random.default_rng(10)
    X = rng.uniform(0, 10, (100, 2))
    Z, Zg = inducing_points(X, 15)
    assert Zg is None
    assert Z.shape == (15, 2) and len(np.unique(Z, axis=0)) == 15


def test_inducing_points_invalid():
    X = np.random.default_rng(11).uniform(size=(20, 2))
    with pytest.raises(ValueError, match="num_inducing"):
        inducing_points(X, 0)
    with pytest.raises(ValueError, match="allocation"):
        inducing_points(X, 5, groups=np.zeros(20, dtype=int), allocation="random")  # type: ignore[arg-type]


def test_kmeans_distinct_and_duplicates():
    rng = np.random.default_rng(12)
    X = rng.uniform(0, 10, (300, 2))
    C = kmeans_centers(X, 25)
    assert C.shape == (25, 2) and len(np.unique(C, axis=0)) == 25
    base = rng.uniform(0, 10, (5, 2))
    Xd = np.repeat(base, 20, axis=0)
    C = kmeans_centers(Xd, 10)
    assert C.shape == (5, 2)  # only 5 distinct points exist
    np.testing.assert_allclose(np.sort(C, axis=0), np.sort(base, axis=0), atol=1e-8)
    C = kmeans_centers(Xd, 3)
    assert C.shape == (3, 2) and len(np.unique(C, axis=0)) == 3
    assert kmeans_centers(X, 0).shape == (0, 2)
    # through inducing_points: M is capped by the distinct points
    Z, _ = inducing_points(Xd, 10, groups=np.repeat(np.arange(5) % 2, 20))
    assert len(np.unique(Z, axis=0)) == len(Z) <= 5


@pytest.mark.parametrize(
    ("sizes", "total", "expected"),
    [
        ([10, 10], 5, None),  # ties: sums to 5, one gets 3
        ([1, 1, 98], 10, [0, 0, 10]),
        ([0, 5, 5], 3, None),  # empty group gets nothing
        ([5, 5], 100, [5, 5]),  # more than the cells: capped
        ([7, 3], 0, [0, 0]),
        ([9], 4, [4]),
        ([1, 2, 3], 6, [1, 2, 3]),
        ([3, 3, 3], 2, None),
    ],
)
def test_largest_remainder(sizes, total, expected):
    sizes_a = np.asarray(sizes)
    alloc = largest_remainder(sizes_a, total)
    assert alloc.dtype.kind == "i"
    assert alloc.sum() == min(total, sizes_a.sum())
    assert (alloc >= 0).all() and (alloc <= sizes_a).all()
    quota = sizes_a / sizes_a.sum() * min(total, sizes_a.sum())
    assert (np.abs(alloc - quota) < 1).all()
    if expected is not None:
        np.testing.assert_array_equal(alloc, expected)


# ====================================================================== initialization
@pytest.mark.parametrize("case", ["matern32", "per_factor", "mggp"])
def test_init_from_log_factors_recovers_smooth_fields(case):
    rng = np.random.default_rng(13)
    N = 400
    X = rng.uniform(0, 100, (N, 2))
    g = rng.integers(0, 3, N)
    F = np.stack(
        [
            np.sin(X[:, 0] / 15) + np.cos(X[:, 1] / 20),
            np.cos(X[:, 0] / 25) * np.sin(X[:, 1] / 15),
            0.5 * np.sin((X[:, 0] + X[:, 1]) / 30) + 2.0,
        ],
        axis=1,
    )
    Z, Zg = inducing_points(X, 80, groups=g if case == "mggp" else None)
    if case == "matern32":
        prior = SVGPPrior(3, Z, lengthscale=20.0)
    elif case == "per_factor":
        prior = SVGPPrior(3, Z, lengthscale=[15.0, 20.0, 30.0], per_factor_kernel=True)
    else:
        prior = SVGPPrior(3, Z, Zg, lengthscale=20.0, group_embedding=_onehot(3), group_diff_param=0.2)
    prior = prior.double()
    X_all, g_all = _t(X), torch.as_tensor(g)
    inp = PriorInput(idx=torch.arange(N), n_total=N, X=X_all, groups=g_all, X_all=X_all, groups_all=g_all)
    prior.init_from_log_factors(_t(F), inp)
    np.testing.assert_allclose(prior.beta.detach().numpy(), F.mean(0), rtol=1e-10)
    with torch.no_grad():
        mu, _ = prior.marginals(inp)
    for ll in range(3):
        r = np.corrcoef(mu[:, ll].numpy(), F[:, ll])[0, 1]
        assert r > 0.95, (ll, r)
    # not a trivial copy of the data: held-out locations are predicted too
    Xn = rng.uniform(5, 95, (100, 2))
    Fn = np.sin(Xn[:, 0] / 15) + np.cos(Xn[:, 1] / 20)
    with torch.no_grad():
        mun, _ = prior.predict(_t(Xn), torch.as_tensor(rng.integers(0, 3, 100)) if prior.multigroup else None)
    assert np.corrcoef(mun[:, 0].numpy(), Fn)[0, 1] > 0.95


# ====================================================================== reorder
@pytest.mark.parametrize("diagonal_only", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_reorder_permutes_marginals(case, diagonal_only):
    rng = np.random.default_rng(14)
    Z, Zg = _points(rng, 12)
    X, g = _points(rng, 40)
    prior = _make_prior(case, Z, Zg, n_factors=3, diagonal_only=diagonal_only)
    _random_variational(prior, rng)
    X_all, g_all = _t(X), torch.as_tensor(g)
    inp = PriorInput(idx=torch.arange(40), n_total=40, X=X_all, groups=g_all, X_all=X_all, groups_all=g_all)
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        mu0, var0 = prior.marginals(inp)  # fills the cache
        mun0, varn0 = prior.predict(X_all[:7] + 0.5, g_all[:7] if prior.multigroup else None)
    m0, b0, Lu0 = prior.m.detach().clone(), prior.beta.detach().clone(), prior.Lu().detach().clone()
    ls0 = prior.kernel.lengthscale.detach().clone()
    kl0 = prior.kl().item()
    prior.reorder(perm)
    np.testing.assert_array_equal(prior.m.detach().numpy(), m0[perm].numpy())
    np.testing.assert_array_equal(prior.beta.detach().numpy(), b0[perm].numpy())
    np.testing.assert_array_equal(prior.Lu().detach().numpy(), Lu0[perm].numpy())
    if prior.kernel.n_sets > 1:
        np.testing.assert_array_equal(prior.kernel.lengthscale.detach().numpy(), ls0[perm].numpy())
        np.testing.assert_allclose(prior.config()["lengthscale"], ls0[perm].numpy(), rtol=1e-12)
    with torch.no_grad():
        mu1, var1 = prior.marginals(inp)  # through the cache (must have been invalidated if per-factor)
        mun1, varn1 = prior.predict(X_all[:7] + 0.5, g_all[:7] if prior.multigroup else None)
    np.testing.assert_allclose(mu1.numpy(), mu0[:, perm].numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(var1.numpy(), var0[:, perm].numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mun1.numpy(), mun0[:, perm].numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(varn1.numpy(), varn0[:, perm].numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(prior.kl().item(), kl0, rtol=1e-12)


def test_config_roundtrip_rebuilds_prior():
    rng = np.random.default_rng(15)
    Z, Zg = _points(rng, 9)
    prior = _make_prior("mggp", Z, Zg, n_factors=2)
    _random_variational(prior, rng)
    clone = SVGPPrior(**prior.config()).double()
    clone.load_state_dict(prior.state_dict())
    X, g = _points(rng, 20)
    with torch.no_grad():
        a = prior.predict(_t(X), torch.as_tensor(g))
        b = clone.predict(_t(X), torch.as_tensor(g))
    np.testing.assert_allclose(a[0].numpy(), b[0].numpy(), rtol=1e-12)
    np.testing.assert_allclose(a[1].numpy(), b[1].numpy(), rtol=1e-12)
    info = prior.gp_info()
    assert info["num_inducing"] == 9 and info["prior"] == "mggp_svgp"
    with pytest.raises(ValueError, match="group"):
        prior.predict(_t(X))


# ====================================================================== model level
def _simulate(n_obs: int, seed: int) -> ad.AnnData:
    return sfact.datasets.simulate(n_obs=n_obs, n_vars=40, n_factors=N_FACTORS, n_groups=2, random_state=seed)


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    return _simulate(300, 0)


@pytest.fixture(scope="module")
def new_cells() -> ad.AnnData:
    return _simulate(40, 1)


def _fit(adata, prior, max_iter=30, **kw) -> SpatialFactorization:
    kw.setdefault("prior_kwargs", {"num_inducing": NUM_INDUCING})
    model = SpatialFactorization(adata, prior=prior, n_factors=N_FACTORS, **kw)
    model.train(max_iter=max_iter, init_iter=30, progress_bar=False)
    return model


@pytest.fixture(scope="module")
def models(adata) -> dict[str, SpatialFactorization]:
    return {"svgp": _fit(adata, "svgp"), "mggp_svgp": _fit(adata, "mggp_svgp", group_key="group")}


@pytest.mark.parametrize("prior", ["svgp", "mggp_svgp"])
def test_model_trains_with_finite_elbo(models, prior):
    model = models[prior]
    elbo = model.history["elbo"].to_numpy()
    assert len(elbo) >= 1 and np.isfinite(elbo).all()
    assert model.module.prior.name == prior
    assert model.module.prior.n_inducing == NUM_INDUCING
    F = model.get_factors()
    assert F.shape == (300, N_FACTORS) and np.isfinite(F).all() and (F > 0).all()
    if prior == "mggp_svgp":
        Zg = model.module.prior.Z_groups.numpy()
        assert set(Zg.tolist()) == {0, 1}  # inducing points in both groups
        # without group_distances, every pair of different groups is at squared distance 1
        e = model.module.prior.kernel.group_embedding.double().numpy()
        d2 = ((e[:, None] - e[None]) ** 2).sum(-1)
        np.testing.assert_allclose(d2, 1.0 - np.eye(2), atol=1e-6)


@pytest.mark.parametrize("prior", ["svgp", "mggp_svgp"])
def test_transform_new_coordinates(models, new_cells, prior):
    model = models[prior]
    factors, scales = model.transform(new_cells)
    assert factors.shape == scales.shape == (new_cells.n_obs, N_FACTORS)
    assert np.isfinite(factors).all() and np.isfinite(scales).all()
    assert (factors > 0).all() and (scales >= 0).all()
    np.testing.assert_allclose(model.get_factors(new_cells), factors, rtol=1e-6)
    np.testing.assert_allclose(model.get_scales(new_cells), scales, rtol=1e-6)
    # predicting at the training cells' coordinates gives the training factors
    np.testing.assert_allclose(model.transform(model.adata)[0], model.get_factors(), rtol=1e-4)


def test_mggp_transform_depends_on_group(models, new_cells):
    model = models["mggp_svgp"]
    other = new_cells.copy()
    flip = {"g0": "g1", "g1": "g0"}
    other.obs["group"] = [flip[v] for v in new_cells.obs["group"].astype(str)]
    assert not np.allclose(model.transform(other)[0], model.transform(new_cells)[0])


def test_groupwise_factors_match_transform(models, new_cells):
    model = models["mggp_svgp"]
    F, names = model.groupwise_factors(new_cells)
    assert names == ["g0", "g1"]
    assert F.shape == (2, new_cells.n_obs, N_FACTORS) and (F > 0).all()
    factors, _ = model.transform(new_cells)
    own = np.array([names.index(v) for v in new_cells.obs["group"].astype(str)])
    np.testing.assert_allclose(F[own, np.arange(new_cells.n_obs)], factors, rtol=1e-6)
    with pytest.raises(ValueError, match="multi-group"):
        models["svgp"].groupwise_factors(new_cells)


def test_mggp_transform_unknown_group_raises(models, new_cells):
    bad = new_cells.copy()
    bad.obs["group"] = ["g0"] * (bad.n_obs - 1) + ["g_unseen"]
    with pytest.raises(ValueError, match="g_unseen"):
        models["mggp_svgp"].transform(bad)
    with pytest.raises(ValueError, match="g_unseen"):
        models["mggp_svgp"].get_factors(bad)


def test_mggp_without_group_key_warns_and_works(adata, new_cells):
    with pytest.warns(SfactWarning, match="group_key"):
        model = SpatialFactorization(
            adata, prior="mggp_svgp", n_factors=N_FACTORS, prior_kwargs={"num_inducing": 30}
        )
    model.train(max_iter=5, init_iter=10, progress_bar=False)
    assert np.isfinite(model.history["elbo"]).all()
    factors, scales = model.transform(new_cells)
    assert factors.shape == scales.shape == (new_cells.n_obs, N_FACTORS)
    assert np.isfinite(factors).all() and (factors > 0).all() and (scales >= 0).all()


@pytest.mark.parametrize("prior", ["svgp", "mggp_svgp"])
def test_save_load_roundtrip(models, adata, new_cells, prior, tmp_path):
    model = models[prior]
    path = tmp_path / prior
    model.save(path)
    state = torch.load(os.path.join(path, "model.pt"), weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    assert any(k.endswith("prior.m") for k in state) and any(k.endswith("prior.Z") for k in state)
    expected_f = model.get_factors(new_cells)
    expected_t = model.transform(new_cells)
    for attached in (None, adata):
        loaded = SpatialFactorization.load(path, adata=attached)
        assert loaded.prior == prior
        np.testing.assert_array_equal(loaded.get_factors(new_cells), expected_f)
        got = loaded.transform(new_cells)
        np.testing.assert_array_equal(got[0], expected_t[0])
        np.testing.assert_array_equal(got[1], expected_t[1])
        np.testing.assert_array_equal(loaded.get_loadings(), model.get_loadings())
    # with the training data attached, the training factors too
    np.testing.assert_allclose(loaded.get_factors(), model.get_factors(), rtol=1e-6)
    # a detached model predicts the training cells from the coordinates saved with it
    detached = SpatialFactorization.load(path)
    np.testing.assert_allclose(detached.get_factors(), model.get_factors(), rtol=1e-4)


def test_tl_fit_svgp_writes_slots(adata):
    a = adata.copy()
    sfact.tl.fit(a, prior="svgp", n_factors=N_FACTORS, prior_kwargs={"num_inducing": 40}, max_iter=20)
    assert a.obsm["X_sfact"].shape == (a.n_obs, N_FACTORS)
    assert (a.obsm["X_sfact"] > 0).all() and np.isfinite(a.obsm["X_sfact"]).all()
    assert a.obsm["X_sfact_scales"].shape == (a.n_obs, N_FACTORS) and (a.obsm["X_sfact_scales"] >= 0).all()
    assert a.varm["sfact_loadings"].shape == (a.n_vars, N_FACTORS) and (a.varm["sfact_loadings"] >= 0).all()
    uns = a.uns["sfact"]
    assert uns["params"]["prior"] == "svgp"
    assert np.isfinite(uns["metrics"]["deviance"])
    moran = uns["moranI"]["I"].to_numpy()
    assert (np.diff(moran) <= 1e-12).all()  # ordered by descending Moran's I


def test_tl_fit_records_gp_info(adata):
    a = adata.copy()
    sfact.tl.fit(
        a,
        prior="svgp",
        n_factors=N_FACTORS,
        prior_kwargs={"num_inducing": 30, "lengthscale": 12.0},
        max_iter=3,
    )
    gp = a.uns["sfact"]["gp"]
    assert gp["num_inducing"] == 30 and gp["kernel"] == "matern32"
    np.testing.assert_allclose(gp["lengthscale"], 12.0, rtol=1e-6)
    assert np.all(np.asarray(gp["sigma"]) > 0)


@pytest.mark.parametrize("bad", ["num_inducting", "lenghtscale"])
def test_unknown_prior_kwargs_raise_type_error(adata, bad):
    with pytest.raises(TypeError, match=bad):
        SpatialFactorization(adata, prior="svgp", n_factors=N_FACTORS, prior_kwargs={bad: 3})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_inducing": 0},
        {"num_inducing": -5},
        {"lengthscale": 0.0},
        {"lengthscale": -2.0},
        {"lengthscale": [1.0, -1.0, 2.0], "per_factor_kernel": True},
        {"sigma": 0.0},
        {"kernel": "matern52"},
        {"allocation": "random"},
        {"group_diff_param": -1.0},
    ],
)
@pytest.mark.parametrize("prior", ["svgp", "mggp_svgp"])
def test_bad_prior_kwargs_raise_value_error(adata, prior, kwargs):
    with pytest.raises(ValueError):
        SpatialFactorization(adata, prior=prior, n_factors=N_FACTORS, group_key="group", prior_kwargs=kwargs)


@pytest.mark.parametrize(
    "D", [np.ones((3, 3)) - np.eye(3), np.array([[0.0, 1.0], [2.0, 0.0]])], ids=["wrong_shape", "asymmetric"]
)
def test_bad_group_distances_raise(adata, D):
    model = SpatialFactorization(
        adata,
        prior="mggp_svgp",
        n_factors=N_FACTORS,
        group_key="group",
        prior_kwargs={"num_inducing": 20, "group_distances": D},
    )
    with pytest.raises(ValueError, match="group_distances"):
        model.train(max_iter=1, init_iter=2, progress_bar=False)


def test_group_distances_used(adata):
    D = np.array([[0.0, 2.0], [2.0, 0.0]])
    model = _fit(
        adata,
        "mggp_svgp",
        max_iter=2,
        group_key="group",
        prior_kwargs={"num_inducing": 20, "group_distances": D},
    )
    k = model.module.prior.kernel
    e = k.group_embedding.double().numpy()
    np.testing.assert_allclose(((e[0] - e[1]) ** 2).sum(), 4.0, rtol=1e-6)


@pytest.mark.parametrize("fraction", [0.05, 0.1])
def test_heldout_split(adata, fraction):
    train, test = sfact.tl.heldout_split(adata, fraction=fraction, random_state=0)
    N = adata.n_obs
    assert test.n_obs == round(fraction * N)
    assert train.n_obs + test.n_obs == N
    assert not set(train.obs_names) & set(test.obs_names)
    assert set(train.obs_names) | set(test.obs_names) == set(adata.obs_names)
    order = {name: i for i, name in enumerate(adata.obs_names)}
    for part in (train, test):
        pos = [order[n] for n in part.obs_names]
        assert pos == sorted(pos)  # original order kept
        np.testing.assert_array_equal(part.obsm["spatial"], adata[part.obs_names].obsm["spatial"])
    _, test2 = sfact.tl.heldout_split(adata, fraction=fraction, random_state=0)
    assert list(test2.obs_names) == list(test.obs_names)
    _, test3 = sfact.tl.heldout_split(adata, fraction=fraction, random_state=1)
    assert list(test3.obs_names) != list(test.obs_names)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.001])
def test_heldout_split_bad_fraction(adata, fraction):
    with pytest.raises(ValueError, match="fraction"):
        sfact.tl.heldout_split(adata, fraction=fraction)


@pytest.mark.parametrize(
    ("prior", "size_factors"), [("svgp", None), ("svgp", "total"), ("mggp_svgp", "total")]
)
def test_heldout_deviance_matches_dense(adata, prior, size_factors):
    train, test = sfact.tl.heldout_split(adata, random_state=0)
    model = _fit(
        train,
        prior,
        max_iter=20,
        group_key="group" if prior == "mggp_svgp" else None,
        size_factors=size_factors,
    )
    dev = sfact.tl.heldout_deviance(model, test)
    assert np.isfinite(dev) and dev > 0
    mu, var = model.get_log_factors(test)
    W = model.get_loadings()

    def dense(a):
        return (a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)).astype(np.float64)

    Y = dense(test)
    if size_factors is None:
        s = np.ones(test.n_obs)
    else:  # each held-out cell's own total over the median total of the training cells
        train_totals = dense(train).sum(1)
        s = np.maximum(Y.sum(1) / np.median(train_totals[train_totals > 0]), 1e-8)
    lam = s[:, None] * (np.exp(mu + 0.5 * var) @ W.T)
    with np.errstate(divide="ignore", invalid="ignore"):
        ylog = np.where(Y > 0, Y * np.log(Y / lam), 0.0)
    expected = 2.0 * (ylog - (Y - lam)).sum() / Y.size
    np.testing.assert_allclose(dev, expected, rtol=1e-8)
