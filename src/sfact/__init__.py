"""sfact: spatial factorization of spatial transcriptomics counts with Gaussian-process priors.

``import sfact`` is cheap: torch, squidpy, seaborn, pynndescent and scikit-learn are imported
only inside the functions that need them. It sets ``OMP_WAIT_POLICY=PASSIVE`` unless it is set
already (``SFACT_NO_THREAD_SETUP=1`` turns this off; see :mod:`sfact._threads`).
"""

from __future__ import annotations

# first: _threads sets OMP_WAIT_POLICY before anything sfact imports could load torch
from . import _threads  # noqa: F401

# isort: split
from . import datasets, get, models, pl, pp, tl
from ._settings import settings
from ._version import __version__

__all__ = ["__version__", "datasets", "get", "models", "pl", "pp", "settings", "tl"]
