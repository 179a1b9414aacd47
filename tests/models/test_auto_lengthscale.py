"""``lengthscale="auto"`` (the default of the GP priors): the selection rule, recovery of known
lengthscales on simulated data, determinism, what is recorded and saved, the fallback for few
cells, bad values, and sharing the search between models of a grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sfact
from sfact._core.lengthscale import _select, lengthscale_ladder
from sfact.models import SpatialFactorization
from sfact.models._training import share_training_start

# one torch thread: the session fixture in conftest.py
pytestmark = pytest.mark.usefixtures("no_progress_bar")


def _sim(lengthscale: float, n_obs: int = 600, n_vars: int = 60, n_groups: int = 1):
    adata = sfact.datasets.simulate(
        n_obs=n_obs, n_vars=n_vars, n_factors=3, n_groups=n_groups, lengthscale=lengthscale, random_state=0
    )
    sfact.pp.prepare(adata, group_key="group" if n_groups > 1 else None)
    return adata


def test_selection_rule_takes_the_longest_lengthscale_within_the_tolerance():
    ladder = np.array([4.0, 8.0, 16.0, 32.0])
    # a clear minimum: the next value is far above the tolerance, so nearly the minimum itself
    assert _select(ladder, np.array([1.2, 1.0, 1.5, 2.0]), 0.0025) == pytest.approx(
        math.exp(math.log(8.0) + 0.0025 / 0.5 * math.log(2.0))
    )
    # 1.001 is within 0.25% of 1.0, 1.01 is not: the limit 1.0025 is crossed 1/6 of the way to 16
    expected = math.exp(math.log(8.0) + (0.0015 / 0.009) * math.log(2.0))
    assert _select(ladder, np.array([1.0, 1.001, 1.01, 1.1]), 0.0025) == pytest.approx(expected)
    # a flat curve: the longest lengthscale of the ladder
    assert _select(ladder, np.array([1.0, 1.0, 1.0, 1.0]), 0.0025) == 32.0
    # the minimum at the short end and a steep rise: (almost) the shortest
    assert _select(ladder, np.array([1.0, 2.0, 3.0, 4.0]), 0.0025) < 4.01


def test_ladder_is_geometric_from_twice_the_spacing_to_half_the_extent():
    lad = lengthscale_ladder(1.0, 100.0)
    assert lad[0] == pytest.approx(2.0)
    assert np.allclose(lad[1:] / lad[:-1], math.sqrt(2.0))
    assert lad[-1] <= 50.0 < lad[-1] * math.sqrt(2.0)
    assert len(lengthscale_ladder(10.0, 5.0)) >= 3  # tiny tissue: still a ladder


@pytest.mark.parametrize("truth", [5.0, 25.0])
def test_auto_recovers_short_and_long_simulated_lengthscales(truth):
    # RBF fields of lengthscale 5 (about 2.7 cell spacings) and 25 (about 14)
    adata = sfact.datasets.simulate(
        n_obs=3000, n_vars=200, n_factors=5, n_groups=1, lengthscale=truth, random_state=0
    )
    sfact.pp.prepare(adata)
    model = SpatialFactorization(
        adata, prior="svgp", n_factors=5, prior_kwargs={"kernel": "rbf"}, random_state=0
    )
    model.train(max_iter=0)
    chosen = model.gp_info()["lengthscale"][0]
    assert chosen == pytest.approx(model.lengthscale_search_["lengthscale"], rel=1e-6)
    assert abs(chosen / truth - 1) < 0.25


def test_auto_is_deterministic_recorded_and_trains_like_the_fixed_choice(tmp_path):
    adata = _sim(15.0)
    kw = {"num_inducing": 80}
    a = SpatialFactorization(adata, prior="svgp", n_factors=3, prior_kwargs=kw, random_state=0).train(
        max_iter=15
    )
    b = SpatialFactorization(adata, prior="svgp", n_factors=3, prior_kwargs=kw, random_state=0).train(
        max_iter=15
    )
    search = a.lengthscale_search_
    assert search == b.lengthscale_search_
    assert set(search) >= {"lengthscale", "ladder", "deviance", "best", "n_cells", "n_folds"}
    assert len(search["ladder"]) == len(search["deviance"]) >= 3
    assert search["n_cells"] == adata.n_obs
    chosen = search["lengthscale"]
    assert search["ladder"][0] <= chosen <= search["ladder"][-1]
    # the chosen one is within the tolerance of the best deviance on the ladder
    dev = np.interp(np.log(chosen), np.log(search["ladder"]), search["deviance"])
    assert dev <= min(search["deviance"]) * 1.0025 + 1e-12
    # the search draws nothing from the model's generator: same training as a fixed lengthscale
    fixed = SpatialFactorization(
        adata, prior="svgp", n_factors=3, prior_kwargs={**kw, "lengthscale": chosen}, random_state=0
    ).train(max_iter=15)
    np.testing.assert_allclose(a.history["elbo"], fixed.history["elbo"], rtol=1e-5)
    assert fixed.lengthscale_search_ is None and "lengthscale_search" not in fixed.gp_info()
    # recorded in gp_info and train_info, kept by a second train call and by save/load
    assert a.gp_info()["lengthscale_search"] == search
    a.train(max_iter=2)
    assert a.train_info["lengthscale_search"] == search
    a.save(tmp_path / "m")
    loaded = SpatialFactorization.load(tmp_path / "m")
    assert loaded.gp_info()["lengthscale"] == pytest.approx(a.gp_info()["lengthscale"])
    assert loaded.gp_info()["lengthscale_search"] == search


def test_tl_fit_writes_the_search_to_uns(tmp_path):
    adata = _sim(15.0)
    sfact.tl.fit(
        adata, prior="lcgp", n_factors=3, prior_kwargs={"n_neighbors": 8}, max_iter=10, validation_fraction=0
    )
    gp = adata.uns["sfact"]["gp"]
    assert gp["lengthscale"][0] == pytest.approx(gp["lengthscale_search"]["lengthscale"], rel=1e-6)
    adata.write_h5ad(tmp_path / "a.h5ad")
    import anndata as ad

    back = ad.read_h5ad(tmp_path / "a.h5ad")
    np.testing.assert_allclose(
        back.uns["sfact"]["gp"]["lengthscale_search"]["deviance"], gp["lengthscale_search"]["deviance"]
    )


def test_multigroup_search_uses_the_groups():
    adata = _sim(15.0, n_groups=2)
    model = SpatialFactorization(
        adata,
        prior="mggp_svgp",
        n_factors=3,
        group_key="group",
        prior_kwargs={"num_inducing": 80},
        random_state=0,
    ).train(max_iter=0)
    single = SpatialFactorization(
        adata, prior="svgp", n_factors=3, prior_kwargs={"num_inducing": 80}, random_state=0
    ).train(max_iter=0)
    # the multi-group kernel decorrelates the groups, so the deviances differ from one group's
    assert model.lengthscale_search_["deviance"] != pytest.approx(single.lengthscale_search_["deviance"])


def test_few_cells_fall_back_to_a_fixed_lengthscale():
    from sfact.models._config import GPConfig

    adata = _sim(15.0, n_obs=80)
    model = SpatialFactorization(adata, prior="svgp", n_factors=2, prior_kwargs={"num_inducing": 30}).train(
        max_iter=0
    )
    assert model.lengthscale_search_ is None
    assert model.gp_info()["lengthscale"] == [pytest.approx(GPConfig.FALLBACK_LENGTHSCALE)]
    assert "lengthscale_search" not in model.gp_info()
    # a learned lengthscale (None) starts at the data start instead: 4 x the 10th-neighbour spacing
    from sfact._core.factory import coordinate_spacing

    learned = SpatialFactorization(
        adata, prior="svgp", n_factors=2, prior_kwargs={"num_inducing": 30, "lengthscale": None}
    ).train(max_iter=0)
    start = GPConfig.LENGTHSCALE_NN_MULTIPLE * coordinate_spacing(learned.setup.scaled_coords(adata))["nn10"]
    assert learned.gp_info()["lengthscale"] == [pytest.approx(start, rel=1e-5)]


@pytest.mark.parametrize("value", ["long", "AUTO", -1.0])
def test_bad_lengthscale_raises_before_fitting(value):
    adata = _sim(15.0)
    before = adata.copy()
    with pytest.raises(ValueError, match="lengthscale"):
        SpatialFactorization(adata, prior="svgp", prior_kwargs={"lengthscale": value})
    with pytest.raises(ValueError, match="lengthscale"):
        sfact.tl.fit(adata, prior="lcgp", prior_kwargs={"lengthscale": value})
    assert set(adata.obsm) == set(before.obsm) and set(adata.uns) == set(before.uns)


def test_models_sharing_a_start_share_the_search():
    adata = _sim(15.0)
    models = [
        SpatialFactorization(
            adata, prior="svgp", n_factors=3, prior_kwargs={"num_inducing": 80}, random_state=0
        ),
        SpatialFactorization(
            adata, prior="lcgp", n_factors=3, prior_kwargs={"n_neighbors": 8}, random_state=0
        ),
        SpatialFactorization(
            adata,
            prior="svgp",
            n_factors=3,
            prior_kwargs={"num_inducing": 80, "kernel": "rbf"},
            random_state=0,
        ),
    ]
    share_training_start(models)
    for m in models:
        m.train(max_iter=0)
    start = models[0]._shared_start
    assert len(start.searches) == 2  # one per kernel
    assert models[0].lengthscale_search_ == models[1].lengthscale_search_
    alone = SpatialFactorization(
        adata, prior="lcgp", n_factors=3, prior_kwargs={"n_neighbors": 8}, random_state=0
    ).train(max_iter=0)
    assert alone.lengthscale_search_ == models[1].lengthscale_search_


def test_a_failed_search_warns_and_falls_back(monkeypatch):
    import sfact._core.lengthscale as lsmod
    from sfact.models._config import GPConfig

    def singular(*args, **kwargs):
        raise torch.linalg.LinAlgError("not positive-definite")

    monkeypatch.setattr(lsmod, "choose_lengthscale", singular)
    adata = _sim(15.0)
    model = SpatialFactorization(adata, prior="svgp", n_factors=2, prior_kwargs={"num_inducing": 40})
    with pytest.warns(UserWarning, match="lengthscale search failed"):
        model.train(max_iter=2)
    assert model.gp_info()["lengthscale"] == [pytest.approx(GPConfig.FALLBACK_LENGTHSCALE)]
    assert "lengthscale_search" not in model.gp_info()
