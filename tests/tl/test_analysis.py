"""``sfact.tl`` analysis: Moran's I order, compute/write, deviance, reconstruction error, group loadings, enrichment."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sfact
from sfact.models import SpatialFactorization
from sfact.tl._analyze import compute_analysis, order_by_moran, write_analysis
from sfact.tl._groups import enrichment_log2fc, refit_loadings

N_FACTORS = 4


@pytest.fixture(scope="module")
def osmfish_fit(osmfish_pnmf_fit):
    """osmFISH fitted once with pnmf (with its cell types as groups); (adata copy, model dir)."""
    adata, model_dir = osmfish_pnmf_fit
    return adata.copy(), model_dir


def _dense(adata):
    X = adata.X
    return (X.toarray() if sp.issparse(X) else np.asarray(X)).astype(np.float64)


def _size_factors(adata):
    totals = _dense(adata).sum(1)
    return totals / adata.uns["sfact"]["params"]["size_factor_reference"]


def _expected(adata, key="sfact"):
    F = adata.obsm[f"X_{key}"].astype(np.float64)
    S = adata.obsm[f"X_{key}_scales"].astype(np.float64)
    return F * np.exp(0.5 * S**2)


# ---------------------------------------------------------------------------- reorder
def _unordered_model(adata):
    """A trained pnmf model whose factors are not in Moran's I order (as ``model.train`` leaves them)."""
    model = SpatialFactorization(adata, prior="pnmf", n_factors=N_FACTORS, random_state=3)
    model.train(max_iter=15, progress_bar=False)
    return model


def test_analyze_leaves_the_model_untouched(osmfish_fit):
    adata, _ = osmfish_fit
    adata = adata.copy()
    model = _unordered_model(adata)
    W, F, S = model.get_loadings(), model.get_factors(), model.get_scales()
    sfact.tl.analyze(adata, model, key_added="re")
    np.testing.assert_array_equal(model.get_loadings(), W)
    np.testing.assert_array_equal(model.get_factors(), F)
    np.testing.assert_array_equal(model.get_scales(), S)
    # the results are in the model's factor order, whatever their Moran's I
    np.testing.assert_allclose(adata.obsm["X_re"], F, rtol=1e-5)
    np.testing.assert_allclose(adata.obsm["X_re_scales"], S, rtol=1e-5)
    np.testing.assert_allclose(adata.varm["re_loadings"], W, rtol=1e-5)
    moran = adata.uns["re"]["moranI"]
    assert list(moran.index) == [f"factor_{i}" for i in range(N_FACTORS)]
    again = sfact.tl.morans_i(adata.obsm["X_re"], adata.obsm["spatial"])
    np.testing.assert_allclose(again["I"].to_numpy(), moran["I"].to_numpy(), rtol=1e-4)
    assert not np.all(np.diff(moran["I"].to_numpy()) <= 1e-12)  # this seed is not in order


def test_order_by_moran_keeps_factors_loadings_scales_aligned(osmfish_fit):
    adata, _ = osmfish_fit
    adata = adata.copy()
    model = _unordered_model(adata)
    mu, var = model.get_log_factors()
    before = np.exp(mu + 0.5 * var) @ model.get_loadings().T
    W_before = model.get_loadings()
    ordered = order_by_moran(model, adata)
    assert sorted(ordered.order.tolist()) == list(range(N_FACTORS))
    assert not np.array_equal(ordered.order, np.arange(N_FACTORS))
    np.testing.assert_array_equal(model.get_loadings(), W_before[:, ordered.order])
    np.testing.assert_array_equal(ordered.mu, mu[:, ordered.order])
    assert np.all(np.diff(ordered.moran["I"].to_numpy()) <= 1e-12)
    assert list(ordered.moran.index) == [f"factor_{i}" for i in range(N_FACTORS)]
    sfact.tl.analyze(adata, model, key_added="re")
    moran = adata.uns["re"]["moranI"]
    assert np.all(np.diff(moran["I"].to_numpy()) <= 1e-12)
    np.testing.assert_allclose(moran["I"].to_numpy(), ordered.moran["I"].to_numpy(), rtol=1e-6)
    # the written slots reconstruct the same rates as the unordered model
    after = _expected(adata, "re") @ adata.varm["re_loadings"].astype(np.float64).T
    np.testing.assert_allclose(after, before, rtol=2e-4, atol=1e-6)
    # and the model was permuted the same way
    np.testing.assert_allclose(model.get_factors(), adata.obsm["X_re"], rtol=1e-5)
    np.testing.assert_allclose(model.get_scales(), adata.obsm["X_re_scales"], rtol=1e-5)
    np.testing.assert_allclose(model.get_loadings(), adata.varm["re_loadings"], rtol=1e-5)
    # Moran's I of the written factors agrees with the table (same order)
    again = sfact.tl.morans_i(adata.obsm["X_re"], adata.obsm["spatial"])
    np.testing.assert_allclose(again["I"].to_numpy(), moran["I"].to_numpy(), rtol=1e-4)
    # ordering again is a no-op
    W = model.get_loadings()
    assert np.array_equal(order_by_moran(model, adata).order, np.arange(N_FACTORS))
    np.testing.assert_array_equal(model.get_loadings(), W)


def test_fit_orders_the_model_by_moran(osmfish_fit):
    """``tl.fit`` orders once, where the fit is made: the saved model is in the written order."""
    adata, model_dir = osmfish_fit
    moran = adata.uns["sfact"]["moranI"]
    assert np.all(np.diff(moran["I"].to_numpy()) <= 1e-12)
    model = SpatialFactorization.load(model_dir, adata)
    np.testing.assert_allclose(model.get_loadings(), adata.varm["sfact_loadings"], rtol=1e-5)
    assert np.array_equal(order_by_moran(model, adata).order, np.arange(N_FACTORS))


# ---------------------------------------------------------------------------- compute / write
def test_compute_then_write(osmfish_fit):
    adata, model_dir = osmfish_fit
    target = adata.copy()
    model = SpatialFactorization.load(model_dir, target)  # its training cells: no refit of pnmf's factors
    W = model.get_loadings()
    snapshot = target.copy()
    result = compute_analysis(target, model)
    # computing changes neither the model nor the AnnData
    np.testing.assert_array_equal(model.get_loadings(), W)
    _assert_same_adata(target, snapshot)
    write_analysis(target, result)
    # what is written is the result, and equals what tl.fit wrote for the same model
    np.testing.assert_array_equal(target.obsm["X_sfact"], result.factors)
    np.testing.assert_array_equal(target.varm["sfact_loadings"], result.loadings)
    np.testing.assert_allclose(target.obsm["X_sfact"], adata.obsm["X_sfact"], rtol=1e-5)
    pd.testing.assert_frame_equal(target.uns["sfact"]["moranI"], result.moran)
    assert target.uns["sfact"]["metrics"] == pytest.approx(result.metrics)
    # writing the same result again gives the same AnnData
    once = target.copy()
    write_analysis(target, result)
    _assert_same_adata(target, once)
    # the result is not tied to the AnnData it was written to
    target.obsm["X_sfact"][0, 0] = -1.0
    assert result.factors[0, 0] != -1.0


def _assert_same_adata(a, b):
    assert set(a.obsm) == set(b.obsm) and set(a.varm) == set(b.varm) and set(a.uns) == set(b.uns)
    for k in a.obsm:
        np.testing.assert_array_equal(np.asarray(a.obsm[k]), np.asarray(b.obsm[k]))
    for k in a.varm:
        np.testing.assert_array_equal(np.asarray(a.varm[k]), np.asarray(b.varm[k]))
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    _assert_same_tree(dict(a.uns), dict(b.uns))


def _assert_same_tree(x, y):
    if isinstance(x, dict):
        assert isinstance(y, dict) and set(x) == set(y)
        for k in x:
            _assert_same_tree(x[k], y[k])
    elif isinstance(x, pd.DataFrame):
        pd.testing.assert_frame_equal(x, y)
    elif isinstance(x, np.ndarray):
        np.testing.assert_array_equal(x, y)
    elif isinstance(x, float) and np.isnan(x):
        assert np.isnan(y)
    else:
        assert x == y


# ---------------------------------------------------------------------------- deviance, error
def test_deviance_matches_numpy(osmfish_fit):
    adata, _ = osmfish_fit
    Y = _dense(adata)
    lam = _size_factors(adata)[:, None] * (
        _expected(adata) @ adata.varm["sfact_loadings"].astype(np.float64).T
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        ylogy = np.where(Y > 0, Y * np.log(Y / lam), 0.0)
    dense = 2 * (ylogy - (Y - lam))
    # float32 storage of factors/loadings: agreement to ~1e-5 relative
    np.testing.assert_allclose(adata.obs["sfact_deviance"], dense.sum(1), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(adata.var["sfact_deviance"], dense.sum(0), rtol=1e-3)
    metrics = adata.uns["sfact"]["metrics"]
    assert metrics["deviance"] == pytest.approx(dense.sum(), rel=1e-4)
    assert metrics["deviance_per_entry"] == pytest.approx(dense.sum() / Y.size, rel=1e-4)
    err = np.linalg.norm(Y - lam) / np.linalg.norm(Y)
    assert metrics["reconstruction_error"] == pytest.approx(err, rel=1e-4)


def test_reconstruction_error_sparse_equals_dense():
    rng = np.random.default_rng(0)
    Y = sp.random(57, 23, density=0.3, random_state=1, format="csr") * 5
    Y.data = np.round(Y.data)
    E = rng.gamma(1.0, 1.0, (57, 3))
    W = rng.gamma(1.0, 1.0, (23, 3))
    s = rng.uniform(0.5, 2.0, 57)
    dense = np.linalg.norm(Y.toarray() - s[:, None] * (E @ W.T)) / np.linalg.norm(Y.toarray())
    got = sfact.tl._analysis.reconstruction_error(Y, E, W, s, batch_size=10)
    assert got == pytest.approx(dense, rel=1e-10)


# ---------------------------------------------------------------------------- group loadings
def test_one_group_loadings_equal_global(osmfish_fit):
    adata, _ = osmfish_fit
    adata = adata.copy()
    adata.obs["everything"] = pd.Categorical(["all"] * adata.n_obs)
    sfact.tl.group_loadings(adata, group_key="everything")
    W = adata.varm["sfact_loadings"].astype(np.float64)
    Wg = adata.varm["sfact_loadings_all"].astype(np.float64)
    # the fit ran 30 iterations only, so its loadings are nearly (not exactly) a fixed point
    assert np.abs(Wg - W).max() <= 0.01 * W.max()
    info = adata.uns["sfact"]["group_loadings"]
    assert list(info["groups"]) == ["all"] and list(info["n_cells"]) == [adata.n_obs]
    # with converged global loadings, the one group's loadings equal them
    mu = np.log(adata.obsm["X_sfact"].astype(np.float64))
    var = adata.obsm["X_sfact_scales"].astype(np.float64) ** 2
    W_star, _ = refit_loadings(adata.X, mu, var, _size_factors(adata), W, max_iter=1500, tol=1e-10)
    adata.varm["sfact_loadings"] = W_star
    sfact.tl.group_loadings(adata, group_key="everything", max_iter=200, tol=1e-9)
    np.testing.assert_allclose(adata.varm["sfact_loadings_all"], W_star, rtol=2e-3, atol=5e-5 * W_star.max())


def test_refit_is_a_fixed_point_of_exact_loadings():
    """Loadings that maximize the bound for fixed factors are returned unchanged."""
    rng = np.random.default_rng(1)
    mu = rng.normal(0, 0.5, (200, 3))
    var = np.full_like(mu, 0.01)
    s = rng.uniform(0.5, 2, 200)
    W_true = rng.gamma(1.0, 1.0, (15, 3))
    Y = sp.csr_matrix(rng.poisson(s[:, None] * (np.exp(mu + var / 2) @ W_true.T)))
    W_star, _ = refit_loadings(Y, mu, var, s, W_true, max_iter=3000, tol=1e-12, batch_size=64)
    W_again, n_iter = refit_loadings(Y, mu, var, s, W_star, max_iter=50, tol=1e-6, batch_size=37)
    np.testing.assert_allclose(W_again, W_star, rtol=1e-5, atol=1e-8)
    assert n_iter < 50
    # with a prior centred on the maximizer, it stays the fixed point
    W_map, _ = refit_loadings(Y, mu, var, s, W_star, max_iter=50, tol=1e-6, prior_strength=5.0)
    np.testing.assert_allclose(W_map, W_star, rtol=1e-5, atol=1e-8)
    # the prior pulls loadings the data barely determine towards its mode
    W_far = W_star * 3.0
    W_pulled, _ = refit_loadings(
        Y[:5], mu[:5], var[:5], s[:5], W_far, max_iter=500, tol=1e-9, prior_strength=50.0
    )
    W_free, _ = refit_loadings(Y[:5], mu[:5], var[:5], s[:5], W_far, max_iter=500, tol=1e-9)
    assert np.abs(np.log(W_pulled / W_far)).mean() < np.abs(np.log(np.maximum(W_free, 1e-8) / W_far)).mean()
    # batching does not change the result
    W_b1, _ = refit_loadings(Y, mu, var, s, W_true, max_iter=5, tol=0, batch_size=1000)
    W_b2, _ = refit_loadings(Y, mu, var, s, W_true, max_iter=5, tol=0, batch_size=7)
    np.testing.assert_allclose(W_b1, W_b2, rtol=1e-10)


def test_enrichment_zero_when_group_equals_global(osmfish_fit):
    W = np.random.default_rng(0).gamma(1.0, 1.0, (10, 4))
    np.testing.assert_array_equal(enrichment_log2fc(W[None], W), 0.0)
    # AnnData level: group loadings set to the global ones give zero enrichment
    adata, _ = osmfish_fit
    adata = adata.copy()
    sfact.tl.group_loadings(adata, group_key="Region")
    for k in adata.uns["sfact"]["group_loadings"]["varm_keys"]:
        adata.varm[str(k)] = adata.varm["sfact_loadings"].copy()
    sfact.tl.gene_enrichment(adata)
    lfc = adata.uns["sfact"]["enrichment"]["log2fc"]
    finite = lfc[np.isfinite(lfc)]
    assert finite.size > 0
    np.testing.assert_allclose(finite, 0.0, atol=1e-6)
    assert adata.uns["sfact"]["enrichment"]["top_genes"].empty  # nothing is enriched


def test_fit_with_groups_writes_group_loadings_and_enrichment(osmfish_fit, tmp_path):
    adata, _ = osmfish_fit
    groups = list(adata.obs["ClusterName"].cat.categories)
    info = adata.uns["sfact"]["group_loadings"]
    assert list(info["groups"]) == groups
    for g in groups:
        W = adata.varm[f"sfact_loadings_{g}"]
        assert W.shape == (adata.n_vars, N_FACTORS) and (W >= 0).all()
    enr = adata.uns["sfact"]["enrichment"]
    assert enr["log2fc"].shape == (len(groups), adata.n_vars, N_FACTORS)
    assert list(enr["groups"]) == groups
    top = enr["top_genes"]
    assert list(top.columns) == ["group", "factor", "rank", "gene", "log2fc"]
    assert (top["log2fc"] > 0).all() and top.groupby(["group", "factor"]).size().max() <= 10
    # h5ad round trip
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(back.uns["sfact"]["enrichment"]["log2fc"], enr["log2fc"])
    pd.testing.assert_frame_equal(back.uns["sfact"]["enrichment"]["top_genes"], top, check_dtype=False)
    assert list(back.uns["sfact"]["group_loadings"]["groups"]) == groups


def test_post_hoc_groups_for_a_fit_without_groups(osmfish_fit):
    adata, model_dir = osmfish_fit
    adata = adata.copy()
    model = SpatialFactorization.load(model_dir, adata)
    sfact.tl.analyze(adata, model, key_added="ph", group_key="Region")
    regions = sorted(adata.obs["Region"].astype(str).unique())
    done = list(adata.uns["ph"]["group_loadings"]["groups"])
    assert set(done) <= set(regions) and len(done) >= 2
    assert adata.uns["ph"]["enrichment"]["group_key"] == "Region"
    # analysing again without groups removes the stale per-group slots
    sfact.tl.analyze(adata, model, key_added="ph", group_key=False)
    assert not any(k.startswith("ph_loadings_") for k in adata.varm)
    assert "enrichment" not in adata.uns["ph"]


def test_errors_before_fit_and_for_bad_groups(osmfish_fit):
    raw = sfact.datasets.osmfish()
    with pytest.raises(KeyError, match=r"sfact\.tl\.fit"):
        sfact.tl.group_loadings(raw, group_key="ClusterName")
    with pytest.raises(KeyError, match=r"sfact\.tl\.fit"):
        sfact.tl.gene_enrichment(raw, group_key="ClusterName")
    adata, _ = osmfish_fit
    with pytest.raises(KeyError, match="no_such_column"):
        sfact.tl.group_loadings(adata.copy(), group_key="no_such_column")
    with pytest.raises(ValueError, match="Unknown groups"):
        sfact.tl.group_loadings(adata.copy(), group_key="ClusterName", groups=["nope"])
