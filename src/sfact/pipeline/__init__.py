"""The command-line pipeline: configs, stages, job plans and the parallel runner.

Used by the ``sfact`` console script; importing it does not import torch.
"""

from __future__ import annotations

from . import _stages as stages
from ._config import Config
from ._config_files import find_configs, load_config, write_prior_configs
from ._config_schema import (
    FIGURE_KINDS,
    PRIORS,
    AnalysisConfig,
    ConfigError,
    DatasetConfig,
    FiguresConfig,
    ModelConfig,
    PreprocessingConfig,
    SelectionConfig,
    TrainingConfig,
)
from ._jobs import STAGES, Job, JobResult
from ._layout import Layout
from ._plan import Plan, collect_configs, make_plan, run_plan
from ._report import print_plan, write_summaries

__all__ = [
    "FIGURE_KINDS",
    "PRIORS",
    "STAGES",
    "AnalysisConfig",
    "Config",
    "ConfigError",
    "DatasetConfig",
    "FiguresConfig",
    "Job",
    "JobResult",
    "Layout",
    "ModelConfig",
    "Plan",
    "PreprocessingConfig",
    "SelectionConfig",
    "TrainingConfig",
    "collect_configs",
    "find_configs",
    "load_config",
    "make_plan",
    "print_plan",
    "run_plan",
    "stages",
    "write_prior_configs",
    "write_summaries",
]
