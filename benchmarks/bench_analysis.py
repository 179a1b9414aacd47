"""Time and peak memory of ``sfact.tl.analyze`` on a 100,000-cell simulated fit.

    .venv/bin/python benchmarks/bench_analysis.py            # 100,000 x 2,000, density 0.05
    .venv/bin/python benchmarks/bench_analysis.py --quick    # 20,000 x 500 smoke run

Step 1 (this process) simulates the data, fits ``pnmf`` for 3 iterations (``batch_size``
10,000) and saves the model and the counts. Step 2 runs in a fresh process: it loads the data
and the model, records the RSS, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``;
``resource.getrusage``'s ``ru_maxrss`` cannot be reset and is dominated by loading, so it is
printed for reference), then runs ``sfact.tl.analyze`` (factors in batches, Moran's I, deviance, reconstruction
error, and with ``--groups`` per-group loadings and gene enrichment) and prints the time and the
peak RSS above the loaded state. A dense cells x genes matrix would take
``n_obs * n_vars * 8`` bytes (1.6 GB at 100,000 x 2,000); the analysis must stay well below it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _hwm_mb() -> float:
    """The kernel's peak RSS of this process (VmHWM), resettable through ``clear_refs``."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak belongs to what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class _Sampler:
    """Samples the RSS every few milliseconds in a thread (a check that needs no kernel support)."""

    def __init__(self, every: float = 0.005):
        import threading

        self.every, self.peak, self._stop = every, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def fit_step(args, work: Path) -> None:
    import sfact

    t = time.perf_counter()
    adata = sfact.datasets.simulate(
        n_obs=args.n_obs, n_vars=args.n_vars, n_factors=10, density=args.density, random_state=0
    )
    print(f"simulated {adata.n_obs} x {adata.n_vars}, nnz {adata.X.nnz:,} in {time.perf_counter() - t:.1f} s")
    # keep the analysis input lean: counts, coordinates, groups
    for k in list(adata.obsm):
        if k != "spatial":
            del adata.obsm[k]
    del adata.varm["loadings_true"]
    model = sfact.models.SpatialFactorization(adata, prior="pnmf", n_factors=10, size_factors="total")
    t = time.perf_counter()
    model.train(max_iter=3, batch_size=args.batch_size, progress_bar=False)
    print(f"pnmf fit, 3 iterations: {time.perf_counter() - t:.1f} s")
    model.save(work / "model", overwrite=True)
    adata.write_h5ad(work / "data.h5ad")


def analyze_step(args, work: Path) -> dict:
    import anndata as ad

    import sfact

    adata = ad.read_h5ad(work / "data.h5ad")
    model = sfact.models.SpatialFactorization.load(work / "model", adata)
    sfact.settings.progress_bar = False
    # warm the lazy imports (squidpy, numba) so they are not counted as analysis
    sfact.tl.morans_i(adata.obsm["spatial"][:50], adata.obsm["spatial"][:50])
    import gc

    gc.collect()
    base_rss, base_peak = _rss_mb(), _peak_mb()
    reset = _reset_hwm()
    t = time.perf_counter()
    with _Sampler() as sampler:
        sfact.tl.analyze(
            adata,
            model,
            analyze_batch_size=args.batch_size,
            group_key="group" if args.groups else None,
        )
    elapsed = time.perf_counter() - t
    # getrusage's ru_maxrss cannot be reset: it covers loading too; VmHWM after clear_refs and the
    # sampler cover the analysis alone
    peak_ru = _peak_mb()
    peak = _hwm_mb() if reset else sampler.peak
    dense_mb = adata.n_obs * adata.n_vars * 8 / 1024**2
    out = {
        "n_obs": adata.n_obs,
        "n_vars": adata.n_vars,
        "nnz": int(adata.X.nnz),
        "groups": bool(args.groups),
        "analyze_batch_size": args.batch_size,
        "analysis_s": round(elapsed, 2),
        "rss_before_mb": round(base_rss, 1),
        "peak_rss_mb": round(peak, 1),
        "peak_rss_source": "VmHWM after clear_refs" if reset else "5 ms RSS sampler",
        "peak_rss_sampled_mb": round(sampler.peak, 1),
        "peak_above_loaded_mb": round(peak - max(base_rss, 0.0), 1),
        "getrusage_maxrss_process_mb": round(peak_ru, 1),
        "getrusage_maxrss_before_analysis_mb": round(base_peak, 1),
        "dense_float64_n_x_d_mb": round(dense_mb, 1),
        "deviance_per_entry": adata.uns["sfact"]["metrics"]["deviance_per_entry"],
        "reconstruction_error": adata.uns["sfact"]["metrics"]["reconstruction_error"],
    }
    if args.groups:
        info = adata.uns["sfact"]["group_loadings"]
        out["group_n_cells"] = [int(v) for v in info["n_cells"]]
        out["group_n_iter"] = [int(v) for v in info["n_iter"]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n-obs", type=int, default=100_000)
    parser.add_argument("--n-vars", type=int, default=2_000)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--groups", action="store_true", help="also per-group loadings and enrichment")
    parser.add_argument("--both", action="store_true", help="run the analysis without and with groups")
    parser.add_argument(
        "--work", type=Path, default=None, help="keep the fit here (default: a temporary folder)"
    )
    parser.add_argument("--reuse", action="store_true", help="reuse the fit saved in --work")
    parser.add_argument("--analyze-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.n_obs, args.n_vars = 20_000, 500
    if args.analyze_only:
        print("RESULT " + json.dumps(analyze_step(args, args.work)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not (args.reuse and (work / "data.h5ad").exists()):
            fit_step(args, work)
        runs = [False, True] if args.both else [args.groups]
        for groups in runs:
            cmd = [sys.executable, __file__, "--analyze-only", "--work", str(work)]
            cmd += [
                "--n-obs",
                str(args.n_obs),
                "--n-vars",
                str(args.n_vars),
                "--batch-size",
                str(args.batch_size),
            ]
            if groups:
                cmd.append("--groups")
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(proc.stdout[-3000:], proc.stderr[-3000:])
                raise SystemExit(f"analysis step failed (exit {proc.returncode})")
            res = json.loads(lines[-1].removeprefix("RESULT "))
            print(
                f"analysis of {res['n_obs']:,} x {res['n_vars']:,} (nnz {res['nnz']:,}), "
                f"groups={res['groups']}: {res['analysis_s']:.1f} s, peak RSS during the analysis "
                f"{res['peak_rss_mb']:.0f} MB = {res['peak_above_loaded_mb']:.0f} MB above the loaded data and "
                f"model (a dense N x D float64 matrix alone would be {res['dense_float64_n_x_d_mb']:.0f} MB; "
                f"getrusage max RSS of the process, loading included: {res['getrusage_maxrss_process_mb']:.0f} MB)"
            )
            print("  " + json.dumps(res))


if __name__ == "__main__":
    main()
