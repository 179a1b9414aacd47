"""Tools: fit models and analyse them."""

from __future__ import annotations

from ._analysis import baseline_deviance, morans_i
from ._fit import fit, groupwise_factors
from ._heldout import heldout_deviance, heldout_split

__all__ = ["baseline_deviance", "fit", "groupwise_factors", "heldout_deviance", "heldout_split", "morans_i"]
