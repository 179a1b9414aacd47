"""Data sets: small real data bundled with sfact, public data sets, vendor output folders, loaders by name, and simulated data."""

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
from ._read import READERS, ReaderInfo, detect_technology, read
from ._registry import LOADERS, LoaderInfo, load, loaders
from ._simulate import simulate

__all__ = [
    "LOADERS",
    "READERS",
    "LoaderInfo",
    "ReaderInfo",
    "colon_merfish",
    "detect_technology",
    "liver_merfish",
    "load",
    "loaders",
    "merfish",
    "osmfish",
    "read",
    "sdmbench_dlpfc",
    "sdmbench_osmfish",
    "simulate",
    "slideseqv2",
    "visium_dentate_gyrus",
    "visium_hne",
    "visium_prostate",
]
