"""Tools: fit models and analyse them."""

from __future__ import annotations

from ._analysis import baseline_deviance, morans_i
from ._fit import fit

__all__ = ["baseline_deviance", "fit", "morans_i"]
