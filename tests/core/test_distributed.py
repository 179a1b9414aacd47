"""Data-parallel training (``train(distributed=True)``, ``sfact.models.train_distributed``) on the CPU.

Two gloo processes must give the single-process fit of the same seed: the same ELBO history and
loadings up to the order of float summation.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

import sfact


def _gloo() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return False
    return dist.is_available() and dist.is_gloo_available()


needs_gloo = pytest.mark.skipif(
    not _gloo(), reason="torch.distributed with the gloo backend is not available"
)

ITERS = dict(max_iter=5, min_iter=0)


@pytest.fixture(scope="module")
def adata():
    ad = sfact.datasets.simulate(n_obs=200, n_vars=20, n_factors=3, random_state=0)
    sfact.pp.prepare(ad)
    return ad


@pytest.fixture(scope="module")
def adata_samples():
    ad = sfact.datasets.simulate(n_obs=200, n_vars=20, n_factors=3, n_samples=2, random_state=1)
    sfact.pp.prepare(ad)
    return ad


def _same_fit(one, two) -> None:
    e1, e2 = np.asarray(one.history_.elbo), np.asarray(two.history_.elbo)
    assert e1.shape == e2.shape == (ITERS["max_iter"],)
    np.testing.assert_allclose(e2, e1, rtol=1e-5, atol=0)
    W1, W2 = np.asarray(one.get_loadings()), np.asarray(two.get_loadings())
    np.testing.assert_allclose(W2, W1, rtol=1e-4, atol=1e-5 * np.abs(W1).max())


@needs_gloo
def test_svgp_two_processes_equal_one(adata):
    """svgp, 2 steps per iteration (a global KL counted once): 2 gloo processes give the 1-process fit."""
    kw = dict(prior="svgp", n_factors=3, prior_kwargs={"num_inducing": 30}, random_state=0)
    one = sfact.models.SpatialFactorization(adata, **kw).train(batch_size=100, **ITERS)
    two = sfact.models.train_distributed(adata, n_procs=2, backend="gloo", batch_size=100, **kw, **ITERS)
    assert isinstance(two, sfact.models.SpatialFactorization)
    assert two.is_trained and two.device == "cpu" and two.adata is adata
    _same_fit(one, two)
    # the KL enters once, not once per process
    np.testing.assert_allclose(two.history_.kl, one.history_.kl, rtol=1e-5)


@needs_gloo
def test_pnmf_gene_offsets_uneven_batches_equal_one(adata_samples):
    """pnmf (per-cell KL) with gene offsets; batches of 199 and 1 cells: process 1 has no cells in one."""
    kw = dict(prior="pnmf", n_factors=3, sample_key="sample", random_state=0)
    one = sfact.models.SpatialFactorization(adata_samples, **kw)
    assert one.setup.gene_offsets  # the per-sample statistics are summed too
    one.train(batch_size=199, **ITERS)
    two = sfact.models.train_distributed(adata_samples, n_procs=2, batch_size=199, **kw, **ITERS)
    _same_fit(one, two)
    np.testing.assert_allclose(
        two.module.gene_offset.numpy(), one.module.gene_offset.numpy(), rtol=1e-4, atol=1e-6
    )


@needs_gloo
def test_error_in_a_process_reaches_the_caller(adata):
    with pytest.raises(ValueError, match="n_factors"):
        sfact.models.train_distributed(adata, n_procs=2, prior="pnmf", n_factors=0, max_iter=1)


def _mismatch_worker(rank: int, path: str, out: str) -> None:
    import torch.distributed as dist

    sfact.settings.progress_bar = False
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    model = None
    try:
        ad = sfact.datasets.simulate(n_obs=60, n_vars=10, n_factors=2, random_state=0)
        sfact.pp.prepare(ad)
        model = sfact.models.SpatialFactorization(ad, prior="pnmf", n_factors=2)
        try:
            model.train(max_iter=2, batch_size=20 + 10 * rank, distributed=True)
        except ValueError as err:
            with open(f"{out}_{rank}", "w") as f:
                f.write(str(err))
    finally:
        del model
        gc.collect()  # free the error's reference cycles (holding the gloo group) while Python is alive
        dist.destroy_process_group()


@needs_gloo
def test_processes_with_different_options_fail_together(tmp_path):
    """A process with another `batch_size` is refused on every process, before any step could hang."""
    import torch.multiprocessing as mp

    mp.spawn(_mismatch_worker, args=(str(tmp_path / "rdv"), str(tmp_path / "err")), nprocs=2, join=True)
    for rank in range(2):
        text = (tmp_path / f"err_{rank}").read_text()
        assert "differ in: batch_size" in text


def test_distributed_needs_a_process_group(adata):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is initialized in this process")
    model = sfact.models.SpatialFactorization(adata, prior="pnmf", n_factors=2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        model.train(max_iter=1, distributed=True)
    assert model.module is None  # refused before anything was set up


def test_train_distributed_checks_its_options(adata):
    with pytest.raises(TypeError, match="devices="):
        sfact.models.train_distributed(adata, n_procs=2, device="cpu")
    with pytest.raises(TypeError, match="random_state"):
        sfact.models.train_distributed(adata, n_procs=2, random_state=np.random.default_rng(0))
    with pytest.raises(ValueError, match="one per process"):
        sfact.models.train_distributed(adata, n_procs=3, devices=["cpu", "cpu"])
    with pytest.raises(ValueError, match="backend"):
        sfact.models.train_distributed(adata, n_procs=2, backend="mpi")
