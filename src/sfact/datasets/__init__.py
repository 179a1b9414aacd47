"""Data sets: small real data bundled with sfact, loaders by name, and simulated data."""

from __future__ import annotations

from ._datasets import osmfish, visium_dentate_gyrus, visium_prostate
from ._registry import LOADERS, LoaderInfo, load, loaders
from ._simulate import simulate

__all__ = [
    "LOADERS",
    "LoaderInfo",
    "load",
    "loaders",
    "osmfish",
    "simulate",
    "visium_dentate_gyrus",
    "visium_prostate",
]
