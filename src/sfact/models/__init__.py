"""Model objects: :class:`SpatialFactorization`, its :class:`ModelSetup`, :class:`TrainingError`."""

from __future__ import annotations

from .._exceptions import TrainingError
from ._model import SpatialFactorization
from ._setup import ModelSetup

__all__ = ["ModelSetup", "SpatialFactorization", "TrainingError"]
