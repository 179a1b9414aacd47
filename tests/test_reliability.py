"""Reliability: meaningless input is refused up front, with sfact's errors naming the argument and the fix.

Issue 15, item 3 and the WEAK cases of its survey: every case here was accepted, or failed deep in
numpy/scipy/torch/squidpy (often after training), before the checks were added.
"""

from __future__ import annotations

import math
import re

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import sfact
from sfact._utils import SfactWarning
from sfact.models import SpatialFactorization

NAN, INF = float("nan"), float("inf")


def _simulate() -> ad.AnnData:
    return sfact.datasets.simulate(n_obs=200, n_vars=20, n_factors=3, random_state=0)


@pytest.fixture(scope="module")
def prepared() -> ad.AnnData:
    """200 simulated cells x 20 genes with 3 groups, prepared; take ``.copy()``."""
    adata = _simulate()
    sfact.pp.prepare(adata, group_key="group")
    return adata


@pytest.fixture(scope="module")
def fitted(prepared) -> ad.AnnData:
    """``prepared`` after a short pnmf fit; take ``.copy()``."""
    adata = prepared.copy()
    sfact.tl.fit(adata, prior="pnmf", n_factors=2, max_iter=3)
    return adata


# --- the table: bad options across the public functions ---------------------------------------


def _fit(adata, **kwargs):
    """``sfact.tl.fit`` with a small, fast default set-up (overridden by ``kwargs``)."""
    return sfact.tl.fit(adata, **{"prior": "pnmf", "n_factors": 3, "max_iter": 2, **kwargs})


def _fit_prior(prior):
    def call(adata, **prior_kwargs):
        return _fit(adata, prior=prior, prior_kwargs=prior_kwargs)

    call.__name__ = f"fit_{prior}"
    return call


def _model(adata, **kwargs):
    return SpatialFactorization(adata, **{"prior": "pnmf", "n_factors": 3, **kwargs})


def _train(adata, **kwargs):
    return SpatialFactorization(adata, prior="pnmf", n_factors=3).train(**{"max_iter": 2, **kwargs})


def _morans_i(adata, **kwargs):
    return sfact.tl.morans_i(adata.obsm["log_factors_true"], adata.obsm["spatial"], **kwargs)


_svgp, _mggp, _lcgp, _pnmf = (_fit_prior(p) for p in ("svgp", "mggp_svgp", "lcgp", "pnmf"))

#: (callable, kwargs, exception, match): each call gets a fresh copy of the prepared AnnData
BAD_INPUTS = [
    # training options (tl.fit passes them to the model's train)
    (_fit, {"learning_rate": -0.1}, ValueError, r"`learning_rate` must be positive and finite"),
    (_fit, {"learning_rate": NAN}, ValueError, r"`learning_rate` must be positive and finite"),
    (_fit, {"learning_rate": 0}, ValueError, r"`learning_rate` must be positive and finite"),
    (_fit, {"tol": NAN}, ValueError, r"`tol` must be >= 0 and finite"),
    (_fit, {"y_batch_size": 0}, ValueError, r"`y_batch_size` must be positive, a whole number"),
    (_fit, {"batch_size": 50.5}, ValueError, r"`batch_size` must be positive, a whole number"),
    (_fit, {"max_iter": 2.5}, ValueError, r"`max_iter` must be >= 0, a whole number"),
    (_fit, {"n_neighs": 0}, ValueError, r"`n_neighs` must be positive, a whole number"),
    (_train, {"kl_weight": NAN}, ValueError, r"`kl_weight` must be >= 0 and finite"),
    (_train, {"init_iter": -1}, ValueError, r"`init_iter` must be >= 0, a whole number"),
    (_train, {"min_iter": 1.5}, ValueError, r"`min_iter` must be >= 0, a whole number"),
    (_train, {"batch_size": True}, TypeError, r"`batch_size` must be positive, a whole number"),
    (_model, {"n_samples": 0}, ValueError, r"`n_samples` must be positive, a whole number"),
    # hyperparameters of the priors
    (_svgp, {"lengthscale": NAN}, ValueError, r"`lengthscale` must be positive and finite"),
    (_svgp, {"lengthscale": INF}, ValueError, r"`lengthscale` must be positive and finite"),
    (_svgp, {"lengthscale": [1.0, NAN, 2.0], "per_factor_kernel": True}, ValueError, r"positive and finite"),
    (
        _svgp,
        {"lengthscale": [5.0, 10.0], "per_factor_kernel": True},
        ValueError,
        r"`lengthscale` has 2 values for a model with 3 factors: pass one value, or one per factor \(3",
    ),
    (
        _svgp,
        {"lengthscale": [5.0, 10.0, 20.0]},
        ValueError,
        r"`lengthscale` has 3 values .* set `per_factor_kernel=True`",
    ),
    (_svgp, {"sigma": NAN}, ValueError, r"`sigma` must be positive and finite"),
    (_svgp, {"num_inducing": 2.5}, ValueError, r"`num_inducing` must be positive, a whole number"),
    (_svgp, {"hyper_iter": 1.5}, ValueError, r"`hyper_iter` must be >= 0, a whole number"),
    (_svgp, {"sample_distance": INF}, ValueError, r"`sample_distance` must be positive and finite"),
    (_mggp, {"group_diff_param": NAN}, ValueError, r"`group_diff_param` must be >= 0 and finite"),
    (_lcgp, {"n_neighbors": 2.5}, ValueError, r"`n_neighbors` must be positive, a whole number"),
    (_lcgp, {"nugget": INF}, ValueError, r"`nugget` must be positive and finite"),
    (_pnmf, {"init_scale": -0.1}, ValueError, r"`init_scale` must be positive and finite"),
    # Moran's I
    (_morans_i, {"n_neighs": 0}, ValueError, r"`n_neighs` must be positive, a whole number"),
]


def _case_id(case) -> str:
    fn, kwargs, _, _ = case
    return f"{fn.__name__.strip('_')}-" + ",".join(f"{k}={v!r}" for k, v in kwargs.items())


@pytest.mark.parametrize(("func", "kwargs", "exception", "match"), BAD_INPUTS, ids=map(_case_id, BAD_INPUTS))
def test_bad_inputs_raise_sfact_errors(prepared, func, kwargs, exception, match):
    adata = prepared.copy()
    before = set(adata.uns)
    with pytest.raises(exception, match=match):
        func(adata, **kwargs)
    assert set(adata.uns) == before  # nothing written


def test_bad_training_option_refused_before_initialization(prepared):
    """The options are checked before the data set-up and the initialization, not after."""
    model = SpatialFactorization(prepared.copy(), prior="svgp", n_factors=2)
    with pytest.raises(ValueError, match="`learning_rate` must be positive"):
        model.train(max_iter=2, learning_rate=-1.0)
    assert model.module is None  # nothing initialized
    # still usable; a float with a whole value (from a config file) is a whole number
    model.train(max_iter=2.0, batch_size=100.0)
    assert model.is_trained and model.train_info["batch_size"] == 100


# --- counts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [True, False])
def test_all_zero_counts_refused_by_prepare_and_model(sparse):
    adata = _simulate()
    adata.X = sp.csr_matrix(adata.shape, dtype=np.float32) if sparse else np.zeros(adata.shape, np.float32)
    with pytest.raises(ValueError, match=r"`adata.X` has no counts \(every entry is 0\).*`layer=`"):
        sfact.pp.prepare(adata)
    assert "sfact_prepare" not in adata.uns
    with pytest.raises(ValueError, match=r"`adata.X` has no counts \(every entry is 0\)"):
        SpatialFactorization(adata, prior="pnmf", n_factors=2)
    with pytest.raises(ValueError, match=r"`adata.X` has no counts"):
        sfact.tl.fit(adata, prior="pnmf", n_factors=2, max_iter=2)


def test_all_zero_counts_in_a_layer_name_the_layer():
    adata = _simulate()
    adata.layers["counts"] = sp.csr_matrix(adata.shape, dtype=np.float32)
    with pytest.raises(ValueError, match=r"`adata.layers\['counts'\]` has no counts"):
        SpatialFactorization(adata, prior="pnmf", n_factors=2, layer="counts")


def test_no_counts_left_after_filtering_refused_by_prepare():
    adata = _simulate()
    adata.var_names = ["mt-Co1", *adata.var_names[1:]]
    X = np.zeros(adata.shape, dtype=np.float32)
    X[:, 0] = 5.0  # all counts in the mitochondrial gene, which the filter drops
    adata.X = X
    with pytest.raises(ValueError, match=r"no counts in the 200 cells and 19 genes left after filtering"):
        sfact.pp.prepare(adata, mito_prefix="mt-")
    assert "sfact_prepare" not in adata.uns and adata.n_vars == 20


def test_float16_counts_converted_by_prepare():
    adata = _simulate()
    adata.X = adata.X.toarray().astype(np.float16)
    with pytest.warns(SfactWarning, match=r"`adata.X` was float16.*float32"):
        sfact.pp.prepare(adata)
    assert adata.X.dtype == np.float32
    sfact.tl.fit(adata, prior="pnmf", n_factors=2, max_iter=2)  # scipy refused float16 here before
    assert adata.obsm["X_sfact"].shape == (adata.n_obs, 2)


def test_float16_counts_refused_by_the_model_with_the_fix():
    adata = _simulate()
    adata.X = adata.X.toarray().astype(np.float16)
    with pytest.raises(
        ValueError, match=r"`adata.X` is float16.*adata.X.astype\(np.float32\).*sfact.pp.prepare"
    ):
        SpatialFactorization(adata, prior="pnmf", n_factors=2)


def test_backed_anndata_refused_with_to_memory(tmp_path):
    path = tmp_path / "cells.h5ad"
    _simulate().write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        with pytest.raises(ValueError, match=r"`adata` is backed.*adata.to_memory\(\)"):
            sfact.pp.prepare(backed)
        with pytest.raises(ValueError, match=r"`adata` is backed.*adata.to_memory\(\)"):
            SpatialFactorization(backed, prior="pnmf", n_factors=2)
        with pytest.raises(ValueError, match=r"`adata` is backed.*adata.to_memory\(\)"):
            sfact.tl.fit(backed, prior="pnmf", n_factors=2, max_iter=2)
    finally:
        backed.file.close()


# --- coordinates ------------------------------------------------------------------------------


@pytest.mark.parametrize("prior", ["svgp", "mggp_svgp", "lcgp"])
def test_single_location_refused_for_a_spatial_prior(prior):
    adata = _simulate()
    adata.obsm["spatial"] = np.full((adata.n_obs, 2), 7.0)
    with pytest.raises(
        ValueError, match=rf"All cells are at one location.*spatial prior '{prior}'.*prior='pnmf'"
    ):
        SpatialFactorization(
            adata, prior=prior, n_factors=2, group_key="group" if prior == "mggp_svgp" else None
        )
    SpatialFactorization(adata, prior="pnmf", n_factors=2)  # no spatial prior: nothing to object to


def test_single_location_of_one_sample_refused():
    adata = sfact.datasets.simulate(n_obs=200, n_vars=20, n_factors=3, n_samples=2, random_state=0)
    adata.obsm["spatial"][adata.obs["sample"].to_numpy() == "s1"] = 3.0
    with pytest.raises(
        ValueError, match=r"All cells of sample 's1' of `adata.obs\['sample'\]` are at one location"
    ):
        SpatialFactorization(adata, prior="svgp", n_factors=2, sample_key="sample")


def test_string_coordinates_refused():
    adata = _simulate()
    adata.obsm["spatial"] = np.array([["left", "top"]] * adata.n_obs, dtype=object)
    match = r"`adata.obsm\['spatial'\]` must hold numeric coordinates.*astype\(float\)"
    with pytest.raises(ValueError, match=match):
        sfact.pp.prepare(adata)
    with pytest.raises(ValueError, match=match):
        SpatialFactorization(adata, prior="pnmf", n_factors=2)


# --- groups -----------------------------------------------------------------------------------


def _with_nan_group() -> ad.AnnData:
    adata = _simulate()
    g = adata.obs["group"].astype(str).to_numpy().copy()
    g[:15] = "nan"
    adata.obs["group"] = g
    return adata


def test_nan_string_group_dropped_by_prepare_and_refused_by_fit():
    adata = _with_nan_group()
    with pytest.raises(
        ValueError, match=r"15 cells whose group is 'nan'.*sfact.pp.prepare\(adata, group_key='group'\)"
    ):
        SpatialFactorization(adata, prior="mggp_svgp", n_factors=2, group_key="group")
    with pytest.raises(ValueError, match=r"whose group is 'nan'"):
        sfact.tl.fit(adata, prior="pnmf", n_factors=2, group_key="group", max_iter=2)
    sfact.pp.prepare(adata, group_key="group")  # drops those cells: the same reading of 'nan'
    assert adata.n_obs == 185
    model = SpatialFactorization(adata, prior="mggp_svgp", n_factors=2)
    assert "nan" not in model.setup.group_categories


def test_none_string_sample_refused_like_a_missing_sample():
    adata = _simulate()
    adata.obs["section"] = ["s1"] * 100 + ["None"] * 100
    with pytest.raises(ValueError, match=r"100 cells without a sample"):
        SpatialFactorization(adata, prior="pnmf", n_factors=2, sample_key="section")


# --- plots ------------------------------------------------------------------------------------


def test_factor_maps_need_two_coordinates(fitted):
    adata = fitted.copy()
    adata.obsm["spatial"] = adata.obsm["spatial"][:, :1]
    with pytest.raises(ValueError, match=r"`sfact.pl.factors` draws maps in the plane.*1 coordinate column"):
        sfact.pl.factors(adata, return_fig=True)
    with pytest.raises(ValueError, match=r"`sfact.pl.scales` draws maps in the plane"):
        sfact.pl.scales(adata, return_fig=True)


def test_elbo_plot_without_iterations(prepared):
    adata = prepared.copy()
    sfact.tl.fit(adata, prior="pnmf", n_factors=2, max_iter=0)
    with pytest.raises(ValueError, match=r"no training iterations \(trained with `max_iter=0`\)"):
        sfact.pl.elbo(adata, return_fig=True)


# --- Moran's I --------------------------------------------------------------------------------


def test_undefined_morans_i_warns_naming_the_factor():
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 10, (100, 2))
    values = np.c_[coords[:, 0], np.full(100, 2.5), rng.normal(size=100)]
    with pytest.warns(
        SfactWarning, match=r"Moran's I is undefined \(NaN\) for flat: the factor is constant"
    ) as rec:
        df = sfact.tl.morans_i(values, coords, names=["gradient", "flat", "noise"])
    assert len(rec) == 1  # only the flat factor is named
    assert (
        np.isnan(df.loc["flat", "I"]) and df.loc["gradient", "I"] > 0.5 and np.isfinite(df.loc["noise", "I"])
    )


# --- the progress bar in logs -----------------------------------------------------------------


def test_progress_bar_writes_few_lines_to_a_log(prepared, capsys):
    """Captured stderr is not a terminal: the bar writes its first and last state and a few more."""
    import time

    model = SpatialFactorization(prepared.copy(), prior="pnmf", n_factors=2)
    capsys.readouterr()
    model.train(max_iter=120, tol=0.0, progress_bar=True, callback=lambda it, elbo: time.sleep(0.01))
    err = capsys.readouterr().err
    lines = [s for s in re.split(r"[\r\n]+", err) if "training pnmf" in s]
    assert 2 <= len(lines) <= 6, lines
    assert "120it [" in lines[-1]  # the last state is kept in the log (no total: it ends at convergence)


def test_progress_bar_redraws_normally_in_a_terminal():
    from sfact._logging import interactive, progress_bar

    class Terminal:
        def isatty(self):
            return True

        def write(self, s):
            pass

        def flush(self):
            pass

    assert interactive(Terminal())
    with open(__file__) as f:
        assert not interactive(f)  # a file
    bar = progress_bar(range(10), desc="x", disable=False, file=Terminal())
    assert bar.mininterval == 0.1 and not bar.leave  # tqdm's defaults
    bar.close()
    log = progress_bar(range(10), desc="x", disable=False, file=_File())
    assert log.mininterval >= 60 and log.leave and math.isinf(log.maxinterval)
    log.close()


class _File:
    def write(self, s):
        pass

    def flush(self):
        pass
