"""``sfact.tl.fit``: what it writes, that it survives h5ad, and that bad input leaves adata alone."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import sfact
from sfact._utils import SfactWarning
from sfact.models import SpatialFactorization

N_OBS, N_VARS, N_FACTORS = 300, 30, 3
FIT_KWARGS = {"prior": "pnmf", "n_factors": N_FACTORS, "max_iter": 25}
UNS_KEYS = {"params", "history", "moranI", "metrics", "factor_names", "keys"}


def _synthetic(
    n_obs: int = N_OBS, n_vars: int = N_VARS, n_factors: int = N_FACTORS, seed: int = 0
) -> ad.AnnData:
    """Poisson counts from a few smooth bumps over random 2-D coordinates."""
    rng = np.random.default_rng(seed)
    coords = rng.uniform(0, 10, (n_obs, 2))
    centers = rng.uniform(0, 10, (n_factors, 2))
    F = 3 * np.exp(-((coords[:, None, :] - centers[None]) ** 2).sum(-1) / 8) + 0.1
    W = rng.gamma(0.5, 2.0, (n_vars, n_factors))
    Y = rng.poisson(F @ W.T).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(Y), obsm={"spatial": coords})
    adata.obs_names = [f"cell{i}" for i in range(n_obs)]
    adata.var_names = [f"gene{j}" for j in range(n_vars)]
    adata.obs["group"] = pd.Categorical(rng.choice(["a", "b"], n_obs))
    adata.uns["note"] = "kept"
    return adata


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[ad.AnnData, ad.AnnData, object]:
    """(input copy, fitted AnnData, saved model dir) of one fit shared by the read-only tests."""
    adata = _synthetic()
    original = adata.copy()
    model_dir = tmp_path_factory.mktemp("fit") / "model"
    sfact.tl.fit(adata, **FIT_KWARGS, save_model=model_dir)
    return original, adata, model_dir


def _snapshot(adata: ad.AnnData) -> dict:
    X = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X, copy=True)
    return {
        "X": X,
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "obsm": {k: np.array(v, copy=True) for k, v in adata.obsm.items()},
        "varm": set(adata.varm.keys()),
        "layers": set(adata.layers.keys()),
        "uns": set(adata.uns.keys()),
        "shape": adata.shape,
    }


def _assert_unchanged(adata: ad.AnnData, snap: dict) -> None:
    after = _snapshot(adata)
    assert after["shape"] == snap["shape"]
    np.testing.assert_array_equal(after["X"], snap["X"])
    pd.testing.assert_frame_equal(after["obs"], snap["obs"])
    pd.testing.assert_frame_equal(after["var"], snap["var"])
    assert after["obsm"].keys() == snap["obsm"].keys()
    for k, v in snap["obsm"].items():
        np.testing.assert_array_equal(after["obsm"][k], v)
    assert after["varm"] == snap["varm"]
    assert after["layers"] == snap["layers"]
    assert after["uns"] == snap["uns"]


# ---------------------------------------------------------------------------- what fit writes
def test_fit_writes_all_slots(fitted):
    _, adata, _ = fitted
    factors = adata.obsm["X_sfact"]
    scales = adata.obsm["X_sfact_scales"]
    loadings = adata.varm["sfact_loadings"]
    assert factors.shape == scales.shape == (N_OBS, N_FACTORS)
    assert loadings.shape == (N_VARS, N_FACTORS)
    for arr in (factors, scales, loadings):
        assert np.isfinite(arr).all()
    assert (factors > 0).all() and (scales > 0).all() and (loadings >= 0).all()
    assert np.isfinite(adata.obs["sfact_deviance"]).all()
    assert np.isfinite(adata.var["sfact_deviance"]).all()

    uns = adata.uns["sfact"]
    assert UNS_KEYS <= set(uns)
    assert list(uns["factor_names"]) == [f"factor_{i}" for i in range(N_FACTORS)]
    assert dict(uns["keys"]) == {
        "factors": "X_sfact",
        "scales": "X_sfact_scales",
        "loadings": "sfact_loadings",
        "uns": "sfact",
    }
    params = uns["params"]
    assert params["prior"] == "pnmf"
    assert params["n_factors"] == N_FACTORS
    assert params["random_state"] == 0
    assert params["max_iter"] == FIT_KWARGS["max_iter"]
    assert params["device"] == "cpu"
    assert params["version"] == sfact.__version__
    for v in params.values():  # plain values only (STYLE 4)
        assert isinstance(v, str | int | float | bool | np.ndarray | dict), (v, type(v))
    history = uns["history"]
    assert len(history["elbo"]) == FIT_KWARGS["max_iter"] == uns["metrics"]["n_iter"]
    assert np.isfinite(history["elbo"]).all()
    assert uns["metrics"]["elbo_per_entry"] == pytest.approx(history["elbo"][-1])
    assert 0 < uns["metrics"]["reconstruction_error"] < 1


def test_fit_keeps_input_slots(fitted):
    original, adata, _ = fitted
    np.testing.assert_array_equal(adata.X.toarray(), original.X.toarray())
    np.testing.assert_array_equal(adata.obsm["spatial"], original.obsm["spatial"])
    assert adata.uns["note"] == "kept"
    assert list(adata.obs_names) == list(original.obs_names)


def test_moran_table_orders_factors(fitted):
    _, adata, _ = fitted
    moran = adata.uns["sfact"]["moranI"]
    assert isinstance(moran, pd.DataFrame)
    assert list(moran.columns) == ["I", "pval_norm", "var_norm", "pval_norm_fdr_bh"]
    assert list(moran.index) == [f"factor_{i}" for i in range(N_FACTORS)]
    assert np.all(np.diff(moran["I"].to_numpy()) <= 1e-12)
    # the synthetic factors are smooth bumps: strongly autocorrelated
    assert (moran["I"] > 0.3).all()
    # the table agrees with Moran's I of the factors as written
    again = sfact.tl.morans_i(adata.obsm["X_sfact"], adata.obsm["spatial"])
    np.testing.assert_allclose(again["I"].to_numpy(), moran["I"].to_numpy(), rtol=1e-4)


def test_saved_model_matches_written_results(fitted):
    """The saved model is the reordered one: its factors/loadings are those in adata."""
    _, adata, model_dir = fitted
    model = SpatialFactorization.load(model_dir, adata)
    np.testing.assert_allclose(model.get_factors(), adata.obsm["X_sfact"], rtol=1e-5)
    np.testing.assert_allclose(model.get_scales(), adata.obsm["X_sfact_scales"], rtol=1e-5)
    np.testing.assert_allclose(model.get_loadings(), adata.varm["sfact_loadings"], rtol=1e-5)


def test_deviance_matches_dense_computation(fitted):
    _, adata, model_dir = fitted
    metrics = adata.uns["sfact"]["metrics"]
    dev_cell = adata.obs["sfact_deviance"].to_numpy()
    dev_gene = adata.var["sfact_deviance"].to_numpy()
    assert dev_cell.sum() == pytest.approx(metrics["deviance"], rel=1e-9)
    assert dev_gene.sum() == pytest.approx(metrics["deviance"], rel=1e-6)
    assert metrics["deviance_per_entry"] == pytest.approx(metrics["deviance"] / (N_OBS * N_VARS))

    model = SpatialFactorization.load(model_dir, adata)
    mu, var = model.get_log_factors()
    Y = adata.X.toarray().astype(np.float64)
    totals = Y.sum(1)
    s = totals / np.median(totals[totals > 0])  # default size factors: "total"
    lam = s[:, None] * (np.exp(mu + 0.5 * var) @ model.get_loadings().T)
    with np.errstate(divide="ignore", invalid="ignore"):
        ylogy = np.where(Y > 0, Y * np.log(Y / lam), 0.0)
    dense = 2 * (ylogy - (Y - lam))
    np.testing.assert_allclose(dev_cell, dense.sum(1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(dev_gene, dense.sum(0), rtol=1e-4, atol=1e-6)
    assert (dev_cell >= -1e-6).all()


def test_h5ad_round_trip(fitted, tmp_path):
    _, adata, _ = fitted
    path = tmp_path / "fitted.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    uns, uns_back = adata.uns["sfact"], back.uns["sfact"]
    assert UNS_KEYS <= set(uns_back)
    assert isinstance(uns_back["moranI"], pd.DataFrame)
    pd.testing.assert_frame_equal(uns_back["moranI"], uns["moranI"], check_dtype=False)
    assert set(uns_back["params"]) == set(uns["params"])
    for k, v in uns["params"].items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(uns_back["params"][k], v)
        else:
            assert uns_back["params"][k] == v, k
    for k, v in uns["history"].items():
        np.testing.assert_allclose(uns_back["history"][k], v)
    for k, v in uns["metrics"].items():
        assert uns_back["metrics"][k] == pytest.approx(v), k
    np.testing.assert_array_equal(back.obsm["X_sfact"], adata.obsm["X_sfact"])
    np.testing.assert_array_equal(back.varm["sfact_loadings"], adata.varm["sfact_loadings"])


def test_key_added_derives_every_slot():
    adata = _synthetic()
    sfact.tl.fit(adata, **FIT_KWARGS, key_added="foo")
    assert {"X_foo", "X_foo_scales"} <= set(adata.obsm)
    assert "foo_loadings" in adata.varm
    assert "foo_deviance" in adata.obs and "foo_deviance" in adata.var
    assert "foo" in adata.uns and UNS_KEYS <= set(adata.uns["foo"])
    assert adata.uns["foo"]["keys"]["factors"] == "X_foo"
    everything = [*adata.obsm, *adata.varm, *adata.obs, *adata.var, *adata.uns]
    assert not any("sfact" in k for k in everything), everything


def test_copy_leaves_input_unchanged():
    adata = _synthetic()
    snap = _snapshot(adata)
    out = sfact.tl.fit(adata, **FIT_KWARGS, copy=True)
    _assert_unchanged(adata, snap)
    assert isinstance(out, ad.AnnData) and out is not adata
    assert out.obsm["X_sfact"].shape == (N_OBS, N_FACTORS)
    assert sfact.tl.fit(adata.copy(), **FIT_KWARGS) is None


def test_reorder_keeps_reconstruction():
    adata = _synthetic()
    model = SpatialFactorization(adata, prior="pnmf", n_factors=N_FACTORS)
    model.train(max_iter=10, init_iter=20)

    def reconstruction():
        mu, var = model.get_log_factors()
        return np.exp(mu + 0.5 * var) @ model.get_loadings().T

    before = reconstruction()
    model.reorder_factors(np.array([1, 2, 0]))
    np.testing.assert_allclose(reconstruction(), before, rtol=1e-6)


def test_fit_reproducible():
    a, b, c = _synthetic(), _synthetic(), _synthetic()
    sfact.tl.fit(a, **FIT_KWARGS, random_state=1)
    sfact.tl.fit(b, **FIT_KWARGS, random_state=1)
    sfact.tl.fit(c, **FIT_KWARGS, random_state=2)
    np.testing.assert_array_equal(a.obsm["X_sfact"], b.obsm["X_sfact"])
    assert not np.allclose(a.obsm["X_sfact"], c.obsm["X_sfact"])


def test_size_factors_total_fit():
    adata = _synthetic()
    sfact.tl.fit(adata, **FIT_KWARGS, size_factors="total")
    assert adata.uns["sfact"]["params"]["size_factors"] == "total"
    assert np.isfinite(adata.obs["sfact_deviance"]).all()


# ---------------------------------------------------------------------------- bad input
def _with_negative(a):
    a.X = a.X.toarray()
    a.X[0, 0] = -1
    return a


def _with_nan_counts(a):
    a.X = a.X.toarray()
    a.X[3, 2] = np.nan
    return a


def _with_nan_coords(a):
    a.obsm["spatial"][5, 1] = np.nan
    return a


def _without_spatial(a):
    del a.obsm["spatial"]
    return a


@pytest.mark.parametrize(
    ("make_bad", "kwargs", "error", "match"),
    [
        pytest.param(_with_negative, {}, ValueError, "negative", id="negative-counts"),
        pytest.param(_with_nan_counts, {}, ValueError, "NaN", id="nan-counts"),
        pytest.param(_with_nan_coords, {}, ValueError, "NaN", id="nan-coords"),
        pytest.param(_without_spatial, {}, KeyError, "spatial", id="no-spatial"),
        pytest.param(None, {"group_key": "no_such_column"}, KeyError, "no_such_column", id="group-key"),
        pytest.param(None, {"n_factors": N_VARS + 1}, ValueError, "n_factors", id="too-many-factors"),
        pytest.param(None, {"prior": "magic"}, ValueError, "magic", id="unknown-prior"),
        pytest.param(None, {"elbo_mode": "exact"}, ValueError, "elbo_mode", id="elbo-mode"),
        pytest.param(None, {"loadings_mode": "nnls"}, ValueError, "loadings_mode", id="loadings-mode"),
        pytest.param(None, {"layer": "counts"}, KeyError, "counts", id="missing-layer"),
        pytest.param(None, {"device": "bogus"}, ValueError, "device", id="bogus-device"),
    ],
)
def test_bad_input_raises_and_leaves_adata_unchanged(make_bad, kwargs, error, match):
    adata = _synthetic()
    if make_bad is not None:
        adata = make_bad(adata)
    snap = _snapshot(adata)
    with pytest.raises(error, match=match):
        sfact.tl.fit(adata, **{**FIT_KWARGS, **kwargs})
    _assert_unchanged(adata, snap)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_cuda_without_cuda_raises():
    adata = _synthetic()
    snap = _snapshot(adata)
    with pytest.raises(RuntimeError, match="CUDA"):
        sfact.tl.fit(adata, **FIT_KWARGS, device="cuda")
    _assert_unchanged(adata, snap)


def test_view_warns_and_fits():
    parent = _synthetic()
    snap = _snapshot(parent)
    view = parent[:200]
    assert view.is_view
    with pytest.warns(SfactWarning, match="view"):
        sfact.tl.fit(view, **FIT_KWARGS)
    assert not view.is_view
    assert view.obsm["X_sfact"].shape == (200, N_FACTORS)
    _assert_unchanged(parent, snap)


def test_non_integer_counts_warn():
    adata = _synthetic()
    adata.X = adata.X * 1.5
    with pytest.warns(SfactWarning, match="integer"):
        sfact.tl.fit(adata, **FIT_KWARGS)
    assert np.isfinite(adata.obsm["X_sfact"]).all()


def test_batch_size_larger_than_n_obs_is_clamped():
    adata = _synthetic()
    sfact.tl.fit(adata, **FIT_KWARGS, batch_size=10 * N_OBS)
    assert adata.uns["sfact"]["params"]["batch_size"] == N_OBS
    assert adata.obsm["X_sfact"].shape == (N_OBS, N_FACTORS)


def test_nan_during_training_writes_nothing(monkeypatch):
    """A training failure raises TrainingError and leaves adata untouched (nothing half-written)."""
    adata = _synthetic()
    snap = _snapshot(adata)
    original_train = SpatialFactorization.train

    def poisoned_train(self, *args, **kwargs):
        def poison(iteration, elbo):
            if iteration == 2:
                with torch.no_grad():
                    mu = dict(self.module.named_parameters())["prior.mu"]
                    mu[0, 0] = float("nan")

        return original_train(self, *args, **{**kwargs, "callback": poison})

    monkeypatch.setattr(SpatialFactorization, "train", poisoned_train)
    with pytest.raises(sfact.models.TrainingError, match="iteration 3"):
        sfact.tl.fit(adata, **FIT_KWARGS)
    _assert_unchanged(adata, snap)


def test_layer_counts():
    adata = _synthetic()
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))  # normalized data in X must not be used
    sfact.tl.fit(adata, **FIT_KWARGS, layer="counts")
    assert adata.uns["sfact"]["params"]["layer"] == "counts"
    reference = _synthetic()
    sfact.tl.fit(reference, **FIT_KWARGS)
    np.testing.assert_allclose(adata.obsm["X_sfact"], reference.obsm["X_sfact"], rtol=1e-5)
