"""Snapshot of results that a refactor must not change, and a comparison of two snapshots.

For each of the five priors on osmFISH (fixed seed, the held-out protocol of
``bench_spatial.py``: 5% of cells held out with ``default_rng(0)``, L = 10) it records the ELBO
history, the held-out deviance and a few sums of the fitted factors and loadings; for the tiny
CLI plan (``configs/osmfish/general_test.yaml``) the list of files written and the arrays in
each ``results.h5ad``.

    python benchmarks/refactor_snapshot.py --out before.json      # on the old code
    python benchmarks/refactor_snapshot.py --out after.json       # on the new code
    python benchmarks/refactor_snapshot.py --compare before.json after.json

The comparison prints one table (max relative difference of the ELBO history, held-out
deviance before/after) and exits 1 when anything differs by more than float32 tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PRIORS = ["pnmf", "svgp", "mggp_svgp", "lcgp", "mggp_lcgp"]
REPO = Path(__file__).resolve().parents[1]


def _fits(max_iter: int) -> dict:
    import sfact

    adata = sfact.datasets.osmfish()
    sfact.pp.prepare(adata, group_key="ClusterName")
    train, test = sfact.tl.heldout_split(adata, fraction=0.05, random_state=0)
    out = {}
    for prior in PRIORS:
        kw = {"group_key": "ClusterName"} if prior.startswith("mggp") else {}
        t0 = time.perf_counter()
        model = sfact.models.SpatialFactorization(train, prior=prior, n_factors=10, random_state=0, **kw)
        model.train(max_iter=max_iter, progress_bar=False)
        fit_s = time.perf_counter() - t0
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dev = sfact.tl.heldout_deviance(model, test)
        F = model.get_factors()
        W = model.get_loadings()
        out[prior] = {
            "elbo": [float(x) for x in model.history["elbo"].to_numpy()],
            "heldout_deviance": float(dev),
            "factor_sum": float(np.sum(F)),
            "loadings_sum": float(np.sum(W)),
            "fit_s": fit_s,
        }
        print(
            f"{prior:10s} iters={len(out[prior]['elbo']):4d} heldout={dev:.6f} fit={fit_s:.1f}s", flush=True
        )
    return out


def _cli() -> dict:
    import anndata as ad

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "cfg.yaml"
        cfg.write_text(
            f"base: {REPO / 'configs/osmfish/general_test.yaml'}\noutput_dir: {tmp}/out\n", encoding="utf-8"
        )
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        cmd = [sys.executable, "-m", "sfact", "run", "all", "-c", str(cfg), "--plain", "--executor", "serial"]
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        root = Path(tmp) / "out"
        files = sorted(
            str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "logs" not in p.parts
        )
        arrays = {}
        for p in sorted(root.rglob("results.h5ad")):
            a = ad.read_h5ad(p)
            rel = str(p.relative_to(root))
            for k in sorted(a.obsm):
                arrays[f"{rel}:obsm:{k}"] = float(np.nansum(np.asarray(a.obsm[k], dtype=float)))
            for k in sorted(a.varm):
                arrays[f"{rel}:varm:{k}"] = float(np.nansum(np.asarray(a.varm[k], dtype=float)))
    return {"files": files, "arrays": arrays}


def _compare(a: dict, b: dict) -> int:
    bad = 0
    print("| prior | iters before | iters after | max rel diff ELBO | held-out before | held-out after |")
    print("|---|---|---|---|---|---|")
    for prior in PRIORS:
        x, y = a["fits"][prior], b["fits"][prior]
        ex, ey = np.asarray(x["elbo"]), np.asarray(y["elbo"])
        n = min(len(ex), len(ey))
        rel = float(np.max(np.abs(ex[:n] - ey[:n]) / np.maximum(np.abs(ex[:n]), 1e-12))) if n else 0.0
        print(
            f"| {prior} | {len(ex)} | {len(ey)} | {rel:.2e} | {x['heldout_deviance']:.6f} | {y['heldout_deviance']:.6f} |"
        )
        dev_rel = abs(x["heldout_deviance"] - y["heldout_deviance"]) / x["heldout_deviance"]
        if len(ex) != len(ey) or rel > 1e-4 or dev_rel > 1e-4:
            bad += 1
    if "cli" in a and "cli" in b:
        fa, fb = set(a["cli"]["files"]), set(b["cli"]["files"])
        print(
            f"\nCLI files: {len(fa)} before, {len(fb)} after; only before: {sorted(fa - fb)}; only after: {sorted(fb - fa)}"
        )
        bad += fa != fb
        diffs = []
        for k in sorted(set(a["cli"]["arrays"]) | set(b["cli"]["arrays"])):
            va, vb = a["cli"]["arrays"].get(k), b["cli"]["arrays"].get(k)
            if va is None or vb is None or abs(va - vb) > 1e-4 * max(abs(va), 1.0):
                diffs.append((k, va, vb))
        print(f"CLI result arrays differing: {len(diffs)} of {len(a['cli']['arrays'])}")
        for d in diffs[:20]:
            print("   ", d)
        bad += bool(diffs)
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--compare", nargs=2, type=Path)
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--no-cli", action="store_true")
    args = p.parse_args()
    if args.compare:
        a, b = (json.loads(x.read_text()) for x in args.compare)
        return _compare(a, b)
    import torch

    torch.set_num_threads(2)
    snap = {"fits": _fits(args.max_iter)}
    if not args.no_cli:
        snap["cli"] = _cli()
    if args.out:
        args.out.write_text(json.dumps(snap, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
