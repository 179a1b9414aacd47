"""Plots of fitted factors, loadings, ELBO curves, Moran's I and gene enrichment."""

from __future__ import annotations

from ._factors import factors, scales

__all__ = ["factors", "scales"]
