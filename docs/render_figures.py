"""Render every ``sfact.pl`` figure on a real osmFISH fit to PNGs, to look at them as a user would.

    python docs/render_figures.py                 # fit once (cached), then draw every figure
    python docs/render_figures.py --refit         # fit again
    python docs/render_figures.py --only factors moran

The fit (``mggp_svgp``, the default prior, 10 factors, 150 iterations) and its saved model are
cached in the output folder (``docs/_build/figures/`` by default, git-ignored), so changing a
plot and re-running takes seconds.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.pyplot as plt

import sfact
from sfact._constants import GP_PRIORS

HERE = Path(__file__).resolve().parent
GROUPS = ["Pyramidal L6", "Oligodendrocyte Mature", "Inhibitory CP", "Microglia"]


def fitted(out: Path, *, refit: bool, max_iter: int, prior: str, n_factors: int):
    h5ad, model_dir = out / "osmfish_fit.h5ad", out / "model"
    if not refit and h5ad.exists() and (model_dir / "metadata.json").exists():
        adata = ad.read_h5ad(h5ad)
        sfact.tl.group_loadings(adata)  # cheap: picks up changes to the defaults
        sfact.tl.gene_enrichment(adata)
        return adata, sfact.models.SpatialFactorization.load(model_dir, adata)
    adata = sfact.datasets.osmfish()
    sfact.pp.prepare(adata, group_key="ClusterName")
    t = time.perf_counter()
    sfact.tl.fit(adata, prior=prior, n_factors=n_factors, max_iter=max_iter, save_model=model_dir)
    print(f"fit {prior}: {time.perf_counter() - t:.1f} s")
    model = sfact.models.SpatialFactorization.load(model_dir, adata)
    if prior.startswith("mggp"):
        sfact.tl.groupwise_factors(adata, model)
    adata.write_h5ad(h5ad)
    return adata, model


def figures(adata, model) -> dict:
    mggp = "X_sfact_groupwise" in adata.obsm
    figs = {
        "factors": lambda: sfact.pl.factors(adata, return_fig=True),
        "factors_shared_scale": lambda: sfact.pl.factors(adata, shared_scale=True, return_fig=True),
        "scales": lambda: sfact.pl.scales(adata, return_fig=True),
        "elbo": lambda: sfact.pl.elbo(adata, return_fig=True),
        "moran": lambda: sfact.pl.moran(adata, return_fig=True),
        "top_genes": lambda: sfact.pl.top_genes(adata, return_fig=True),
        "top_genes_share": lambda: sfact.pl.top_genes(adata, by="share", n_genes=6, return_fig=True),
        "loadings": lambda: sfact.pl.loadings(adata, return_fig=True),
        "factors_with_genes": lambda: sfact.pl.factors_with_genes(adata, return_fig=True),
        "gene_enrichment": lambda: sfact.pl.gene_enrichment(adata, return_fig=True),
        "gene_enrichment_subset": lambda: sfact.pl.gene_enrichment(
            adata, factors=[0, 1], groups=GROUPS, return_fig=True
        ),
        "enrichment_by_group": lambda: sfact.pl.enrichment_by_group(adata, return_fig=True),
        "enrichment_by_group_subset": lambda: sfact.pl.enrichment_by_group(
            adata, groups=GROUPS, return_fig=True
        ),
        "enrichment_by_factor": lambda: sfact.pl.enrichment_by_factor(adata, return_fig=True),
    }
    if model.setup.prior in GP_PRIORS:
        figs["inducing_points"] = lambda: sfact.pl.inducing_points(adata, model, return_fig=True)
        figs["inducing_points_split"] = lambda: sfact.pl.inducing_points(
            adata, model, split_groups=True, return_fig=True
        )
    if mggp:
        figs["groupwise_factors"] = lambda: sfact.pl.groupwise_factors(
            adata, groups=GROUPS, factors=[0, 1, 2, 3, 4], return_fig=True
        )
        figs["groupwise_factors_all"] = lambda: sfact.pl.groupwise_factors(
            adata, factors=[0, 1], return_fig=True
        )
    return figs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "_build" / "figures")
    parser.add_argument("--refit", action="store_true")
    parser.add_argument("--prior", default="mggp_svgp")
    parser.add_argument("--n-factors", type=int, default=10)
    parser.add_argument("--max-iter", type=int, default=150)
    parser.add_argument("--dpi", type=int, default=110)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    adata, model = fitted(
        args.out, refit=args.refit, max_iter=args.max_iter, prior=args.prior, n_factors=args.n_factors
    )
    for name, draw in figures(adata, model).items():
        if args.only and name not in args.only:
            continue
        t = time.perf_counter()
        fig = draw()
        path = args.out / f"{name}.png"
        fig.savefig(path, dpi=args.dpi)
        w, h = fig.get_size_inches()
        plt.close(fig)
        print(f"{name:28s} {time.perf_counter() - t:5.2f} s  {w:4.1f} x {h:4.1f} in  -> {path}")


if __name__ == "__main__":
    main()
