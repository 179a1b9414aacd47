"""Cost of ``sfact.tl.select_model`` against the same grid fitted as separate default fits.

Run from the repository root::

    .venv/bin/python benchmarks/bench_select.py            # 3 priors x 3 values of L on osmFISH
    .venv/bin/python benchmarks/bench_select.py --quick    # smoke run (30 iterations per fit)

Both sides use the package's held-out protocol: ``sfact.pp.prepare(adata, group_key="ClusterName",
min_group_size=1)``, ``sfact.tl.heldout_split(adata, fraction=0.05, random_state=0)``, default
training (``max_iter=1000``, ``tol=1e-4``), and the held-out deviance of
:func:`sfact.tl.heldout_deviance`. The separate fits run one after another in this process, each
built, trained and scored on its own (torch's default number of threads); then
``select_model`` runs the same grid (``n_jobs`` processes, shared split and KL-NMF start). The
script prints both wall times and their ratio, and each setting's held-out deviance from both
sides (they agree up to the floating-point effect of the thread count).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")

PRIORS = ("svgp", "mggp_svgp", "lcgp")
N_FACTORS = (5, 10, 15)
SEED = 0


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the process pool's workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def separate_fits(adata, priors, n_factors, max_iter: int, device: str) -> tuple[float, dict]:
    """The grid as separate fits, as a user would run it: split, build, train, score each one."""
    import sfact

    out = {}
    t0 = time.perf_counter()
    for prior in priors:
        for L in n_factors:
            t = time.perf_counter()
            train, test = sfact.tl.heldout_split(adata, fraction=0.05, random_state=SEED)
            model = sfact.models.SpatialFactorization(
                train, prior=prior, n_factors=L, random_state=SEED, device=device
            )
            model.train(max_iter, progress_bar=False)
            dev = sfact.tl.heldout_deviance(model, test)
            out[(prior, L)] = (dev, len(model.history_), time.perf_counter() - t)
            print(f"  separate {prior:10s} L={L:<3d} {dev:.4f}  {out[(prior, L)][2]:7.1f} s", flush=True)
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 iterations per fit (smoke run)")
    parser.add_argument("--max-iter", type=int, default=None, help="iterations cap of every fit")
    parser.add_argument("--n-jobs", type=int, default=None, help="processes of select_model (default: cores)")
    parser.add_argument("--device", default="cpu", help="device of both sides (default: cpu)")
    parser.add_argument("--priors", nargs="+", default=list(PRIORS))
    parser.add_argument("--n-factors", nargs="+", type=int, default=list(N_FACTORS))
    args = parser.parse_args()
    max_iter = args.max_iter if args.max_iter is not None else (30 if args.quick else 1000)

    import torch

    import sfact

    sfact.settings.progress_bar = False
    adata = sfact.datasets.osmfish()
    sfact.pp.prepare(adata, group_key="ClusterName", min_group_size=1)
    n_settings = len(args.priors) * len(args.n_factors)
    print(
        f"osmFISH {adata.n_obs} cells x {adata.n_vars} genes; {n_settings} settings "
        f"({', '.join(args.priors)} x L = {args.n_factors}); max_iter={max_iter}; "
        f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"{platform.processor() or platform.machine()}",
        flush=True,
    )

    c0 = cpu_seconds()
    t_sep, sep = separate_fits(adata, args.priors, args.n_factors, max_iter, args.device)
    c_sep = cpu_seconds() - c0
    print(f"{n_settings} separate default fits: {t_sep:.1f} s ({c_sep:.1f} CPU s)", flush=True)

    c0 = cpu_seconds()
    t0 = time.perf_counter()
    df = sfact.tl.select_model(
        adata,
        priors=args.priors,
        n_factors=args.n_factors,
        max_iter=max_iter,
        n_jobs=args.n_jobs,
        device=args.device,
        random_state=SEED,
    )
    t_sel = time.perf_counter() - t0
    c_sel = cpu_seconds() - c0
    n_proc = adata.uns["sfact_selection"]["params"]["n_jobs"]
    print(f"select_model ({n_proc} processes): {t_sel:.1f} s ({c_sel:.1f} CPU s)", flush=True)

    print("\nsetting              separate  select_model  iterations (separate / select)")
    for row in df.itertuples():
        dev, n_iter, _ = sep[(row.prior, row.n_factors)]
        print(
            f"  {row.prior:10s} L={row.n_factors:<3d}  {dev:8.4f}  {row.heldout_deviance:12.4f}  "
            f"{n_iter:5d} / {row.n_iter}"
        )
    best = adata.uns["sfact_selection"]["best"]
    print(f"best: {best['prior']}, L={best['n_factors']} ({best['heldout_deviance']:.4f})")
    print(
        f"\nwall time: separate fits {t_sep:.1f} s, select_model {t_sel:.1f} s, "
        f"ratio select/separate = {t_sel / t_sep:.2f}"
    )
    print(
        f"CPU time:  separate fits {c_sep:.1f} s, select_model {c_sel:.1f} s, "
        f"ratio select/separate = {c_sel / c_sep:.2f}"
    )


if __name__ == "__main__":
    main()
