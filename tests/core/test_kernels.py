"""Covariance functions: Matérn-3/2, RBF and their multi-group versions, and the MDS embedding.

Every kernel value is compared with its closed form computed independently in numpy (float64).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sfact._core.kernels import Kernel as _Kernel
from sfact._core.kernels import mds_embedding

# the core constructor takes every option explicitly (defaults live in GPConfig); these tests
# build kernels directly with the values below unless they say otherwise
CORE_KWARGS = {
    "n_dims": 2,
    "lengthscale": 10.0,
    "sigma": 1.0,
    "n_factors": 1,
    "per_factor": False,
    "group_embedding": None,
    "group_diff_param": 1.0,
    "train_lengthscale": False,
    "train_sigma": False,
    "train_group_diff_param": False,
}


def Kernel(name: str = "matern32", **kw) -> _Kernel:  # stands in for the class
    return _Kernel(name, **{**CORE_KWARGS, **kw})


P = 2  # spatial dimension


# ---------------------------------------------------------------------- reference formulas
def _dist(X1: np.ndarray, X2: np.ndarray) -> np.ndarray:
    return np.sqrt(((X1[:, None, :] - X2[None, :, :]) ** 2).sum(-1))


def _ref_kernel(name, r, ls, sigma, nu=None, p=P):
    """σ²(1+√3r/ℓ)e^{−√3r/ℓ} / σ² exp(−r²/2ℓ²), or their multi-group versions with ν."""
    if nu is None:
        if name == "matern32":
            a = math.sqrt(3.0) * r / ls
            return sigma**2 * (1.0 + a) * np.exp(-a)
        return sigma**2 * np.exp(-(r**2) / (2.0 * ls**2))
    if name == "matern32":
        rt = math.sqrt(3.0) * r / ls * np.sqrt(nu)
        return sigma**2 * (1.0 + rt) * np.exp(-rt) * nu ** ((3.0 + p) / 2.0)
    return sigma**2 * np.exp(-nu * r**2 / (2.0 * ls**2)) * nu ** (p / 2.0)


def _onehot_embedding(G: int) -> np.ndarray:
    """Group coordinates with squared distance 1 between every pair of different groups."""
    return np.eye(G) / math.sqrt(2.0)


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def _hyper(k: Kernel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        k.lengthscale.detach().double().numpy(),
        k.sigma.detach().double().numpy(),
        k.alpha.detach().double().numpy(),
    )


@pytest.fixture
def points():
    rng = np.random.default_rng(0)
    return rng.uniform(0, 10, (17, P)), rng.uniform(0, 10, (11, P))


# ---------------------------------------------------------------------- single group
@pytest.mark.parametrize("name", ["matern32", "rbf"])
def test_single_group_matches_formula(name, points):
    X1, X2 = points
    ls, sigma = 2.5, 1.7
    k = Kernel(name, lengthscale=ls, sigma=sigma).double()
    ls_k, s_k, _ = _hyper(k)
    # the stored hyperparameters are the requested ones
    np.testing.assert_allclose(ls_k, [ls], rtol=1e-6)
    np.testing.assert_allclose(s_k, [sigma], rtol=1e-6)
    K = k(_t(X1), _t(X2)).numpy()
    assert K.shape == (1, len(X1), len(X2))
    expected = _ref_kernel(name, _dist(X1, X2), ls_k[0], s_k[0])
    np.testing.assert_allclose(K[0], expected, rtol=1e-10, atol=1e-12)
    # and with the requested values, up to float32 storage of the hyperparameters
    np.testing.assert_allclose(K[0], _ref_kernel(name, _dist(X1, X2), ls, sigma), rtol=1e-5)


@pytest.mark.parametrize("name", ["matern32", "rbf"])
def test_per_factor_hyperparameters(name, points):
    X1, X2 = points
    ls = np.array([0.7, 3.0, 12.0])
    sigma = np.array([0.5, 1.0, 2.0])
    k = Kernel(name, lengthscale=ls, sigma=sigma, n_factors=3, per_factor=True).double()
    assert k.n_sets == 3
    ls_k, s_k, _ = _hyper(k)
    np.testing.assert_allclose(ls_k, ls, rtol=1e-6)
    np.testing.assert_allclose(s_k, sigma, rtol=1e-6)
    K = k(_t(X1), _t(X2)).numpy()
    assert K.shape == (3, len(X1), len(X2))
    r = _dist(X1, X2)
    for j in range(3):
        np.testing.assert_allclose(K[j], _ref_kernel(name, r, ls_k[j], s_k[j]), rtol=1e-10, atol=1e-12)
    # the sets really differ
    assert not np.allclose(K[0], K[2])


def test_shared_kernel_ignores_n_factors(points):
    X1, X2 = points
    k = Kernel("matern32", lengthscale=2.0, n_factors=5, per_factor=False).double()
    assert k.n_sets == 1
    assert k(_t(X1), _t(X2)).shape == (1, len(X1), len(X2))


# ---------------------------------------------------------------------- multi-group
@pytest.mark.parametrize("name", ["matern32", "rbf"])
@pytest.mark.parametrize("alpha", [0.3, 1.0, 4.0])
def test_multigroup_matches_formula(name, alpha):
    rng = np.random.default_rng(1)
    G = 3
    X1, X2 = rng.uniform(0, 10, (13, P)), rng.uniform(0, 10, (9, P))
    g1, g2 = rng.integers(0, G, 13), rng.integers(0, G, 9)
    ls, sigma = 3.0, 1.3
    k = Kernel(
        name, lengthscale=ls, sigma=sigma, group_embedding=_onehot_embedding(G), group_diff_param=alpha
    ).double()
    assert k.multigroup and k.n_groups == G
    ls_k, s_k, a_k = _hyper(k)
    np.testing.assert_allclose(a_k, [alpha], rtol=1e-6)
    K = k(_t(X1), _t(X2), torch.as_tensor(g1), torch.as_tensor(g2)).numpy()[0]
    d2 = (g1[:, None] != g2[None, :]).astype(np.float64)
    nu = 1.0 / (alpha * d2 + 1.0)
    expected = _ref_kernel(name, _dist(X1, X2), ls_k[0], s_k[0], nu)
    np.testing.assert_allclose(K, expected, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("name", ["matern32", "rbf"])
def test_multigroup_cross_group_at_zero_distance(name):
    alpha, sigma = 2.0, 1.5
    k = Kernel(
        name, lengthscale=4.0, sigma=sigma, group_embedding=_onehot_embedding(2), group_diff_param=alpha
    ).double()
    x = _t([[1.0, 2.0], [1.0, 2.0]])
    K = k(x, x, torch.tensor([0, 1]), torch.tensor([0, 1])).numpy()[0]
    nu = 1.0 / (alpha * 1.0 + 1.0)  # d² = 1 between different groups
    power = (3.0 + P) / 2.0 if name == "matern32" else P / 2.0
    np.testing.assert_allclose(K[0, 1], sigma**2 * nu**power, rtol=1e-6)
    np.testing.assert_allclose(K[1, 0], sigma**2 * nu**power, rtol=1e-6)
    np.testing.assert_allclose(np.diag(K), sigma**2, rtol=1e-6)
    # for matern32, p = 2: σ² (1/3)^{5/2}
    if name == "matern32":
        np.testing.assert_allclose(K[0, 1], sigma**2 * 3.0**-2.5, rtol=1e-6)


@pytest.mark.parametrize("name", ["matern32", "rbf"])
def test_multigroup_same_group_reduces_to_single_group(name, points):
    X1, X2 = points
    mg = Kernel(name, lengthscale=2.0, sigma=0.8, group_embedding=_onehot_embedding(3), group_diff_param=5.0)
    sg = Kernel(name, lengthscale=2.0, sigma=0.8)
    mg, sg = mg.double(), sg.double()
    for g in range(3):
        K_mg = mg(_t(X1), _t(X2), torch.full((len(X1),), g), torch.full((len(X2),), g))
        np.testing.assert_allclose(K_mg.numpy(), sg(_t(X1), _t(X2)).numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["matern32", "rbf"])
def test_alpha_zero_makes_groups_identical(name, points):
    X1, X2 = points
    rng = np.random.default_rng(2)
    g1, g2 = torch.as_tensor(rng.integers(0, 3, len(X1))), torch.as_tensor(rng.integers(0, 3, len(X2)))
    mg = Kernel(name, lengthscale=2.0, group_embedding=_onehot_embedding(3), group_diff_param=0.0).double()
    sg = Kernel(name, lengthscale=2.0).double()
    np.testing.assert_allclose(
        mg(_t(X1), _t(X2), g1, g2).numpy(), sg(_t(X1), _t(X2)).numpy(), rtol=1e-9, atol=1e-12
    )
    # whereas α > 0 separates them
    mg1 = Kernel(name, lengthscale=2.0, group_embedding=_onehot_embedding(3), group_diff_param=1.0).double()
    assert not np.allclose(mg1(_t(X1), _t(X2), g1, g2).numpy(), sg(_t(X1), _t(X2)).numpy())


def test_multigroup_needs_groups(points):
    X1, X2 = points
    k = Kernel("matern32", group_embedding=_onehot_embedding(2)).double()
    with pytest.raises(ValueError, match="group"):
        k(_t(X1), _t(X2))


# ---------------------------------------------------------------------- symmetry and PSD
def _assert_psd(K: np.ndarray) -> None:
    np.testing.assert_allclose(K, K.T, rtol=0, atol=1e-12 * np.abs(K).max())
    w = np.linalg.eigvalsh(0.5 * (K + K.T))
    assert w.min() >= -1e-8 * w.max(), (w.min(), w.max())


@pytest.mark.parametrize("name", ["matern32", "rbf"])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0, 10.0, 1000.0])
@pytest.mark.parametrize("ls", [0.3, 3.0, 30.0])
def test_multigroup_symmetric_psd(name, alpha, ls):
    rng = np.random.default_rng(int(10 * alpha + ls))
    G, n = 3, 40
    X = rng.uniform(0, 10, (n, P))
    X[20:30] = X[:10]  # duplicate coordinates ...
    g = rng.integers(0, G, n)
    g[20:30] = (g[:10] + 1) % G  # ... in other groups
    X[30:33] = X[0]  # and a location shared by many cells of every group
    g[30:33] = [0, 1, 2]
    emb = _onehot_embedding(G)
    k = Kernel(name, lengthscale=ls, sigma=1.2, group_embedding=emb, group_diff_param=alpha).double()
    gt = torch.as_tensor(g)
    _assert_psd(k(_t(X), _t(X), gt, gt).numpy()[0])


@pytest.mark.parametrize("name", ["matern32", "rbf"])
def test_multigroup_psd_with_group_distances(name):
    rng = np.random.default_rng(3)
    # an Euclidean distance matrix between 4 groups
    pts = rng.normal(size=(4, 3))
    D = _dist(pts, pts)
    n = 40
    X = rng.uniform(0, 5, (n, P))
    X[20:] = X[:20]
    g = torch.as_tensor(rng.integers(0, 4, n))
    for alpha in (0.5, 5.0):
        k = Kernel(name, lengthscale=2.0, group_embedding=mds_embedding(D), group_diff_param=alpha).double()
        _assert_psd(k(_t(X), _t(X), g, g).numpy()[0])


@pytest.mark.parametrize("name", ["matern32", "rbf"])
def test_single_group_symmetric_psd(name):
    rng = np.random.default_rng(4)
    X = rng.uniform(0, 10, (50, P))
    X[25:] = X[:25]
    k = Kernel(name, lengthscale=[0.5, 5.0], sigma=[1.0, 3.0], n_factors=2, per_factor=True).double()
    K = k(_t(X), _t(X)).numpy()
    for j in range(2):
        _assert_psd(K[j])


# ---------------------------------------------------------------------- MDS embedding
def test_mds_reproduces_euclidean_distances():
    rng = np.random.default_rng(5)
    pts = rng.normal(size=(6, 3)) * np.array([3.0, 1.0, 0.2])
    D = _dist(pts, pts)
    E = mds_embedding(D)
    assert E.shape[0] == 6 and E.shape[1] <= 5
    np.testing.assert_allclose(_dist(E, E), D, atol=1e-9)


def test_mds_of_unit_distances_is_simplex():
    G = 4
    D = 1.0 - np.eye(G)
    E = mds_embedding(D)
    assert E.shape == (G, G - 1)
    np.testing.assert_allclose(_dist(E, E), D, atol=1e-9)


def test_mds_all_zero_distances():
    E = mds_embedding(np.zeros((3, 3)))
    assert E.shape[0] == 3
    np.testing.assert_allclose(_dist(E, E), 0.0, atol=1e-12)


@pytest.mark.parametrize("name", ["matern32", "rbf"])
def test_kernel_with_mds_embedding_uses_squared_distances(name):
    D = np.array([[0.0, 1.0, 3.0], [1.0, 0.0, 2.5], [3.0, 2.5, 0.0]])  # Euclidean (triangle inequality)
    alpha, sigma, ls = 0.7, 1.1, 3.0
    k = Kernel(name, lengthscale=ls, sigma=sigma, group_embedding=mds_embedding(D), group_diff_param=alpha)
    k = k.double()
    rng = np.random.default_rng(6)
    X = rng.uniform(0, 5, (8, P))
    X[4:] = X[:4]  # also zero spatial distances across groups
    g = rng.integers(0, 3, 8)
    g[:3] = [0, 1, 2]
    K = k(_t(X), _t(X), torch.as_tensor(g), torch.as_tensor(g)).numpy()[0]
    nu = 1.0 / (alpha * D[g][:, g] ** 2 + 1.0)
    np.testing.assert_allclose(K, _ref_kernel(name, _dist(X, X), ls, sigma, nu), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize(
    "D",
    [
        np.array([[0.0, 1.0], [2.0, 0.0]]),  # asymmetric
        np.array([[0.0, -1.0], [-1.0, 0.0]]),  # negative
        np.array([[1.0, 1.0], [1.0, 1.0]]),  # non-zero diagonal
        np.zeros((2, 3)),  # not square
        np.zeros(3),  # not a matrix
    ],
    ids=["asymmetric", "negative", "diagonal", "rectangular", "vector"],
)
def test_mds_rejects_bad_matrices(D):
    with pytest.raises(ValueError, match="group_distances"):
        mds_embedding(D)


# ---------------------------------------------------------------------- diag and validation
@pytest.mark.parametrize("name", ["matern32", "rbf"])
@pytest.mark.parametrize("multigroup", [False, True])
def test_diag_equals_diagonal_of_forward(name, multigroup):
    rng = np.random.default_rng(7)
    X = _t(rng.uniform(0, 10, (30, P)))
    g = torch.as_tensor(rng.integers(0, 3, 30)) if multigroup else None
    k = Kernel(
        name,
        lengthscale=[1.0, 4.0],
        sigma=[0.6, 2.2],
        n_factors=2,
        per_factor=True,
        group_embedding=_onehot_embedding(3) if multigroup else None,
        group_diff_param=2.0,
    ).double()
    K = k(X, X, g, g)
    d = k.diag(X, g)
    assert d.shape == (2, 30)
    np.testing.assert_allclose(d.numpy(), K.diagonal(dim1=-2, dim2=-1).numpy(), rtol=1e-10)
    np.testing.assert_allclose(d.numpy()[:, 0], [0.36, 2.2**2], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "matern52"},
        {"name": "RBF"},
        {"lengthscale": 0.0},
        {"lengthscale": -1.0},
        {"sigma": 0.0},
        {"lengthscale": [1.0, -2.0], "n_factors": 2, "per_factor": True},
        {"group_embedding": np.eye(2), "group_diff_param": -0.5},
    ],
)
def test_invalid_arguments_raise(kwargs):
    kwargs = dict(kwargs)
    name = kwargs.pop("name", "matern32")
    with pytest.raises(ValueError):
        Kernel(name, **kwargs)


def test_info_reports_hyperparameters():
    k = Kernel("rbf", lengthscale=2.0, sigma=0.5, group_embedding=np.eye(2), group_diff_param=3.0)
    info = k.info()
    assert info["kernel"] == "rbf"
    np.testing.assert_allclose(info["lengthscale"], [2.0], rtol=1e-6)
    np.testing.assert_allclose(info["sigma"], [0.5], rtol=1e-6)
    np.testing.assert_allclose(info["group_diff_param"], [3.0], rtol=1e-6)
    assert not k.trainable
    assert Kernel("rbf", train_lengthscale=True).trainable
