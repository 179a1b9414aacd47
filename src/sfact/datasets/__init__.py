"""Data sets: small real data bundled with sfact, public data sets, loaders by name, and simulated data."""

from __future__ import annotations

from ._datasets import osmfish, visium_dentate_gyrus, visium_prostate
from ._public import (
    colon_merfish,
    liver_merfish,
    merfish,
    sdmbench_dlpfc,
    sdmbench_osmfish,
    slideseqv2,
    visium_hne,
)
from ._registry import LOADERS, LoaderInfo, load, loaders
from ._simulate import simulate

__all__ = [
    "LOADERS",
    "LoaderInfo",
    "colon_merfish",
    "liver_merfish",
    "load",
    "loaders",
    "merfish",
    "osmfish",
    "sdmbench_dlpfc",
    "sdmbench_osmfish",
    "simulate",
    "slideseqv2",
    "visium_dentate_gyrus",
    "visium_hne",
    "visium_prostate",
]
