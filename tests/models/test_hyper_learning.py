"""Learned kernel hyperparameters at the model level: they move towards the truth on simulated
data, the default learns them, an explicit value fixes them, and predictions after the learning
phase equal an uncached computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sfact
from sfact.models import SpatialFactorization

# one torch thread: the session fixture in conftest.py
pytestmark = pytest.mark.usefixtures("no_progress_bar")


def _sim(lengthscale: float):
    adata = sfact.datasets.simulate(
        n_obs=500, n_vars=60, n_factors=3, n_groups=1, lengthscale=lengthscale, random_state=0
    )
    sfact.pp.prepare(adata)
    return adata


@pytest.mark.parametrize(("prior", "start"), [("svgp", 6.0), ("svgp", 60.0), ("lcgp", 6.0), ("lcgp", 60.0)])
def test_learned_lengthscale_moves_towards_the_truth(prior, start):
    truth = 20.0
    adata = _sim(truth)
    opts = {"num_inducing": 150} if prior == "svgp" else {"n_neighbors": 15}
    model = SpatialFactorization(
        adata,
        prior=prior,
        n_factors=3,
        prior_kwargs={
            **opts,
            "kernel": "rbf",
            "lengthscale": start,
            "train_lengthscale": True,
            "hyper_iter": 150,
        },
        random_state=0,
    )
    model.train(max_iter=150, min_iter=150)
    learned = model.gp_info()["lengthscale"][0]
    assert abs(np.log(learned / truth)) < 0.75 * abs(np.log(start / truth))


def test_none_learns_from_the_auto_choice_and_a_number_fixes():
    adata = _sim(15.0)
    kw = {"num_inducing": 80}
    learned = SpatialFactorization(
        adata,
        prior="svgp",
        n_factors=2,
        prior_kwargs={**kw, "lengthscale": None, "sigma": None},
        random_state=0,
    )
    cfg = learned.setup.prior_config()
    assert cfg.lengthscale is None and cfg._trained("lengthscale") and cfg._trained("sigma")
    learned.train(max_iter=0)
    # starts from the lengthscale "auto" would fix
    start = learned.lengthscale_search_["lengthscale"]
    assert learned.gp_info()["lengthscale"] == [pytest.approx(start, rel=1e-5)]
    learned.train(max_iter=12, min_iter=100)
    assert learned.gp_info()["lengthscale"] != [pytest.approx(start, rel=1e-3)]
    assert learned.gp_info()["sigma"] != [pytest.approx(1.0, rel=1e-3)]
    # the default ("auto": the same choice) and any number stay fixed (unless train_<name>=True)
    for opts in ({}, {"lengthscale": 7.0}):
        fixed = SpatialFactorization(
            adata, prior="svgp", n_factors=2, prior_kwargs={**kw, **opts}, random_state=0
        )
        assert not fixed.setup.prior_config()._trained("lengthscale")
        fixed.train(max_iter=5, min_iter=100)
        assert fixed.gp_info()["lengthscale"] == [pytest.approx(opts.get("lengthscale", start))]
        assert fixed.gp_info()["sigma"] == [pytest.approx(1.0)]
    trained = SpatialFactorization(
        adata, prior="svgp", n_factors=2, prior_kwargs={**kw, "lengthscale": 7.0, "train_lengthscale": True}
    )
    assert trained.setup.prior_config()._trained("lengthscale")


@pytest.mark.parametrize("prior", ["svgp", "lcgp"])
def test_predictions_after_the_phase_equal_an_uncached_computation(prior, tmp_path):
    adata = _sim(15.0)
    opts = {"num_inducing": 80} if prior == "svgp" else {"n_neighbors": 8, "nugget": None}
    opts.update(lengthscale=None, sigma=None)
    model = SpatialFactorization(
        adata, prior=prior, n_factors=2, prior_kwargs={**opts, "hyper_iter": 4}, random_state=0
    )
    model.train(max_iter=8, min_iter=100)
    p = model.module.prior
    assert not p.hyper_trainable
    mu_train, var_train = model.get_log_factors()
    X = torch.as_tensor(model.setup.scaled_coords(adata), dtype=p.m.dtype)
    if prior == "svgp":
        ref = p._marginals_from_A(p._A(X, None), X, None)
    else:
        k64 = __import__("copy").deepcopy(p.kernel).double()
        b, tau2 = p._conditionals_of(k64, p.X_train.to(torch.float64), None, p.nbr)
        torch.testing.assert_close(p.b, b.to(p.b.dtype))
        torch.testing.assert_close(p.tau2, tau2.to(p.tau2.dtype))
        idx = torch.arange(adata.n_obs)
        ref = p.marginals(sfact._core.priors.PriorInput(idx=idx, n_total=adata.n_obs))
    np.testing.assert_allclose(mu_train, ref[0].detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var_train, ref[1].detach().numpy(), rtol=1e-5, atol=1e-5)
    # saved and loaded: the learned values, the same predictions
    path = tmp_path / "m"
    model.save(path)
    loaded = SpatialFactorization.load(path, adata)
    assert loaded.gp_info()["lengthscale"] == pytest.approx(model.gp_info()["lengthscale"])
    np.testing.assert_allclose(
        loaded.get_log_factors(adata)[0], model.get_log_factors(adata)[0], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("prior", ["mggp_svgp", "mggp_lcgp"])
def test_multigroup_alpha_is_learned_and_frozen(prior):
    adata = sfact.datasets.simulate(
        n_obs=300, n_vars=30, n_factors=2, n_groups=2, lengthscale=15.0, random_state=0
    )
    sfact.pp.prepare(adata, group_key="group")
    opts = {"num_inducing": 60} if prior == "mggp_svgp" else {"n_neighbors": 6}
    model = SpatialFactorization(
        adata,
        prior=prior,
        n_factors=2,
        group_key="group",
        prior_kwargs={**opts, "group_diff_param": None, "hyper_iter": 5},
        random_state=0,
    )
    model.train(max_iter=8, min_iter=100)
    alpha = model.gp_info()["group_diff_param"][0]
    assert alpha != pytest.approx(1.0, rel=1e-3)
    # the lengthscale ("auto") was chosen before training and stayed fixed
    assert model.gp_info()["lengthscale"] == [pytest.approx(model.lengthscale_search_["lengthscale"])]
    assert not model.module.prior.hyper_trainable
