"""Getters: factors, loadings and top genes as arrays, DataFrames or AnnData (never write)."""

from __future__ import annotations
