"""Reduced precision of the SVGP priors' large products (``matmul_precision``).

TF32 rounding emulated on the bit pattern against a float64 reference; the scoped TF32 switch
restores torch's global flags (also on an exception, and in every state of torch's two TF32 APIs);
the emulated mode changes the prior's products by at most TF32's error bound, forward and backward;
the option travels from ``prior_kwargs`` to the prior and through save/load; on CUDA, real TF32
stays within the same bound, ``"highest"`` keeps FP32 even when TF32 is switched on globally, and
the kernel and the triangular solve never see TF32.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sfact
import sfact._core.precision as precision
from sfact._core.precision import (
    MATMUL_PRECISIONS,
    TF32_UNIT_ROUNDOFF,
    cuda_tf32,
    matmul,
    round_to_tf32,
)
from sfact._core.priors import PriorInput
from sfact._core.svgp import SVGPPrior
from sfact.models import SpatialFactorization
from sfact.models._config import SVGPConfig

U = TF32_UNIT_ROUNDOFF  # 2^-11


def _reference_tf32(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even to 11 significant bits, in float64 (normal numbers)."""
    mant, exp = np.frexp(x.astype(np.float64))  # x = mant * 2^exp, 0.5 <= |mant| < 1
    return np.ldexp(np.round(mant * 2.0**11), exp - 11)  # np.round: ties to even


def _bound(a: torch.Tensor, b: torch.Tensor, per_input: float) -> torch.Tensor:
    """Error bound of a product of inputs rounded with relative error ``per_input``, summed in FP32."""
    k = a.shape[-1]
    gamma = k * 2.0**-24 / (1 - k * 2.0**-24)  # FP32 accumulation of k terms
    rounding = 2 * per_input + per_input**2
    # against FP32 (itself within gamma of the exact product): the two errors add
    return (rounding + 2 * gamma) * (a.detach().double().abs() @ b.detach().double().abs())


# ============================================================================ rounding
def test_round_to_tf32_known_values():
    one = 1.0
    cases = {
        one: one,
        one + 2**-10: one + 2**-10,  # exactly representable: kept
        one + 2**-11: one,  # tie, the lower neighbour is even
        one + 3 * 2**-11: one + 2**-9,  # tie, the upper neighbour is even
        one + 2**-11 + 2**-20: one + 2**-10,  # above the midpoint
        one + 2**-11 - 2**-20: one,  # below the midpoint
        -(one + 3 * 2**-11): -(one + 2**-9),  # the sign is kept
        float(torch.finfo(torch.float32).max): math.inf,  # above the largest TF32 number, as in hardware
        (2 - 2**-10) * 2.0**127: (2 - 2**-10) * 2.0**127,  # the largest TF32 number: kept
        0.0: 0.0,
    }
    x = torch.tensor(list(cases), dtype=torch.float32)
    expected = torch.tensor(list(cases.values()), dtype=torch.float32)
    assert torch.equal(round_to_tf32(x), expected)
    special = torch.tensor([math.inf, -math.inf, math.nan, -0.0])
    out = round_to_tf32(special)
    assert out[0] == math.inf and out[1] == -math.inf and torch.isnan(out[2])
    assert out[3] == 0 and torch.signbit(out[3])


def test_round_to_tf32_matches_a_float64_reference():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(20_000) * np.exp(rng.uniform(-60, 60, 20_000))).astype(np.float32)
    got = round_to_tf32(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, _reference_tf32(x).astype(np.float32))
    rel = np.abs(got.astype(np.float64) - x) / np.abs(x)
    assert rel.max() <= U
    assert rel.max() > 0.9 * U  # the bound is reached: the rounding does drop 13 bits
    # TF32 values have at most 11 significant bits: the 13 low bits of the pattern are zero
    assert not (torch.from_numpy(got).view(torch.int32) & 0x1FFF).any()


def test_round_to_tf32_takes_views_and_rejects_other_dtypes():
    x = torch.randn(30, 40)
    assert torch.equal(round_to_tf32(x.T), round_to_tf32(x).T)
    with pytest.raises(TypeError, match="float32"):
        round_to_tf32(x.double())


# ============================================================================ the scoped switch
def _flags():
    m = torch.backends.cuda.matmul
    try:
        legacy = m.allow_tf32
    except RuntimeError:
        legacy = "refused"
    return legacy, m.fp32_precision


@pytest.fixture
def clean_flags():
    """Start from torch's TF32 flags as a fresh process has them; put the previous ones back after."""
    m = torch.backends.cuda.matmul
    legacy, new = _flags()
    m.allow_tf32 = False
    m.fp32_precision = "none"
    assert _flags() == (False, "none")
    yield
    m.allow_tf32 = legacy if isinstance(legacy, bool) else False
    m.fp32_precision = new


@pytest.mark.parametrize(
    "setup",
    ["fresh", "legacy_on", "set_float32_matmul_precision", "new_api_mixed"],
)
@pytest.mark.parametrize("enabled", [True, False])
def test_cuda_tf32_restores_the_global_flags_on_an_exception(clean_flags, setup, enabled):
    m = torch.backends.cuda.matmul
    if setup == "legacy_on":
        m.allow_tf32 = True
    elif setup == "set_float32_matmul_precision":
        torch.set_float32_matmul_precision("high")
    elif setup == "new_api_mixed":  # legacy then new API: torch refuses to read the legacy flag
        m.allow_tf32 = True
        m.fp32_precision = "ieee"
    before = _flags()
    with pytest.raises(KeyError, match="inside"), cuda_tf32(enabled):
        assert (m.fp32_precision == "tf32") == enabled
        raise KeyError("inside")
    assert _flags() == before


def test_cuda_tf32_leaves_the_flags_alone_when_they_already_agree(clean_flags, monkeypatch):
    writes = []
    real = type(torch.backends.cuda.matmul).__setattr__

    def spy(self, name, value):
        writes.append((name, value))
        real(self, name, value)

    monkeypatch.setattr(type(torch.backends.cuda.matmul), "__setattr__", spy)
    with cuda_tf32(False):
        pass
    assert writes == []
    with cuda_tf32(True):
        assert torch.backends.cuda.matmul.allow_tf32
    assert writes and writes[0] == ("allow_tf32", True)


def test_backward_products_run_at_the_forward_precision(monkeypatch):
    """The gradient products of ``high`` are TF32 too (they run outside any ``with`` of the forward)."""
    seen = []
    real = precision._product

    def recorder(a, b, tf32):
        seen.append(tf32)
        return real(a, b, tf32)

    monkeypatch.setattr(precision, "_product", recorder)
    a = torch.randn(3, 5, requires_grad=True)
    b = torch.randn(5, 4, requires_grad=True)
    precision._PrecisionMatmul.apply(a, b, True, False).sum().backward()
    assert seen == [True, True, True]  # forward, d/da, d/db
    seen.clear()
    precision._PrecisionMatmul.apply(a, b, False, False).sum().backward()
    assert seen == [False, False, False]


# ============================================================================ matmul
def test_fp32_modes_on_a_cpu_are_plain_matmul(clean_flags):
    a, b = torch.randn(2, 7, 9), torch.randn(9, 5)
    for prec in ("auto", "highest", "high"):
        assert torch.equal(matmul(a, b, prec), torch.matmul(a, b))
    assert _flags() == (False, "none")
    # float64 products are exact in every mode, emulation included
    assert torch.equal(matmul(a.double(), b.double(), "tf32-emulated"), a.double() @ b.double())


def test_emulated_product_and_gradients_within_the_tf32_bound():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 64, 300, generator=g).requires_grad_()
    b = torch.randn(1, 300, 50, generator=g).requires_grad_()  # broadcast over the batch
    w = torch.randn(4, 64, 50, generator=g)
    out32 = torch.matmul(a, b)
    (out32 * w).sum().backward()
    ga32, gb32 = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    out = matmul(a, b, "tf32-emulated")
    (out * w).sum().backward()
    assert out.shape == out32.shape and a.grad.shape == a.shape and b.grad.shape == b.shape
    assert ((out - out32).abs().double() <= _bound(a, b, U)).all()
    assert not torch.equal(out, out32)  # the emulation is on
    ga_bound = _bound(w, b.mT.expand(4, 50, 300), U)
    assert ((a.grad - ga32).abs().double() <= ga_bound).all()
    gb_bound = _bound(a.mT, w, U).sum(0, keepdim=True)
    assert ((b.grad - gb32).abs().double() <= gb_bound).all()
    assert not torch.equal(a.grad, ga32) and not torch.equal(b.grad, gb32)  # backward emulated too


# ============================================================================ the SVGP prior
KERNEL = {
    "kernel": "matern32",
    "lengthscale": 15.0,
    "sigma": 1.0,
    "group_embedding": None,
    "group_diff_param": 1.0,
    "per_factor_kernel": False,
    "train_lengthscale": False,
    "train_sigma": False,
    "train_group_diff_param": False,
    "cache_budget": 10**7,
}


def _prior(prec, diagonal_only, seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.uniform(0, 100, (60, 2))
    p = SVGPPrior(4, Z, diagonal_only=diagonal_only, matmul_precision=prec, **KERNEL)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        p.m.copy_(torch.randn(p.m.shape, generator=g))
        p.raw_Lu_diag.copy_(-1 + 0.3 * torch.randn(p.raw_Lu_diag.shape, generator=g))
        if not diagonal_only:
            p.Lu_offdiag.copy_(0.1 * torch.randn(p.Lu_offdiag.shape, generator=g))
    return p


@pytest.mark.parametrize("diagonal_only", [True, False])
def test_emulated_mode_changes_the_marginals_within_the_tf32_bound(diagonal_only):
    X = torch.as_tensor(np.random.default_rng(1).uniform(0, 100, (250, 2)), dtype=torch.float32)
    inp = PriorInput(idx=torch.arange(250), n_total=250, X=X)
    fp32, emulated = _prior("highest", diagonal_only), _prior("tf32-emulated", diagonal_only)
    mu32, var32 = fp32.marginals(inp)
    mu, var = emulated.marginals(inp)
    A = fp32._A(X, None)[0]  # (M, B), FP32 in both modes
    # the mean is one product with A
    assert ((mu - mu32).abs().double() <= _bound(fp32.m, A, U).T).all()
    # the variance: σ² = resid + Σ_j x_j² with x = the product's entries (each within δ_j)
    if diagonal_only:
        dvar = _bound(torch.exp(2 * fp32.raw_Lu_diag), A.pow(2), U).T
    else:
        AtLu = (A.T @ fp32.Lu()).double()  # (L, B, M)
        delta = _bound(A.T, fp32.Lu(), U)
        dvar = (delta * (2 * AtLu.abs() + delta)).sum(-1).T
    assert ((var - var32).abs().double() <= dvar + 1e-6 * var32.abs().double()).all()
    assert not torch.equal(mu, mu32) and not torch.equal(var, var32)
    # the KL involves no product with A: identical
    assert torch.equal(emulated.kl(), fp32.kl())


def test_emulated_mode_gradients_of_the_marginals():
    X = torch.as_tensor(np.random.default_rng(2).uniform(0, 100, (200, 2)), dtype=torch.float32)
    inp = PriorInput(idx=torch.arange(200), n_total=200, X=X)
    grads = {}
    for prec in ("highest", "tf32-emulated"):
        p = _prior(prec, diagonal_only=False)
        mu, var = p.marginals(inp)
        (mu.sum() + var.sum()).backward()
        grads[prec] = (p.m.grad.clone(), p.Lu_offdiag.grad.clone())
    for g32, gem in zip(grads["highest"], grads["tf32-emulated"], strict=True):
        assert not torch.equal(g32, gem)
        np.testing.assert_allclose(gem.numpy(), g32.numpy(), rtol=2e-2, atol=2e-3 * g32.abs().max().item())


def test_the_option_is_validated_by_the_config_and_the_prior():
    assert set(MATMUL_PRECISIONS) == {"auto", "highest", "high", "tf32-emulated"}
    assert SVGPConfig().matmul_precision == "auto"
    for value in MATMUL_PRECISIONS:
        assert SVGPConfig(matmul_precision=value).matmul_precision == value
    with pytest.raises(ValueError, match=r"`matmul_precision` must be 'auto'.*received 'bf16'"):
        SVGPConfig(matmul_precision="bf16")
    with pytest.raises(ValueError, match="`matmul_precision` must be one of"):
        SVGPPrior(
            2, np.zeros((3, 2)) + np.arange(3)[:, None], diagonal_only=True, matmul_precision="tf32", **KERNEL
        )


def test_the_option_reaches_the_prior_and_survives_save_and_load(tmp_path):
    adata = sfact.datasets.simulate(n_obs=150, n_vars=12, n_factors=2, random_state=0)
    sfact.pp.prepare(adata)
    model = SpatialFactorization(
        adata,
        prior="svgp",
        n_factors=2,
        prior_kwargs={"num_inducing": 20, "lengthscale": 20.0, "matmul_precision": "tf32-emulated"},
    )
    model.train(max_iter=3, progress_bar=False)
    assert model.module.prior.matmul_precision == "tf32-emulated"
    assert np.isfinite(model.history["elbo"]).all()
    model.save(tmp_path / "m")
    loaded = SpatialFactorization.load(tmp_path / "m", adata=adata)
    assert loaded.module.prior.matmul_precision == "tf32-emulated"
    np.testing.assert_array_equal(loaded.get_factors(), model.get_factors())
    default = SpatialFactorization(adata, prior="svgp", n_factors=2, prior_kwargs={"num_inducing": 20})
    default.train(max_iter=0, progress_bar=False)
    assert default.module.prior.matmul_precision == "auto"


# ============================================================================ CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_tf32_within_the_bound_and_highest_guarded(clean_flags):
    """``high`` and ``auto`` run TF32 (error within 2^-10 per input: hardware may truncate), flags
    untouched afterwards; ``highest`` keeps FP32 accuracy when the user switched TF32 on globally."""
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(8, 512, 1024, device="cuda", generator=g).requires_grad_()
    b = torch.randn(1, 1024, 256, device="cuda", generator=g)
    exact = a.detach().double() @ b.double()
    truncation = 2.0**-10  # the weaker bound of hardware that truncates instead of rounding
    fp32_bound = _bound(a, b, 0.0) / 2  # FP32 accumulation only (worst case)
    fp32_error = (torch.matmul(a.detach(), b).double() - exact).abs().max()
    for prec in ("high", "auto"):  # "auto" is TF32 on CUDA
        out = matmul(a, b, prec)
        out.sum().backward()
        assert _flags() == (False, "none")
        error = (out.double() - exact).abs()
        assert (error <= _bound(a, b, truncation)).all()
        if torch.cuda.get_device_capability() >= (8, 0):  # TF32 exists: it was used
            assert error.max() > 10 * fp32_error
    torch.backends.cuda.matmul.allow_tf32 = True  # the user's global switch
    out_highest = matmul(a.detach(), b, "highest")
    assert torch.backends.cuda.matmul.allow_tf32  # restored to the user's value
    assert ((out_highest.double() - exact).abs() <= fp32_bound).all()
    torch.backends.cuda.matmul.allow_tf32 = False
    emulated = matmul(a.detach(), b, "tf32-emulated")
    assert ((emulated.double() - exact).abs() <= _bound(a, b, U)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_and_solve_run_without_tf32_on_cuda(clean_flags, monkeypatch):
    """``K_zx`` (``torch.cdist``'s matrix product) and the triangular solve for ``A`` see TF32 off,
    also when the user switched it on globally; the user's flag is back afterwards."""
    seen = []

    def recording(name, fn):
        def wrapper(*args, **kwargs):
            seen.append((name, torch.backends.cuda.matmul.allow_tf32))
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(torch, "cdist", recording("cdist", torch.cdist))
    monkeypatch.setattr(
        torch.linalg, "solve_triangular", recording("solve_triangular", torch.linalg.solve_triangular)
    )
    prior = _prior("auto", diagonal_only=False).to("cuda")
    X = torch.rand(300, 2, device="cuda") * 100
    torch.backends.cuda.matmul.allow_tf32 = True
    prior.marginals(PriorInput(idx=torch.arange(300, device="cuda"), n_total=300, X=X))
    assert torch.backends.cuda.matmul.allow_tf32
    assert {name for name, _ in seen} == {"cdist", "solve_triangular"}
    assert not any(flag for _, flag in seen)
