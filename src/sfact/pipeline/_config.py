"""Pipeline configuration files: YAML validated into typed dataclasses.

The names of the config modules in one place (``sfact.pipeline._config`` is where they always
were; the docs extension reads ``_SECTIONS`` from here):

- :mod:`._config_schema`: the sections' dataclasses, :class:`Config`, :class:`ConfigError`;
- :mod:`._config_coerce`: values coerced to the dataclasses' types;
- :mod:`._config_validate`: the checks of each section's values;
- :mod:`._config_files`: YAML files, ``base:`` inheritance, per-prior configs.
"""

from __future__ import annotations

from ._config_files import config_to_yaml, find_configs, load_config, write_prior_configs
from ._config_schema import (
    _SECTIONS,
    FIGURE_KINDS,
    MULTIGROUP_PRIORS,
    PRIORS,
    AnalysisConfig,
    Config,
    ConfigError,
    DatasetConfig,
    FigureKind,
    FiguresConfig,
    ModelConfig,
    PreprocessingConfig,
    PriorName,
    TrainingConfig,
)

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
    "TrainingConfig",
    "config_to_yaml",
    "find_configs",
    "load_config",
    "write_prior_configs",
]
