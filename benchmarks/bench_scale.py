"""Slide-seq-sized scale run of ``mggp_svgp``: seconds per iteration and peak memory.

Simulates N=42,000 cells x D=17,000 genes at ~2% non-zero with 14 groups (the size of the
Slide-seqV2 set the reference implementation needs ~0.45 s per iteration for on a GPU), then
trains ``mggp_svgp`` with M=3000 inducing points, L=10, batches of 7,000 cells for a few
iterations and prints s/iteration (one iteration = one pass over the cells = 6 steps), s/step,
the initialization time and the peak memory (CUDA max allocated on a GPU, RSS high-water mark
on the CPU).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_scale.py [--device cuda] [--iters 3]
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings

import numpy as np

import sfact


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="auto")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--n-obs", type=int, default=42_000)
    p.add_argument("--n-vars", type=int, default=17_000)
    p.add_argument("--num-inducing", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=7000)
    p.add_argument("--diagonal-only", choices=["auto", "yes", "no"], default="auto")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    import torch

    t0 = time.perf_counter()
    adata = sfact.datasets.simulate(
        n_obs=args.n_obs, n_vars=args.n_vars, n_factors=10, n_groups=14, density=0.02, random_state=0
    )
    t_sim = time.perf_counter() - t0
    sfact.pp.prepare(adata, group_key="group")
    diag = {"auto": None, "yes": True, "no": False}[args.diagonal_only]
    model = sfact.models.SpatialFactorization(
        adata,
        prior="mggp_svgp",
        n_factors=10,
        prior_kwargs={"num_inducing": args.num_inducing, "diagonal_only": diag},
        device=args.device,
        random_state=0,
    )
    if model.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    model.train(max_iter=1, batch_size=args.batch_size, progress_bar=False)  # set-up + init + 1 iteration
    t_first = time.perf_counter() - t1
    model.train(max_iter=args.iters, batch_size=args.batch_size, min_iter=10**9, progress_bar=False)
    if model.device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (CUDA max allocated)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS high-water mark)"
    times = np.diff(model.history["time"].to_numpy())[-args.iters :]
    steps = int(np.ceil(adata.n_obs / args.batch_size))
    gp = model.gp_info()
    print(f"device {model.device}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(
        f"data: {adata.n_obs} x {adata.n_vars}, {adata.X.nnz} non-zeros, 14 groups (simulated in {t_sim:.0f} s)"
    )
    print(
        f"mggp_svgp M={gp['num_inducing']} L=10 batch={args.batch_size} "
        f"({steps} steps/iteration), {'diagonal' if gp['diagonal_only'] else 'full'} S"
    )
    print(f"first call (set-up, k-means, KL-NMF init, 1 iteration): {t_first:.1f} s")
    print(f"s/iteration: {times.mean():.3f} (s/step {times.mean() / steps:.3f}) over {len(times)} iterations")
    print(f"peak memory: {peak}")


if __name__ == "__main__":
    main()
