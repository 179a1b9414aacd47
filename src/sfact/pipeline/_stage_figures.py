"""The ``figures`` stage: the PNGs of an analysed prior, drawn from its ``results.h5ad``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .._constants import prior_family
from ._jobs import null_reporter
from ._layout import _swap_dir, _tmp_dir
from ._stage_utils import _require, _say, _skipped, _stage_context

if TYPE_CHECKING:
    from ._config import Config
    from ._jobs import Reporter


def _largest_groups(adata, group_key: str | None, n: int = 4) -> list[str] | None:
    if group_key is None or group_key not in adata.obs:
        return None
    counts = adata.obs[group_key].value_counts()
    return [str(g) for g in counts.index[:n]]


def _figure_makers(adata, prior: str, cfg: Config, model_loader) -> dict[str, Any]:
    """Drawing function of every figure that applies to this fit."""
    import sfact

    uns = adata.uns.get("sfact", {})
    group_key = uns.get("params", {}).get("group_key")
    gw_groups = None
    if "groupwise_groups" in uns:
        known = [str(g) for g in uns["groupwise_groups"]]
        wanted = cfg.figures.groups or _largest_groups(adata, group_key) or known
        gw_groups = [g for g in wanted if g in known] or known[:4]
    n_factors = adata.obsm["X_sfact"].shape[1]
    makers = {
        "factors": lambda: sfact.pl.factors(adata, return_fig=True),
        "scales": lambda: sfact.pl.scales(adata, return_fig=True),
        "elbo": lambda: sfact.pl.elbo(adata, return_fig=True),
        "moran": lambda: sfact.pl.moran(adata, return_fig=True),
        "top_genes": lambda: sfact.pl.top_genes(adata, return_fig=True),
        "loadings": lambda: sfact.pl.loadings(adata, return_fig=True),
        "factors_with_genes": lambda: sfact.pl.factors_with_genes(adata, return_fig=True),
    }
    if "enrichment" in uns:
        makers["gene_enrichment"] = lambda: sfact.pl.gene_enrichment(adata, return_fig=True)
        makers["enrichment_by_group"] = lambda: sfact.pl.enrichment_by_group(adata, return_fig=True)
        makers["enrichment_by_factor"] = lambda: sfact.pl.enrichment_by_factor(adata, return_fig=True)
    if prior_family(prior) == "svgp":
        makers["inducing_points"] = lambda: sfact.pl.inducing_points(adata, model_loader(), return_fig=True)
    if gw_groups is not None:
        makers["groupwise_factors"] = lambda: sfact.pl.groupwise_factors(
            adata, groups=gw_groups, factors=list(range(min(5, n_factors))), return_fig=True
        )
    return makers


def figures(
    *,
    config: dict[str, Any],
    prior: str,
    config_file: str | None = None,
    force: bool = False,
    device: str | None = None,
    report: Reporter = null_reporter,
) -> dict[str, Any]:
    """Draw the figures of an analysed prior from ``results.h5ad`` into ``<prior>/figures/``.

    Parameters
    ----------
    config
        The config as a dict; ``figures.kinds`` selects the figures (all that apply when
        ``null``).
    config_file
        The file the config came from (named in error messages).
    prior
        The prior.
    force
        Redo them when the folder exists.
    device
        Unused (figures are drawn on the CPU).
    report
        Progress callback.

    Returns
    -------
    ``{"figures": [paths], "not_applicable": [kinds]}``, or ``{"skipped": True, ...}``.

    Examples
    --------
    >>> stages.figures(config=cfg.to_dict(), prior="svgp")  # doctest: +SKIP
    """
    with _stage_context(config, config_file, "figures", prior) as (cfg, layout):
        fig_dir = layout.figures(prior)
        if fig_dir.exists() and not force:
            return _skipped(f"{fig_dir} exists (use --force to redo it)")
        _require(layout.results(prior), "analysis results", "analyze", cfg)
        import anndata as ad
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        adata = ad.read_h5ad(layout.results(prior))
        cache: dict[str, Any] = {}

        def model_loader():
            if "model" not in cache:
                from sfact.models import SpatialFactorization

                cache["model"] = SpatialFactorization.load(layout.model_dir(prior), device="cpu")
            return cache["model"]

        makers = _figure_makers(adata, prior, cfg, model_loader)
        kinds = cfg.figures.kinds
        wanted = list(makers) if kinds is None else list(dict.fromkeys(kinds))
        not_applicable = [k for k in wanted if k not in makers]
        for k in not_applicable:
            _say(f"figure {k!r} does not apply to this fit ({prior}); left out")
        todo = [k for k in wanted if k in makers]
        written = []
        with _tmp_dir(fig_dir) as tmp:
            for i, kind in enumerate(todo):
                report(message=f"figure {i + 1}/{len(todo)}: {kind}")
                t = time.perf_counter()
                try:
                    fig = makers[kind]()
                    # tight: long group names and labels are not cut at the figure edge
                    fig.savefig(tmp / f"{kind}.png", dpi=cfg.figures.dpi, bbox_inches="tight")
                except Exception as e:
                    raise RuntimeError(f"Drawing the {kind!r} figure failed: {type(e).__name__}: {e}") from e
                finally:
                    plt.close("all")
                written.append(str(fig_dir / f"{kind}.png"))
                _say(f"figure {kind}: {time.perf_counter() - t:.1f} s")
            _swap_dir(tmp, fig_dir)
        _say(f"wrote {len(written)} figures to {fig_dir}")
        return {"figures": written, "not_applicable": not_applicable}
