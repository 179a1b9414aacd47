from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial import cKDTree

import sfact


def _is_integer(X) -> bool:
    vals = X.data if sp.issparse(X) else np.asarray(X)
    return bool(np.all(vals == np.round(vals)))


# --- bundled data ---------------------------------------------------------------------------


def test_osmfish_valid_cells():
    adata = sfact.datasets.osmfish()
    assert adata.shape == (4839, 33)
    assert isinstance(adata.X, np.ndarray)
    assert adata.X.dtype == np.float32
    assert _is_integer(adata.X)
    assert (adata.X >= 0).all()
    assert (adata.obs["Valid"] == 1).all()
    assert (adata.obs["Region"] != "Excluded").all()
    # unused categories are removed after subsetting
    assert "Excluded" not in adata.obs["Region"].cat.categories
    assert "Excluded" not in adata.obs["ClusterName"].cat.categories
    assert adata.obs["Region"].nunique() == 11
    assert adata.obsm["spatial"].shape == (4839, 2)
    np.testing.assert_allclose(adata.obsm["spatial"], adata.obs[["X", "Y"]].to_numpy())


def test_osmfish_all_cells():
    adata = sfact.datasets.osmfish(valid_only=False)
    assert adata.shape == (6471, 33)
    assert int((adata.obs["Region"] == "Excluded").sum()) == 6471 - 4839
    assert ((adata.obs["Region"] == "Excluded") == (adata.obs["Valid"] == 0)).all()


def test_osmfish_returns_a_fresh_copy():
    a = sfact.datasets.osmfish()
    original = float(a.X[0, 0])
    a.X[0, 0] = -1.0
    a.obsm["spatial"][0] = np.nan
    b = sfact.datasets.osmfish()
    assert b is not a
    assert float(b.X[0, 0]) == original
    assert np.isfinite(b.obsm["spatial"]).all()
    assert not b.is_view


def test_visium_prostate():
    adata = sfact.datasets.visium_prostate()
    assert adata.shape == (2327, 1255)
    assert sp.issparse(adata.X) and adata.X.format == "csr"
    assert _is_integer(adata.X)
    assert adata.obs["list_ID"].value_counts().to_dict() == {"NP": 987, "CP": 1340}
    assert adata.obsm["spatial"].shape == (2327, 2)
    # the two sections do not overlap along the first axis
    x = adata.obsm["spatial"][:, 0]
    is_np = (adata.obs["list_ID"] == "NP").to_numpy()
    assert x[is_np].max() < x[~is_np].min()


def test_visium_dentate_gyrus():
    adata = sfact.datasets.visium_dentate_gyrus()
    assert adata.shape == (624, 634)
    assert sp.issparse(adata.X)
    assert _is_integer(adata.X)
    assert adata.obsm["spatial"].shape == (624, 2)
    assert np.isfinite(adata.obsm["spatial"]).all()


# --- simulate -------------------------------------------------------------------------------


def test_simulate_defaults():
    adata = sfact.datasets.simulate()
    n, d, L, G = 2000, 200, 5, 3
    assert adata.shape == (n, d)
    assert sp.issparse(adata.X) and adata.X.format == "csr"
    assert adata.X.dtype == np.float32
    assert (adata.X.data >= 0).all()
    assert _is_integer(adata.X)
    assert adata.obs_names[0] == "cell_0" and adata.var_names[-1] == f"gene_{d - 1}"
    xy = adata.obsm["spatial"]
    assert xy.shape == (n, 2) and xy.min() >= 0 and xy.max() <= 100
    F = adata.obsm["log_factors_true"]
    assert F.shape == (n, L)
    np.testing.assert_allclose(adata.obsm["factors_true"], np.exp(F))
    W = adata.varm["loadings_true"]
    assert W.shape == (d, L) and (W >= 0).all()
    # every gene loads mainly on one factor
    top = np.sort(W, axis=1)[:, ::-1]
    assert np.median(top[:, 0] / top.sum(axis=1)) > 0.6
    assert list(adata.obs["group"].cat.categories) == [f"g{g}" for g in range(G)]
    assert adata.obs["group"].value_counts().min() > 0.05 * n
    s = adata.obs["size_factor_true"].to_numpy()
    assert (s > 0).all() and abs(s.mean() - 1) < 0.05
    assert adata.obsm["log_factors_true_groupwise"].shape == (n, G, L)
    params = adata.uns["simulate"]
    assert params["n_obs"] == n and params["n_factors"] == L and params["random_state"] == 0
    assert params["rate_scale"] == 1.0


def test_simulate_rates_match_truth():
    adata = sfact.datasets.simulate(n_obs=3000, n_vars=100, n_factors=4, random_state=3)
    s = adata.obs["size_factor_true"].to_numpy()
    rate = s[:, None] * (adata.obsm["factors_true"] @ adata.varm["loadings_true"].T)
    observed = np.asarray(adata.X.sum(axis=0)).ravel()
    expected = rate.sum(axis=0)
    # Poisson totals per gene agree with the stored truth
    z = (observed - expected) / np.sqrt(expected)
    assert np.abs(z).max() < 5
    assert abs(observed.sum() / expected.sum() - 1) < 0.01


@pytest.mark.parametrize("density", [0.02, 0.05, 0.2])
def test_simulate_density(density):
    adata = sfact.datasets.simulate(n_obs=3000, n_vars=300, n_factors=5, density=density, random_state=1)
    observed = adata.X.nnz / (adata.n_obs * adata.n_vars)
    assert abs(observed - density) / density < 0.15
    assert adata.uns["simulate"]["rate_scale"] != 1.0


def test_simulate_is_reproducible():
    a = sfact.datasets.simulate(n_obs=500, n_vars=40, random_state=7)
    b = sfact.datasets.simulate(n_obs=500, n_vars=40, random_state=7)
    c = sfact.datasets.simulate(n_obs=500, n_vars=40, random_state=8)
    assert (a.X != b.X).nnz == 0
    np.testing.assert_array_equal(a.obsm["log_factors_true"], b.obsm["log_factors_true"])
    np.testing.assert_array_equal(a.obs["group"], b.obs["group"])
    assert (a.X != c.X).nnz > 0
    assert not np.allclose(a.obsm["spatial"], c.obsm["spatial"])
    # a Generator works too
    d = sfact.datasets.simulate(n_obs=500, n_vars=40, random_state=np.random.default_rng(7))
    assert d.uns["simulate"]["random_state"] is None


def test_simulate_dense():
    adata = sfact.datasets.simulate(n_obs=300, n_vars=30, sparse=False, random_state=2)
    assert isinstance(adata.X, np.ndarray) and adata.X.dtype == np.float32
    sparse = sfact.datasets.simulate(n_obs=300, n_vars=30, sparse=True, random_state=2)
    np.testing.assert_array_equal(adata.X, sparse.X.toarray())


def test_simulate_groups_differ_in_their_factors():
    adata = sfact.datasets.simulate(n_obs=4000, n_vars=20, n_factors=2, group_effect=1.0, random_state=0)
    assert adata.uns["simulate"]["group_factors"] == [0]
    gw = adata.obsm["log_factors_true_groupwise"]
    # factor 0 depends on the group at the same place, factor 1 does not
    assert np.abs(gw[:, 0, 0] - gw[:, 1, 0]).mean() > 0.3
    np.testing.assert_array_equal(gw[:, 0, 1], gw[:, 1, 1])
    codes = adata.obs["group"].cat.codes.to_numpy()
    np.testing.assert_array_equal(gw[np.arange(adata.n_obs), codes], adata.obsm["log_factors_true"])

    # the same seen from the observed truth only: nearest neighbours in different groups
    # differ much more in factor 0 than neighbours in the same group; not so in factor 1
    xy = adata.obsm["spatial"]
    _, nn = cKDTree(xy).query(xy, k=2)
    nn = nn[:, 1]
    F = adata.obsm["log_factors_true"]
    other = codes != codes[nn]
    diff = np.abs(F - F[nn])
    ratio = diff[other].mean(axis=0) / diff[~other].mean(axis=0)
    assert ratio[0] > 3
    assert ratio[1] < 1.5

    shared = sfact.datasets.simulate(n_obs=500, n_vars=20, n_factors=2, group_effect=0.0, random_state=0)
    gw = shared.obsm["log_factors_true_groupwise"]
    np.testing.assert_array_equal(gw[:, 0], gw[:, 2])


def test_simulate_sections_share_a_pattern_and_differ_by_their_own():
    adata = sfact.datasets.simulate(
        n_obs=8000, n_vars=20, n_factors=2, n_groups=1, n_samples=4, sample_effect=1.0, random_state=0
    )
    assert adata.obs["sample"].cat.categories.tolist() == ["s0", "s1", "s2", "s3"]
    assert adata.obs["sample"].value_counts().tolist() == [2000] * 4
    assert adata.uns["simulate"]["n_samples"] == 4
    # every section covers the whole square (overlapping coordinates)
    for s in adata.obs["sample"].cat.categories:
        xy = adata.obsm["spatial"][(adata.obs["sample"] == s).to_numpy()]
        assert xy.min() < 2 and xy.max() > 98
    # nearest neighbours: much closer log-factors within a section than across sections, and
    # across sections still correlated (the shared field)
    xy = adata.obsm["spatial"]
    codes = adata.obs["sample"].cat.codes.to_numpy()
    F = adata.obsm["log_factors_true"][:, 0]
    within, across = [], []
    for s in range(4):
        own = np.flatnonzero(codes == s)
        other = np.flatnonzero(codes == (s + 1) % 4)
        _, nn_own = cKDTree(xy[own]).query(xy[own], k=2)
        _, nn_other = cKDTree(xy[other]).query(xy[own], k=1)
        within.append(np.corrcoef(F[own], F[own[nn_own[:, 1]]])[0, 1])
        across.append(np.corrcoef(F[own], F[other[nn_other]])[0, 1])
    assert min(within) > 0.9
    assert 0.2 < np.mean(across) < 0.8
    # one sample: the data of before (no sample column, same counts)
    one = sfact.datasets.simulate(n_obs=300, n_vars=10, n_samples=1, random_state=0)
    ref = sfact.datasets.simulate(n_obs=300, n_vars=10, random_state=0)
    assert "sample" not in one.obs
    np.testing.assert_array_equal(one.X.toarray(), ref.X.toarray())


def test_simulate_one_group_and_round_trip(tmp_path):
    adata = sfact.datasets.simulate(n_obs=200, n_vars=10, n_groups=1, random_state=0)
    assert list(adata.obs["group"].cat.categories) == ["g0"]
    assert adata.uns["simulate"]["group_factors"] == []
    path = tmp_path / "sim.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert back.uns["simulate"]["lengthscale"] == 15.0
    assert back.uns["simulate"]["density"] is None
    np.testing.assert_array_equal(
        back.obsm["log_factors_true_groupwise"], adata.obsm["log_factors_true_groupwise"]
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"density": 1.5}, "density"),
        ({"density": 0.0}, "density"),
        ({"n_obs": 0}, "n_obs"),
        ({"lengthscale": -1.0}, "lengthscale"),
        ({"group_effect": -1.0}, "group_effect"),
        ({"n_samples": 0}, "n_samples"),
        ({"sample_effect": -1.0}, "sample_effect"),
    ],
)
def test_simulate_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sfact.datasets.simulate(**kwargs)
