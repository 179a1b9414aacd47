"""Model objects: :class:`SpatialFactorization`, its :class:`ModelSetup`, :class:`TrainingError`, :class:`ModelFileError`."""

from __future__ import annotations

from .._exceptions import ModelFileError, TrainingError
from ._model import SpatialFactorization
from ._setup import ModelSetup

__all__ = ["ModelFileError", "ModelSetup", "SpatialFactorization", "TrainingError"]
