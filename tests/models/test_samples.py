"""Several samples (tissue sections) in one model: shared loadings, one GP per sample.

One sample is today's model; the kernel between samples vanishes; coordinates are scaled per
sample at training and at prediction; save/load; tl.fit's per-sample outputs; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sfact
from sfact.models import SpatialFactorization

# one torch thread: the session fixture in conftest.py
pytestmark = pytest.mark.usefixtures("no_progress_bar")


def _sections(n_obs: int = 600, n_samples: int = 3, n_groups: int = 1, shift: float = 0.0):
    adata = sfact.datasets.simulate(
        n_obs=n_obs,
        n_vars=40,
        n_factors=3,
        n_groups=n_groups,
        n_samples=n_samples,
        lengthscale=15.0,
        random_state=0,
    )
    if shift:  # sections stored side by side, as an instrument writes them
        codes = adata.obs["sample"].cat.codes.to_numpy()
        adata.obsm["spatial"] = adata.obsm["spatial"] + np.c_[codes * shift, np.zeros(adata.n_obs)]
    return adata


# independent samples unless a test says otherwise (the default, "auto", chooses from the data)
OPTS = {
    "svgp": {"num_inducing": 60, "sample_distance": None},
    "lcgp": {"n_neighbors": 8, "sample_distance": None},
}


@pytest.mark.parametrize("prior", ["svgp", "lcgp"])
def test_one_sample_is_the_model_without_samples(prior):
    adata = sfact.datasets.simulate(n_obs=400, n_vars=40, n_factors=3, n_groups=1, random_state=0)
    adata.obs["slide"] = "only"
    plain = adata.copy()
    sfact.pp.prepare(plain)
    sfact.pp.prepare(adata, sample_key="slide")
    np.testing.assert_allclose(adata.obsm["spatial_sfact"], plain.obsm["spatial_sfact"])
    kw = {"prior": prior, "n_factors": 3, "prior_kwargs": OPTS[prior], "random_state": 0}
    a = SpatialFactorization(adata, **kw).train(max_iter=15)
    b = SpatialFactorization(plain, **kw).train(max_iter=15)
    assert a.setup.sample_key == "slide" and b.setup.sample_key is None
    np.testing.assert_allclose(a.history["elbo"], b.history["elbo"], rtol=1e-6)
    np.testing.assert_allclose(a.get_factors(), b.get_factors(), rtol=1e-5)


@pytest.mark.parametrize("prior", ["svgp", "mggp_svgp", "lcgp"])
def test_samples_are_independent_a_priori(prior):
    groups = 2 if prior.startswith("mggp") else 1
    adata = _sections(n_groups=groups)
    sfact.pp.prepare(adata, sample_key="sample", group_key="group" if groups > 1 else None)
    model = SpatialFactorization(
        adata, prior=prior, n_factors=3, prior_kwargs=OPTS[prior.replace("mggp_", "")], random_state=0
    ).train(max_iter=3)
    X, codes = model._training_inputs()
    G = groups
    sample = codes // G
    assert model.setup.n_kernel_groups == 3 * G
    assert model.gp_info()["prior"] == prior
    k = model.module.prior.kernel
    Xt, ct = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(codes)
    K = k(Xt[:200], Xt[:200], ct[:200], ct[:200])[0].numpy()
    same = sample[:200, None] == sample[None, :200]
    # overlapping coordinates: close cells of different samples exist, yet the kernel vanishes
    assert np.abs(K[~same]).max() < 1e-5
    assert K[same].max() > 0.99
    if prior.endswith("svgp"):
        # every cell's whitened projection uses only its own sample's inducing points
        zs = model.module.prior.Z_groups.numpy() // G
        A = model.module.prior._A(Xt, ct)[0].numpy()  # (M, N)
        assert np.abs(A[zs[:, None] != sample[None, :]]).max() < 1e-4


def test_prediction_scales_each_sample_and_rejects_unknown_ones(tmp_path):
    adata = _sections(shift=500.0)  # stored side by side; prepared, the sections overlap
    sfact.pp.prepare(adata, sample_key="sample")
    scaled = adata.obsm["spatial_sfact"]
    for s in ("s0", "s1", "s2"):
        xy = scaled[(adata.obs["sample"] == s).to_numpy()]
        assert xy.min() >= 0 and xy.max() <= 100.0 + 1e-9
    model = SpatialFactorization(adata, prior="svgp", n_factors=3, prior_kwargs=OPTS["svgp"], random_state=0)
    np.testing.assert_allclose(model._training_inputs()[0], scaled)
    model.train(max_iter=20)
    # the training cells of one sample, predicted as new cells from their coordinates: the
    # training marginals (the same scaled coordinates and kernel groups)
    sub = adata[(adata.obs["sample"] == "s1").to_numpy()].copy()
    mu_new, var_new = model.get_log_factors(sub)
    mu, var = model.get_log_factors()
    rows = (adata.obs["sample"] == "s1").to_numpy()
    np.testing.assert_allclose(mu_new, mu[rows], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(var_new, var[rows], rtol=1e-4, atol=1e-4)
    # save -> load (with and without the data) -> the same predictions
    model.save(tmp_path / "m")
    for loaded in (
        SpatialFactorization.load(tmp_path / "m"),
        SpatialFactorization.load(tmp_path / "m", adata),
    ):
        assert loaded.setup.sample_categories == ("s0", "s1", "s2")
        np.testing.assert_allclose(loaded.get_log_factors(sub)[0], mu_new, rtol=1e-5, atol=1e-6)
    # a sample the model has not seen: a clear error, the AnnData unchanged
    new = sub.copy()
    new.obs["sample"] = "s9"
    before = new.obs.copy()
    with pytest.raises(ValueError, match=r"not trained on: \['s9'\]"):
        model.get_log_factors(new)
    assert new.obs.equals(before)


def test_bad_samples_raise_before_fitting():
    adata = _sections()
    sfact.pp.prepare(adata, sample_key="sample")
    nan = adata.copy()
    nan.obs["sample"] = nan.obs["sample"].astype(object)
    nan.obs.iloc[:2, nan.obs.columns.get_loc("sample")] = np.nan
    with pytest.raises(ValueError, match="without a sample"):
        SpatialFactorization(nan, prior="svgp", n_factors=2)
    tiny = adata.copy()
    tiny.obs["sample"] = tiny.obs["sample"].cat.add_categories("s_small")
    tiny.obs.iloc[:5, tiny.obs.columns.get_loc("sample")] = "s_small"
    with pytest.raises(ValueError, match="fewer than 10 cells"):
        SpatialFactorization(tiny, prior="lcgp", n_factors=2, sample_key="sample")
    with pytest.raises(KeyError, match="slide"):
        sfact.tl.fit(adata, prior="svgp", n_factors=2, sample_key="slide")
    assert "sfact" not in adata.uns


def test_tl_fit_with_samples_writes_per_sample_results(tmp_path):
    adata = _sections(n_obs=1200, n_groups=2)
    sfact.pp.prepare(adata, sample_key="sample", group_key="group")
    sfact.tl.fit(adata, prior="mggp_lcgp", n_factors=3, prior_kwargs=OPTS["lcgp"], max_iter=20)
    u = adata.uns["sfact"]
    assert u["params"]["sample_key"] == "sample"
    table = u["samples"]
    assert list(table.index) == ["s0", "s1", "s2"]
    assert table["n_obs"].sum() == adata.n_obs
    assert {f"moranI_factor_{i}" for i in range(3)} <= set(table.columns)
    assert (table["moranI_factor_0"] > 0.2).all()  # smooth within every section
    # validation cells in every section, and every section keeps training cells
    val = adata.obs["sfact_validation"].to_numpy()
    for s in ("s0", "s1", "s2"):
        cells = (adata.obs["sample"] == s).to_numpy()
        assert val[cells].any() and (~val[cells]).any()
    df = sfact.get.factors_df(adata)
    assert df.columns[0] == "sample" and (df["sample"] == adata.obs["sample"]).all()
    adata.write_h5ad(tmp_path / "a.h5ad")
    import anndata as ad

    back = ad.read_h5ad(tmp_path / "a.h5ad")
    np.testing.assert_allclose(
        back.uns["sfact"]["samples"]["deviance_per_entry"], table["deviance_per_entry"]
    )


def test_a_new_sample_is_fitted_to_its_counts_and_smoothed_over_its_coordinates():
    from scipy.optimize import linear_sum_assignment

    from sfact.models._inference import count_marginals

    adata = sfact.datasets.simulate(
        n_obs=1500, n_vars=60, n_factors=3, n_groups=1, n_samples=5, lengthscale=12.0, random_state=0
    )
    sfact.pp.prepare(adata, sample_key="sample")
    is_new = (adata.obs["sample"] == "s4").to_numpy()
    train = adata[~is_new].copy()
    train.obs["sample"] = train.obs["sample"].cat.remove_unused_categories()
    new = adata[is_new].copy()
    # a shallow section: 5% of its counts
    rng = np.random.default_rng(0)
    X = new.X.tocsr().copy()
    X.data = rng.binomial(X.data.astype(int), 0.05).astype(np.float32)
    X.eliminate_zeros()
    new.X = X
    model = SpatialFactorization(train, prior="svgp", n_factors=3, prior_kwargs=OPTS["svgp"], random_state=0)
    model.train(max_iter=150)
    with pytest.raises(ValueError, match="fit_new_sample"):
        model.get_log_factors(new)
    with pytest.raises(ValueError, match="seen in training"):
        model.fit_new_sample(train[:20])
    mu, var = model.fit_new_sample(new)
    assert mu.shape == var.shape == (new.n_obs, 3) and (var > 0).all()
    raw, _ = count_marginals(model, new, known_samples=False)
    truth = new.obsm["log_factors_true"]

    def recovery(est):
        C = np.corrcoef(est.T, truth.T)[:3, 3:]
        r, c = linear_sum_assignment(-np.abs(C))
        return np.abs(C[r, c]).mean()

    # smoothing over the section's coordinates recovers its factors better than the counts alone
    assert recovery(mu) > recovery(raw) + 0.02
    # and is deterministic
    np.testing.assert_array_equal(model.fit_new_sample(new)[0], mu)


@pytest.mark.parametrize("prior", ["svgp", "lcgp"])
def test_with_loadings_fixed_one_section_does_not_move_another(prior):
    """Independence across samples: the prior shares no parameter between sections (its own GP
    and its own mean each), so with the loadings fixed, changing one section's counts leaves the
    other section's factors exactly where they were."""
    adata = _sections(n_obs=600, n_samples=2)
    sfact.pp.prepare(adata, sample_key="sample")
    other = adata.copy()
    s1 = np.flatnonzero((other.obs["sample"] == "s1").to_numpy())
    X = other.X.tocsr().toarray()
    X[s1] = X[np.random.default_rng(0).permutation(s1)][:, ::-1]  # s1's counts scrambled
    other.X = __import__("scipy.sparse", fromlist=["csr_matrix"]).csr_matrix(X)
    kw = {
        "prior": prior,
        "n_factors": 3,
        "prior_kwargs": {**OPTS[prior], "lengthscale": 10.0},
        "random_state": 0,
    }
    ref = SpatialFactorization(adata, **kw).train(max_iter=0)
    fits = []
    for data in (adata, other):
        m = SpatialFactorization(data, **kw).train(max_iter=0)
        with torch.no_grad():  # the same start for section s0, and the same fixed loadings
            m.module.load_state_dict(ref.module.state_dict())
        m.module.loadings_mode = "fixed"
        m.train(max_iter=25, min_iter=30)
        fits.append(m.get_log_factors())
    s0 = (adata.obs["sample"] == "s0").to_numpy()
    np.testing.assert_allclose(fits[0][0][s0], fits[1][0][s0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fits[0][1][s0], fits[1][1][s0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(fits[0][0][~s0], fits[1][0][~s0], atol=1e-3)  # s1's did move


def test_a_sample_distance_correlates_sections_and_alpha_can_be_learned():
    adata = _sections(n_obs=450, n_samples=3)
    sfact.pp.prepare(adata, sample_key="sample")
    kw = {"prior": "svgp", "n_factors": 2, "random_state": 0}
    model = SpatialFactorization(
        adata,
        prior_kwargs={**OPTS["svgp"], "sample_distance": 1.0, "group_diff_param": None, "hyper_iter": 5},
        **kw,
    )
    model.train(max_iter=8, min_iter=100)
    alpha = model.gp_info()["group_diff_param"][0]
    assert alpha != pytest.approx(1.0, rel=1e-3)  # learned
    k = model.module.prior.kernel
    x = torch.zeros(1, 2)
    K = k(x, x, torch.tensor([0]), torch.tensor([1]))[0].item()
    nu = 1.0 / (alpha * 1.0 + 1.0)
    assert K == pytest.approx(nu**2.5, rel=1e-4)  # Matérn-3/2, p = 2, the same place in two sections
    independent = SpatialFactorization(adata, prior_kwargs=OPTS["svgp"], **kw).train(max_iter=2)
    Ki = independent.module.prior.kernel(x, x, torch.tensor([0]), torch.tensor([1]))[0].item()
    assert Ki < 1e-12
    with pytest.raises(ValueError, match="sample_distance"):
        SpatialFactorization(adata, prior_kwargs={"sample_distance": 0.0}, **kw)


@pytest.mark.parametrize("prior", ["mggp_svgp", "mggp_lcgp"])
def test_new_sample_with_groups_and_resume(prior, tmp_path):
    adata = sfact.datasets.simulate(
        n_obs=600, n_vars=30, n_factors=2, n_groups=2, n_samples=3, lengthscale=12.0, random_state=0
    )
    sfact.pp.prepare(adata, sample_key="sample", group_key="group")
    is_new = (adata.obs["sample"] == "s2").to_numpy()
    train = adata[~is_new].copy()
    train.obs["sample"] = train.obs["sample"].cat.remove_unused_categories()
    opts = OPTS["svgp" if prior.endswith("svgp") else "lcgp"]
    model = SpatialFactorization(train, prior=prior, n_factors=2, prior_kwargs=opts, random_state=0)
    model.train(max_iter=6, min_iter=10)
    mu, var = model.fit_new_sample(adata[is_new].copy())
    assert mu.shape == (int(is_new.sum()), 2) and np.isfinite(mu).all() and (var > 0).all()
    # resuming continues the history; save -> load -> resume as well
    model.train(max_iter=3, min_iter=10)
    assert len(model.history["elbo"]) == 9
    model.save(tmp_path / "m")
    loaded = SpatialFactorization.load(tmp_path / "m", train)
    loaded.train(max_iter=2, min_iter=10)
    assert len(loaded.history["elbo"]) == 11


def _one_tissue_in_three_sections(rotate: bool):
    """One simulated tissue, every cell in one of three sections at random (serial sections whose
    coordinates line up); with ``rotate`` sections 1 and 2 are turned by 90 and 180 degrees, so
    the same place shows different tissue in each."""
    adata = sfact.datasets.simulate(n_obs=900, n_vars=40, n_factors=3, lengthscale=15.0, random_state=0)
    section = np.random.default_rng(0).integers(0, 3, adata.n_obs)
    adata.obs["section"] = [f"s{i}" for i in section]
    if rotate:
        xy = adata.obsm["spatial"].copy()
        c = xy.mean(0)
        turn = np.array([[0.0, -1.0], [1.0, 0.0]])
        for s, k in ((1, 1), (2, 2)):
            m = section == s
            adata.obsm["spatial"][m] = (np.linalg.matrix_power(turn, k) @ (xy[m] - c).T).T + c
    sfact.pp.prepare(adata, sample_key="section")
    return adata


@pytest.mark.parametrize("rotate", [False, True])
def test_auto_sample_distance_correlates_aligned_sections_only(rotate):
    from sfact.models._training import SAMPLE_CORRELATIONS

    adata = _one_tissue_in_three_sections(rotate)
    model = SpatialFactorization(
        adata, prior="svgp", n_factors=3, prior_kwargs={"num_inducing": 60}, random_state=0
    ).train(max_iter=0)
    search = model.train_info["lengthscale_search"]
    assert set(search["sample_candidates"]) == {"0.0", *(str(c) for c in SAMPLE_CORRELATIONS)}
    corr = search["sample_correlation"]
    # aligned sections share their pattern: a correlation wins; rotated ones do not
    assert (corr > 0) != rotate
    # the model's kernel correlates the same place in two sections by the chosen value
    k = model.module.prior.kernel
    x = torch.zeros(1, 2)
    K = k(x, x, torch.tensor([0]), torch.tensor([1]))[0].item()
    assert K == pytest.approx(corr, rel=1e-3, abs=1e-9)
    gp = model.gp_info()
    assert gp["lengthscale_search"]["sample_correlation"] == corr


@pytest.mark.parametrize(("kernel", "p"), [("matern32", 2), ("rbf", 2), ("matern32", 3)])
def test_sample_distance_for_gives_the_correlation(kernel, p):
    from sfact._core.kernels import Kernel
    from sfact.models._training import sample_distance_for

    for corr in (0.5, 0.9, 0.99):
        d = sample_distance_for(corr, 2.0, kernel, p)
        emb = np.array([[0.0], [d]])
        k = Kernel(
            kernel,
            n_dims=p,
            lengthscale=np.asarray(3.0),
            sigma=np.asarray(1.0),
            n_factors=1,
            per_factor=False,
            group_embedding=emb,
            group_diff_param=2.0,
            train_lengthscale=False,
            train_sigma=False,
            train_group_diff_param=False,
        ).double()
        x = torch.zeros(1, p, dtype=torch.float64)
        K = k(x, x, torch.tensor([0]), torch.tensor([1]))[0].item()
        assert K == pytest.approx(corr, rel=1e-5)  # the embedding is stored in float32
