"""The ``sfact`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import sfact

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    sfact.settings.verbosity = 2
    t0 = time.perf_counter()
    print(
        f"sfact {sfact.__version__}: demo on the bundled osmFISH data (prior={args.prior}, L={args.n_factors})"
    )
    adata = sfact.datasets.osmfish()
    sfact.pp.prepare(adata, group_key="ClusterName")
    print(
        f"  data: {adata.n_obs} cells x {adata.n_vars} genes, {len(adata.obs['ClusterName'].cat.categories)} cell types"
    )
    sfact.tl.fit(
        adata,
        prior=args.prior,
        n_factors=args.n_factors,
        max_iter=args.max_iter,
        device=args.device,
        save_model=out / "model",
        random_state=args.seed,
    )
    h5ad = out / "osmfish_sfact.h5ad"
    adata.write_h5ad(h5ad)
    fig = sfact.pl.factors(adata, return_fig=True)
    png = out / "factors.png"
    fig.savefig(png, dpi=110)
    m = adata.uns["sfact"]["metrics"]
    moran = adata.uns["sfact"]["moranI"]
    print(
        f"  trained {m['n_iter']} iterations in {m['train_time_s']:.1f} s "
        f"({'converged' if m['converged'] else 'not converged'}); "
        f"train deviance per entry {m['deviance_per_entry']:.4f}"
    )
    print("  Moran's I per factor: " + ", ".join(f"{i:.2f}" for i in moran["I"]))
    print(f"  wrote {h5ad}, {png} and {out / 'model'}  (total {time.perf_counter() - t0:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sfact``."""
    p = argparse.ArgumentParser(
        prog="sfact", description="Spatial factorization of spatial transcriptomics data."
    )
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo", help="fit the bundled osmFISH data and write an .h5ad and a PNG of the factors"
    )
    d.add_argument("--output", "-o", default="demo_output", help="output folder (default: demo_output)")
    d.add_argument("--prior", default="mggp_svgp", help="prior (default: mggp_svgp, groups: ClusterName)")
    d.add_argument("--n-factors", type=int, default=10, help="number of factors (default: 10)")
    d.add_argument("--max-iter", type=int, default=1000, help="maximum iterations (default: 1000)")
    d.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sfact`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
