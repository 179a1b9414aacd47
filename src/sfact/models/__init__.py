"""Model objects: :class:`SpatialFactorization`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._model import SpatialFactorization
from ._setup import ModelSetup

if TYPE_CHECKING:
    from .._core.train import TrainingError


def __getattr__(name: str):
    if name == "TrainingError":
        from .._core.train import TrainingError

        return TrainingError
    raise AttributeError(name)


__all__ = ["ModelSetup", "SpatialFactorization", "TrainingError"]
