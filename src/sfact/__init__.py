"""sfact: spatial factorization of spatial transcriptomics counts with Gaussian-process priors.

``import sfact`` is cheap: torch, squidpy, seaborn, pynndescent and scikit-learn are imported
only inside the functions that need them.
"""

from __future__ import annotations

from . import datasets, get, models, pl, pp, tl
from ._settings import settings
from ._version import __version__

__all__ = ["__version__", "datasets", "get", "models", "pl", "pp", "settings", "tl"]
