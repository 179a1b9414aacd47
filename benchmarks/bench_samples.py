"""Several tissue sections in one model: how the priors handle samples, on real and simulated data.

Run from the repository root::

    .venv/bin/python benchmarks/bench_samples.py                 # everything, one fit per core
    .venv/bin/python benchmarks/bench_samples.py --quick         # smoke run (30 iterations per fit)

Data: the bundled Visium prostate pair (``list_ID`` as the sample: two sections stored side by
side), and ``sfact.datasets.simulate(n_samples=4)``: four sections over the same 100 x 100 square
(overlapping coordinates), shared loadings, and log-factors that add a per-section field to a
shared one (correlation 0.5 between sections at the same place), 5 true factors.

Rows (held-out protocol of ``bench_spatial.py``: 5% of the cells held out with
``default_rng(0)``, mean Poisson deviance per entry; L = 10 on the prostate pair, L = 5 = the truth
on the simulation):

- ``svgp`` / ``lcgp``, sections as stored (one coordinate system: overlapping in the simulation);
- ``mggp_svgp`` / ``mggp_lcgp`` with the section as the group (α = 1: the same place in two
  sections correlates by ν^{(3+p)/2} = 0.18 for Matérn-3/2);
- the same with α = 1000 (sections nearly independent: independent GPs, shared loadings);
- ``svgp`` fitted to each section on its own (own loadings), deviance pooled over sections;
- ``svgp`` / ``lcgp`` with ``sample_key``: every section scaled from its own corner (one common
  factor), shared loadings, one GP per section (independent across sections); and the same with
  the sections at distance 1 in the kernel and α learned (a learned correlation between them).

Columns: held-out deviance, relative to the baseline (cell total x gene share), recovery of the
true log-factors on the simulation (training cells; mean over true factors of the best-match
correlation, Hungarian matching), iterations, seconds per iteration and peak resident memory of
the fit's process. Every fit runs in its own process with one torch thread, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 0
SIM = {"n_obs": 4000, "n_vars": 200, "n_factors": 5, "n_groups": 1, "n_samples": 4, "lengthscale": 12.0}
FITS = {
    "svgp, sections as stored": ("svgp", {}, None),
    "lcgp, sections as stored": ("lcgp", {}, None),
    "mggp_svgp, section as group (alpha=1)": ("mggp_svgp", {}, "sample"),
    "mggp_lcgp, section as group (alpha=1)": ("mggp_lcgp", {}, "sample"),
    "mggp_svgp, section as group (alpha=1000)": ("mggp_svgp", {"group_diff_param": 1000.0}, "sample"),
    "mggp_lcgp, section as group (alpha=1000)": ("mggp_lcgp", {"group_diff_param": 1000.0}, "sample"),
    "svgp per section (own loadings)": ("svgp", {}, "separate"),
    "svgp, sample_key (default: sections' correlation chosen)": ("svgp", {}, "sample_key"),
    "lcgp, sample_key (default: sections' correlation chosen)": ("lcgp", {}, "sample_key"),
    "svgp, sample_key, gene offsets": ("svgp", {"_gene_offsets": True}, "sample_key"),
    "lcgp, sample_key, gene offsets": ("lcgp", {"_gene_offsets": True}, "sample_key"),
    "svgp, sample_key, independent sections": ("svgp", {"sample_distance": None}, "sample_key"),
    "lcgp, sample_key, independent sections": ("lcgp", {"sample_distance": None}, "sample_key"),
    "svgp, sample_key, sample_distance=0.2": ("svgp", {"sample_distance": 0.2}, "sample_key"),
    "svgp, sample_key, sample_distance=0.05": ("svgp", {"sample_distance": 0.05}, "sample_key"),
    "svgp, sample_key, sections correlated (learned)": (
        "svgp",
        {"sample_distance": 1.0, "group_diff_param": None},
        "sample_key",
    ),
    "lcgp, sample_key, sections correlated (learned)": (
        "lcgp",
        {"sample_distance": 1.0, "group_diff_param": None},
        "sample_key",
    ),
}


def load(dataset: str, sample_key: bool = False):
    """``(adata, n_factors)`` with ``obs['sample']``, prepared (coordinates as stored, or per sample)."""
    import sfact

    if dataset == "prostate":
        adata = sfact.datasets.visium_prostate()
        adata.obs["sample"] = adata.obs["list_ID"].astype("category")
        n_factors = 10
    elif dataset == "serial":
        adata = _pseudo_serial()
        n_factors = 10
    else:
        adata = sfact.datasets.simulate(**SIM, random_state=SEED)
        n_factors = SIM["n_factors"]
    sfact.pp.prepare(adata, min_group_size=None, sample_key="sample" if sample_key else None)
    return adata, n_factors


def _pseudo_serial():
    """osmFISH cut into four pseudo-serial sections whose coordinates line up.

    Every cell goes to one of four sections at random (each section sees the whole tissue at a
    quarter of the density); each section is shifted by 1% of the tissue's width at random (an
    imperfect registration) and its counts are thinned gene by gene with a per-section detection
    efficiency drawn from U(0.6, 1) (a batch effect between sections).
    """
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    import sfact

    adata = sfact.datasets.osmfish()
    rng = np.random.default_rng(1)
    n, d = adata.shape
    section = rng.integers(0, 4, n)
    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    width = float(np.ptp(xy[:, 0]))
    adata.obsm["spatial"] = xy + rng.normal(0.0, 0.01 * width, (4, 2))[section]
    X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    efficiency = rng.uniform(0.6, 1.0, (4, d))
    adata.X = sp.csr_matrix(rng.binomial(X.astype(np.int64), efficiency[section]).astype(np.float32))
    adata.obs["sample"] = pd.Categorical([f"s{i}" for i in section])
    return adata


def _best_match(est, truth) -> float:
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    L = est.shape[1]
    C = np.nan_to_num(np.corrcoef(est.T, truth.T)[:L, L:])
    r, c = linear_sum_assignment(-np.abs(C))
    return float(np.abs(C[r, c]).mean())


def one_fit(job: tuple) -> dict:
    dataset, label, max_iter = job
    import numpy as np
    import torch

    torch.set_num_threads(1)
    import sfact

    sfact.settings.progress_bar = False
    prior, kwargs, mode = FITS[label]
    kwargs = dict(kwargs)
    model_kw = {"gene_offsets": kwargs.pop("_gene_offsets")} if "_gene_offsets" in kwargs else {}
    adata, L = load(dataset, sample_key=mode == "sample_key")
    train, test = sfact.tl.heldout_split(adata, fraction=0.05, random_state=SEED)
    t0 = time.perf_counter()
    parts = []
    if mode == "separate":
        for s in train.obs["sample"].cat.categories:
            tr = train[train.obs["sample"] == s].copy()
            te = test[test.obs["sample"] == s].copy()
            m = sfact.models.SpatialFactorization(
                tr, prior=prior, n_factors=L, prior_kwargs=kwargs or None, random_state=SEED, device="cpu"
            ).train(max_iter=max_iter)
            parts.append((m, tr, te))
    else:
        m = sfact.models.SpatialFactorization(
            train,
            prior=prior,
            n_factors=L,
            group_key=mode if mode == "sample" else None,
            prior_kwargs=kwargs or None,
            **model_kw,
            random_state=SEED,
            device="cpu",
        ).train(max_iter=max_iter)
        parts.append((m, train, test))
    fit_s = time.perf_counter() - t0
    n_iter = sum(len(m.history["elbo"]) for m, _, _ in parts)
    dev = sum(sfact.tl.heldout_deviance(m, te) * te.n_obs for m, _, te in parts) / test.n_obs
    recovery = None
    if "log_factors_true" in adata.obsm:
        est = np.zeros((train.n_obs, L))
        for m, tr, _ in parts:
            rows = train.obs_names.get_indexer(tr.obs_names)
            est[rows] = np.log(m.get_factors())
        recovery = _best_match(est, np.asarray(train.obsm["log_factors_true"]))
    return {
        "dataset": dataset,
        "label": label,
        "heldout_dev": float(dev),
        "baseline": float(sfact.tl.baseline_deviance(train.X, test.X)),
        "recovery": recovery,
        "fit_s": fit_s,
        "n_iter": n_iter,
        "s_per_iter": fit_s / max(n_iter, 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "lengthscale": [float(np.mean(m.gp_info()["lengthscale"])) for m, _, _ in parts],
        "sample_correlation": [
            (m.train_info.get("lengthscale_search") or {}).get("sample_correlation") for m, _, _ in parts
        ],
    }


def format_table(records: list[dict]) -> str:
    lines = [
        "| data | fit | held-out deviance | vs baseline | recovery (log-factors) | iterations | s / iteration | peak RSS MB | lengthscale | sections' correlation |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {label: i for i, label in enumerate(FITS)}
    for r in sorted(records, key=lambda r: (r["dataset"], order.get(r["label"], 99))):
        rec = "" if r["recovery"] is None else f"{r['recovery']:.3f}"
        ls = ", ".join(f"{v:.3g}" for v in r["lengthscale"])
        corr = ", ".join("" if v is None else f"{v:g}" for v in r.get("sample_correlation", []))
        lines.append(
            f"| {r['dataset']} | {r['label']} | {r['heldout_dev']:.4f} | {100 * (r['heldout_dev'] / r['baseline'] - 1):+.1f}% | "
            f"{rec} | {r['n_iter']} | {r['s_per_iter']:.3f} | {r['peak_rss_mb']:.0f} | {ls} | {corr} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--datasets",
        nargs="+",
        default=["sim4", "prostate", "serial"],
        choices=["sim4", "prostate", "serial"],
    )
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--out", type=Path, default=HERE / "results" / "bench_samples.json")
    args = p.parse_args(argv)
    max_iter = 30 if args.quick else args.max_iter
    jobs = [
        (d, label, max_iter)
        for d in args.datasets
        for label in FITS
        if args.only is None or label in args.only
    ]
    records = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for fut in as_completed([pool.submit(one_fit, j) for j in jobs]):
            rec = fut.result()
            records.append(rec)
            print(
                f"[{time.perf_counter() - t0:6.0f}s] {rec['dataset']:<9} {rec['label']:<44} {rec['heldout_dev']:.4f}",
                flush=True,
            )
    print()
    print(format_table(records))
    args.out.write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
