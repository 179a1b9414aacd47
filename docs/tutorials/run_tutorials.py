"""Re-execute the tutorial notebooks top to bottom, each in a fresh kernel, and save their outputs.

Run from the repository root (or anywhere)::

    python docs/tutorials/run_tutorials.py                    # every notebook, outputs written in place
    python docs/tutorials/run_tutorials.py --check            # execute, but write no notebook back
    python docs/tutorials/run_tutorials.py --check --out /tmp/nb   # ... and keep the executed copies there
    python docs/tutorials/run_tutorials.py 01 03              # only the notebooks whose names contain 01 or 03
    python docs/tutorials/run_tutorials.py --timeout 3600     # seconds allowed per cell

Every notebook runs in a new kernel of this interpreter (``kernel_name="python3"`` resolves to
the Python running this script when ``ipykernel`` is installed in it), with the notebook's folder
as the working directory, ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads do not spin on shared
cores) and matplotlib's inline backend (figures are embedded as PNG). Stream outputs are cleaned
(carriage-return redraws of progress bars resolved, empty streams dropped), and outputs that
show an absolute path of this machine are reported. A table of notebook, wall time, size and
status is printed at the end; the exit status is 1 when a notebook failed (its file is then left
as it was), 2 when nothing could run.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes of IPython tracebacks
KERNEL_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",
    # the inline backend embeds figures as PNG; a non-interactive backend inherited from the
    # caller's environment (e.g. MPLBACKEND=Agg) would silently drop them
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    "PYDEVD_DISABLE_FILE_VALIDATION": "1",  # quiets the debugger warning of frozen modules
}


def notebooks(patterns: list[str]) -> list[Path]:
    """The tutorial notebooks, in name order, filtered by substrings of their names."""
    found = sorted(p for p in HERE.glob("*.ipynb") if not p.name.startswith("."))
    if patterns:
        found = [p for p in found if any(s in p.name for s in patterns)]
    return found


def _strip_timing(nb) -> None:
    """Drop per-cell execution time stamps, which only add noise to diffs."""
    for cell in nb.cells:
        cell.get("metadata", {}).pop("execution", None)


def _terminal_text(text: str) -> str:
    """Roughly what a terminal shows for ``text``: on each line, the last part written after a ``\\r``.

    Text progress bars (tqdm without ipywidgets) redraw themselves with ``\\r``; stored as is,
    every redraw would appear on the rendered page.
    """
    lines = []
    for line in text.split("\n"):
        parts = [p for p in line.split("\r") if p]
        lines.append(parts[-1] if parts else "")
    return "\n".join(lines)


def _clean_streams(nb) -> None:
    """Merge consecutive stream outputs of a cell, resolve carriage returns, drop empty streams."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged = []
        for out in cell.outputs:
            previous = merged[-1] if merged else None
            if (
                out.output_type == "stream"
                and previous is not None
                and previous.output_type == "stream"
                and (previous.name == out.name)
            ):
                previous.text += out.text
            else:
                merged.append(out)
        for out in merged:
            if out.output_type == "stream":
                out.text = _terminal_text(out.text)
        cell.outputs = [o for o in merged if o.output_type != "stream" or o.text.strip()]


def _leaks(nb, needles: list[str]) -> list[str]:
    """Cells whose outputs contain one of ``needles`` (absolute paths of this machine)."""
    import json

    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            text = json.dumps(cell.outputs)
            hits = [n for n in needles if n in text]
            if hits:
                found.append(f"cell {i}: {', '.join(hits)}")
    return found


def _kernel_python(kernel_name: str) -> str | None:
    """The interpreter a kernel spec starts, when it is not this one (``None`` when it is)."""
    from jupyter_client.kernelspec import KernelSpecManager

    argv0 = KernelSpecManager().get_kernel_spec(kernel_name).argv[0]
    # jupyter_client replaces a bare "python"/"python3"/"python3.X" with sys.executable
    bare = {"python", f"python{sys.version_info[0]}", f"python{sys.version_info[0]}.{sys.version_info[1]}"}
    return None if argv0 in bare or Path(argv0).resolve() == Path(sys.executable).resolve() else argv0


def execute(
    path: Path, *, write: bool, timeout: int, kernel_name: str, out_dir: Path | None = None
) -> tuple[float, str, int]:
    """Execute ``path`` in a fresh kernel; returns (seconds, status, size of the executed notebook).

    With ``write``, the executed notebook replaces ``path`` when it ran without error (a failed run
    never overwrites the committed outputs); with ``out_dir``, a copy is written there too.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=kernel_name,
        # the notebook's folder is the working directory; the notebooks write their files under
        # _outputs/ there (git-ignored), also with --check
        resources={"metadata": {"path": str(path.parent)}},
    )
    t0 = time.perf_counter()
    status = "ok"
    try:
        client.execute()
    except CellTimeoutError as e:
        status = f"timeout: {str(e).splitlines()[0][:120]}"
    except CellExecutionError as e:
        lines = [ln for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()]
        failed = [
            i for i, c in enumerate(nb.cells) if any(o.output_type == "error" for o in c.get("outputs", []))
        ]
        where = f" (cell {failed[0]})" if failed else ""
        status = f"failed{where}: {lines[-1][:160] if lines else type(e).__name__}"
    except Exception as e:  # kernel died, could not start, ...
        status = f"failed: {type(e).__name__}: {str(e)[:160]}"
    seconds = time.perf_counter() - t0
    _strip_timing(nb)
    _clean_streams(nb)
    needles = sorted({str(HERE.parents[1]), str(Path.home()), sys.prefix} - {"/", ""}, key=len, reverse=True)
    for leak in _leaks(nb, needles):
        print(f"  warning: output shows an absolute path ({leak})", flush=True)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out_dir / path.name)
    if write and status == "ok":
        nbformat.write(nb, path)
    return seconds, status, len(nbformat.writes(nb).encode())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="run only notebooks whose file names contain one of these")
    p.add_argument("--check", action="store_true", help="execute without writing the notebooks back")
    p.add_argument("--out", type=Path, help="also write the executed notebooks to this folder")
    p.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell (default: 1800)")
    p.add_argument("--kernel", default="python3", help="Jupyter kernel name (default: python3, this Python)")
    args = p.parse_args()

    try:
        import ipykernel  # noqa: F401
        import nbclient  # noqa: F401
        import nbformat  # noqa: F401
    except ImportError as e:
        print(f"run_tutorials: {e.name} is missing: pip install nbclient nbformat ipykernel", file=sys.stderr)
        return 2
    os.environ.update(KERNEL_ENV)
    paths = notebooks(args.names)
    if not paths:
        print(f"run_tutorials: no notebook matches {args.names} in {HERE}", file=sys.stderr)
        return 2
    print(
        f"python {sys.executable}; {'checking (nothing written)' if args.check else 'writing outputs in place'}"
    )
    other = _kernel_python(args.kernel)
    if other is not None:
        print(
            f"run_tutorials: warning: kernel {args.kernel!r} starts {other}, not this Python", file=sys.stderr
        )
    rows = []
    total = time.perf_counter()
    for path in paths:
        print(f"running {path.name} ...", flush=True)
        seconds, status, size = execute(
            path, write=not args.check, timeout=args.timeout, kernel_name=args.kernel, out_dir=args.out
        )
        rows.append((path.name, seconds, size, status))
        print(f"  {status} in {seconds:.0f} s", flush=True)
    width = max(len(r[0]) for r in rows)
    print()
    print(f"| {'notebook':<{width}} | wall time |    size | status |")
    print(f"|{'-' * (width + 2)}|----------:|--------:|--------|")
    for name, seconds, size, status in rows:
        print(f"| {name:<{width}} | {seconds / 60:5.1f} min | {size / 1e6:4.1f} MB | {status} |")
    print(f"\ntotal {(time.perf_counter() - total) / 60:.1f} min")
    return 0 if all(r[3] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
