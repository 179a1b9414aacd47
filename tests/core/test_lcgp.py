"""The locally conditioned GP priors ``lcgp`` / ``mggp_lcgp``: neighbour sets, Vecchia conditionals,
the KL and its mini-batch estimator against dense references, prediction, and the model-level
workflow (train, save/load, groups, accuracy against svgp with few inducing points).

Exact checks run in float64 with small N.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

import sfact
from sfact._core.lcgp import LCGPPrior as _LCGPPrior
from sfact._core.lcgp import sparse_row_quad, vecchia_neighbors
from sfact._core.priors import PriorInput
from sfact.models import SpatialFactorization

# the core constructor takes every option explicitly (defaults live in LCGPConfig); these tests
# build priors directly with the values below unless they say otherwise
CORE_KWARGS = {
    "n_neighbors": 50,
    "kernel": "matern32",
    "lengthscale": 8.0,
    "sigma": 1.0,
    "group_embedding": None,
    "group_diff_param": 1.0,
    "per_factor_kernel": False,
    "train_lengthscale": False,
    "train_sigma": False,
    "train_group_diff_param": False,
    "nugget": 0.03,
    "diagonal_only": False,
    "neighbor_method": "auto",
    "neighbor_selection": "auto",
    "order_seed": 0,
}


def LCGPPrior(*args, **kw) -> _LCGPPrior:  # stands in for the class
    return _LCGPPrior(*args, **{**CORE_KWARGS, **kw})


# ====================================================================== helpers
def _points(n: int, seed: int = 0, n_dup: int = 4) -> np.ndarray:
    """Random coordinates with some exact duplicates (as in osmFISH)."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 10, (n, 2))
    for k in range(n_dup):  # cells 2k+1 sit on cells 2k+n//2; one triple
        X[2 * k + 1] = X[2 * k + n // 2]
    X[n - 1] = X[n // 2]
    return X


def _prior(
    X, groups=None, *, K=6, L=3, diagonal_only=False, per_factor=False, seed=0, selection="spatial"
) -> LCGPPrior:
    kw = {}
    if groups is not None:
        kw = {"group_embedding": np.eye(3) / math.sqrt(2.0), "group_diff_param": 1.5}
        kw["neighbor_selection"] = selection
    ls = np.linspace(2.0, 4.0, L) if per_factor else 3.0
    sg = np.linspace(0.8, 1.4, L) if per_factor else 1.3
    p = LCGPPrior(
        L,
        X,
        groups,
        n_neighbors=K,
        lengthscale=ls,
        sigma=sg,
        per_factor_kernel=per_factor,
        nugget=1e-2,
        diagonal_only=diagonal_only,
        **kw,
    ).double()
    rng = np.random.default_rng(seed)
    N = len(X)
    with torch.no_grad():
        p.m.copy_(torch.as_tensor(rng.normal(size=(L, N))))
        p.beta.copy_(torch.as_tensor(rng.normal(size=L)))
        p.raw_Lu_diag.copy_(torch.as_tensor(rng.normal(scale=0.3, size=(L, N)) - 1.0))
        if not diagonal_only:
            p.Lu_offdiag.copy_(torch.as_tensor(rng.normal(scale=0.3, size=(L, N, K))))
    return p


def _kernel_sets(p: LCGPPrior, X1, X2, g1=None, g2=None) -> np.ndarray:
    """(L, n1, n2) kernel matrix per factor (shared kernel repeated)."""
    t = lambda a: None if a is None else torch.as_tensor(a)  # noqa: E731
    if not p.multigroup:
        g1 = g2 = None
    K = p.kernel(t(X1).double(), t(X2).double(), t(g1), t(g2)).detach().numpy()
    return np.broadcast_to(K, (p.n_factors, *K.shape[1:])) if K.shape[0] == 1 else K


def _dense_Lu(p: LCGPPrior) -> np.ndarray:
    """(L, N, N) dense L_u."""
    L, N = p.n_factors, p.n_obs
    nbr = p.nbr.numpy()
    d = np.exp(p.raw_Lu_diag.detach().numpy())
    out = np.zeros((L, N, N))
    out[:, np.arange(N), np.arange(N)] = d
    if not p.diagonal_only:
        off = p.Lu_offdiag.detach().numpy()
        for j in range(N):
            for k in range(p.n_neighbors):
                if nbr[j, k] >= 0:
                    out[:, j, nbr[j, k]] = off[:, j, k]
    return out


def _dense_precision(p: LCGPPrior) -> np.ndarray:
    """(L, N, N) precision (I − B)ᵀ D⁻¹ (I − B) of the Vecchia prior."""
    L, N = p.n_factors, p.n_obs
    nbr = p.nbr.numpy()
    b = np.broadcast_to(p.b.numpy(), (L, N, p.n_neighbors))
    t2 = np.broadcast_to(p.tau2.numpy(), (L, N))
    out = np.empty((L, N, N))
    for f in range(L):
        A = np.eye(N)
        for j in range(N):
            for k in range(p.n_neighbors):
                if nbr[j, k] >= 0:
                    A[j, nbr[j, k]] -= b[f, j, k]
        out[f] = A.T @ np.diag(1.0 / t2[f]) @ A
    return out


def _dense_kl(p: LCGPPrior) -> float:
    Lu, Lam = _dense_Lu(p), _dense_precision(p)
    total = 0.0
    for f in range(p.n_factors):
        q = MultivariateNormal(p.m[f].detach(), covariance_matrix=torch.as_tensor(Lu[f] @ Lu[f].T))
        prior = MultivariateNormal(
            torch.zeros(p.n_obs, dtype=torch.float64), precision_matrix=torch.as_tensor(Lam[f])
        )
        total += float(kl_divergence(q, prior))
    return total


# ====================================================================== neighbour sets
def _brute_force_sets(X, rank, K):
    N = len(X)
    out = np.full((N, K), -1)
    for j in range(N):
        cand = np.flatnonzero(rank < rank[j])
        d = np.sqrt(((X[cand] - X[j]) ** 2).sum(1))
        sel = cand[np.lexsort((cand, d))][:K]
        out[j, : len(sel)] = sel
    return out


@pytest.mark.parametrize("N,K", [(60, 5), (300, 8)])
def test_neighbor_sets_exact_and_never_self(N, K):
    X = _points(N, seed=N)
    rank = np.empty(N, dtype=np.int64)
    rank[np.random.default_rng(1).permutation(N)] = np.arange(N)
    nbr = vecchia_neighbors(X, K, rank, method="exact")
    assert nbr.shape == (N, K)
    np.testing.assert_array_equal(nbr, _brute_force_sets(X, rank, K))
    for j in range(N):
        row = nbr[j][nbr[j] >= 0]
        assert j not in row
        assert (rank[row] < rank[j]).all()
        assert len(row) == min(K, rank[j])  # padded only for the first K cells of the ordering
    # duplicates: the later cell of each coincident pair conditions on the earlier one at distance 0
    a, b = 1, N // 2
    later, earlier = (a, b) if rank[a] > rank[b] else (b, a)
    assert nbr[later][0] == earlier
    # deterministic
    np.testing.assert_array_equal(nbr, vecchia_neighbors(X, K, rank, method="exact"))


def test_correlation_based_sets_for_the_multigroup_kernel():
    N, K = 80, 5
    X = _points(N, seed=4)
    g = np.random.default_rng(3).integers(0, 3, N)
    p = _prior(X, g, K=K, selection="correlation")
    rank = p.rank.numpy()
    spatial = _brute_force_sets(X, rank, K)
    Kx = _kernel_sets(p, X, X, g, g)[0]
    for j in range(N):
        same = np.flatnonzero((g == g[j]) & (rank < rank[j]))
        d_same = np.sqrt(((X[same] - X[j]) ** 2).sum(1))
        same = same[np.lexsort((same, d_same))][:K]
        cand = np.unique(np.concatenate([spatial[j][spatial[j] >= 0], same])).astype(int)
        d = np.sqrt(((X[cand] - X[j]) ** 2).sum(1))
        expect = cand[np.lexsort((cand, d, -Kx[j, cand]))][:K]
        got = p.nbr[j].numpy()
        np.testing.assert_array_equal(got[got >= 0], expect)
        assert j not in got and (rank[got[got >= 0]] < rank[j]).all()
    # the sets hold more same-group cells than the spatial ones
    frac = lambda nb: np.mean([(g[r[r >= 0]] == g[j]).mean() for j, r in enumerate(nb) if (r >= 0).any()])  # noqa: E731
    assert frac(p.nbr.numpy()) > frac(spatial) + 0.1
    # prediction: training coordinates give the training marginals, new points are finite
    gt = torch.as_tensor(g)
    mu, var = p.predict(torch.as_tensor(X), gt)
    mu_tr, var_tr = p.marginals(PriorInput(idx=torch.arange(N), n_total=N))
    first = np.array([min(i for i in range(N) if (X[i] == X[j]).all() and g[i] == g[j]) for j in range(N)])
    np.testing.assert_allclose(mu.numpy(), mu_tr.detach().numpy()[first], rtol=1e-12)
    np.testing.assert_allclose(var.numpy(), var_tr.detach().numpy()[first], rtol=1e-12)
    mu, var = p.predict(torch.as_tensor(X + 0.05), (gt + 1) % 3)
    assert torch.isfinite(mu).all() and (var > 0).all()


# ====================================================================== conditionals
@pytest.mark.parametrize("case", ["single", "mggp", "per_factor"])
def test_conditionals_equal_dense(case):
    N, K = 40, 6
    X = _points(N)
    g = np.random.default_rng(0).integers(0, 3, N) if case == "mggp" else None
    p = _prior(X, g, K=K, per_factor=case == "per_factor")
    nbr = p.nbr.numpy()
    Kall = _kernel_sets(p, X, X, g, g)
    s2 = p.kernel.sigma.detach().numpy() ** 2
    s2 = np.broadcast_to(s2, (p.n_factors,))
    for f in range(p.n_factors):
        S = f if p.b.shape[0] > 1 else 0
        Kl = Kall[f] + p.nugget * s2[f] * np.eye(N)  # the prior covariance k + δσ²I
        for j in range(N):
            n = nbr[j][nbr[j] >= 0]
            if len(n) == 0:
                np.testing.assert_allclose(p.tau2[S, j].item(), Kl[j, j])
                assert (p.b[S, j] == 0).all()
                continue
            bj = np.linalg.solve(Kl[np.ix_(n, n)], Kl[n, j])
            t2 = Kl[j, j] - Kl[j, n] @ bj
            np.testing.assert_allclose(p.b[S, j, : len(n)].numpy(), bj, rtol=1e-7, atol=1e-9)
            np.testing.assert_allclose(p.tau2[S, j].item(), t2, rtol=1e-7)
        if p.b.shape[0] == 1:
            break


def test_full_conditioning_sets_recover_the_exact_gp():
    """With K = N − 1 (every earlier cell) the Vecchia factorization is the exact GP (chain rule)."""
    N = 30
    X = _points(N)
    g = np.random.default_rng(2).integers(0, 3, N)
    p = _prior(X, g, K=N - 1, L=1)
    Lam = _dense_precision(p)[0]
    Kx = _kernel_sets(p, X, X, g, g)[0] + p.nugget * p.kernel.sigma.item() ** 2 * np.eye(N)
    np.testing.assert_allclose(np.linalg.inv(Lam), Kx, atol=1e-8)


# ====================================================================== KL
@pytest.mark.parametrize("case", ["full", "diagonal", "mggp", "per_factor"])
def test_kl_equals_dense_and_minibatch_estimator_is_unbiased(case):
    N, K = 40, 6
    X = _points(N)
    g = np.random.default_rng(0).integers(0, 3, N) if case == "mggp" else None
    p = _prior(X, g, K=K, diagonal_only=case == "diagonal", per_factor=case == "per_factor")
    exact = _dense_kl(p)
    full = float(p.kl_full().detach())
    assert full == pytest.approx(exact, rel=1e-9)
    # mean of the N/B-scaled estimates over the batches of a random partition = the exact KL
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    B = 8
    ests = [float(p.kl(PriorInput(idx=perm[s : s + B], n_total=N)).detach()) for s in range(0, N, B)]
    assert np.mean(ests) == pytest.approx(exact, rel=1e-9)
    assert np.std(ests) > 0  # the batches do differ: it is an estimator, not a constant
    # and over random batches (with replacement of batches), the Monte Carlo mean converges to it
    gen = torch.Generator().manual_seed(1)
    mc = [
        float(p.kl(PriorInput(idx=torch.randperm(N, generator=gen)[:B], n_total=N)).detach())
        for _ in range(400)
    ]
    se = np.std(mc) / math.sqrt(len(mc))
    assert abs(np.mean(mc) - exact) < 4 * se


def test_sparse_quadratic_form_gradients():
    N, K = 25, 4
    p = _prior(_points(N), K=K, L=2)
    d = torch.exp(p.raw_Lu_diag.detach()).requires_grad_()
    off = p.Lu_offdiag.detach().clone().requires_grad_()
    rows = torch.cat([torch.arange(6)[:, None], p.nbr[:6].clamp_min(0)], 1)
    for S in (1, 2):
        coef = torch.randn(S, 6, K + 1, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda d, o, c: sparse_row_quad(d, o, c, rows, p.nbr), (d, off, coef))
    # equals the dense ‖L_uᵀ a‖²
    coef = torch.randn(1, 6, K + 1, dtype=torch.float64)
    Lu = _dense_Lu(p)
    q = sparse_row_quad(d, off, coef, rows, p.nbr).detach().numpy()
    for i in range(6):
        a = np.zeros(N)
        np.add.at(a, rows[i].numpy(), coef[0, i].numpy())
        for f in range(2):
            assert q[f, i] == pytest.approx(np.sum((Lu[f].T @ a) ** 2), rel=1e-10)


def test_kl_gradients_match_dense():
    N, K = 20, 4
    p = _prior(_points(N, n_dup=2), K=K, L=1)
    p.kl_full().backward()
    g_off = p.Lu_offdiag.grad.clone()
    g_m = p.m.grad.clone()
    Lam = torch.as_tensor(_dense_precision(p)[0])
    m = p.m.detach().clone().requires_grad_()
    Ld = torch.as_tensor(_dense_Lu(p)[0]).requires_grad_()
    S = Ld @ Ld.T
    kl = 0.5 * (torch.trace(Lam @ S) + m[0] @ Lam @ m[0] - N - torch.logdet(S) - torch.logdet(Lam))
    kl.backward()
    np.testing.assert_allclose(g_m.numpy(), m.grad.numpy(), rtol=1e-8, atol=1e-10)
    nbr = p.nbr.numpy()
    for j in range(N):
        for k in range(K):
            if nbr[j, k] >= 0:
                assert g_off[0, j, k].item() == pytest.approx(
                    Ld.grad[j, nbr[j, k]].item(), rel=1e-8, abs=1e-10
                )
            else:
                assert g_off[0, j, k].item() == 0.0


def test_trainable_hyperparameters_give_the_same_kl_and_finite_gradients():
    N, K = 30, 5
    X = _points(N)
    fixed = _prior(X, K=K, L=2)
    trained = LCGPPrior(
        2, X, n_neighbors=K, lengthscale=3.0, sigma=1.3, nugget=1e-2, train_lengthscale=True, train_sigma=True
    ).double()
    trained.load_state_dict(fixed.state_dict())
    assert trained.kernel.trainable
    kl = trained.kl_full()
    assert float(kl.detach()) == pytest.approx(float(fixed.kl_full().detach()), rel=1e-9)
    kl.backward()
    g = trained.kernel.log_lengthscale.grad.item()
    eps = 1e-5
    with torch.no_grad():
        trained.kernel.log_lengthscale += eps
        up = float(trained.kl_full())
        trained.kernel.log_lengthscale -= 2 * eps
        down = float(trained.kl_full())
    assert g == pytest.approx((up - down) / (2 * eps), rel=1e-5)


# ====================================================================== prediction
@pytest.mark.parametrize("case", ["full", "diagonal", "mggp"])
def test_prediction(case):
    N, K = 40, 6
    X = _points(N)
    g = np.random.default_rng(0).integers(0, 3, N) if case == "mggp" else None
    p = _prior(X, g, K=K, diagonal_only=case == "diagonal")
    gt = None if g is None else torch.as_tensor(g)
    # at the training coordinates: the training marginals (duplicates: the lowest-index twin)
    mu, var = p.predict(torch.as_tensor(X), gt)
    mu_tr, var_tr = p.marginals(PriorInput(idx=torch.arange(N), n_total=N))
    first = np.array(
        [min(i for i in range(N) if (X[i] == X[j]).all() and (g is None or g[i] == g[j])) for j in range(N)]
    )
    np.testing.assert_allclose(mu.numpy(), mu_tr.detach().numpy()[first], rtol=1e-12)
    np.testing.assert_allclose(var.numpy(), var_tr.detach().numpy()[first], rtol=1e-12)
    unique = first == np.arange(N)
    assert unique.sum() >= N - 6
    # at new coordinates: the dense K-nearest-neighbour conditional with the dense q block
    rng = np.random.default_rng(5)
    Xs = rng.uniform(0, 10, (7, 2))
    gs = None if g is None else rng.integers(0, 3, 7)
    mu, var = p.predict(torch.as_tensor(Xs), None if gs is None else torch.as_tensor(gs))
    Lu = _dense_Lu(p)
    s2 = p.kernel.sigma.item() ** 2
    for i in range(7):
        d = np.sqrt(((X - Xs[i]) ** 2).sum(1))
        n = np.lexsort((np.arange(N), d))[:K]
        Kn = _kernel_sets(p, X[n], X[n], None if g is None else g[n], None if g is None else g[n])[0]
        Kn = Kn + p.nugget * s2 * np.eye(K)
        ks = _kernel_sets(
            p, X[n], Xs[i : i + 1], None if g is None else g[n], None if gs is None else gs[i : i + 1]
        )[0][:, 0]
        w = np.linalg.solve(Kn, ks)
        for f in range(p.n_factors):
            Snn = (Lu[f] @ Lu[f].T)[np.ix_(n, n)]
            m_exp = p.beta[f].item() + w @ p.m[f].detach().numpy()[n]
            v_exp = s2 * (1 + p.nugget) - w @ ks + w @ Snn @ w
            assert mu[i, f].item() == pytest.approx(m_exp, rel=1e-6)
            assert var[i, f].item() == pytest.approx(v_exp, rel=1e-6)


def test_reorder_and_config_roundtrip():
    N, K = 30, 5
    X = _points(N)
    p = _prior(X, K=K, per_factor=True)
    mu0, var0 = p.predict(torch.as_tensor(X[:5] + 0.3))
    kl0 = float(p.kl_full().detach())
    perm = torch.tensor([2, 0, 1])
    p.reorder(perm)
    mu1, var1 = p.predict(torch.as_tensor(X[:5] + 0.3))
    np.testing.assert_allclose(mu1.numpy(), mu0.numpy()[:, [2, 0, 1]], rtol=1e-10)
    np.testing.assert_allclose(var1.numpy(), var0.numpy()[:, [2, 0, 1]], rtol=1e-10)
    assert float(p.kl_full().detach()) == pytest.approx(kl0, rel=1e-10)
    # an empty shell from config() + the state dict is the same prior, without recomputing neighbours
    q = LCGPPrior(**p.config()).double()
    assert (q.nbr == -1).all()  # nothing computed
    q.load_state_dict(p.state_dict())
    mu2, var2 = q.predict(torch.as_tensor(X[:5] + 0.3))
    np.testing.assert_allclose(mu2.numpy(), mu1.numpy(), rtol=1e-12)
    np.testing.assert_allclose(var2.numpy(), var1.numpy(), rtol=1e-12)


def test_neighbour_trees_follow_the_hyperparameter_counter():
    """The kd-trees of the training cells are rebuilt when a state dict (new cells) is loaded."""
    X1, X2 = _points(40, seed=1), _points(40, seed=2)
    p1, p2 = _prior(X1, K=5), _prior(X2, K=5, seed=3)
    Q = torch.as_tensor(X2[:6] + 0.2)
    p1.predict(Q)  # builds p1's trees
    version = p1.hyper_version
    p1.load_state_dict(p2.state_dict())
    assert p1.hyper_version > version
    mu1, var1 = p1.predict(Q)
    mu2, var2 = p2.predict(Q)
    np.testing.assert_allclose(mu1.numpy(), mu2.numpy(), rtol=1e-12)
    np.testing.assert_allclose(var1.numpy(), var2.numpy(), rtol=1e-12)


def test_init_from_log_factors_smooths():
    N, K = 200, 10
    rng = np.random.default_rng(0)
    X = rng.uniform(0, 20, (N, 2))
    p = LCGPPrior(2, X, n_neighbors=K, lengthscale=4.0).double()
    truth = np.stack([np.sin(X[:, 0] / 3), np.cos(X[:, 1] / 4)], 1)
    F = truth + rng.normal(scale=0.5, size=truth.shape) + 1.0
    p.init_from_log_factors(torch.as_tensor(F), PriorInput(idx=torch.arange(N), n_total=N))
    mu, var = p.marginals(PriorInput(idx=torch.arange(N), n_total=N))
    err_init = np.abs(mu.detach().numpy() - 1.0 - truth).mean()
    assert err_init < 0.6 * np.abs(F - 1.0 - truth).mean()  # smoother than the noisy input
    assert torch.isfinite(var).all() and (var > 0).all()
    assert np.isfinite(float(p.kl_full().detach()))


# ====================================================================== model level
@pytest.fixture(scope="module")
def sim():
    adata = sfact.datasets.simulate(n_obs=500, n_vars=40, n_factors=3, n_groups=2, random_state=0)
    sfact.pp.prepare(adata, group_key="group")
    return adata


@pytest.mark.parametrize("diagonal_only", [True, False])
def test_model_train_save_load_same_predictions(sim, tmp_path, diagonal_only):
    train, test = sfact.tl.heldout_split(sim, fraction=0.1, random_state=0)
    model = SpatialFactorization(
        train,
        prior="lcgp",
        n_factors=3,
        prior_kwargs={"n_neighbors": 8, "diagonal_only": diagonal_only},
        random_state=0,
    )
    model.train(max_iter=15, batch_size=200, min_iter=100)
    assert model.gp_info()["n_neighbors"] == 8 and model.gp_info()["prior"] == "lcgp"
    f_new, s_new = model.transform(test)
    f_tr = model.get_factors()
    assert np.isfinite(f_new).all() and np.isfinite(s_new).all()
    dev = sfact.tl.heldout_deviance(model, test)
    assert np.isfinite(dev)
    model.save(tmp_path / "m")
    loaded = SpatialFactorization.load(tmp_path / "m")
    np.testing.assert_allclose(loaded.transform(test)[0], f_new, rtol=1e-6)
    np.testing.assert_allclose(loaded.get_factors(), f_tr, rtol=1e-6)  # training cells, no adata
    assert loaded.module.prior.n_neighbors == 8
    assert torch.equal(loaded.module.prior.nbr, model.module.prior.nbr.cpu())
    # training continues after loading with the data attached
    again = SpatialFactorization.load(tmp_path / "m", adata=train)
    again.train(max_iter=2, batch_size=200, min_iter=100)
    assert len(again.history) == 17


def test_mggp_lcgp_trains_and_predicts_with_groups(sim, tmp_path):
    train, test = sfact.tl.heldout_split(sim, fraction=0.1, random_state=0)
    model = SpatialFactorization(
        train, prior="mggp_lcgp", n_factors=3, prior_kwargs={"n_neighbors": 8}, random_state=0
    )
    model.train(max_iter=15, min_iter=100)
    assert model.module.prior.name == "mggp_lcgp" and model.module.prior.multigroup
    mu_a, _ = model.get_log_factors(test)
    flipped = test.copy()
    flipped.obs["group"] = np.where(test.obs["group"] == "g0", "g1", "g0")
    mu_b, _ = model.get_log_factors(flipped)
    assert np.isfinite(mu_a).all() and not np.allclose(mu_a, mu_b)  # the group matters
    gw, names = model.groupwise_factors()
    assert gw.shape == (2, train.n_obs, 3) and names == ["g0", "g1"]
    assert np.isfinite(gw).all()
    assert np.isfinite(sfact.tl.heldout_deviance(model, test))
    model.save(tmp_path / "mg")
    loaded = SpatialFactorization.load(tmp_path / "mg")
    np.testing.assert_allclose(loaded.get_log_factors(test)[0], mu_a, rtol=1e-6)


def test_lcgp_beats_svgp_with_few_inducing_points_on_fine_structure():
    adata = sfact.datasets.simulate(
        n_obs=1500, n_vars=40, n_factors=3, n_groups=1, lengthscale=4.0, random_state=1
    )
    sfact.pp.prepare(adata)
    train, test = sfact.tl.heldout_split(adata, fraction=0.1, random_state=0)
    dev = {}
    for prior, kw in (("svgp", {"num_inducing": 30}), ("lcgp", {"n_neighbors": 15})):
        model = SpatialFactorization(train, prior=prior, n_factors=3, prior_kwargs=kw, random_state=0)
        model.train(max_iter=80)
        dev[prior] = sfact.tl.heldout_deviance(model, test)
    assert dev["lcgp"] < 0.95 * dev["svgp"], dev
