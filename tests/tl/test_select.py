"""``sfact.tl.select_model``: columns, determinism, shared start = separate fit, uns round trip, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import sfact

GRID = {"lengthscale": [5.0, 20.0]}
COLUMNS = [
    "prior",
    "n_factors",
    "lengthscale",
    "fold",
    "n_train",
    "n_test",
    "heldout_deviance",
    "baseline_deviance",
    "n_iter",
    "converged",
    "fit_time_s",
]


@pytest.fixture(scope="module")
def tiny():
    adata = sfact.datasets.simulate(n_obs=200, n_vars=20, random_state=0)
    sfact.pp.prepare(adata)
    return adata


def _select(adata, **kwargs):
    kw = {
        "priors": ["pnmf", "svgp"],
        "n_factors": [2, 3],
        "prior_kwargs_grid": GRID,
        "max_iter": 10,
        "n_jobs": 1,
    } | kwargs
    return sfact.tl.select_model(adata, **kw)


def test_columns_rows_and_best(tiny):
    adata = tiny.copy()
    df = _select(adata, n_folds=2)
    assert list(df.columns) == COLUMNS
    # pnmf has no lengthscale: one setting per n_factors; svgp: 2 lengthscales x 2 n_factors
    assert len(df) == (2 + 4) * 2
    assert df.loc[df["prior"] == "pnmf", "lengthscale"].isna().all()
    assert set(df["fold"]) == {0, 1}
    first = df[(df["prior"] == "svgp") & (df["n_factors"] == 2) & (df["lengthscale"] == 5.0)]
    assert first["n_test"].sum() == adata.n_obs
    assert np.isfinite(df["heldout_deviance"]).all() and (df["fit_time_s"] > 0).all()
    assert df["n_iter"].max() <= 10
    res = adata.uns["sfact_selection"]
    means = df.groupby(["prior", "n_factors", "lengthscale"], dropna=False)["heldout_deviance"].mean()
    best = res["best"]
    assert best["heldout_deviance"] == pytest.approx(means.min())
    assert best["prior"] in ("pnmf", "svgp") and best["n_factors"] in (2, 3)
    assert ("lengthscale" in best["prior_kwargs"]) == (best["prior"] == "svgp")


def test_deterministic_and_single_split_protocol(tiny):
    a, b = tiny.copy(), tiny.copy()
    df1 = _select(a, priors=["svgp"], n_factors=[2], random_state=3)
    df2 = _select(b, priors=["svgp"], n_factors=[2], random_state=3)
    cols = [c for c in df1.columns if c != "fit_time_s"]
    pd.testing.assert_frame_equal(df1[cols], df2[cols])
    # the single split is the one of heldout_split(fraction=0.05, random_state=seed)
    train, test = sfact.tl.heldout_split(tiny, fraction=0.05, random_state=3)
    assert (df1["n_test"] == test.n_obs).all() and (df1["n_train"] == train.n_obs).all()


def test_shared_start_equals_a_separate_fit(tiny):
    """Each setting trains exactly as a separate fit on the same split with the same seed."""
    df = _select(tiny.copy(), priors=["svgp", "lcgp"], n_factors=[2], random_state=1)
    train, test = sfact.tl.heldout_split(tiny, fraction=0.05, random_state=1)
    for prior, ls in [("svgp", 20.0), ("lcgp", 5.0)]:
        model = sfact.models.SpatialFactorization(
            train, prior=prior, n_factors=2, prior_kwargs={"lengthscale": ls}, random_state=1
        )
        model.train(10, progress_bar=False)
        expected = sfact.tl.heldout_deviance(model, test)
        row = df[(df["prior"] == prior) & (df["lengthscale"] == ls)].iloc[0]
        assert row["heldout_deviance"] == pytest.approx(expected, rel=1e-6)
        assert row["n_iter"] == len(model.history_)


@pytest.mark.slow
def test_same_results_with_a_process_pool(tiny):
    cols = ["prior", "n_factors", "lengthscale", "fold", "heldout_deviance", "n_iter"]
    df1 = _select(tiny.copy(), priors=["svgp"], n_factors=[2, 3], n_jobs=1)
    df2 = _select(tiny.copy(), priors=["svgp"], n_factors=[2, 3], n_jobs=2)
    pd.testing.assert_frame_equal(df1[cols], df2[cols], rtol=1e-6)


def test_uns_survives_h5ad_round_trip(tiny, tmp_path):
    import anndata as ad

    adata = tiny.copy()
    df = _select(
        adata, priors=["pnmf", "svgp"], n_factors=[2], prior_kwargs_grid={"kernel": ["rbf", "matern32"]}
    )
    assert df.loc[df["prior"] == "pnmf", "kernel"].eq("").all()
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad").uns["sfact_selection"]
    pd.testing.assert_frame_equal(back["results"], df, check_dtype=False)
    best = adata.uns["sfact_selection"]["best"]
    assert back["best"]["prior"] == best["prior"]
    assert dict(back["best"]["prior_kwargs"]) == best["prior_kwargs"]
    assert list(back["params"]["priors"]) == ["pnmf", "svgp"]


def _snapshot(adata):
    return (
        adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X.copy(),
        adata.obs.copy(),
        {k: v.copy() for k, v in adata.obsm.items()},
        sorted(adata.uns.keys()),
        adata.uns["sfact_prepare"].copy() if "sfact_prepare" in adata.uns else None,
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"priors": ["svgp", "nsf"]}, "`priors` has unknown prior"),
        ({"priors": []}, "`priors` must name"),
        ({"n_factors": [2, 0]}, "`n_factors` must be positive"),
        ({"n_factors": [50]}, "`n_factors` has 50"),
        ({"n_folds": 150}, "`n_folds=150` needs at least 300 cells"),
        ({"n_folds": 1}, "`n_folds` must be an integer >= 2"),
        ({"prior_kwargs_grid": {"lenghtscale": [5.0]}}, "`prior_kwargs_grid` has 'lenghtscale'"),
        ({"prior_kwargs_grid": {"lengthscale": 5.0}}, r"`prior_kwargs_grid\['lengthscale'\]` must be a list"),
        ({"prior_kwargs": {"sigma": 1.0}, "prior_kwargs_grid": {"sigma": [1.0]}}, "in both"),
        ({"heldout_fraction": 0.0}, "`heldout_fraction` must be in"),
        ({"n_jobs": 0}, "`n_jobs` must be"),
    ],
)
def test_bad_input_raises_before_fitting(tiny, monkeypatch, kwargs, match):
    from sfact.tl import _select as mod

    def no_fits(*args, **kw):
        raise AssertionError("fitting started")

    monkeypatch.setattr(mod, "_run", no_fits)
    adata = tiny.copy()
    before = _snapshot(adata)
    with pytest.raises((ValueError, TypeError), match=match):
        _select(adata, **kwargs)
    after = _snapshot(adata)
    np.testing.assert_array_equal(before[0], after[0])
    pd.testing.assert_frame_equal(before[1], after[1])
    for k in before[2]:
        np.testing.assert_array_equal(before[2][k], after[2][k])
    assert before[3] == after[3]


def test_samples_recorded_by_prepare_are_used_by_every_fit():
    adata = sfact.datasets.simulate(
        n_obs=450, n_vars=30, n_factors=2, n_groups=1, n_samples=3, lengthscale=15.0, random_state=0
    )
    sfact.pp.prepare(adata, sample_key="sample")
    df = sfact.tl.select_model(
        adata.copy(), priors=["svgp"], n_factors=[2], max_iter=10, n_jobs=1, random_state=1,
        prior_kwargs_grid={"num_inducing": [40]},
    )  # fmt: skip
    train, test = sfact.tl.heldout_split(adata, fraction=0.05, random_state=1)
    model = sfact.models.SpatialFactorization(
        train, prior="svgp", n_factors=2, prior_kwargs={"num_inducing": 40}, random_state=1
    )
    assert model.setup.sample_key == "sample"
    model.train(10, progress_bar=False)
    assert df["heldout_deviance"].iloc[0] == pytest.approx(sfact.tl.heldout_deviance(model, test), rel=1e-6)
