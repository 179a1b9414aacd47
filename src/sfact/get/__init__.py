"""Getters: factors, loadings and top genes as arrays, DataFrames or AnnData (never write)."""

from __future__ import annotations

from ._get import factors_adata, factors_df, history, loadings_df, top_genes

__all__ = ["factors_adata", "factors_df", "history", "loadings_df", "top_genes"]
