"""Held-out accuracy, speed and memory of the locally conditioned GP priors ``lcgp``/``mggp_lcgp``.

Run from the repository root::

    .venv/bin/python benchmarks/bench_lcgp.py                    # osmFISH + Visium prostate + scale row
    .venv/bin/python benchmarks/bench_lcgp.py --quick            # few iterations (smoke run)
    .venv/bin/python benchmarks/bench_lcgp.py --priors lcgp,mggp_lcgp,svgp,mggp_svgp --no-scale
    .venv/bin/python benchmarks/bench_lcgp.py --prior-kwargs '{"lengthscale": 4}'

Protocol (the one of ``bench_spatial.py``): ``sfact.pp.prepare(adata, group_key=GROUP,
min_group_size=1)``, ``sfact.tl.heldout_split(adata, fraction=0.05, random_state=0)``, L = 10,
``size_factors="total"``; held-out deviance = ``sfact.tl.heldout_deviance`` (mean Poisson
deviance per entry of the held-out cells, rates predicted from their coordinates and group with
their own totals); Moran's I = mean over factors of ``sfact.tl.morans_i`` of the training
factors. The scale row fits ``sfact.datasets.simulate(n_obs=200_000, n_vars=200, n_factors=10)``
on the CPU for a few iterations with ``batch_size=10000`` (with a ``pnmf`` row: the cost of the
likelihood engine alone at that size).

Every fit runs in a fresh subprocess (``--one``) so its peak RSS (``ru_maxrss``) is its own;
``base MB`` is the RSS after loading the data, ``peak MB`` the high-water mark of the process
(after resetting it to the current RSS through ``/proc/self/clear_refs`` where Linux allows).
``s/iter``: mean difference of ``model.history["time"]`` (iterations only); ``fit s``: model
construction (neighbour search, conditionals, KL-NMF start) + training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_FACTORS = 10
DATASETS = {
    "osmfish": {"label": "osmFISH", "loader": "osmfish", "group_key": "ClusterName"},
    "prostate": {"label": "Visium prostate", "loader": "visium_prostate", "group_key": "list_ID"},
}
SCALE = {"n_obs": 200_000, "n_vars": 200, "n_factors": 10, "batch_size": 10_000, "iters": 3}
CHILD_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "TQDM_DISABLE": "1"}


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(method: str, dataset: str, max_iter: int, prior_kwargs: dict, device: str) -> dict:
    """One fit in this process; returns its row."""
    import gc

    import numpy as np
    import torch

    import sfact

    sfact.settings.progress_bar = False
    if dataset == "sim200k":
        adata = sfact.datasets.simulate(
            n_obs=SCALE["n_obs"], n_vars=SCALE["n_vars"], n_factors=SCALE["n_factors"], random_state=0
        )
        sfact.pp.prepare(adata)
        train, test, group_key = adata, None, None
    else:
        spec = DATASETS[dataset]
        adata = getattr(sfact.datasets, spec["loader"])()
        sfact.pp.prepare(adata, group_key=spec["group_key"], min_group_size=1)
        train, test = sfact.tl.heldout_split(adata, fraction=0.05, random_state=0)
        group_key = spec["group_key"]
    gc.collect()
    base = _rss_mb()
    _reset_peak()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    row = {"dataset": dataset, "method": method, "n_train": int(train.n_obs), "prior_kwargs": prior_kwargs}
    t0 = time.perf_counter()
    if method == "baseline":
        Y = train.X
        row["heldout_dev"] = float(sfact.tl.baseline_deviance(Y, test.X))
        row["fit_s"] = time.perf_counter() - t0
        return row
    model = sfact.models.SpatialFactorization(
        train,
        prior=method,
        n_factors=N_FACTORS,
        group_key=group_key if method.startswith("mggp") else None,
        prior_kwargs=prior_kwargs or None,
        device=device,
        random_state=0,
    )
    train_kw = {}
    if dataset == "sim200k":
        train_kw = {"batch_size": SCALE["batch_size"], "min_iter": max_iter + 1}
    model.train(max_iter=max_iter, **train_kw)
    row["fit_s"] = time.perf_counter() - t0
    row["peak_mb"] = _peak_mb()
    row["base_mb"] = base
    if device.startswith("cuda"):
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    h = model.history
    row["iters"] = len(h)
    row["converged"] = bool(model.converged)
    row["s_per_iter"] = float(np.diff(np.r_[0.0, h["time"].to_numpy()]).mean()) if len(h) else float("nan")
    row["init_s"] = float(model.train_info.get("init_time_s", float("nan")))
    row["gp_info"] = model.gp_info()
    if test is not None:
        row["heldout_dev"] = float(sfact.tl.heldout_deviance(model, test))
        coords = np.asarray(train.obsm["spatial"], np.float64)
        row["moran"] = float(np.nanmean(sfact.tl.morans_i(model.get_factors(), coords)["I"].to_numpy()))
    return row


def _child(args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--one",
        args.method,
        args.dataset,
        "--max-iter",
        str(args.max_iter),
        "--device",
        args.device,
        "--prior-kwargs",
        json.dumps(args.kw),
    ]
    env = {**os.environ, **CHILD_ENV}
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if out.returncode != 0:
        return {"dataset": args.dataset, "method": args.method, "error": out.stderr.strip().splitlines()[-1:]}
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["process_s"] = time.perf_counter() - t
    return row


def _fmt(v, spec):
    return "" if v is None or (isinstance(v, float) and v != v) else format(v, spec)


def table(rows: list[dict]) -> str:
    lines = [
        "| data | method | options | held-out dev/entry | mean Moran's I | s/iter | iters | conv | fit s | base MB | peak MB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['dataset']} | {r['method']} | | error: {r['error']} | | | | | | | |")
            continue
        label = DATASETS.get(r["dataset"], {}).get("label", r["dataset"])
        opts = ", ".join(f"{k}={v}" for k, v in (r.get("prior_kwargs") or {}).items())
        lines.append(
            f"| {label} | {r['method']} | {opts} | {_fmt(r.get('heldout_dev'), '.4f')} | {_fmt(r.get('moran'), '.3f')} "
            f"| {_fmt(r.get('s_per_iter'), '.3f')} | {r.get('iters', '')} | "
            f"{'' if 'converged' not in r else ('yes' if r['converged'] else 'no')} | {_fmt(r.get('fit_s'), '.1f')} "
            f"| {_fmt(r.get('base_mb'), '.0f')} | {_fmt(r.get('peak_mb'), '.0f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "DATASET"))
    ap.add_argument("--priors", default="baseline,lcgp,mggp_lcgp")
    ap.add_argument("--datasets", default="osmfish,prostate")
    ap.add_argument("--max-iter", type=int, default=None)
    ap.add_argument("--prior-kwargs", default="{}", help="JSON options for every GP prior")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-scale", action="store_true", help="skip the 200,000-cell scale row")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    if args.one:
        method, dataset = args.one
        max_iter = args.max_iter if args.max_iter is not None else 1000
        row = run_one(method, dataset, max_iter, json.loads(args.prior_kwargs), args.device)
        print(json.dumps(row, default=float))
        return
    kw = json.loads(args.prior_kwargs)
    rows = []
    t_all = time.perf_counter()
    jobs = [(m, d) for d in args.datasets.split(",") if d for m in args.priors.split(",") if m]
    if not args.no_scale:
        jobs += [("pnmf", "sim200k"), ("lcgp", "sim200k")]  # pnmf: the engine's own cost at that size
    for method, dataset in jobs:
        if dataset == "sim200k":
            max_iter = 2 if args.quick else SCALE["iters"]
        else:
            max_iter = args.max_iter if args.max_iter is not None else (30 if args.quick else 1000)
        ns = argparse.Namespace(
            method=method,
            dataset=dataset,
            max_iter=max_iter,
            device=args.device,
            kw={} if method == "baseline" else kw,
            timeout=args.timeout,
        )
        print(f"[{time.perf_counter() - t_all:7.1f} s] {method} on {dataset} ...", flush=True)
        row = _child(ns)
        rows.append(row)
        print("    " + json.dumps({k: v for k, v in row.items() if k != "gp_info"}, default=str), flush=True)
    text = table(rows)
    print()
    print(text)
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "total_s": time.perf_counter() - t_all,
    }
    print(f"\n{info}")
    os.makedirs(args.out, exist_ok=True)
    tag = "lcgp_quick" if args.quick else "lcgp"
    with open(os.path.join(args.out, f"{tag}.json"), "w") as fh:
        json.dump({"rows": rows, "info": info, "table": text}, fh, indent=1, default=str)
    with open(os.path.join(args.out, f"{tag}.md"), "w") as fh:
        fh.write(text + "\n")


if __name__ == "__main__":
    main()
