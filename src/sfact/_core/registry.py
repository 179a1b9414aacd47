"""The prior registry: name -> prior class.

The prior modules import only :mod:`~sfact._core.priors` and :mod:`~sfact._core.gp`; this module
imports them all, so nothing imports back into a prior module and there is no cycle.
"""

from __future__ import annotations

from .._constants import PRIOR_NAMES
from .lcgp import LCGPPrior
from .priors import PNMFPrior, Prior
from .svgp import SVGPPrior

__all__ = ["PRIORS", "prior_class"]

#: Every prior of :data:`sfact._constants.PRIOR_NAMES` and its class.
PRIORS: dict[str, type[Prior]] = {
    "pnmf": PNMFPrior,
    "svgp": SVGPPrior,
    "mggp_svgp": SVGPPrior,
    "lcgp": LCGPPrior,
    "mggp_lcgp": LCGPPrior,
}


def prior_class(name: str) -> type[Prior]:
    """The prior class registered under ``name``."""
    if name not in PRIOR_NAMES:
        raise ValueError(f"Unknown prior {name!r}; choose one of {PRIOR_NAMES}.")
    if name not in PRIORS:
        raise NotImplementedError(
            f"The {name!r} prior is not implemented yet in this version of sfact; available: {tuple(PRIORS)}."
        )
    return PRIORS[name]
