"""Tiny job functions for testing the runner (and for checking that a cluster works).

They live in the package, not in ``tests/``, because the runner's workers (spawned processes, Dask
workers) import a job's function by module path, and ``sfact.pipeline._testing_jobs`` is
importable wherever sfact is installed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from ._jobs import null_reporter


def write_stamp(
    *,
    path: str,
    text: str = "",
    epochs: int = 0,
    sleep: float = 0.0,
    fail: bool = False,
    skip_if_exists: bool = False,
    scanpy_message: str | None = None,
    device: str = "cpu",
    report=null_reporter,
) -> dict[str, Any]:
    """Report ``epochs`` fake epochs, then write a JSON stamp (start/end times, device) to ``path``.

    Parameters
    ----------
    path
        The JSON file written.
    text
        Stored in the stamp.
    epochs
        Number of fake epochs reported (``elbo = -1 / (epoch + 1)``), ``sleep / epochs`` apart.
    sleep
        Total seconds the job takes.
    fail
        Raise :class:`ValueError` after printing and logging a line (nothing is written).
    skip_if_exists
        Return ``{"skipped": True}`` when ``path`` exists already.
    scanpy_message
        Log this warning through scanpy's logger (which sfact logs through).
    device
        The device the runner assigned (recorded in the stamp).
    report
        The runner's progress callback.

    Returns
    -------
    ``{"path": path, "text": text}`` (or ``{"skipped": True, "path": path}``).
    """
    out = Path(path)
    if skip_if_exists and out.exists():
        return {"skipped": True, "path": path}
    start = time.time()
    print(f"job writing {out.name} on {device}")
    logging.getLogger("sfact.testing").warning("logged from the job")
    if scanpy_message is not None:
        from scanpy import logging as logg

        logg.warning(scanpy_message)
    report(message="working")
    for epoch in range(1, epochs + 1):
        time.sleep(sleep / epochs)
        report(epoch=epoch, max_epoch=epochs, elbo=-1.0 / (epoch + 1))
    if epochs == 0 and sleep:
        time.sleep(sleep)
    if fail:
        print("about to fail", file=sys.stderr)
        raise ValueError(f"failed on purpose ({out.name})")
    stamp = {"text": text, "start": start, "end": time.time(), "device": device, "pid": os.getpid()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stamp))
    return {"path": path, "text": text}


def crash(*, device: str = "cpu", report=null_reporter) -> dict[str, Any]:
    """Kill the worker process without reporting back (simulates a segfault or the OOM killer)."""
    print("crashing", flush=True)
    os._exit(3)
