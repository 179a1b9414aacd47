"""Benchmark the sfact Poisson factorization engine (``pnmf`` prior) against scikit-learn's KL-NMF.

Run from the repository root::

    .venv/bin/python benchmarks/bench_engine.py            # full run (~20 min on 2 cores)
    .venv/bin/python benchmarks/bench_engine.py --quick    # smoke run (< 2 min)

Every (method, data set) pair runs in a fresh subprocess (this script re-invoked with
``--one METHOD DATASET``) so that each peak-memory measurement is separable. The parent collects
the children's JSON results, prints one table and writes it to ``benchmarks/results/`` as CSV and
JSON. See ``benchmarks/README.md`` for what every column means.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"
N_FACTORS = 10
SEED = 0
METHODS = ("baseline", "sfact", "sklearn")
METHOD_LABELS = {
    "baseline": "baseline (cell total x gene share)",
    "sfact": "sfact pnmf",
    "sklearn": "sklearn NMF (KL, mu)",
}
# environment of the children; set on the parent too, before torch/numpy are imported
CHILD_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


# ---------------------------------------------------------------------------- data sets
def _load_osmfish():
    import sfact

    return sfact.datasets.osmfish()


def _simulator(n_obs: int, n_vars: int) -> Callable:
    def load():
        import sfact

        return sfact.datasets.simulate(
            n_obs=n_obs, n_vars=n_vars, n_factors=N_FACTORS, density=0.05, random_state=SEED
        )

    return load


@dataclass
class DatasetSpec:
    """A data set and the settings used on it."""

    label: str
    load: Callable
    batch_size: int | None  # cells per sfact step; None = full batch
    max_iter: dict[str, int] = field(default_factory=dict)  # default run
    quick_max_iter: dict[str, int] = field(default_factory=dict)  # --quick run


# Caps chosen so that the default run fits in ~20 minutes on 2 CPU cores (see README): on such a
# machine one sfact iteration on sim100k takes ~7.5 s plus ~340 s of KL-NMF initialization, and
# one scikit-learn iteration ~2.3 s.
DATASETS: dict[str, DatasetSpec] = {
    "osmfish": DatasetSpec(
        label="osmFISH",
        load=_load_osmfish,
        batch_size=None,
        max_iter={"sfact": 1000, "sklearn": 1000},
        quick_max_iter={"sfact": 200, "sklearn": 200},
    ),
    "sim100k": DatasetSpec(
        label="sim 100Kx2K",
        load=_simulator(100_000, 2_000),
        batch_size=10_000,
        max_iter={"sfact": 40, "sklearn": 150},
        quick_max_iter={"sfact": 5, "sklearn": 10},
    ),
    "sim20k": DatasetSpec(
        label="sim 20Kx500",
        load=_simulator(20_000, 500),
        batch_size=10_000,
        max_iter={"sfact": 200, "sklearn": 500},
        quick_max_iter={"sfact": 20, "sklearn": 50},
    ),
}
DEFAULT_DATASETS = ("osmfish", "sim100k")
QUICK_DATASETS = ("osmfish", "sim20k")


# ---------------------------------------------------------------------------- memory helpers
def _rss_mb() -> float:
    """Current resident set size (MiB), from /proc when available."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return _maxrss_mb()


def _maxrss_mb() -> float:
    """High-water mark of the resident set size (MiB) of this process."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def _reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0); False when unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _as_csr(X):
    import numpy as np
    import scipy.sparse as sp

    return X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))


def _deviance_per_entry(Y, factors_expected, loadings) -> float:
    import numpy as np

    from sfact.tl._analysis import poisson_deviance_sparse

    N, D = Y.shape
    per_cell, _ = poisson_deviance_sparse(
        Y,
        np.asarray(factors_expected, dtype=np.float64),
        np.asarray(loadings, dtype=np.float64),
        np.ones(N),
    )
    return float(per_cell.sum() / (float(N) * float(D)))


# ---------------------------------------------------------------------------- one child run
def run_one(method: str, dataset: str, max_iter: int | None, batch_size: int | None) -> dict:
    """Load ``dataset``, fit ``method`` once and measure it (meant to run in a fresh process)."""
    import numpy as np
    import scipy.sparse as sp
    import sklearn
    import torch
    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    import sfact

    spec = DATASETS[dataset]
    t0 = time.perf_counter()
    adata = spec.load()
    load_s = time.perf_counter() - t0
    X = adata.X  # as stored: dense float32 for osmFISH, CSR float32 for the simulations
    N, D = adata.shape
    nnz = int(X.nnz) if sp.issparse(X) else int(np.count_nonzero(X))
    gc.collect()
    rec: dict = {
        "method": method,
        "dataset": dataset,
        "data": spec.label,
        "N": int(N),
        "D": int(D),
        "nnz": nnz,
        "load_s": load_s,
        "torch_threads": torch.get_num_threads(),
        "sklearn_version": sklearn.__version__,
        "sfact_version": sfact.__version__,
    }
    if method == "baseline":
        rec["deviance_per_entry"] = float(sfact.tl.baseline_deviance(X, X))
        return rec

    rec["rss_load_mb"] = _rss_mb()  # current RSS after loading the data (and importing)
    rec["hwm_load_mb"] = _maxrss_mb()  # high-water mark so far (includes transient load peaks)
    rec["peak_reset"] = _reset_peak_rss()
    base = _rss_mb() if rec["peak_reset"] else rec["hwm_load_mb"]
    rec["rss_base_mb"] = base
    rec["max_iter"] = int(max_iter)

    if method == "sfact":
        rec["batch_size"] = batch_size if batch_size is not None else int(N)
        t = time.perf_counter()
        # no size factors: the same model as sklearn's NMF (Y ≈ H Wᵀ), so deviances compare
        model = sfact.models.SpatialFactorization(
            adata, prior="pnmf", n_factors=N_FACTORS, size_factors=None, random_state=SEED
        )
        model.train(max_iter=max_iter, batch_size=batch_size, progress_bar=False)
        total_s = time.perf_counter() - t
        rec["peak_rss_mb"] = _maxrss_mb()
        times = np.asarray(model.history["time"], dtype=np.float64)
        steps = np.diff(np.concatenate([[0.0], times]))
        rec.update(
            n_iter=len(times),
            converged=bool(model.converged),
            total_s=total_s,
            iters_s=float(times[-1]) if len(times) else 0.0,
            init_s=total_s - (float(times[-1]) if len(times) else 0.0),
            s_per_iter=float(steps.mean()) if len(steps) else float("nan"),
            s_per_iter_median=float(np.median(steps)) if len(steps) else float("nan"),
            final_elbo=float(model.history["elbo"].iloc[-1]) if len(times) else float("nan"),
        )
        mu, var = model.get_log_factors()
        E = np.exp(mu + 0.5 * var)
        W = model.get_loadings()
    elif method == "sklearn":
        t = time.perf_counter()
        nmf = NMF(
            n_components=N_FACTORS,
            beta_loss="kullback-leibler",
            solver="mu",
            init="nndsvda",
            max_iter=max_iter,
            tol=1e-4,
            random_state=SEED,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            E = nmf.fit_transform(X)
        total_s = time.perf_counter() - t
        rec["peak_rss_mb"] = _maxrss_mb()
        not_converged = any(issubclass(w.category, ConvergenceWarning) for w in caught)
        n_iter = int(nmf.n_iter_)
        rec.update(
            n_iter=n_iter,
            converged=not not_converged,
            total_s=total_s,
            iters_s=float("nan"),
            init_s=float("nan"),
            s_per_iter=total_s / max(n_iter, 1),
            input_format="csr" if sp.issparse(X) else "dense",
        )
        W = nmf.components_.T
    else:
        raise ValueError(f"unknown method {method!r}")
    rec["delta_rss_mb"] = rec["peak_rss_mb"] - base
    rec["deviance_per_entry"] = _deviance_per_entry(_as_csr(X), E, W)
    return rec


# ---------------------------------------------------------------------------- parent
def machine_info() -> dict:
    """CPU, library versions and thread settings of this process (same environment as the children)."""
    import numpy as np
    import scipy
    import sklearn
    import torch

    import sfact

    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    try:
        from threadpoolctl import threadpool_info

        pools = [f"{p.get('internal_api')}:{p.get('num_threads')}" for p in threadpool_info()]
    except Exception:  # threadpoolctl missing or broken: informational only
        pools = []
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "load_avg_1_5_15": load,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "sklearn": sklearn.__version__,
        "sfact": sfact.__version__,
        "threadpools": pools,
        "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")},
    }


def _spawn(method: str, dataset: str, max_iter: int | None, batch_size: int | None, timeout: float | None):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--one",
            method,
            dataset,
            "--json-out",
            str(out),
        ]
        if max_iter is not None:
            cmd += ["--max-iter", str(max_iter)]
        if batch_size is not None:
            cmd += ["--batch-size", str(batch_size)]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"method": method, "dataset": dataset, "error": f"timed out after {timeout} s"}
        wall = time.perf_counter() - t
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-15:]
            return {"method": method, "dataset": dataset, "error": "\n".join(tail), "process_s": wall}
        rec = json.loads(out.read_text())
        rec["process_s"] = wall
        return rec


def _fmt(v, spec: str) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and v != v:  # NaN
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


# (key, header, format)
COLUMNS = [
    ("method", "method", ""),
    ("data", "data", ""),
    ("N", "N", ","),
    ("D", "D", ","),
    ("nnz", "nnz", ","),
    ("s_per_iter", "s/iter", ".4g"),
    ("s_per_iter_ratio", "s/iter vs skl", ".2f"),
    ("n_iter", "iters", "d"),
    ("max_iter", "max_iter", "d"),
    ("converged", "conv", ""),
    ("init_s", "init s", ".1f"),
    ("total_s", "time-to-conv s", ".1f"),
    ("total_ratio", "ttc vs skl", ".2f"),
    ("rss_base_mb", "base RSS MB", ".0f"),
    ("peak_rss_mb", "peak RSS MB", ".0f"),
    ("delta_rss_mb", "delta MB", ".0f"),
    ("deviance_per_entry", "deviance/entry", ".5f"),
]


def format_table(rows: list[dict]) -> str:
    """Plain-text table of the result rows."""
    cells = [[h for _, h, _ in COLUMNS]]
    for r in rows:
        cells.append([_fmt(r.get(k), f) for k, _, f in COLUMNS])
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = []
    for j, row in enumerate(cells):
        parts = [
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _add_ratios(rows: list[dict]) -> None:
    by_data = {}
    for r in rows:
        if r.get("method_key") == "sklearn" and "error" not in r:
            by_data[r["dataset"]] = r
    for r in rows:
        ref = by_data.get(r["dataset"])
        if ref is None or r.get("method_key") == "baseline" or "error" in r:
            continue
        for key, out in (("s_per_iter", "s_per_iter_ratio"), ("total_s", "total_ratio")):
            if r.get(key) is not None and ref.get(key):
                r[out] = r[key] / ref[key]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke run: osmFISH + a 20K x 500 simulation, few iterations"
    )
    p.add_argument("--datasets", default=None, help=f"comma-separated, from {sorted(DATASETS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {METHODS}")
    p.add_argument(
        "--max-iter", type=int, default=None, help="iteration cap of both methods (overrides defaults)"
    )
    p.add_argument("--sfact-max-iter", type=int, default=None, help="iteration cap of sfact only")
    p.add_argument("--sklearn-max-iter", type=int, default=None, help="iteration cap of scikit-learn only")
    p.add_argument(
        "--batch-size", type=int, default=None, help="cells per sfact step (overrides the data set's)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="set OMP/MKL/OpenBLAS thread counts of the children"
    )
    p.add_argument("--timeout", type=float, default=None, help="seconds per child run")
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="results folder (default benchmarks/results)"
    )
    p.add_argument(
        "--tag", default=None, help="file stem of the results (default engine_full / engine_quick)"
    )
    p.add_argument("--one", nargs=2, metavar=("METHOD", "DATASET"), help=argparse.SUPPRESS)
    p.add_argument("--json-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one is not None:  # child mode
        method, dataset = args.one
        if method not in METHODS or dataset not in DATASETS:
            p.error(f"--one expects a method in {METHODS} and a data set in {sorted(DATASETS)}")
        spec = DATASETS[dataset]
        max_iter = args.max_iter if args.max_iter is not None else spec.max_iter.get(method)
        batch_size = args.batch_size if args.batch_size is not None else spec.batch_size
        rec = run_one(method, dataset, max_iter, batch_size)
        text = json.dumps(rec, indent=1)
        if args.json_out is not None:
            args.json_out.write_text(text)
        else:
            print(text)
        return 0

    os.environ.update(CHILD_ENV)
    if args.threads is not None:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[k] = str(args.threads)
    if args.datasets:
        datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    else:
        datasets = list(QUICK_DATASETS if args.quick else DEFAULT_DATASETS)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [d for d in datasets if d not in DATASETS] + [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown data set(s)/method(s) {bad}; data sets: {sorted(DATASETS)}, methods: {METHODS}")
    tag = args.tag or ("engine_quick" if args.quick else "engine_full")

    info = machine_info()
    print("sfact engine benchmark")
    for k, v in info.items():
        print(f"  {k:22s} {v}")
    print(flush=True)

    rows: list[dict] = []
    t_all = time.perf_counter()
    for dataset in datasets:
        spec = DATASETS[dataset]
        for method in methods:
            max_iter = None
            if method != "baseline":
                caps = spec.quick_max_iter if args.quick else spec.max_iter
                max_iter = caps[method]
                if args.max_iter is not None:
                    max_iter = args.max_iter
                override = args.sfact_max_iter if method == "sfact" else args.sklearn_max_iter
                if override is not None:
                    max_iter = override
            batch_size = (
                (args.batch_size if args.batch_size is not None else spec.batch_size)
                if method == "sfact"
                else None
            )
            desc = f"{method} on {dataset}" + (f" (max_iter={max_iter})" if max_iter is not None else "")
            print(f"[{time.perf_counter() - t_all:7.1f} s] running {desc} ...", flush=True)
            rec = _spawn(method, dataset, max_iter, batch_size, args.timeout)
            rec["method_key"] = method
            rec.setdefault("data", spec.label)
            rec["method"] = METHOD_LABELS[method]
            if "error" in rec:
                print(f"    FAILED: {rec['error']}", flush=True)
            else:
                extra = ""
                if method != "baseline":
                    extra = f", {rec['n_iter']} iterations, fit {rec['total_s']:.1f} s"
                print(f"    done in {rec['process_s']:.1f} s{extra}", flush=True)
            rows.append(rec)
    _add_ratios(rows)
    total = time.perf_counter() - t_all

    print()
    print(format_table(rows))
    print()
    print(f"total benchmark time {total:.1f} s")
    try:
        load_end = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load_end = None
    print(f"load average at the end (1, 5, 15 min): {load_end}")
    errors = [r for r in rows if "error" in r]

    args.out.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    df = pd.DataFrame(rows)
    csv_path = args.out / f"{tag}.csv"
    json_path = args.out / f"{tag}.json"
    df.to_csv(csv_path, index=False)
    payload = {
        "machine": info,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "total_s": total,
        "load_avg_end": load_end,
        "rows": rows,
        "table": format_table(rows),
    }
    json_path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {csv_path} and {json_path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
