"""The model object: training continues, reproducibility, save/load, transform, failure modes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import sfact
from sfact.models import SpatialFactorization

N_OBS, N_VARS, N_FACTORS = 300, 30, 3


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
    return adata


def _train(
    adata: ad.AnnData, max_iter: int = 30, *, model_kwargs=None, **train_kwargs
) -> SpatialFactorization:
    model = SpatialFactorization(adata, prior="pnmf", n_factors=N_FACTORS, **(model_kwargs or {}))
    train_kwargs.setdefault("init_iter", 20)
    train_kwargs.setdefault("tol", 0.0)  # never stop early: iteration counts are part of the checks
    model.train(max_iter=max_iter, **train_kwargs)
    return model


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    return _synthetic()


@pytest.fixture(scope="module")
def model(adata) -> SpatialFactorization:
    """A trained model shared by the tests that only read it."""
    return _train(adata, 30)


def _log_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    la, lb = np.log(a), np.log(b)
    return np.array([np.corrcoef(la[:, k], lb[:, k])[0, 1] for k in range(a.shape[1])])


def _reconstruction(model: SpatialFactorization) -> np.ndarray:
    mu, var = model.get_log_factors()
    return np.exp(mu + 0.5 * var) @ model.get_loadings().T


# ---------------------------------------------------------------------------- save / load
def test_save_load_same_factors_and_loadings(model, adata, tmp_path):
    model.save(tmp_path / "m")
    for loaded in (
        SpatialFactorization.load(tmp_path / "m", adata),
        SpatialFactorization.load(tmp_path / "m"),
    ):
        assert loaded.prior == "pnmf"
        assert loaded.n_factors == N_FACTORS
        assert list(loaded.var_names) == list(adata.var_names)
        np.testing.assert_allclose(loaded.get_factors(), model.get_factors(), rtol=1e-6)
        np.testing.assert_allclose(loaded.get_scales(), model.get_scales(), rtol=1e-6)
        np.testing.assert_allclose(loaded.get_loadings(), model.get_loadings(), rtol=1e-6)
        np.testing.assert_allclose(loaded.history.to_numpy(), model.history.to_numpy())


def test_saved_tensors_load_with_weights_only(model, tmp_path):
    model.save(tmp_path / "m")
    state = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    assert isinstance(state, dict) and state
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    np.testing.assert_allclose(state["W"].numpy(), model.module.W.detach().cpu().numpy())
    meta = json.loads((tmp_path / "m" / "metadata.json").read_text())
    assert meta["setup"]["var_names"] == list(model.var_names)
    if (tmp_path / "m" / "optimizer.pt").exists():
        torch.load(tmp_path / "m" / "optimizer.pt", weights_only=True)


def test_load_with_other_genes_raises(model, adata, tmp_path):
    model.save(tmp_path / "m")
    with pytest.raises(ValueError, match="expected"):
        SpatialFactorization.load(tmp_path / "m", adata[:, : N_VARS - 1].copy())
    with pytest.raises(ValueError, match="expected"):
        SpatialFactorization.load(tmp_path / "m", adata[:, ::-1].copy())


def test_load_pnmf_with_other_cells_raises(model, adata, tmp_path):
    model.save(tmp_path / "m")
    with pytest.raises(ValueError, match="expected"):
        SpatialFactorization.load(tmp_path / "m", adata[:100].copy())


def test_save_twice_needs_overwrite(model, tmp_path):
    model.save(tmp_path / "m")
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "m")
    model.save(tmp_path / "m", overwrite=True)
    SpatialFactorization.load(tmp_path / "m")


def test_load_missing_dir_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        SpatialFactorization.load(tmp_path / "nothing_here")


def test_save_untrained_raises(adata, tmp_path):
    model = SpatialFactorization(adata, prior="pnmf", n_factors=N_FACTORS)
    with pytest.raises(RuntimeError, match="not trained"):
        model.save(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_continue_training_after_load(adata, tmp_path):
    """Save after 10 iterations, load, train 5 more: same as training 15 without stopping."""
    reference = _train(adata, 10)
    reference.save(tmp_path / "m")
    assert (tmp_path / "m" / "optimizer.pt").exists()
    reference.train(max_iter=5, tol=0.0)

    loaded = SpatialFactorization.load(tmp_path / "m", adata)
    assert loaded._optimizer_state is not None
    loaded.train(max_iter=5, tol=0.0)
    assert len(loaded.history) == 15
    # Adam's step counters carried on from the saved optimizer (10 full-batch steps + 5)
    steps = [int(s["step"]) for s in loaded._optimizer.state_dict()["state"].values()]
    assert steps and all(s == 15 for s in steps)
    np.testing.assert_allclose(loaded.history["elbo"], reference.history["elbo"], rtol=1e-5)
    np.testing.assert_allclose(loaded.get_factors(), reference.get_factors(), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(loaded.get_loadings(), reference.get_loadings(), rtol=1e-3, atol=1e-6)


def test_continue_after_load_without_optimizer(adata, tmp_path):
    model = _train(adata, 5)
    model.save(tmp_path / "m", save_optimizer=False)
    assert not (tmp_path / "m" / "optimizer.pt").exists()
    loaded = SpatialFactorization.load(tmp_path / "m", adata)
    loaded.train(max_iter=3, tol=0.0)
    assert len(loaded.history) == 8
    assert np.isfinite(loaded.history["elbo"]).all()


# ---------------------------------------------------------------------------- training
def test_train_twice_continues(adata):
    model = _train(adata, 10)
    end_first = model.history["elbo"].iloc[-1]
    start_first = model.history["elbo"].iloc[0]
    mu_after_first = model.module.prior.mu.detach().clone()
    by_iteration = {}

    def record(iteration, elbo):
        if iteration not in by_iteration:
            by_iteration[iteration] = (elbo, model.module.prior.mu.detach().clone())

    model.train(max_iter=7, tol=0.0, callback=record)
    assert len(model.history) == 17
    assert min(by_iteration) == 11  # iterations are numbered across calls
    elbo_11, mu_11 = by_iteration[11]
    # starts where the first call stopped, not back at the initial value
    assert end_first - start_first > 0
    assert abs(elbo_11 - end_first) < 0.25 * abs(end_first - start_first)
    assert float((mu_11 - mu_after_first).abs().max()) < 0.2  # one Adam step at lr 0.05

    # ... and the two calls together equal one uninterrupted run of 17 iterations
    single = _train(adata, 17)
    np.testing.assert_allclose(model.history["elbo"], single.history["elbo"], rtol=1e-5)


def test_train_history_columns(model):
    hist = model.history
    assert len(hist) == 30
    assert {"elbo", "loglik", "kl", "time"} <= set(hist.columns)
    assert np.isfinite(hist.to_numpy()).all()
    assert np.all(np.diff(hist["time"]) >= 0)
    assert hist["elbo"].iloc[-1] > hist["elbo"].iloc[0]


def test_reproducible_random_state(adata):
    a = _train(adata, 5, model_kwargs={"random_state": 3}).get_factors()
    b = _train(adata, 5, model_kwargs={"random_state": 3}).get_factors()
    c = _train(adata, 5, model_kwargs={"random_state": 4}).get_factors()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_nan_stops_training_naming_the_iteration(adata):
    model = SpatialFactorization(adata, prior="pnmf", n_factors=N_FACTORS)

    def poison(iteration, elbo):
        if iteration == 2:
            with torch.no_grad():
                model.module.prior.mu[0, 0] = float("nan")

    with pytest.raises(sfact.models.TrainingError, match="iteration 3"):
        model.train(max_iter=10, init_iter=5, callback=poison)
    assert len(model.history) == 2
    W = model.get_loadings()
    assert np.isfinite(W).all()
    assert (W >= 0).all()


def test_size_factors_total(adata):
    model = _train(adata, 30, model_kwargs={"size_factors": "total"})
    totals = np.asarray(adata.X.sum(1)).ravel()
    predicted = model.predict(adata)
    assert predicted.shape == adata.shape
    assert (predicted >= 0).all()
    assert np.corrcoef(predicted.sum(1), totals)[0, 1] > 0.9


def test_predict_training_cells(model, adata):
    mu, var = model.get_log_factors()
    totals = np.asarray(adata.X.sum(1)).ravel()
    s = totals / np.median(totals[totals > 0])  # the default size factors ("total")
    expected = s[:, None] * (np.exp(mu + 0.5 * var) @ model.get_loadings().T)
    np.testing.assert_allclose(model.predict(), expected, rtol=1e-6)
    np.testing.assert_allclose(model.get_factors(expected=True), np.exp(mu + 0.5 * var), rtol=1e-6)


@pytest.mark.parametrize("elbo_mode", ["expanded", "simple"])
def test_monte_carlo_elbo_modes(adata, elbo_mode):
    model = _train(adata, 8, model_kwargs={"elbo_mode": elbo_mode, "n_samples": 2})
    assert len(model.history) == 8
    assert np.isfinite(model.history["elbo"]).all()
    assert np.isfinite(model.get_factors()).all()


def test_projected_loadings_stay_nonnegative(adata):
    model = _train(adata, 15, model_kwargs={"loadings_mode": "projected"})
    W = model.get_loadings()
    assert W.shape == (N_VARS, N_FACTORS)
    assert np.isfinite(W).all()
    assert (W >= 0).all()
    assert (model.module.W.detach() >= 0).all()  # the raw parameter is clamped, not only the getter
    assert np.isfinite(model.history["elbo"]).all()


def test_batch_size_larger_than_n_obs_is_clamped(adata):
    model = _train(adata, 3, batch_size=10 * N_OBS)
    assert model.train_info["batch_size"] == N_OBS
    assert len(model.history) == 3


def test_minibatch_training(adata):
    model = _train(adata, 4, batch_size=128, y_batch_size=20)
    assert len(model.history) == 4
    assert np.isfinite(model.get_factors()).all()


def test_reorder_keeps_reconstruction(adata):
    model = _train(adata, 5)
    before = _reconstruction(model)
    factors = model.get_factors()
    perm = np.array([2, 0, 1])
    model.reorder_factors(perm)
    np.testing.assert_allclose(_reconstruction(model), before, rtol=1e-6)
    np.testing.assert_allclose(model.get_factors(), factors[:, perm], rtol=1e-6)
    with pytest.raises(ValueError, match="permutation"):
        model.reorder_factors(np.array([0, 0, 1]))
    model.train(max_iter=2, tol=0.0)  # the optimizer is rebuilt for the new order
    assert len(model.history) == 7


# ---------------------------------------------------------------------------- transform
def test_transform_pnmf_recovers_training_factors(model, adata):
    factors, scales = model.transform(adata)
    assert factors.shape == scales.shape == (N_OBS, N_FACTORS)
    assert np.isfinite(factors).all() and (factors > 0).all()
    assert (scales > 0).all()
    assert np.median(_log_corr(factors, model.get_factors())) > 0.8


def test_transform_with_other_genes_raises(model, adata):
    with pytest.raises(ValueError, match="expected"):
        model.transform(adata[:, 1:].copy())


# ---------------------------------------------------------------------------- arguments
def test_unknown_prior_raises(adata):
    with pytest.raises(ValueError, match="prior"):
        SpatialFactorization(adata, prior="gaussian", n_factors=2)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"elbo_mode": "exact"}, ValueError),
        ({"loadings_mode": "nnls"}, ValueError),
        ({"n_factors": N_VARS + 1}, ValueError),
        ({"n_factors": 0}, ValueError),
        ({"size_factors": "not_a_column"}, KeyError),
        ({"group_key": "not_a_column"}, KeyError),
        ({"spatial_key": "not_a_key"}, KeyError),
        ({"device": "bogus"}, ValueError),
    ],
)
def test_bad_arguments_raise(adata, kwargs, error):
    kwargs = {"prior": "pnmf", "n_factors": 2, **kwargs}
    with pytest.raises(error):
        SpatialFactorization(adata, **kwargs)


def test_settings_device_bogus_raises():
    before = sfact.settings.device
    with pytest.raises(ValueError, match="device"):
        sfact.settings.device = "bogus"
    assert sfact.settings.device == before


def test_untrained_model_getters_raise(adata):
    model = SpatialFactorization(adata, prior="pnmf", n_factors=2)
    assert "untrained" in repr(model)
    with pytest.raises(RuntimeError, match="train"):
        model.get_factors()
    with pytest.raises(RuntimeError, match="train"):
        model.get_loadings()


def test_negative_max_iter_raises(adata):
    model = SpatialFactorization(adata, prior="pnmf", n_factors=2)
    with pytest.raises(ValueError, match="max_iter"):
        model.train(max_iter=-1)


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(adata, tmp_path):
    cpu = _train(adata, 40, model_kwargs={"device": "cpu"})
    gpu = _train(adata, 40, model_kwargs={"device": "cuda"})
    assert gpu.device.startswith("cuda")
    assert next(gpu.module.parameters()).is_cuda
    assert np.min(_log_corr(gpu.get_factors(), cpu.get_factors())) > 0.95
    np.testing.assert_allclose(gpu.history["elbo"], cpu.history["elbo"], rtol=1e-3)
    # a model trained on the GPU loads on the CPU
    gpu.save(tmp_path / "m")
    on_cpu = SpatialFactorization.load(tmp_path / "m", adata, device="cpu")
    np.testing.assert_allclose(on_cpu.get_factors(), gpu.get_factors(), rtol=1e-5)


def test_settings_verbosity_drives_sfacts_messages():
    """``sfact.settings.verbosity`` is scanpy's: at 2 the info messages of ``fit`` appear, at 1 not."""
    import io

    import scanpy as sc

    old, old_file = sc.settings.verbosity, sc.settings.logfile
    adata = sfact.datasets.simulate(n_obs=60, n_vars=8, n_factors=2, random_state=0)
    try:
        for level, expect in ((1, False), (2, True)):
            sfact.settings.verbosity = level
            assert int(sc.settings.verbosity) == level == sfact.settings.verbosity
            sc.settings.logfile = buf = io.StringIO()
            sfact.tl.fit(adata.copy(), prior="pnmf", n_factors=2, max_iter=3, progress_bar=False)
            assert ("fitting sfact" in buf.getvalue()) is expect, buf.getvalue()
        with pytest.raises(ValueError, match="verbosity"):
            sfact.settings.verbosity = 9
    finally:
        sc.settings.verbosity, sc.settings.logfile = old, old_file


# ---------------------------------------------------------------------------- ModelSetup
SETUP_ARGS = {
    "prior": "svgp",
    "n_factors": 2,
    "layer": None,
    "spatial_key": "spatial",
    "group_key": None,
    "size_factors": "total",
    "elbo_mode": "lower-bound",
    "loadings_mode": "multiplicative",
    "n_samples": 4,
    "prior_kwargs": {"num_inducing": 20},
    "random_state": 0,
}


def test_model_setup_json_round_trip(adata):
    grouped = adata.copy()
    grouped.obs["g"] = np.where(np.arange(grouped.n_obs) % 3 == 0, "a", "b")
    setup = sfact.models.ModelSetup.from_adata(
        grouped, **{**SETUP_ARGS, "prior": "mggp_svgp", "group_key": "g"}
    )
    assert setup.group_categories == ("a", "b") and setup.n_groups == 2 and setup.multigroup
    assert sfact.models.ModelSetup.from_json(setup.to_json()) == setup
    assert sfact.models.ModelSetup.from_dict(setup.to_dict()) == setup
    assert json.loads(setup.to_json())["var_names"] == list(grouped.var_names)
    with pytest.raises(ValueError, match="unknown keys"):
        sfact.models.ModelSetup.from_dict({**setup.to_dict(), "bogus": 1})
    # the model's set-up is the typed object, built once (no dict behind it)
    model = SpatialFactorization(grouped, prior="mggp_svgp", n_factors=2, group_key="g")
    assert isinstance(model.setup, sfact.models.ModelSetup)
    assert model.setup == dataclasses.replace(setup, prior_kwargs=model.setup.prior_kwargs)


def test_model_setup_applies_its_rules_to_new_cells(adata):
    setup = sfact.models.ModelSetup.from_adata(adata, **SETUP_ARGS)
    totals = np.asarray(adata.X.sum(1)).ravel()
    assert setup.size_factor_reference == np.median(totals[totals > 0])
    np.testing.assert_allclose(setup.size_factors_of(adata), totals / setup.size_factor_reference)
    coords = np.asarray(adata.obsm["spatial"])
    np.testing.assert_allclose(setup.scaled_coords(adata).max(0).max(), 100.0)
    np.testing.assert_allclose(setup.scaled_coords(adata), (coords - coords.min(0)) / setup.scaling["factor"])
    assert setup.group_codes(adata) is None
    assert sp.issparse(setup.counts(adata))
    setup.check_vars(adata)
    with pytest.raises(ValueError, match="Genes do not match"):
        setup.check_vars(adata[:, ::-1])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prior": "gaussian"}, ValueError, "Unknown prior"),
        ({"elbo_mode": "exact"}, ValueError, "elbo_mode"),
        ({"loadings_mode": "nnls"}, ValueError, "loadings_mode"),
        ({"n_factors": 0}, ValueError, "n_factors"),
        ({"n_factors": N_VARS + 1}, ValueError, "more than the number of genes"),
        ({"size_factors": "nope"}, KeyError, "size_factors"),
        ({"group_key": "nope"}, KeyError, "nope"),
        ({"spatial_key": "nope"}, KeyError, "nope"),
        ({"prior_kwargs": {"bogus": 1}}, TypeError, "bogus"),
        ({"prior_kwargs": {"lengthscale": -1.0}}, ValueError, "positive"),
    ],
)
def test_model_setup_from_adata_errors(adata, kwargs, error, match):
    with pytest.raises(error, match=match):
        sfact.models.ModelSetup.from_adata(adata, **{**SETUP_ARGS, **kwargs})


def test_model_setup_from_adata_checks_data(adata):
    bad = adata.copy()
    bad.X = bad.X.toarray()
    bad.X[0, 0] = -1
    with pytest.raises(ValueError, match="negative"):
        sfact.models.ModelSetup.from_adata(bad, **SETUP_ARGS)
    bad = adata.copy()
    bad.obsm["spatial"] = np.array(bad.obsm["spatial"])
    bad.obsm["spatial"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite coordinates"):
        sfact.models.ModelSetup.from_adata(bad, **SETUP_ARGS)
    bad = adata.copy()
    bad.obs["g"] = pd.Series(["a"] * (bad.n_obs - 1) + [None], index=bad.obs_names, dtype=object)
    with pytest.raises(ValueError, match="missing values"):
        sfact.models.ModelSetup.from_adata(bad, **{**SETUP_ARGS, "group_key": "g"})
    bad = adata.copy()
    bad.obs["sf"] = 0.0
    with pytest.raises(ValueError, match="positive and finite"):
        sfact.models.ModelSetup.from_adata(bad, **{**SETUP_ARGS, "size_factors": "sf"})
    with pytest.raises(ValueError, match="at least 2 cells"):
        sfact.models.ModelSetup.from_adata(adata[:1].copy(), **{**SETUP_ARGS, "n_factors": 1})


# ---------------------------------------------------------------------------- previous format
MODELS_V1 = Path(__file__).parent / "data" / "models_v1"


@pytest.mark.parametrize("prior", ["pnmf", "svgp", "mggp_svgp", "lcgp", "mggp_lcgp"])
def test_previous_format_models_load(prior):
    """Models saved by the code before the refactor (format 1) load and give the same results."""
    expected = np.load(MODELS_V1 / "expected.npz")
    model = SpatialFactorization.load(MODELS_V1 / prior, device="cpu")
    assert model.is_trained and model.adata is None and model.prior == prior
    np.testing.assert_allclose(model.get_loadings(), expected[f"{prior}_loadings"], rtol=1e-5, atol=1e-8)
    # from the stored training inputs (no AnnData attached)
    np.testing.assert_allclose(model.get_factors(), expected[f"{prior}_factors"], rtol=1e-5, atol=1e-8)
    if f"{prior}_predict" in expected:
        new_cells = ad.read_h5ad(MODELS_V1 / "new_cells.h5ad")
        np.testing.assert_allclose(
            model.predict(new_cells), expected[f"{prior}_predict"], rtol=1e-5, atol=1e-8
        )
    # the optimizer state matches the parameter groups, so training can continue
    assert model._optimizer_state is not None
    optimizer = torch.optim.Adam([{"params": ps, "lr_scale": k} for k, ps in model.module.param_groups()])
    optimizer.load_state_dict(model._optimizer_state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("prior", ["svgp", "mggp_svgp", "lcgp", "mggp_lcgp"])
def test_cuda_predicts_new_cells_like_cpu(prior):
    """A model trained on CUDA predicts new cells (and groups) as the same model moved to the CPU.

    (``mggp_lcgp`` used to fail here with a device mismatch in its neighbour selection.)
    """
    data = sfact.datasets.simulate(n_obs=300, n_vars=12, n_factors=2, n_groups=2, random_state=0)
    sfact.pp.prepare(data, group_key="group")
    train, test = sfact.tl.heldout_split(data, fraction=0.1, random_state=0)
    kw = {"group_key": "group"} if prior.startswith("mggp") else {}
    pk = {"num_inducing": 30} if "svgp" in prior else {"n_neighbors": 8}
    model = SpatialFactorization(train, prior=prior, n_factors=2, device="cuda", prior_kwargs=pk, **kw)
    model.train(max_iter=10, min_iter=1, progress_bar=False)
    on_gpu = model.predict(test)
    on_cpu = model.to_device("cpu").predict(test)
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-4, atol=1e-6)
