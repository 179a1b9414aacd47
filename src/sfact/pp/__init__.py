"""Preprocessing: prepare an AnnData for sfact."""

from __future__ import annotations

from ._prepare import prepare

__all__ = ["prepare"]
