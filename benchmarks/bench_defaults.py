"""Default ("auto") lengthscales against fixed ones, on real and simulated data.

Run from the repository root::

    .venv/bin/python benchmarks/bench_defaults.py                 # everything, one fit per core
    .venv/bin/python benchmarks/bench_defaults.py --jobs 2 --datasets dentate_gyrus sim_short
    .venv/bin/python benchmarks/bench_defaults.py --quick         # smoke run (few iterations)

Protocol (as ``benchmarks/bench_spatial.py``): ``sfact.pp.prepare(adata)``, then
``sfact.tl.heldout_split(adata, fraction=0.05, random_state=0)``; L = 10 factors; the metric is
``sfact.tl.heldout_deviance(model, test)``, the mean Poisson deviance per entry of the held-out
cells, whose factors are predicted from their coordinates. References: the baseline
``sfact.tl.baseline_deviance`` (cell total x the gene's share) and the kNN composition smoother of
``bench_spatial.py``, best over k in 5...50 (chosen on the held-out cells themselves, so an
optimistic reference).

Rows per data set, for ``svgp`` and ``lcgp``: the default (``lengthscale="auto"``: chosen from
the data before training, see ``sfact._core.lengthscale``), the old default (the lengthscale
fixed at 5 for ``svgp`` and 8 for ``lcgp``, the defaults before ``"auto"``) and the lengthscale
fixed at 5, 10 and 20. ``vs best fixed`` is relative to the best of the fixed lengthscales 5,
10, 20 of the same prior; ``vs baseline`` / ``vs best kNN`` relative to the references;
``time x`` is the fit time (set-up, search and training) over the old default's.
``BENCH_VARIANTS=1`` adds learned hyperparameters (``lengthscale=None``: ELBO, started from the
"auto" choice). Simulated data (``sfact.datasets.simulate``, ``BENCH_SIM_CELLS`` cells, default
3000, uniform in the 100 x 100 box, which ``pp.prepare`` keeps at the same scale) have a known
squared-exponential lengthscale (5: about 2.7 cell spacings; 25: about 14); there every fit uses
``kernel="rbf"``, so the chosen lengthscale compares with the truth.

Every fit runs in its own process with one torch thread, ``--jobs`` at a time (default: the CPU
count), all fits of one run side by side: compare times as ratios within a run (``time x``: fit
time over the default's fit time on the same data).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_FACTORS = 10
SEED = 0
HELDOUT_FRACTION = 0.05
KNN_KS = (5, 10, 20, 30, 50)
KNN_SHRINK = 0.01
FIXED_LENGTHSCALES = (5.0, 10.0, 20.0)
REAL = {
    "osmfish": "osmfish",
    "prostate": "visium_prostate",
    "dentate_gyrus": "visium_dentate_gyrus",
}
SIMULATED = {"sim_short": 5.0, "sim_long": 25.0}  # true lengthscales (scaled units)
SIM_CELLS = int(os.environ.get("BENCH_SIM_CELLS", "3000"))
DATASETS = (*REAL, *SIMULATED)
# the fixed lengthscales that were the defaults before `lengthscale="auto"`
OLD_DEFAULT = {"svgp": 5.0, "lcgp": 8.0}
# learned hyperparameters (ELBO, first `hyper_iter` iterations, started from the "auto" choice)
LEARNED = {
    "svgp": {"lengthscale": None, "sigma": None},
    "lcgp": {"lengthscale": None, "sigma": None, "nugget": None},
}
VARIANTS = os.environ.get("BENCH_VARIANTS", "0") == "1"  # adds the learned rows


def load(dataset: str):
    """The prepared data set and its held-out split: ``(adata, train, test, true_lengthscale)``."""
    import sfact

    if dataset in SIMULATED:
        truth = SIMULATED[dataset]
        adata = sfact.datasets.simulate(
            n_obs=SIM_CELLS, n_vars=200, n_factors=5, n_groups=1, lengthscale=truth, random_state=SEED
        )
    else:
        truth = None
        adata = getattr(sfact.datasets, REAL[dataset])()
    sfact.pp.prepare(adata)
    train, test = sfact.tl.heldout_split(adata, fraction=HELDOUT_FRACTION, random_state=SEED)
    return adata, train, test, truth


def fits_of(dataset: str) -> list[tuple[str, str, dict]]:
    """(label, prior, prior_kwargs) of every fit on ``dataset``.

    ``default``: the package defaults (``lengthscale="auto"``); ``fixed ls=X``: the lengthscale
    fixed at X, the rest at the defaults; ``old default``: the fixed lengthscales that were the
    defaults before ``"auto"`` (5 for ``svgp``, 8 for ``lcgp``), the reference of ``time x``.
    On simulated data every fit uses the RBF kernel of the simulation, so the chosen lengthscale
    compares with the true one.
    """
    rbf = {"kernel": "rbf"} if dataset in SIMULATED else {}
    rows = []
    for prior in ("svgp", "lcgp"):
        rows.append((f"{prior} default", prior, dict(rbf)))
        rows.append((f"{prior} old default", prior, {**rbf, "lengthscale": OLD_DEFAULT[prior]}))
        for ls in FIXED_LENGTHSCALES:
            if ls != OLD_DEFAULT[prior]:
                rows.append((f"{prior} fixed ls={ls:g}", prior, {**rbf, "lengthscale": ls}))
        if VARIANTS:
            rows.append((f"{prior} learned", prior, {**rbf, **LEARNED[prior]}))
    return rows


def references(dataset: str) -> dict:
    """Baseline and the best kNN composition smoother (over ``KNN_KS``) on the held-out cells."""
    import numpy as np
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    import sfact

    _, train, test, _ = load(dataset)
    Ytr = sp.csr_matrix(train.X, dtype=np.float64)
    Yte = sp.csr_matrix(test.X, dtype=np.float64)
    out = {"baseline": float(sfact.tl.baseline_deviance(Ytr, Yte))}
    tot_tr = np.asarray(Ytr.sum(1)).ravel()
    tot_te = np.asarray(Yte.sum(1)).ravel()
    keep = tot_tr > 0
    comp_tr = np.asarray(Ytr[keep].multiply(1.0 / tot_tr[keep][:, None]).todense())
    share = np.asarray(Ytr.sum(0)).ravel()
    share = share / share.sum()
    Xtr = np.asarray(train.obsm["spatial"], np.float64)[keep]
    Xte = np.asarray(test.obsm["spatial"], np.float64)
    Yd = Yte.toarray()
    best = (np.inf, None)
    for k in KNN_KS:
        _, nn = cKDTree(Xtr).query(Xte, k=min(k, len(Xtr)))
        comp = (1.0 - KNN_SHRINK) * comp_tr[nn].mean(axis=1) + KNN_SHRINK * share[None, :]
        lam = np.maximum(comp * tot_te[:, None], 1e-10)
        pos = Yd > 0
        term = np.zeros_like(Yd)
        term[pos] = Yd[pos] * np.log(Yd[pos] / lam[pos])
        dev = float(2.0 * (term - (Yd - lam)).sum() / Yd.size)
        best = min(best, (dev, k))
    out["knn"], out["knn_k"] = best
    return out


def one_fit(job: tuple) -> dict:
    """Fit one (dataset, label, prior, prior_kwargs) in this (fresh) process; the record of it."""
    dataset, label, prior, kwargs, max_iter = job
    import torch

    torch.set_num_threads(1)
    import numpy as np

    import sfact

    sfact.settings.progress_bar = False
    _, train, test, truth = load(dataset)
    t = time.perf_counter()
    model = sfact.models.SpatialFactorization(
        train,
        prior=prior,
        n_factors=N_FACTORS,
        size_factors="total",
        prior_kwargs=kwargs or None,
        random_state=SEED,
        device="cpu",
    )
    model.train(max_iter=max_iter)
    fit_s = time.perf_counter() - t
    info = model.gp_info()
    return {
        "dataset": dataset,
        "label": label,
        "prior": prior,
        "prior_kwargs": kwargs,
        "heldout_dev": float(sfact.tl.heldout_deviance(model, test)),
        "fit_s": fit_s,
        "n_iter": len(model.history["elbo"]),
        "lengthscale": float(np.mean(info["lengthscale"])),
        "sigma": float(np.mean(info["sigma"])),
        "nugget": info.get("nugget"),
        "true_lengthscale": truth,
    }


def format_table(records: list[dict], refs: dict) -> str:
    lines = [
        "| data | fit | held-out deviance | vs best fixed 5/10/20 | vs baseline | vs best kNN | time x old default | iterations | lengthscale | true ls |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ds in DATASETS:
        recs = [r for r in records if r["dataset"] == ds]
        if not recs:
            continue
        ref = refs.get(ds, {})
        for prior in ("svgp", "lcgp"):
            mine = [r for r in recs if r["prior"] == prior]
            fixed = [
                r
                for r in mine
                if r["label"] != f"{prior} default"
                and "learned" not in r["label"]
                and float(r["lengthscale"]) in FIXED_LENGTHSCALES
            ]
            best_fixed = min((r["heldout_dev"] for r in fixed), default=float("nan"))
            ref_time = next((r["fit_s"] for r in mine if r["label"] == f"{prior} old default"), float("nan"))
            for r in mine:
                truth = "" if r["true_lengthscale"] is None else f"{r['true_lengthscale']:g}"
                lines.append(
                    f"| {ds} | {r['label']} | {r['heldout_dev']:.4f} | "
                    f"{100 * (r['heldout_dev'] / best_fixed - 1):+.2f}% | "
                    f"{100 * (r['heldout_dev'] / ref.get('baseline', float('nan')) - 1):+.1f}% | "
                    f"{100 * (r['heldout_dev'] / ref.get('knn', float('nan')) - 1):+.1f}% | "
                    f"{r['fit_s'] / ref_time:.2f} | "
                    f"{r['n_iter']} | {r['lengthscale']:.3g} | {truth} |"
                )
        if ref:
            lines.append(f"| {ds} | baseline | {ref['baseline']:.4f} | | | | | | | |")
            lines.append(f"| {ds} | best kNN smoother (k={ref['knn_k']}) | {ref['knn']:.4f} | | | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--quick", action="store_true", help="30 iterations per fit (smoke run)")
    p.add_argument("--only", nargs="*", default=None, help="fit labels to run (default: all)")
    p.add_argument("--table", type=Path, default=None, help="only print the table of a .partial.jsonl")
    p.add_argument("--out", type=Path, default=HERE / "results" / "bench_defaults.json")
    args = p.parse_args(argv)
    if args.table is not None:
        lines = [json.loads(x) for x in args.table.read_text().splitlines() if x.strip()]
        print(format_table([r for r in lines if "label" in r], lines[0]["references"]))
        return 0
    max_iter = 30 if args.quick else args.max_iter
    jobs = [
        (ds, label, prior, kw, max_iter)
        for ds in args.datasets
        for label, prior, kw in fits_of(ds)
        if args.only is None or label in args.only
    ]
    # the slowest data sets first, so the pool drains evenly
    order = {"osmfish": 0, "prostate": 1, "sim_long": 2, "sim_short": 3, "dentate_gyrus": 4}
    jobs.sort(key=lambda j: (order[j[0]], j[2] != "svgp"))
    t0 = time.perf_counter()
    refs = {ds: references(ds) for ds in args.datasets}
    records = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".partial.jsonl")
    partial.write_text(json.dumps({"references": refs}) + "\n")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for fut in as_completed([pool.submit(one_fit, j) for j in jobs]):
            rec = fut.result()
            records.append(rec)
            with partial.open("a") as fh:  # what finished survives a run stopped early
                fh.write(json.dumps(rec) + "\n")
            print(
                f"[{time.perf_counter() - t0:6.0f}s] {rec['dataset']:<14} {rec['label']:<24} "
                f"{rec['heldout_dev']:.4f}  {rec['fit_s']:.0f}s  ls={rec['lengthscale']:.3g}",
                flush=True,
            )
    print()
    print(format_table(records, refs))
    args.out.write_text(json.dumps({"records": records, "references": refs}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
