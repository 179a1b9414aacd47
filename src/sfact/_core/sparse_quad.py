"""Sparse quadratic forms ``‖Σ_r coef_r L_u[rows_r, :]‖²`` of a sparse L_u, with a custom autograd function.

Used by the LCGP priors for the KL (rows ``[j, n(j)]``) and the predictive variance.
"""

from __future__ import annotations

import torch
from torch import Tensor

_CHUNK_ELEMENTS = 4_000_000  # elements (L x cells x (K+1)²) per chunk of the sparse quadratic form


def _slots(C: Tensor) -> Tensor:
    """For each row of ``C`` (b, P), a slot id per entry such that equal values share a slot."""
    sv, perm = torch.sort(C, dim=1)
    new = torch.ones_like(sv, dtype=torch.bool)
    new[:, 1:] = sv[:, 1:] != sv[:, :-1]
    seg = new.to(torch.int64).cumsum(1) - 1
    return torch.empty_like(seg).scatter_(1, perm, seg)


def _row_columns(rows: Tensor, nbr: Tensor) -> Tensor:
    """Column indices (b, R·(K+1)) of the stored entries of L_u rows ``rows`` (b, R)."""
    C = torch.cat([rows[..., None], nbr[rows]], dim=-1)  # (b, R, K+1)
    return C.reshape(rows.shape[0], -1)


class _SparseRowQuad(torch.autograd.Function):
    """``q_i = ‖Σ_r coef[i, r] · L_u[rows[i, r], :]‖²`` per factor, for sparse rows of L_u.

    Factor-last layout: row n of L_u holds ``dT[n]`` (L,) at column n and ``offT[n, k]`` (L,) at
    column ``nbr[n, k]`` (zero where ``nbr < 0``). The entries of the R rows are grouped by
    column (a sort, or cached slot ids), summed with their coefficients and squared:
    O(R·(K+1)·L) per output, in chunks; the backward pass recomputes each chunk, so nothing of
    size B·(K+1)²·L is kept.
    """

    @staticmethod
    def forward(ctx, dT, offT, coef, rows, nbr, slots):  # type: ignore[override]
        B, L = rows.shape[0], dT.shape[1]
        P = rows.shape[1] * (nbr.shape[1] + 1)
        chunk = max(1, _CHUNK_ELEMENTS // max(1, L * P))
        out = dT.new_empty(B, L)
        for start in range(0, B, chunk):
            sl = slice(start, min(start + chunk, B))
            v, _, _ = _SparseRowQuad._chunk(dT, offT, coef[sl], rows[sl], nbr, slots, sl)
            out[sl] = v.pow(2).sum(1)
        ctx.save_for_backward(dT, offT, coef, rows, nbr, slots if slots is not None else torch.empty(0))
        ctx.has_slots = slots is not None
        return out

    @staticmethod
    def _chunk(dT, offT, cf, r, nbr, slots, sl):
        b, R = r.shape
        L = dT.shape[1]
        V = torch.cat([dT[r][:, :, None, :], offT[r]], dim=2)  # (b, R, E, L)
        P = R * V.shape[2]
        slot = slots[sl].to(torch.int64) if slots is not None else _slots(_row_columns(r, nbr))
        flat = (slot + torch.arange(b, device=slot.device)[:, None] * P).reshape(-1)
        W = (V * cf[:, :, None, :]).reshape(b * P, L)
        v = torch.zeros(b * P, L, dtype=dT.dtype, device=dT.device).index_add_(0, flat, W)
        return v.view(b, P, L), flat, V

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        dT, offT, coef, rows, nbr, slots = ctx.saved_tensors
        slots = slots if ctx.has_slots else None
        (B, R), L, K = rows.shape, dT.shape[1], nbr.shape[1]
        P = R * (K + 1)
        chunk = max(1, _CHUNK_ELEMENTS // max(1, L * P))
        need_d, need_off, need_coef = ctx.needs_input_grad[:3]
        gd = torch.zeros_like(dT) if need_d else None
        goff = torch.zeros_like(offT).view(offT.shape[0], -1) if need_off else None
        gcoef = torch.zeros_like(coef) if need_coef else None
        for start in range(0, B, chunk):
            sl = slice(start, min(start + chunk, B))
            r = rows[sl]
            b = r.shape[0]
            cf = coef[sl][:, :, None, :]
            v, flat, V = _SparseRowQuad._chunk(dT, offT, coef[sl], r, nbr, slots, sl)
            gv = (2.0 * v * g[sl][:, None, :]).reshape(b * P, L)
            gW = gv.index_select(0, flat).view(b, R, K + 1, L)
            if need_d or need_off:
                gV = gW * cf
                rf = r.reshape(-1)
                if need_d:
                    gd.index_add_(0, rf, gV[:, :, 0, :].reshape(b * R, L))
                if need_off:
                    goff.index_add_(0, rf, gV[:, :, 1:, :].reshape(b * R, K * L))
            if need_coef:
                gc = (gW * V).sum(2)  # (b, R, L)
                gcoef[sl] = gc.sum(-1, keepdim=True) if coef.shape[-1] == 1 else gc
        return gd, None if goff is None else goff.view_as(offT), gcoef, None, None, None


def sparse_row_quad(
    d: Tensor, off: Tensor, coef: Tensor, rows: Tensor, nbr: Tensor, slots: Tensor | None = None
) -> Tensor:
    """(L, B) values of ``‖Σ_r coef_r L_u[rows_r, :]‖²`` (see :class:`_SparseRowQuad`).

    ``d`` (L, N) diagonal, ``off`` (L, N, K) off-diagonal values (masked here where
    ``nbr < 0``), ``coef`` (S, B, R) with S in {1, L}, ``rows`` (B, R) valid row indices
    (padding: any valid row with coefficient 0), ``nbr`` (N, K) column of each off-diagonal
    value (-1: absent), ``slots`` optional cached (B, R·(K+1)) slot ids of
    ``_slots(_row_columns(rows, nbr))``. Costs one O(N·K·L) transpose plus O(B·R·(K+1)·L).
    """
    offT = (off * (nbr >= 0).to(off.dtype)).permute(1, 2, 0).contiguous()
    out = _SparseRowQuad.apply(d.T.contiguous(), offT, coef.permute(1, 2, 0).contiguous(), rows, nbr, slots)
    return out.T
