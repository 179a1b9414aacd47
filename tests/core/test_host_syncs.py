"""The training loop's fast path: no host-device synchronization per step.

On a GPU every ``.item()``, ``.cpu()``, ``bool(tensor)`` (``if not torch.isfinite(loss)``), and
every op whose output size depends on the data (``nonzero``, boolean-mask indexing, ``bincount``,
``repeat_interleave`` without ``output_size``) waits for the device. On the CPU nothing waits, so
these tests count the calls themselves: a training iteration may make a fixed number of them (the
ELBO and the finiteness flags fetched once, the order of the mini-batches), never one per step.
"""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest
import torch

import sfact
from sfact.models import SpatialFactorization

#: Tensor methods that copy to the host or turn a tensor into a Python value (a sync on a GPU)
HOST_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
#: torch functions whose output size depends on the data (a sync on a GPU)
SIZED_FUNCTIONS = ("nonzero", "bincount", "unique", "masked_select", "argwhere")
#: at most this many of the calls above per iteration
PER_ITERATION = 4


@pytest.fixture(scope="module")
def adata():
    adata = sfact.datasets.simulate(n_obs=120, n_vars=15, n_factors=3, n_groups=2, random_state=0)
    return adata


class _Counter:
    def __init__(self):
        self.calls: dict[str, int] = {}
        self.on = False

    def hit(self, name: str) -> None:
        if self.on:
            self.calls[name] = self.calls.get(name, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def _has_bool_mask(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool and p.dim() > 0 for p in parts)


@pytest.fixture
def counter(monkeypatch):
    """Count, while ``counter.on``, the calls that synchronize host and device on a GPU."""
    c = _Counter()

    def method(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            # Adam reads its step counters, which live on the CPU whatever the device: no sync
            if not sys._getframe(1).f_globals.get("__name__", "").startswith("torch.optim"):
                c.hit(f"Tensor.{name}")
            return original(self, *args, **kwargs)

        return wrapper

    for name in HOST_METHODS:
        monkeypatch.setattr(torch.Tensor, name, method(name))

    def function(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            c.hit(name)
            return original(*args, **kwargs)

        return wrapper

    for name in SIZED_FUNCTIONS:
        monkeypatch.setattr(torch, name, function(torch, name))
        if hasattr(torch.Tensor, name):
            monkeypatch.setattr(torch.Tensor, name, method(name))

    repeat_interleave = torch.repeat_interleave

    def repeat_wrapper(input, repeats=None, dim=None, *, output_size=None):
        if isinstance(repeats, torch.Tensor) or (repeats is None and isinstance(input, torch.Tensor)):
            if output_size is None:
                c.hit("repeat_interleave without output_size")
        return repeat_interleave(input, repeats, dim, output_size=output_size)

    monkeypatch.setattr(torch, "repeat_interleave", repeat_wrapper)

    getitem, setitem = torch.Tensor.__getitem__, torch.Tensor.__setitem__

    def getitem_wrapper(self, index):
        if _has_bool_mask(index):
            c.hit("boolean-mask indexing")
        return getitem(self, index)

    def setitem_wrapper(self, index, value):
        if _has_bool_mask(index):
            c.hit("boolean-mask indexing")
        return setitem(self, index, value)

    monkeypatch.setattr(torch.Tensor, "__getitem__", getitem_wrapper)
    monkeypatch.setattr(torch.Tensor, "__setitem__", setitem_wrapper)
    return c


def _per_iteration(adata, counter, *, prior: str, batch_size: int, **model_kwargs) -> list[dict[str, int]]:
    """The counted calls of each training iteration after the first (which also sets up)."""
    kwargs = {"prior_kwargs": {"lengthscale": 20.0}} if prior != "pnmf" else {}
    model = SpatialFactorization(adata, prior=prior, n_factors=3, **kwargs, **model_kwargs)
    snapshots = []

    def callback(iteration, elbo):
        snapshots.append(dict(counter.calls))

    counter.on = True
    try:
        model.train(
            max_iter=4,
            batch_size=batch_size,
            init_iter=3,
            min_iter=100,
            progress_bar=False,
            callback=callback,
        )
    finally:
        counter.on = False
    assert len(snapshots) == 4
    out = []
    for before, after in itertools.pairwise(snapshots):
        out.append(
            {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) > before.get(k, 0)}
        )
    return out


@pytest.mark.parametrize(
    ("prior", "model_kwargs"),
    [
        ("svgp", {}),
        ("mggp_svgp", {"group_key": "group"}),
        ("lcgp", {}),
        ("pnmf", {}),
        ("pnmf", {"loadings_mode": "projected"}),
        ("svgp", {"sample_key": "group", "gene_offsets": True}),
        ("pnmf", {"sample_key": "group", "gene_offsets": True, "loadings_mode": "projected"}),
    ],
    ids=["svgp", "mggp_svgp", "lcgp", "pnmf", "pnmf-projected", "svgp-offsets", "pnmf-offsets-projected"],
)
def test_no_host_sync_per_step(adata, counter, prior, model_kwargs):
    """Six mini-batches per iteration make no more syncs than two, and only a few per iteration."""
    two = _per_iteration(adata, counter, prior=prior, batch_size=60, **model_kwargs)
    six = _per_iteration(adata, counter, prior=prior, batch_size=20, **model_kwargs)
    for calls in two + six:
        assert sum(calls.values()) <= PER_ITERATION, sorted(calls.items())
    assert six == two, f"more syncs with more steps per iteration: {six[0]} vs {two[0]}"


def test_counter_sees_a_per_step_check(adata, counter, monkeypatch):
    """The instrumentation catches a Python-side check on a tensor in the step (the old loop had one)."""
    from sfact._core import module as module_mod

    original = module_mod.FactorModule.elbo

    def checked_elbo(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        if not torch.isfinite(terms.elbo):  # the per-step check the loop used to make
            raise AssertionError("non-finite")
        return terms

    monkeypatch.setattr(module_mod.FactorModule, "elbo", checked_elbo)
    six = _per_iteration(adata, counter, prior="pnmf", batch_size=20)
    assert six[0].get("Tensor.__bool__", 0) >= 6


def test_non_finite_iteration_restores_the_last_finite_state(adata):
    """A NaN in the middle of an iteration raises, naming it, and the model is left as it was before it."""
    model = SpatialFactorization(adata, prior="svgp", n_factors=3, prior_kwargs={"lengthscale": 20.0})
    state = {}

    def poison(iteration, elbo):
        if iteration == 2:
            state.update({k: v.detach().clone() for k, v in model.module.state_dict().items()})
            state["adam"] = {
                id(p): {k: v.clone() for k, v in s.items()} for p, s in model._optimizer.state.items()
            }
            # poisons the loadings' running statistics: non-finite loadings in the first step,
            # then a non-finite ELBO in the next ones
            model.module.mm_den[0] = float("nan")

    with pytest.raises(sfact.models.TrainingError, match=r"iteration 3\b.*before this iteration"):
        model.train(max_iter=10, batch_size=40, init_iter=3, callback=poison, progress_bar=False)
    assert len(model.history_) == 2
    now = model.module.state_dict()
    for k, v in state.items():
        if k == "adam":
            continue
        if k == "mm_den":
            v = v.clone()
            v[0] = float("nan")  # the poison itself is part of the state before iteration 3
        torch.testing.assert_close(now[k], v, equal_nan=True, rtol=0, atol=0, msg=k)
    for p, s in model._optimizer.state.items():
        for k, v in s.items():
            torch.testing.assert_close(v, state["adam"][id(p)][k], rtol=0, atol=0)
    assert np.isfinite(model.get_loadings()).all()


def test_blocks_are_cut_without_sized_ops(counter):
    """The mini-batch blocks and their CSR structures: no bincount, sizes known on the host."""
    import scipy.sparse as sp

    from sfact._core.data import SparseCounts

    rng = np.random.default_rng(0)
    dense = rng.poisson(0.5, (50, 12)).astype(np.float32)
    dense[7] = 0  # an empty cell
    Y = sp.csr_matrix(dense)
    counts = SparseCounts(Y)
    counter.on = True
    blocks = counts.blocks(16, torch.Generator().manual_seed(0))
    counter.on = False
    # the permutation is drawn on the host and read there once; nothing waits for the device
    assert counter.calls == {"Tensor.numpy": 1}
    assert sum(b.n_rows for b in blocks) == 50
    for b in blocks:
        sub = Y[b.idx.numpy()]
        np.testing.assert_array_equal(b.crow.numpy(), sub.indptr)
        np.testing.assert_array_equal(b.t_crow.numpy(), sub.tocsc().indptr)
        np.testing.assert_array_equal(b.cols[b.t_perm].numpy(), np.sort(sub.indices, kind="stable"))


@pytest.mark.gpu
def test_no_sync_per_step_on_cuda(adata):
    """On CUDA, torch's sync debug mode counts the same syncs per iteration with two or six steps."""
    import warnings

    def per_iteration(batch_size):
        model = SpatialFactorization(
            adata, prior="svgp", n_factors=3, prior_kwargs={"lengthscale": 20.0}, device="cuda"
        )
        counts = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")

            def callback(iteration, elbo):
                counts.append(len(caught))

            torch.cuda.set_sync_debug_mode("warn")
            try:
                model.train(max_iter=4, batch_size=batch_size, init_iter=3, min_iter=100, callback=callback)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return np.diff(counts).tolist()

    two, six = per_iteration(60), per_iteration(20)
    assert six == two
    assert max(six) <= PER_ITERATION
