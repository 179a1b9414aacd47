"""KL-NMF initialization against a random start: time to reach a given ELBO.

Fits each data set's default spatial prior twice with the same seed — once from the KL-NMF
start (``init_iter=30``, the default) and once from random log-factors and loadings
(``init_iter=0``) — and prints, per run, the iterations and seconds (initialization included)
to come within 0.5% of the ELBO the NMF-started run converged to, the final ELBO, and the
held-out deviance (5% of cells, ``numpy.random.default_rng(0)``).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_init.py [--max-iter 600]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

import sfact


def run(adata, prior, group_key, init_iter, max_iter):
    train, test = sfact.tl.heldout_split(adata, fraction=0.05, random_state=0)
    t0 = time.perf_counter()
    model = sfact.models.SpatialFactorization(
        train, prior=prior, n_factors=10, group_key=group_key, random_state=0
    )
    model.train(max_iter=max_iter, init_iter=init_iter, progress_bar=False)
    total = time.perf_counter() - t0
    h = model.history
    init_s = total - float(h["time"].iloc[-1])
    return model, h, init_s, sfact.tl.heldout_deviance(model, test)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--max-iter", type=int, default=600)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    sets = [
        ("osmFISH", sfact.datasets.osmfish(), "mggp_svgp", "ClusterName"),
        ("Visium prostate", sfact.datasets.visium_prostate(), "svgp", None),
    ]
    print(f"sfact {sfact.__version__}; L=10; target = within 0.5% of the NMF-started run's final ELBO\n")
    print(
        f"{'data':16s} {'prior':10s} {'init':7s} {'iters→target':>12s} {'s→target':>9s} "
        f"{'iters':>6s} {'final ELBO':>11s} {'held-out dev':>12s}"
    )
    for name, adata, prior, gk in sets:
        sfact.pp.prepare(adata, group_key=gk, min_group_size=1)
        results = {}
        for label, init_iter in (("nmf", 30), ("random", 0)):
            results[label] = run(adata, prior, gk, init_iter, args.max_iter)
        target = results["nmf"][1]["elbo"].iloc[-1]
        target -= 0.005 * abs(target)
        for label, (_, h, init_s, dev) in results.items():
            hit = np.nonzero(h["elbo"].to_numpy() >= target)[0]
            it = f"{hit[0] + 1}" if len(hit) else "never"
            secs = f"{init_s + h['time'].iloc[hit[0]]:.1f}" if len(hit) else "-"
            print(
                f"{name:16s} {prior:10s} {label:7s} {it:>12s} {secs:>9s} {len(h):6d} "
                f"{h['elbo'].iloc[-1]:11.4f} {dev:12.4f}"
            )


if __name__ == "__main__":
    main()
