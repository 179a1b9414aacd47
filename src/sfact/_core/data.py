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
    row_totals: Tensor | None = None  # (B,) Σ_d y_nd of each cell (all genes)
    lgamma_sum: Tensor | None = None  # Σ log y! over the batch (all genes)
    crow: Tensor | None = None  # (B+1,) CSR row pointer of the batch (all genes only)
    t_perm: Tensor | None = None  # (nnz_B,) order of the non-zeros by gene (CSR of the transpose)
    t_crow: Tensor | None = None  # (D+1,) row pointer of the transpose

    @property
    def n_rows(self) -> int:
        """Number of cells B in the batch."""
        return int(self.idx.numel())

    def with_csr(self, n_vars: int) -> CountBatch:
        """Add the CSR structure of the batch and of its transpose (computed once per batch)."""
        if self.genes is not None:
            return self
        B = self.n_rows
        dev = self.rows.device
        # row pointers by binary search of the sorted rows (bincount would wait for the device)
        crow = torch.searchsorted(self.rows, torch.arange(B + 1, device=dev))
        t_perm = torch.argsort(self.cols, stable=True)
        t_crow = torch.searchsorted(self.cols[t_perm], torch.arange(n_vars + 1, device=dev))
        self.crow, self.t_perm, self.t_crow = crow, t_perm, t_crow
        return self


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
        self.row_nnz = np.diff(X.indptr).astype(np.int64)  # non-zeros per row, on the host
        self.row_of = torch.repeat_interleave(
            torch.arange(self.n_obs, device=self.device),
            self.indptr[1:] - self.indptr[:-1],
            output_size=int(X.nnz),
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
        self.row_totals_t = torch.as_tensor(self.row_totals, dtype=dtype, device=self.device)
        self.lgamma_rows_t = torch.as_tensor(self.lgamma_rows, dtype=torch.float64, device=self.device)
        self.col_totals = np.asarray(X.sum(axis=0)).ravel().astype(np.float64)
        self.nnz = int(X.nnz)

    def batch(
        self,
        idx: Tensor | None,
        genes: Tensor | None = None,
        gene_mask: Tensor | None = None,
        *,
        n_nonzero: int | None = None,
    ) -> CountBatch:
        """Non-zeros of rows ``idx`` (all rows when ``None``), restricted to ``genes`` if given.

        ``n_nonzero``: the number of non-zeros of rows ``idx``, if known on the host (on a GPU,
        gathering the rows without it waits for the device to count them).
        """
        if idx is None:
            idx_t = torch.arange(self.n_obs, device=self.device)
            rows, cols, vals = self.row_of, self.indices, self.values
        else:
            idx_t = idx
            starts = self.indptr[idx_t]
            lens = self.indptr[idx_t + 1] - starts
            rows = torch.repeat_interleave(
                torch.arange(idx_t.numel(), device=self.device), lens, output_size=n_nonzero
            )
            offsets = torch.cumsum(lens, 0) - lens
            pos = torch.arange(rows.numel(), device=self.device) - offsets[rows] + starts[rows]
            cols, vals = self.indices[pos], self.values[pos]
        if genes is not None:
            if gene_mask is None:
                gene_mask = torch.zeros(self.n_vars, dtype=torch.bool, device=self.device)
                gene_mask[genes] = True
            keep = gene_mask[cols]
            rows, cols, vals = rows[keep], cols[keep], vals[keep]
        return CountBatch(
            idx=idx_t,
            rows=rows,
            cols=cols,
            values=vals,
            genes=genes,
            row_totals=self.row_totals_t[idx_t],
            lgamma_sum=self.lgamma_rows_t[idx_t].sum().to(self.values.dtype),
        )

    def full_batch(self) -> CountBatch:
        """All cells as one batch with its CSR structures (built once, then cached)."""
        if getattr(self, "_full", None) is None:
            self._full = self.batch(None).with_csr(self.n_vars)
        return self._full

    def blocks(self, batch_size: int, generator: torch.Generator | None = None) -> list[CountBatch]:
        """Split the cells into fixed random blocks of ``batch_size`` with their CSR structures.

        Built once per training call, so a step needs no gathering or sorting of non-zeros;
        an epoch visits the blocks in a new random order. The permutation is drawn on the host
        (``generator`` is a CPU generator), which gives every block's size without a sync.
        """
        N = self.n_obs
        if batch_size >= N:
            return [self.full_batch()]
        perm_host = torch.randperm(N, generator=generator)
        perm, perm_np = perm_host.to(self.device), perm_host.numpy()
        out = []
        for start in range(0, N, batch_size):
            idx = torch.sort(perm[start : start + batch_size]).values  # CSR order within the block
            n_nonzero = int(self.row_nnz[perm_np[start : start + batch_size]].sum())
            out.append(self.batch(idx, n_nonzero=n_nonzero).with_csr(self.n_vars))
        return out
