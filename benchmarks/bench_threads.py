"""The same osmFISH API fit with and without sfact's threading set-up, side by side.

``import sfact`` sets ``OMP_WAIT_POLICY=PASSIVE`` before torch is first imported (unless the user
set it; ``SFACT_NO_THREAD_SETUP=1`` turns it off), so that API, notebook and CLI fits run at the
same speed. This script times ``sfact.tl.fit(adata, prior="svgp", max_iter=100)`` on osmFISH in
fresh subprocesses, one with the set-up and one without, alternating, and prints a table::

    .venv/bin/python benchmarks/bench_threads.py              # 2 runs of each (~3 min on 2 cores)
    .venv/bin/python benchmarks/bench_threads.py --repeats 1 --max-iter 50
    .venv/bin/python benchmarks/bench_threads.py --busy 1   # one other process spinning meanwhile

Each child starts from an environment without ``OMP_WAIT_POLICY`` (and, for "without", with
``SFACT_NO_THREAD_SETUP=1``), imports sfact first, loads and prepares osmFISH, then times the fit
(``fit s``: the whole :func:`sfact.tl.fit`, training, analysis and validation included;
``train s``: the training loop, from ``uns['sfact']['metrics']['train_time_s']``). The table
shows the median and the fastest run of each mode, and the ratios without / with. The machine's
load average is printed too: on shared cores, other people's work changes both columns;
``--busy N`` runs N processes that spin on the cores during each fit, to measure that case on
purpose. Results go to ``benchmarks/results/threads.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = {
    "with set-up": {},  # import sfact sets OMP_WAIT_POLICY=PASSIVE
    "without": {"SFACT_NO_THREAD_SETUP": "1"},  # OpenMP's default wait policy
}


def child(max_iter: int) -> dict:
    """One fit in this (fresh) process; returns its timings."""
    import warnings

    import sfact  # first: the set-up happens here, before torch is imported

    policy = os.environ.get("OMP_WAIT_POLICY")
    import torch

    adata = sfact.datasets.osmfish()
    sfact.pp.prepare(adata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a 100-iteration fit need not converge
        t0 = time.perf_counter()
        sfact.tl.fit(adata, prior="svgp", max_iter=max_iter, progress_bar=False)
        fit_s = time.perf_counter() - t0
    m = adata.uns["sfact"]["metrics"]
    return {
        "OMP_WAIT_POLICY": policy,
        "torch_threads": torch.get_num_threads(),
        "fit_s": fit_s,
        "train_s": float(m["train_time_s"]),
        "n_iter": int(m["n_iter"]),
        "n_obs": int(adata.n_obs),
    }


BUSY = "import time\nend = time.time() + 3600\nwhile time.time() < end: pass"


def run_child(mode: str, max_iter: int, timeout: float, busy: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "SFACT_NO_THREAD_SETUP")}
    env.update(MODES[mode])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--max-iter", str(max_iter)]
    # --busy: processes that keep cores busy meanwhile, as other people's work on shared cores does
    burners = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    finally:
        for p in burners:
            p.kill()
            p.wait()
    if out.returncode != 0:
        raise RuntimeError(f"{mode}: the child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="runs of each mode, alternating")
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--busy", type=int, default=0, help="processes that spin on the cores during each fit")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "threads.json")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(child(args.max_iter)))
        return
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for r in range(args.repeats):
        for mode in MODES if r % 2 == 0 else reversed(list(MODES)):  # alternate the order
            res = run_child(mode, args.max_iter, args.timeout, args.busy)
            runs[mode].append(res)
            print(
                f"  run {r + 1} {mode:<12} fit {res['fit_s']:6.1f} s  train {res['train_s']:6.1f} s",
                flush=True,
            )
    load_after = os.getloadavg()
    rows = []
    for mode, rs in runs.items():
        rows.append(
            {
                "mode": mode,
                "OMP_WAIT_POLICY": rs[0]["OMP_WAIT_POLICY"] or "(unset)",
                "fit_s": statistics.median(r["fit_s"] for r in rs),
                "train_s": statistics.median(r["train_s"] for r in rs),
                "fit_min_s": min(r["fit_s"] for r in rs),
                "train_min_s": min(r["train_s"] for r in rs),
                "n_iter": rs[0]["n_iter"],
            }
        )
    on, off = rows
    lines = [
        f"osmFISH ({runs['without'][0]['n_obs']} cells), sfact.tl.fit(adata, prior='svgp', "
        f"max_iter={args.max_iter}); {args.repeats} fresh process(es) each; "
        f"torch threads {runs['without'][0]['torch_threads']}; {args.busy} busy process(es) alongside",
        f"{'':<13}{'OMP_WAIT_POLICY':<17}{'fit s':>8}{'(min)':>7}{'train s':>9}{'(min)':>7}{'iters':>7}",
    ]
    for row in rows:
        lines.append(
            f"{row['mode']:<13}{row['OMP_WAIT_POLICY']:<17}{row['fit_s']:>8.1f}{row['fit_min_s']:>7.1f}"
            f"{row['train_s']:>9.1f}{row['train_min_s']:>7.1f}{row['n_iter']:>7}"
        )
    lines.append(
        f"{'ratio':<13}{'without / with':<17}{off['fit_s'] / on['fit_s']:>8.2f}"
        f"{off['fit_min_s'] / on['fit_min_s']:>7.2f}{off['train_s'] / on['train_s']:>9.2f}"
        f"{off['train_min_s'] / on['train_min_s']:>7.2f}"
    )
    lines.append("(fit s, train s: medians over the runs; (min): the fastest run)")
    lines.append(
        f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (cores shared with other people's work)"
    )
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"rows": rows, "runs": runs, "table": table, "args": vars(args)}, default=str, indent=1)
    )


if __name__ == "__main__":
    main()
