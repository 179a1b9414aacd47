"""Threading set-up done by ``import sfact``, before anything can import torch.

``OMP_WAIT_POLICY=PASSIVE``: spinning OpenMP threads (the default wait policy) slow sfact's many
short parallel regions down, badly so on shared or busy cores (``benchmarks/bench_threads.py``);
the CLI's workers have always set it. OpenMP reads the variable once, when torch loads it, so it
is set here, at ``import sfact``: a user's own setting is kept, ``SFACT_NO_THREAD_SETUP=1`` turns
this off, and nothing can be done once torch is imported (a debug message at the first fit says
so). The variable is inherited by subprocesses.
"""

from __future__ import annotations

import os
import sys

#: set to anything but ``""`` or ``"0"``: ``import sfact`` leaves ``OMP_WAIT_POLICY`` alone
OPT_OUT = "SFACT_NO_THREAD_SETUP"


def set_up_threads() -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it, opted out, or torch is imported.

    Returns
    -------
    What was done, in words (logged at debug level at the first fit).
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} was set by the user; sfact kept it"
    if os.environ.get(OPT_OUT, "") not in ("", "0"):
        return f"{OPT_OUT} is set: sfact left OMP_WAIT_POLICY unset"
    if "torch" in sys.modules:
        return (
            "torch was imported before sfact, so sfact could not set OMP_WAIT_POLICY=PASSIVE (OpenMP "
            "reads it when torch loads); fits may be slower: import sfact first, or set it yourself"
        )
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "sfact set OMP_WAIT_POLICY=PASSIVE before torch was imported"


#: what :func:`set_up_threads` did at ``import sfact``
SETUP = set_up_threads()
