"""Where a training iteration's time goes, by phase, with ``torch.profiler`` (osmFISH).

Trains a prior on osmFISH with the library defaults for the device (L = 10), warms up, then
profiles a few iterations and prints one Markdown row per phase of the step: the prior's
marginals, the Poisson log-likelihood and the KL (the forward pass), the backward pass, the Adam
step, the loadings' multiplicative update, the copy of the state that undoes a non-finite
iteration, and the once-per-iteration finiteness flags and fetch. Every phase is a
``record_function`` range around the method that does it (the library is not changed)::

    .venv/bin/python benchmarks/profile_iteration.py                       # svgp and lcgp, CPU, 1 thread
    .venv/bin/python benchmarks/profile_iteration.py --prior svgp --batch-size 1000 --threads 2
    .venv/bin/python benchmarks/profile_iteration.py --device cuda          # GPU (see below)

Each repetition times ``--iters`` iterations without the profiler, then with it; the table gives
the phases of the fastest profiled repetition (shared cores are noisy) and their shares of its
iteration, followed by its top operators by self time. On a GPU the phase ranges are
timed on the host without synchronizing at their ends (that would add the very syncs the loop
avoids), so the phase column shows launch time; ``--device cuda`` adds CUDA activity and sorts the
operator table by device time, which shows where the GPU spends its time (not measured yet).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PHASES = {
    "marginals": "1 prior marginals (forward)",
    "loglik": "2 Poisson log-likelihood (forward)",
    "kl": "3 prior KL (forward)",
    "backward": "4 backward",
    "adam": "5 Adam step",
    "mm": "6 loadings update (MM)",
    "copy": "7 state copy (undo of a non-finite iteration)",
    "flags": "8 finiteness flags and the iteration's one fetch",
}


def _instrument():
    """Wrap the step's phases in ``record_function`` ranges."""
    import torch
    from torch.profiler import record_function

    from sfact._core import train as train_mod
    from sfact._core.lcgp import LCGPPrior
    from sfact._core.module import FactorModule
    from sfact._core.priors import PNMFPrior
    from sfact._core.svgp import SVGPPrior

    def wrap(owner, name, label):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            with record_function(label):
                return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    for cls in (SVGPPrior, LCGPPrior, PNMFPrior):
        wrap(cls, "marginals", PHASES["marginals"])
        wrap(cls, "kl", PHASES["kl"])
    wrap(FactorModule, "_expected_loglik", PHASES["loglik"])
    wrap(torch.Tensor, "backward", PHASES["backward"])
    wrap(torch.optim.Adam, "step", PHASES["adam"])
    wrap(FactorModule, "multiplicative_update", PHASES["mm"])
    wrap(train_mod, "_finiteness", PHASES["flags"])
    init = train_mod._LastFinite.__init__

    def copy_init(self, *args, **kwargs):
        with record_function(PHASES["copy"]):
            init(self, *args, **kwargs)

    train_mod._LastFinite.__init__ = copy_init


def profile_prior(prior: str, args) -> None:
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    import sfact
    from sfact.models import SpatialFactorization

    adata = sfact.datasets.osmfish()
    sfact.pp.prepare(adata, group_key="ClusterName")
    model = SpatialFactorization(adata, prior=prior, n_factors=10, device=args.device)
    train = {"min_iter": 10**6, "progress_bar": False, "batch_size": args.batch_size}
    model.train(max_iter=args.iters, **train)  # set-up and warm-up
    p = model.module.prior
    n_steps = int(np.ceil(adata.n_obs / (args.batch_size or adata.n_obs)))
    details = [f"N={adata.n_obs}", f"D={adata.n_vars}", "L=10", f"{n_steps} step(s)/iteration"]
    if hasattr(p, "n_inducing") and prior.endswith("svgp"):
        details.append(f"M={int(p.n_inducing)}")
    if hasattr(p, "n_neighbors"):
        details.append(f"K={int(p.n_neighbors)}")
    if hasattr(p, "diagonal_only"):
        details.append("diagonal S" if p.diagonal_only else "full S")
    activities = [ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    plain, best = [], None
    for _ in range(args.reps):
        model.train(max_iter=args.iters, **train)
        t = model.history_.time
        plain.append((t[-1] - t[-1 - args.iters]) / args.iters)
        with profile(activities=activities) as prof:
            model.train(max_iter=args.iters, **train)
        t = model.history_.time
        profiled = (t[-1] - t[-1 - args.iters]) / args.iters
        if best is None or profiled < best[0]:
            best = (profiled, prof)
    profiled, prof = best
    phases = {
        e.key: e.cpu_time_total / 1e6 / args.iters for e in prof.key_averages() if e.key in PHASES.values()
    }
    print(f"\n### {prior} on {args.device} ({', '.join(details)}; {torch.get_num_threads()} thread(s))")
    print(f"\nseconds per iteration without the profiler: {', '.join(f'{x:.4f}' for x in plain)}")
    print(f"fastest profiled repetition: {profiled:.4f} s per iteration; its phases:\n")
    print("| phase | ms per iteration | share |")
    print("|---|---:|---:|")
    for label in PHASES.values():
        if label in phases:
            print(f"| {label[2:]} | {phases[label] * 1e3:.2f} | {100 * phases[label] / profiled:.0f}% |")
    rest = profiled - sum(phases.values())
    print(f"| rest (batches, Python, history) | {rest * 1e3:.2f} | {100 * rest / profiled:.0f}% |")
    sort = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print()
    print(prof.key_averages().table(sort_by=sort, row_limit=args.top, max_name_column_width=44))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prior", nargs="+", default=["svgp", "lcgp"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--iters", type=int, default=10, help="iterations per repetition")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--top", type=int, default=10, help="operators listed")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(args.threads)
    _instrument()
    for prior in args.prior:
        profile_prior(prior, args)


if __name__ == "__main__":
    sys.exit(main())
