"""The validated pipeline config, :class:`Config`: one data set and (optionally) one prior.

The config modules, each with one job (their names are importable from here too, where they
always were; the docs extension reads ``_SECTIONS`` from here):

- :mod:`._config_schema`: the sections' dataclasses, :class:`ConfigError`, the vocabulary;
- :mod:`._config_coerce`: values coerced to the dataclasses' types;
- :mod:`._config_validate`: the checks of each section's values;
- :mod:`._config_files`: YAML files, ``base:`` inheritance, per-prior configs (imports this).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._config_schema import (
    _SECTIONS,
    FIGURE_KINDS,
    MULTIGROUP_PRIORS,
    PRIORS,
    AnalysisConfig,
    ConfigError,
    DatasetConfig,
    FigureKind,
    FiguresConfig,
    ModelConfig,
    PreprocessingConfig,
    PriorName,
    SelectionConfig,
    TrainingConfig,
)
from ._config_validate import validate

__all__ = [
    "FIGURE_KINDS",
    "MULTIGROUP_PRIORS",
    "PRIORS",
    "_SECTIONS",
    "AnalysisConfig",
    "Config",
    "ConfigError",
    "DatasetConfig",
    "FigureKind",
    "FiguresConfig",
    "ModelConfig",
    "PreprocessingConfig",
    "PriorName",
    "SelectionConfig",
    "TrainingConfig",
]


@dataclass
class Config:
    """A validated pipeline config: one data set and (optionally) one prior.

    Build it with :func:`load_config` (from YAML) or :meth:`from_dict`.
    """

    name: str
    dataset: DatasetConfig
    output_dir: str
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    figures: FiguresConfig = field(default_factory=FiguresConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    source: str | None = None
    """The config file (not a key of the YAML)."""

    # -- derived -------------------------------------------------------------------------
    @property
    def group_key(self) -> str | None:
        """The group key (``dataset.group_key``)."""
        return self.dataset.group_key

    @property
    def sample_key(self) -> str | None:
        """The sample key (``dataset.sample_key``)."""
        return self.dataset.sample_key

    def priors(self) -> list[str]:
        """The priors this config plans: ``model.prior``, or every prior that applies."""
        if self.model.prior is not None:
            return [self.model.prior]
        return [p for p in PRIORS if self.group_key is not None or p not in MULTIGROUP_PRIORS]

    def with_prior(self, prior: str) -> Config:
        """A copy with ``model.prior`` set and only that prior's options (mggp priors need a group key)."""
        d = self.to_dict()
        d["model"]["prior"] = prior
        d["model"]["prior_kwargs"] = self.model.prior_kwargs_for(prior)
        return Config.from_dict(d, file=self.source)

    def data_dict(self) -> dict[str, Any]:
        """The sections that determine the prepared data (``dataset`` and ``preprocessing``)."""
        d = self.to_dict()
        return {"dataset": d["dataset"], "preprocessing": d["preprocessing"]}

    def fit_dict(self) -> dict[str, Any]:
        """The sections that determine a trained model (data, ``model`` with its prior's options, ``training``)."""
        d = self.to_dict()
        model = dict(d["model"])
        if self.model.prior is not None:
            model["prior_kwargs"] = self.model.prior_kwargs_for(self.model.prior)
        return {**self.data_dict(), "model": model, "training": d["training"]}

    def model_kwargs(self, prior: str | None = None) -> dict[str, Any]:
        """Keyword arguments of :class:`sfact.models.SpatialFactorization` but ``adata`` and ``device``.

        :meth:`ModelConfig.model_kwargs` plus ``layer`` and ``spatial_key`` (``preprocessing``),
        ``group_key`` and ``sample_key`` (``dataset``) and ``random_state`` (``training``).
        """
        return {
            **self.model.model_kwargs(prior),
            "layer": self.preprocessing.layer,
            "spatial_key": self.preprocessing.spatial_key,
            "group_key": self.group_key,
            "sample_key": self.sample_key,
            "random_state": self.training.random_state,
        }

    # -- conversion ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-valued dict (paths absolute), accepted by :meth:`from_dict`; ``source`` is left out."""
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, file: str | os.PathLike | None = None, base_dir: str | None = None
    ) -> Config:
        """Validate a dict into a :class:`Config`.

        Parameters
        ----------
        data
            The config as parsed from YAML (without ``base``).
        file
            The file it came from, for error messages.
        base_dir
            Folder that relative paths are relative to; the file's folder (or the working
            directory) when ``None``.

        Returns
        -------
        The validated config.

        Examples
        --------
        >>> from sfact.pipeline import Config
        >>> cfg = Config.from_dict({"dataset": {"loader": "osmfish"}, "model": {"n_factors": 5}})
        >>> cfg.name, cfg.group_key, cfg.model.n_factors
        ('osmfish', 'ClusterName', 5)
        """
        if base_dir is None:
            base_dir = str(Path(file).resolve().parent) if file is not None else os.getcwd()
        origins = {"": str(file)} if file is not None else {}
        return cls(**validate(dict(data), origins, {"": base_dir}, source=file))
