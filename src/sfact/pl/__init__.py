"""Plots of fitted factors, loadings, ELBO curves, Moran's I and gene enrichment."""

from __future__ import annotations

from ._diagnostics import elbo, moran
from ._factors import factors, factors_with_genes, groupwise_factors, scales
from ._genes import enrichment_by_factor, enrichment_by_group, gene_enrichment, loadings, top_genes
from ._gp import inducing_points
from ._report import report
from ._selection import model_selection

__all__ = [
    "elbo",
    "enrichment_by_factor",
    "enrichment_by_group",
    "factors",
    "factors_with_genes",
    "gene_enrichment",
    "groupwise_factors",
    "inducing_points",
    "loadings",
    "model_selection",
    "moran",
    "report",
    "scales",
    "top_genes",
]
