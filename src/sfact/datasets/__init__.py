"""Data sets: small real data bundled with sfact, and simulated data with known factors."""

from __future__ import annotations

from ._datasets import osmfish, visium_dentate_gyrus, visium_prostate
from ._simulate import simulate

__all__ = ["osmfish", "simulate", "visium_dentate_gyrus", "visium_prostate"]
