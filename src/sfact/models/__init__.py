"""Model objects: :class:`SpatialFactorization`, its :class:`ModelSetup`, :class:`TrainingError`, :class:`ModelFileError`, :class:`ConvergenceWarning`, :func:`train_distributed`."""

from __future__ import annotations

from .._exceptions import ModelFileError, TrainingError
from ._convergence import ConvergenceWarning
from ._model import SpatialFactorization
from ._parallel import train_distributed
from ._setup import ModelSetup

__all__ = [
    "ConvergenceWarning",
    "ModelFileError",
    "ModelSetup",
    "SpatialFactorization",
    "TrainingError",
    "train_distributed",
]
