"""Tools: fit models and analyse them."""

from __future__ import annotations

from ._analysis import baseline_deviance, morans_i
from ._analyze import analyze
from ._fit import fit, groupwise_factors
from ._groups import gene_enrichment, group_loadings
from ._heldout import heldout_deviance, heldout_split, knn_deviance
from ._select import select_model

__all__ = [
    "analyze",
    "baseline_deviance",
    "fit",
    "gene_enrichment",
    "group_loadings",
    "groupwise_factors",
    "heldout_deviance",
    "heldout_split",
    "knn_deviance",
    "morans_i",
    "select_model",
]
