"""Precision of the large products of the SVGP priors: FP32, TF32 on CUDA, or TF32 emulated.

The sparse variational GP step is dominated by a few products with ``A = L_zz⁻¹ K_zx``: the mean
``mᵀA``, the explained variance ``(A²)ᵀ diag(S)`` (diagonal ``S``) or ``Aᵀ L_u`` (full ``S``), and
their gradients. On an Ampere-or-later GPU, TF32 tensor cores run them several times faster than
plain FP32, at the price of inputs rounded to 10 explicit mantissa bits (a relative error of at
most 2⁻¹¹ per input with round-to-nearest, accumulation in FP32).

:func:`matmul` computes one such product at a chosen precision:

``"auto"`` (the default of the SVGP priors)
    ``"high"`` on CUDA, ``"highest"`` elsewhere.
``"highest"``
    Plain FP32: on CUDA with TF32 switched off for the product and its gradients, even when the
    user switched it on globally (``torch.backends.cuda.matmul.allow_tf32 = True`` or
    ``torch.set_float32_matmul_precision("high")``).
``"high"``
    TF32 on CUDA for the product and its gradients only; plain FP32 elsewhere (there is no TF32 on
    a CPU).
``"tf32-emulated"``
    For testing and accuracy studies on any device: both inputs of the product (and of each
    gradient product) rounded to TF32 by :func:`round_to_tf32`, then multiplied in FP32 — what the
    tensor cores compute, up to the order of the FP32 accumulation. About 1.3-3x slower than FP32.

Why TF32 is the default on CUDA here: with TF32 emulated at exactly these products, the held-out
deviance of ``svgp`` and ``mggp_svgp`` on osmFISH and Visium prostate (diagonal and full ``S``)
moves by at most a few thousandths of a percent, with rounding to nearest and with truncation
alike, and training takes the same number of iterations (``benchmarks/bench_precision.py``; table
in "Reduced precision" of the performance docs). TF32 in *every* float32 matmul
(``allow_tf32 = True``) costs these priors 0.5-1.1% in the emulation and 1.2-2.2% on an H200,
all of it (in the emulation) from the matrix product inside ``torch.cdist`` that the kernel's
distances go through, which the priors therefore compute with TF32 off.

Only float32 products are affected; float64 ones are exact in every mode. TF32 is switched on and
off by :func:`cuda_tf32` around exactly these products (forward and backward, the backward through
a custom autograd function), and the global flags are restored afterwards, also on an exception.
The flag is process-global while a product runs, so another thread's CUDA matmuls started at the
same moment would see it (sfact trains one model per process).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "MATMUL_PRECISIONS",
    "TF32_UNIT_ROUNDOFF",
    "MatmulPrecision",
    "check_matmul_precision",
    "cuda_tf32",
    "matmul",
    "round_to_tf32",
]

MatmulPrecision = Literal["auto", "highest", "high", "tf32-emulated"]
MATMUL_PRECISIONS: tuple[str, ...] = ("auto", "highest", "high", "tf32-emulated")
#: TF32 keeps 10 of FP32's 23 explicit mantissa bits
TF32_DROPPED_BITS = 13
#: relative rounding error bound of round-to-nearest TF32 (half a unit in the last of 11 bits)
TF32_UNIT_ROUNDOFF = 2.0**-11


def check_matmul_precision(value: str) -> str:
    """``value`` if it names a precision of :data:`MATMUL_PRECISIONS`; :class:`ValueError` otherwise."""
    if value not in MATMUL_PRECISIONS:
        raise ValueError(
            f"`matmul_precision` must be one of {MATMUL_PRECISIONS}, received {value!r}: 'auto' for "
            "TF32 on CUDA and FP32 elsewhere, 'highest' for plain FP32, 'high' for TF32 on CUDA, "
            "'tf32-emulated' to study TF32's error on any device."
        )
    return value


def round_to_tf32(x: Tensor) -> Tensor:
    """Round float32 values to the nearest TF32 value (10 explicit mantissa bits, ties to even).

    Works on the float32 bit pattern: adds half a unit of the lowest kept bit (less one, plus that
    bit, so ties go to the even neighbour) and clears the 13 dropped bits; the exponent range is
    FP32's. Infinities and NaN pass unchanged; finite values above the largest TF32 number round to
    infinity, as in hardware. The result is float32 (every value exactly representable in TF32),
    with a relative error of at most :data:`TF32_UNIT_ROUNDOFF`.

    Parameters
    ----------
    x
        A float32 tensor.

    Returns
    -------
    A new float32 tensor of the same shape.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"`round_to_tf32` takes a float32 tensor, received {x.dtype}.")
    bits = x.view(torch.int32)
    r = bits >> TF32_DROPPED_BITS
    r &= 1  # the lowest kept bit: ties round to even
    r += (1 << (TF32_DROPPED_BITS - 1)) - 1  # 0x0FFF: half a unit of the lowest kept bit, less one
    r += bits
    r &= -(1 << TF32_DROPPED_BITS)  # clear the 13 dropped bits
    return torch.where(torch.isnan(x), x, r.view(torch.float32))


def _cuda_matmul_flags() -> tuple[bool | None, str]:
    """(``allow_tf32`` or ``None`` when torch refuses to read it, ``fp32_precision``) of cuBLAS matmuls."""
    m = torch.backends.cuda.matmul
    try:
        legacy = bool(m.allow_tf32)
    except RuntimeError:  # the legacy and the new API were mixed: torch refuses the legacy read
        legacy = None
    return legacy, m.fp32_precision


@contextlib.contextmanager
def cuda_tf32(enabled: bool) -> Iterator[None]:
    """Switch TF32 for CUDA float32 matmuls on (``True``) or off inside the block; restore it after.

    The flag read and written is ``torch.backends.cuda.matmul.allow_tf32`` (the one
    ``torch.set_float32_matmul_precision`` sets too); when the user set the newer
    ``torch.backends.cuda.matmul.fp32_precision`` in a way that makes torch refuse to read the
    older flag, that one instead. Both are restored in a ``finally``, so an exception inside the
    block leaves them as they were. Nothing is written when the flag already has the wanted value.

    Parameters
    ----------
    enabled
        TF32 on or off inside the block.
    """
    m = torch.backends.cuda.matmul
    legacy, before = _cuda_matmul_flags()
    if legacy is not None and legacy == bool(enabled):
        yield
        return
    try:
        if legacy is None:
            m.fp32_precision = "tf32" if enabled else "ieee"
        else:
            m.allow_tf32 = bool(enabled)
        yield
    finally:
        if legacy is not None:
            m.allow_tf32 = legacy
        if m.fp32_precision != before:  # the legacy setter leaves "ieee" where "none" was
            m.fp32_precision = before


def _product(a: Tensor, b: Tensor, tf32: bool) -> Tensor:
    """``a @ b``; on CUDA with TF32 switched on or off for it."""
    if a.is_cuda:
        with cuda_tf32(tf32):
            return torch.matmul(a, b)
    return torch.matmul(a, b)


class _RoundTF32(torch.autograd.Function):
    """:func:`round_to_tf32` with the identity as its gradient (straight through)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return round_to_tf32(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _PrecisionMatmul(torch.autograd.Function):
    """``a @ b`` whose gradient products run at the forward's precision.

    ``tf32``: TF32 on CUDA for the three products. ``round_grad``: emulation, where ``a`` and
    ``b`` come already rounded to TF32 and the incoming gradient is rounded too.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, tf32: bool, round_grad: bool) -> Tensor:
        ctx.save_for_backward(a, b)
        ctx.tf32, ctx.round_grad = tf32, round_grad
        return _product(a, b, tf32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        a, b = ctx.saved_tensors
        if ctx.round_grad:
            grad = round_to_tf32(grad)
        ga = _product(grad, b.mT, ctx.tf32) if ctx.needs_input_grad[0] else None
        gb = _product(a.mT, grad, ctx.tf32) if ctx.needs_input_grad[1] else None
        return ga, gb, None, None


def matmul(a: Tensor, b: Tensor, precision: str = "highest") -> Tensor:
    """``torch.matmul(a, b)`` (batch dimensions broadcast) with the product and its gradients at ``precision``.

    Parameters
    ----------
    a, b
        (..., n, k) and (..., k, p) tensors.
    precision
        One of :data:`MATMUL_PRECISIONS` (see the module notes). Float64 inputs, and
        ``"auto"``/``"highest"``/``"high"`` on a CPU, give exactly ``torch.matmul``.

    Returns
    -------
    The (..., n, p) product.
    """
    emulate = precision == "tf32-emulated"
    if a.dtype != torch.float32 or b.dtype != torch.float32 or not (emulate or a.is_cuda or b.is_cuda):
        return torch.matmul(a, b)
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(
            f"`matmul` takes (..., n, k) and (..., k, p) tensors, received {a.shape} and {b.shape}."
        )
    grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    if emulate:  # round once, before broadcasting
        a, b = (_RoundTF32.apply(a), _RoundTF32.apply(b)) if grad else (round_to_tf32(a), round_to_tf32(b))
    tf32 = precision == "high" or (precision == "auto" and (a.is_cuda or b.is_cuda))
    if not grad:
        return _product(a, b, tf32)
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = a.expand(*batch, *a.shape[-2:])
    b = b.expand(*batch, *b.shape[-2:])
    return _PrecisionMatmul.apply(a, b, tf32, emulate)
