"""The command-line pipeline: configs, stages, job plans and the parallel runner.

Used by the ``sfact`` console script; importing it does not import torch.
"""

from __future__ import annotations

from ._jobs import STAGES, Job, JobResult

__all__ = ["STAGES", "Job", "JobResult"]
