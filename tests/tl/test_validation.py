"""The baseline guard of ``sfact.tl.fit`` (``validation_fraction``) and ``sfact.tl.knn_deviance``."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sfact
from sfact._utils import SfactWarning
from sfact.models import SpatialFactorization
from sfact.tl._analyze import order_by_moran

GUARD = "does not beat the baseline"


def _smooth(n_obs: int = 1200, seed: int = 0) -> ad.AnnData:
    """Counts from 3 smooth factors (lengthscale 25 in the 100-unit box), one group, prepared."""
    adata = sfact.datasets.simulate(n_obs, 60, 3, n_groups=1, lengthscale=25.0, random_state=seed)
    sfact.pp.prepare(adata)
    return adata


@pytest.fixture(scope="module")
def smooth() -> ad.AnnData:
    return _smooth()


def _fixed(lengthscale: float, **kw) -> dict:
    """GP options with the kernel hyperparameters held fixed (the case is about this lengthscale)."""
    return {"lengthscale": lengthscale, "train_lengthscale": False, "train_sigma": False, **kw}


# ---------------------------------------------------------------------------- knn_deviance
def _knn_reference(Ytr, Xtr, Yte, Xte, k, shrink):
    """Dense numpy: brute-force neighbours among training cells with counts, then the deviance."""
    tot_tr = Ytr.sum(1)
    keep = tot_tr > 0
    comp = Ytr[keep] / tot_tr[keep, None]
    share = Ytr.sum(0) / Ytr.sum()
    d = ((Xte[:, None, :] - Xtr[keep][None, :, :]) ** 2).sum(-1)
    nn = np.argsort(d, axis=1)[:, : min(k, keep.sum())]
    q = np.maximum((1 - shrink) * comp[nn].mean(1) + shrink * share, 1e-12)
    lam = q * Yte.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(Yte > 0, Yte * np.log(Yte / lam), 0.0)
    return 2 * (t - (Yte - lam)).sum() / Yte.size


def _tiny_split(seed: int = 0):
    rng = np.random.default_rng(seed)
    Ytr = rng.poisson(1.5, (30, 7)).astype(float)
    Ytr[3] = 0  # a training cell without counts (left out)
    Ytr[:, 5] = 0  # a gene absent from training
    Yte = rng.poisson(1.5, (8, 7)).astype(float)
    Yte[2] = 0  # a held-out cell without counts
    Xtr, Xte = rng.uniform(0, 10, (30, 2)), rng.uniform(0, 10, (8, 2))
    train = ad.AnnData(sp.csr_matrix(Ytr), obsm={"spatial": Xtr})
    test = ad.AnnData(Yte.copy(), obsm={"spatial": Xte})  # dense counts work too
    return train, test, (Ytr, Xtr, Yte, Xte)


@pytest.mark.parametrize(("k", "shrink"), [(1, 0.01), (3, 0.01), (5, 0.0), (50, 0.2)])
def test_knn_deviance_matches_dense_reference(k, shrink):
    train, test, arrays = _tiny_split()
    got = sfact.tl.knn_deviance(train, test, n_neighbors=k, shrink=shrink)
    np.testing.assert_allclose(got, _knn_reference(*arrays, k, shrink), rtol=1e-10)


def test_knn_deviance_with_shrink_one_is_the_baseline():
    train, test, _ = _tiny_split(1)
    np.testing.assert_allclose(
        sfact.tl.knn_deviance(train, test, n_neighbors=4, shrink=1.0),
        sfact.tl.baseline_deviance(train.X, test.X),
        rtol=1e-10,
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"n_neighbors": 0}, "n_neighbors"), ({"n_neighbors": 2.5}, "n_neighbors"), ({"shrink": 1.5}, "shrink")],
)
def test_knn_deviance_bad_arguments(kwargs, match):
    train, test, _ = _tiny_split()
    with pytest.raises(ValueError, match=match):
        sfact.tl.knn_deviance(train, test, **kwargs)
    with pytest.raises(ValueError, match="same genes"):
        sfact.tl.knn_deviance(train, test[:, ::-1])


# ---------------------------------------------------------------------------- bad input
def _state(adata: ad.AnnData) -> dict:
    return {
        "X": adata.X.toarray().copy(),
        "obs": adata.obs.copy(),
        "obsm": set(adata.obsm.keys()),
        "varm": set(adata.varm.keys()),
        "uns": set(adata.uns.keys()),
    }


@pytest.mark.parametrize("bad", [-0.1, 0.5, 0.9, 1, float("nan"), float("inf"), "0.1", True])
def test_bad_validation_fraction_raises_before_fitting(smooth, monkeypatch, bad):
    adata = smooth.copy()
    before = _state(adata)

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(SpatialFactorization, "train", no_training)
    with pytest.raises(ValueError, match="validation_fraction"):
        sfact.tl.fit(adata, prior="pnmf", n_factors=3, validation_fraction=bad)
    after = _state(adata)
    np.testing.assert_array_equal(after["X"], before["X"])
    pd.testing.assert_frame_equal(after["obs"], before["obs"])
    assert {k: after[k] for k in ("obsm", "varm", "uns")} == {k: before[k] for k in ("obsm", "varm", "uns")}


def test_too_small_a_fraction_for_the_cells_raises(smooth, monkeypatch):
    adata = smooth[:100].copy()
    monkeypatch.setattr(SpatialFactorization, "train", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ValueError, match=r"validation_fraction=0\.001.*no validation cell"):
        sfact.tl.fit(adata, prior="pnmf", n_factors=3, validation_fraction=0.001)
    assert "sfact" not in adata.uns


# ---------------------------------------------------------------------------- off: today's fit
def test_validation_fraction_zero_is_the_fit_on_all_cells(smooth):
    """``validation_fraction=0`` trains on every cell, exactly as ``tl.fit`` did without the guard."""
    kw = {"prior": "pnmf", "n_factors": 3, "random_state": 2}
    adata = smooth.copy()
    sfact.tl.fit(adata, **kw, max_iter=20, validation_fraction=0)
    model = SpatialFactorization(smooth.copy(), **kw)
    model.train(max_iter=20, progress_bar=False)
    order_by_moran(model)
    np.testing.assert_array_equal(adata.obsm["X_sfact"], model.get_factors().astype(np.float32))
    np.testing.assert_array_equal(adata.varm["sfact_loadings"], model.get_loadings().astype(np.float32))
    assert "sfact_validation" not in adata.obs
    assert not any(k.startswith("validation") for k in adata.uns["sfact"]["metrics"])


def test_default_is_on_from_1000_cells_and_off_below(smooth):
    small = smooth[:999].copy()
    sfact.tl.fit(small, prior="pnmf", n_factors=3, max_iter=5)
    assert "sfact_validation" not in small.obs
    assert "validation_deviance" not in small.uns["sfact"]["metrics"]
    big = smooth.copy()
    sfact.tl.fit(big, prior="pnmf", n_factors=3, max_iter=5)
    m = big.uns["sfact"]["metrics"]
    assert m["validation_fraction"] == 0.05
    assert m["n_validation"] == round(0.05 * big.n_obs) == big.obs["sfact_validation"].sum()
    # a refit under the same key without the guard removes the old validation column
    sfact.tl.fit(big, prior="pnmf", n_factors=3, max_iter=5, validation_fraction=0)
    assert "sfact_validation" not in big.obs


# ---------------------------------------------------------------------------- on
def test_guard_warns_when_the_model_loses_to_the_baseline(smooth):
    """A lengthscale far too short for smooth data: held-out cells are predicted from nothing."""
    adata = smooth.copy()
    with pytest.warns(SfactWarning, match=GUARD) as record:
        sfact.tl.fit(
            adata, prior="lcgp", n_factors=3, max_iter=50, validation_fraction=0.1, prior_kwargs=_fixed(0.05)
        )
    message = str(record[0].message)
    for advice in ("another prior", "fewer factors", "longer lengthscale", "sfact.tl.select_model"):
        assert advice in message
    m = adata.uns["sfact"]["metrics"]
    assert m["validation_deviance"] > m["validation_baseline_deviance"]
    assert not m["validation_beats_baseline"]


def test_guard_records_metrics_that_survive_h5ad(smooth, tmp_path):
    adata = smooth.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SfactWarning)  # a good lengthscale: no warning
        sfact.tl.fit(
            adata,
            prior="svgp",
            n_factors=3,
            max_iter=60,
            validation_fraction=0.1,
            prior_kwargs=_fixed(25.0, num_inducing=100),
            save_model=tmp_path / "model",
        )
    m = adata.uns["sfact"]["metrics"]
    mask = adata.obs["sfact_validation"].to_numpy()
    # the validation cells are those sfact.tl.heldout_split draws with the same seed
    _, test = sfact.tl.heldout_split(smooth, fraction=0.1, random_state=0)
    assert list(adata.obs_names[mask]) == list(test.obs_names)
    assert m["validation_fraction"] == 0.1 and m["n_validation"] == 120 == mask.sum()
    assert m["validation_deviance"] < m["validation_baseline_deviance"]
    assert m["validation_beats_baseline"]
    np.testing.assert_allclose(
        m["validation_baseline_deviance"], sfact.tl.baseline_deviance(smooth[~mask].X, smooth[mask].X)
    )
    np.testing.assert_allclose(
        m["validation_knn_deviance"], sfact.tl.knn_deviance(smooth[~mask], smooth[mask], n_neighbors=20)
    )
    # the final model is the one trained on the other cells; it predicts the validation cells
    model = SpatialFactorization.load(tmp_path / "model", smooth[~mask].copy())
    assert model.setup.n_obs == smooth.n_obs - 120
    with pytest.raises(ValueError, match=r"expected 1080 cells.*sfact_validation"):
        SpatialFactorization.load(tmp_path / "model", smooth)  # all cells are not its training cells
    np.testing.assert_allclose(
        m["validation_deviance"], sfact.tl.heldout_deviance(model, smooth[mask].copy())
    )
    np.testing.assert_allclose(adata.obsm["X_sfact"][~mask], model.get_factors(), rtol=1e-5)
    np.testing.assert_allclose(adata.obsm["X_sfact"][mask], model.get_factors(smooth[mask].copy()), rtol=1e-5)
    # h5ad round trip
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    for k, v in m.items():
        assert back.uns["sfact"]["metrics"][k] == pytest.approx(v), k
    np.testing.assert_array_equal(back.obs["sfact_validation"].to_numpy(), mask)


def test_pnmf_guard_predicts_from_neighbouring_training_cells(smooth):
    """pnmf has no model of space: its score uses the mean log-factors of 10 nearest training cells."""
    from scipy.spatial import cKDTree

    from sfact.tl._analysis import poisson_deviance_sparse

    adata = smooth.copy()
    sfact.tl.fit(adata, prior="pnmf", n_factors=3, max_iter=30, validation_fraction=0.1, random_state=1)
    m = adata.uns["sfact"]["metrics"]
    mask = adata.obs["sfact_validation"].to_numpy()
    # the model trained on the other cells, rebuilt with the same seed
    model = SpatialFactorization(smooth[~mask].copy(), prior="pnmf", n_factors=3, random_state=1)
    model.train(max_iter=30, progress_bar=False)
    mu, var = model.get_log_factors()
    X = model.setup.scaled_coords(smooth)
    _, nn = cKDTree(X[~mask]).query(X[mask], k=10)
    test = smooth[mask]
    per_cell, _ = poisson_deviance_sparse(
        test.X, np.exp(mu[nn].mean(1) + 0.5 * var[nn].mean(1)), model.get_loadings(), model.size_factors(test)
    )
    np.testing.assert_allclose(
        m["validation_deviance"], per_cell.sum() / (test.n_obs * test.n_vars), rtol=1e-6
    )


def test_groups_missing_from_training_stay_in_training():
    from sfact.tl._heldout import validation_mask

    adata = _smooth(200)
    adata.obs["g"] = pd.Categorical(["rare"] * 2 + ["common"] * 198)
    for seed in range(20):
        mask = validation_mask(adata, 0.49, random_state=seed, group_key="g")
        assert (~mask[:2]).any(), seed  # at least one "rare" cell is a training cell


@pytest.mark.slow
def test_default_fit_on_osmfish_beats_the_baseline():
    adata = sfact.datasets.osmfish()
    sfact.pp.prepare(adata, group_key="ClusterName")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SfactWarning)
        sfact.tl.fit(adata)
    m = adata.uns["sfact"]["metrics"]
    assert m["n_validation"] == round(0.05 * adata.n_obs)
    assert m["validation_deviance"] < m["validation_baseline_deviance"]
    assert m["validation_deviance"] < m["validation_knn_deviance"]
