"""Counts kept as CSR tensors on the training device, and mini-batch extraction."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor


@dataclass
class CountBatch:
    """Non-zeros of a block of cells (and optionally a subset of genes).

    ``rows`` index into the batch (0..B-1), ``cols`` are gene indices, ``values`` the counts.
    """

    idx: Tensor  # (B,) cell indices into the full data
    rows: Tensor  # (nnz_B,) local row of each non-zero
    cols: Tensor  # (nnz_B,) gene of each non-zero
    values: Tensor  # (nnz_B,) counts
    genes: Tensor | None = None  # (B_y,) gene subset, or None for all genes


class SparseCounts:
    """A count matrix as CSR tensors (``indptr``, ``indices``, ``values``) on a device.

    Only the non-zeros are stored, so memory is O(nnz); row batches are gathered with
    tensor ops (no host round trip), which keeps GPU training free of CPU stalls.
    """

    def __init__(self, X, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        X = sp.csr_matrix(X) if not sp.isspmatrix_csr(X) else X
        X = X.copy()
        X.sum_duplicates()
        X.eliminate_zeros()
        X.sort_indices()
        self.shape = X.shape
        self.n_obs, self.n_vars = X.shape
        self.device = torch.device(device)
        self.indptr = torch.as_tensor(X.indptr.astype(np.int64), device=self.device)
        self.indices = torch.as_tensor(X.indices.astype(np.int64), device=self.device)
        self.values = torch.as_tensor(X.data, dtype=dtype, device=self.device)
        self.row_of = torch.repeat_interleave(
            torch.arange(self.n_obs, device=self.device), self.indptr[1:] - self.indptr[:-1]
        )
        data64 = np.asarray(X.data, dtype=np.float64)
        from scipy.special import gammaln

        # constant of the Poisson log-likelihood, per cell (float64 on the host)
        self.lgamma_rows = np.bincount(
            np.repeat(np.arange(self.n_obs), np.diff(X.indptr)),
            weights=gammaln(data64 + 1),
            minlength=self.n_obs,
        )
        self.row_totals = np.asarray(X.sum(axis=1)).ravel().astype(np.float64)
        self.col_totals = np.asarray(X.sum(axis=0)).ravel().astype(np.float64)
        self.nnz = int(X.nnz)

    def batch(
        self, idx: Tensor | None, genes: Tensor | None = None, gene_mask: Tensor | None = None
    ) -> CountBatch:
        """Non-zeros of rows ``idx`` (all rows when ``None``), restricted to ``genes`` if given."""
        if idx is None:
            idx_t = torch.arange(self.n_obs, device=self.device)
            rows, cols, vals = self.row_of, self.indices, self.values
        else:
            idx_t = idx
            starts = self.indptr[idx_t]
            lens = self.indptr[idx_t + 1] - starts
            rows = torch.repeat_interleave(torch.arange(idx_t.numel(), device=self.device), lens)
            offsets = torch.cumsum(lens, 0) - lens
            pos = torch.arange(rows.numel(), device=self.device) - offsets[rows] + starts[rows]
            cols, vals = self.indices[pos], self.values[pos]
        if genes is not None:
            if gene_mask is None:
                gene_mask = torch.zeros(self.n_vars, dtype=torch.bool, device=self.device)
                gene_mask[genes] = True
            keep = gene_mask[cols]
            rows, cols, vals = rows[keep], cols[keep], vals[keep]
        return CountBatch(idx=idx_t, rows=rows, cols=cols, values=vals, genes=genes)


def kl_nmf(
    counts: SparseCounts,
    n_factors: int,
    *,
    n_iter: int = 100,
    size_factors: Tensor | None = None,
    generator: torch.Generator | None = None,
    eps: float = 1e-10,
) -> tuple[Tensor, Tensor]:
    """Kullback-Leibler NMF by multiplicative updates on the sparse counts.

    Solves ``Y ≈ diag(s) H Wᵀ`` with ``H`` (N, L) and ``W`` (D, L) non-negative, touching only
    the non-zeros (O(nnz·L) per iteration). Used to initialize every prior near a good optimum.

    Returns
    -------
    H (N, L) and W (D, L), with the columns of ``H`` scaled to unit mean.
    """
    dev = counts.device
    N, D = counts.shape
    dtype = counts.values.dtype
    s = torch.ones(N, dtype=dtype, device=dev) if size_factors is None else size_factors.to(dev, dtype)
    mean_rate = float(counts.values.sum()) / (N * D) / max(float(s.mean()), eps)
    scale = (mean_rate / n_factors) ** 0.5
    H = scale * (0.5 + torch.rand(N, n_factors, generator=generator, dtype=dtype, device="cpu").to(dev))
    W = scale * (0.5 + torch.rand(D, n_factors, generator=generator, dtype=dtype, device="cpu").to(dev))
    rows, cols, y = counts.row_of, counts.indices, counts.values
    for _ in range(n_iter):
        # update H
        r = (H[rows] * W[cols]).sum(1).clamp_min(eps)  # (nnz,) H W^T without s (cancels)
        q = (y / r)[:, None]
        num = torch.zeros_like(H).index_add_(0, rows, q * W[cols])
        H = H * num / (s[:, None] * W.sum(0)[None, :]).clamp_min(eps)
        H = H.clamp_min(eps)
        # update W
        r = (H[rows] * W[cols]).sum(1).clamp_min(eps)
        q = (y / r)[:, None]
        num = torch.zeros_like(W).index_add_(0, cols, q * H[rows])
        W = W * num / (s[:, None] * H).sum(0)[None, :].clamp_min(eps)
        W = W.clamp_min(eps)
    m = H.mean(0).clamp_min(eps)
    return H / m, W * m
