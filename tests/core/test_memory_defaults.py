"""Defaults from the device's memory: plain for data that fit, reduced so the estimate fits otherwise."""

from __future__ import annotations

import numpy as np
import pytest

import sfact
from sfact._core import memory
from sfact._core.memory import (
    MIN_BATCH,
    MIN_INDUCING,
    PLAIN_CPU,
    PLAIN_GPU,
    available_memory,
    device_defaults,
    estimate_peak,
)

GIB = 2**30

#: (n_obs, n_vars, nnz) of the data sets every test and tutorial uses
SMALL = {
    "osmFISH": (4839, 33, 100_000),
    "Visium prostate": (2327, 1255, 1_300_000),
    "test data": (300, 30, 9000),
}
MILLION = {"n_obs": 10**6, "n_vars": 500, "n_factors": 10, "nnz": 10**7}


def _plain(d, plain) -> bool:
    return (d.num_inducing, d.diagonal_only, d.cache_budget, d.batch_size, d.reduced) == (
        plain["num_inducing"],
        plain["diagonal_only"],
        plain["cache_budget"],
        None,
        False,
    )


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("prior", ["svgp", "lcgp", "pnmf"])
def test_small_data_get_the_plain_defaults(name, prior):
    n_obs, n_vars, nnz = SMALL[name]
    for gib in (2, 24, 256):
        d = device_defaults(
            gib * GIB, is_gpu=False, n_obs=n_obs, n_vars=n_vars, n_factors=10, nnz=nnz, prior=prior
        )
        assert d.batch_size is None and not d.reduced and d.reasons == ()
        if prior == "svgp":
            assert _plain(d, PLAIN_CPU)
    d = device_defaults(80 * GIB, is_gpu=True, n_obs=n_obs, n_vars=n_vars, n_factors=10, nnz=nnz, prior=prior)
    assert d.batch_size is None and not d.reduced
    if prior == "svgp":
        assert _plain(d, PLAIN_GPU)


def test_a_million_cells_on_a_24_gib_cpu():
    d = device_defaults(24 * GIB, is_gpu=False, **MILLION)
    assert d.reduced
    assert d.batch_size is not None and MIN_BATCH <= d.batch_size < MILLION["n_obs"]
    assert d.estimated_peak_bytes <= d.budget_bytes == int(memory.SAFETY["cpu"] * 24 * GIB)
    assert d.num_inducing == 1000 and d.diagonal_only  # the CPU's M and S are kept
    # the largest batch that fits, up to the rounding to two significant digits
    twice = estimate_peak(
        **MILLION, prior="svgp", batch_size=2 * d.batch_size, num_inducing=1000, cached=True
    )
    assert twice > d.budget_bytes
    # the full batch would not have fitted with the plain defaults
    full = estimate_peak(**MILLION, prior="svgp", batch_size=None, num_inducing=1000, cached=False)
    assert full > d.budget_bytes
    assert "cells per step" in d.summary()


@pytest.mark.parametrize("prior", ["lcgp", "pnmf"])
def test_a_million_cells_other_priors(prior):
    quarter = estimate_peak(prior=prior, batch_size=MILLION["n_obs"] // 4, **MILLION)
    d = device_defaults(int(quarter / memory.SAFETY["cpu"]) + 2, is_gpu=False, prior=prior, **MILLION)
    assert d.batch_size == MILLION["n_obs"] // 4
    assert d.reduced and d.batch_size is not None and d.batch_size < MILLION["n_obs"]
    assert d.estimated_peak_bytes <= d.budget_bytes
    assert d.num_inducing == 0 and d.cache_budget == 0


@pytest.mark.parametrize("gib", [80, 141])
def test_large_gpu_keeps_3000_inducing_points_and_full_s(gib):
    d = device_defaults(gib * GIB, is_gpu=True, **MILLION)
    assert d.num_inducing == 3000 and d.diagonal_only is False
    assert d.batch_size is not None and 10_000 <= d.batch_size < MILLION["n_obs"]
    assert d.estimated_peak_bytes <= d.budget_bytes
    # L_zz⁻¹K_zx of the million cells (3·10⁹ numbers, 12 GB) is cached on such a GPU
    assert d.cache_budget >= 3000 * MILLION["n_obs"]
    # a Slide-seq-sized problem fits whole with the plain GPU defaults
    d = device_defaults(gib * GIB, is_gpu=True, n_obs=42_000, n_vars=17_000, n_factors=10, nnz=13_600_000)
    assert _plain(d, PLAIN_GPU)


def test_small_gpu_lowers_the_batch_before_anything_else():
    d = device_defaults(8 * GIB, is_gpu=True, **MILLION)
    assert d.num_inducing == 3000 and not d.diagonal_only
    assert MIN_BATCH <= d.batch_size < 20_000
    assert d.estimated_peak_bytes <= d.budget_bytes


def test_tiny_memory_gives_the_smallest_options_and_says_so():
    d = device_defaults(GIB // 2, is_gpu=True, **MILLION)
    assert (d.batch_size, d.num_inducing, d.cache_budget, d.diagonal_only) == (
        MIN_BATCH,
        MIN_INDUCING,
        0,
        True,
    )
    assert d.estimated_peak_bytes > d.budget_bytes
    assert "exceeds the budget" in d.summary()


def test_memory_between_lowers_inducing_points():
    """When even MIN_BATCH cells do not fit without cache and with a diagonal S, M is halved."""
    plain = estimate_peak(**MILLION, prior="svgp", batch_size=MIN_BATCH, num_inducing=1000, cached=False)
    low = estimate_peak(**MILLION, prior="svgp", batch_size=MIN_BATCH, num_inducing=500, cached=False)
    memory_bytes = int((plain + low) / 2 / memory.SAFETY["cpu"])
    d = device_defaults(memory_bytes, is_gpu=False, **MILLION)
    assert d.num_inducing == 500 and d.cache_budget == 0
    assert d.estimated_peak_bytes <= d.budget_bytes
    assert "500 inducing points" in d.summary()


def test_the_users_values_are_kept():
    d = device_defaults(
        24 * GIB,
        is_gpu=False,
        num_inducing=400,
        diagonal_only=False,
        cache_budget=7,
        batch_size=5000,
        **MILLION,
    )
    assert (d.num_inducing, d.diagonal_only, d.cache_budget, d.batch_size) == (400, False, 7, 5000)
    # a user's batch that does not fit: the free options give way, the user's batch stays
    d = device_defaults(2 * GIB, is_gpu=True, batch_size=200_000, **MILLION)
    assert d.batch_size == 200_000 and d.reduced
    assert d.num_inducing < 3000 or d.diagonal_only


def test_the_estimate_grows_with_the_step():
    kw = {**MILLION, "prior": "svgp", "num_inducing": 1000}
    small = estimate_peak(batch_size=10_000, **kw)
    assert small < estimate_peak(batch_size=100_000, **kw)
    assert small < estimate_peak(batch_size=10_000, diagonal_only=False, **kw)
    assert small < estimate_peak(batch_size=10_000, learned_hyper=True, **kw)
    assert small < estimate_peak(batch_size=10_000, itemsize=8, **kw)
    assert small < estimate_peak(batch_size=10_000, sampled=4, **kw)
    # a cache of A for every cell: 4 GB here
    assert estimate_peak(batch_size=10_000, cached=True, **kw) - small > 3.5e9
    with pytest.raises(ValueError, match="`prior` must be"):
        estimate_peak(batch_size=10, **{**kw, "prior": "mggp_svgp"})
    with pytest.raises(ValueError, match="`n_obs` must be positive"):
        device_defaults(GIB, is_gpu=False, n_obs=0, n_vars=5, n_factors=2, nnz=0)


def test_available_memory_on_the_cpu():
    free = available_memory("cpu")
    assert isinstance(free, int) and free > 0


def test_train_info_round_trips_as_plain_values():
    d = device_defaults(24 * GIB, is_gpu=False, **MILLION)
    info = d.to_dict()
    assert info["batch_size"] == d.batch_size and info["num_inducing"] == 1000
    assert all(isinstance(v, bool | int | float | str) for v in info.values())


@pytest.fixture(scope="module")
def small_adata():
    adata = sfact.datasets.simulate(n_obs=2500, n_vars=15, n_factors=3, n_groups=1, random_state=0)
    sfact.pp.prepare(adata)
    return adata


def _model(adata):
    return sfact.models.SpatialFactorization(
        adata,
        prior="svgp",
        n_factors=3,
        prior_kwargs={"num_inducing": 20, "lengthscale": 10.0},
        random_state=0,
    )


def test_a_fit_with_little_memory_picks_a_smaller_batch(small_adata, monkeypatch):
    adata = small_adata
    nnz = int(adata.X.nnz)
    kw = {"n_obs": adata.n_obs, "n_vars": adata.n_vars, "n_factors": 3, "nnz": nnz, "prior": "svgp"}
    target = 1500  # cells per step the monkeypatched memory affords
    peak = estimate_peak(batch_size=target, num_inducing=20, cached=True, **kw)
    memory_bytes = int(peak / memory.SAFETY["cpu"]) + 1
    expected = device_defaults(memory_bytes, is_gpu=False, num_inducing=20, **kw)
    assert expected.batch_size == target
    monkeypatch.setattr(memory, "available_memory", lambda device: memory_bytes)
    model = _model(adata)
    model.train(max_iter=2, init_iter=2, tol=0, min_iter=0)
    assert model.train_info["batch_size"] == target < adata.n_obs
    chosen = model.train_info["memory_defaults"]
    assert chosen["batch_size"] == target and chosen["num_inducing"] == 20
    assert model.module.prior.cache_budget == expected.cache_budget  # from the memory, not 5·10⁷
    # a continued fit keeps the batch chosen first, whatever the memory says now
    monkeypatch.setattr(memory, "available_memory", lambda device: 1000 * GIB)
    model.train(max_iter=1, tol=0, min_iter=0)
    assert model.train_info["batch_size"] == target
    assert model.train_info["memory_defaults"]["batch_size"] == target


def test_a_fit_with_ample_memory_is_unchanged(small_adata, monkeypatch):
    """The plain defaults, bit for bit: the same ELBO history as with them passed explicitly."""
    monkeypatch.setattr(memory, "available_memory", lambda device: 1000 * GIB)
    model = _model(small_adata)
    model.train(max_iter=3, init_iter=2, tol=0, min_iter=0)
    assert "memory_defaults" not in model.train_info
    assert model.train_info["batch_size"] == small_adata.n_obs
    assert model.module.prior.cache_budget == PLAIN_CPU["cache_budget"]
    assert model.module.prior.diagonal_only is PLAIN_CPU["diagonal_only"]
    explicit = sfact.models.SpatialFactorization(
        small_adata,
        prior="svgp",
        n_factors=3,
        prior_kwargs={
            "num_inducing": 20,
            "lengthscale": 10.0,
            "diagonal_only": PLAIN_CPU["diagonal_only"],
            "cache_budget": PLAIN_CPU["cache_budget"],
        },
        random_state=0,
    )
    explicit.train(max_iter=3, init_iter=2, tol=0, min_iter=0, batch_size=small_adata.n_obs)
    np.testing.assert_array_equal(model.history["elbo"].to_numpy(), explicit.history["elbo"].to_numpy())
