"""The ``select`` stage (``sfact select``): :func:`sfact.tl.select_model` on ``prepared.h5ad``.

Writes ``selection/selection.csv`` (the table), ``selection/selection.json`` (table, best
setting, parameters; written last, it marks a finished selection) and
``selection/model_selection.png`` (:func:`sfact.pl.model_selection`) into the data set's
output folder, all at once: the folder is written as a temporary sibling and renamed into place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._config_schema import MULTIGROUP_PRIORS, PRIORS
from ._jobs import null_reporter
from ._layout import _swap_dir, _tmp_dir, _write_json
from ._stage_utils import _read_prepared, _say, _skipped, _stage_context

if TYPE_CHECKING:
    from ._config import Config
    from ._jobs import Reporter

__all__ = ["select", "select_priors"]


def select_priors(cfg: Config, priors: Sequence[str] | None = None) -> list[str]:
    """The priors ``sfact select`` compares for ``cfg``.

    Parameters
    ----------
    cfg
        The data set's config.
    priors
        The ``--prior`` options, if any.

    Returns
    -------
    ``priors``, else ``selection.priors``, else ``model.prior``, else every prior that applies
    (the multi-group priors only with a group key), in pipeline order.

    Examples
    --------
    >>> from sfact.pipeline import Config
    >>> cfg = Config.from_dict({"dataset": {"loader": "osmfish"}, "selection": {"priors": ["svgp", "lcgp"]}})
    >>> select_priors(cfg)
    ['svgp', 'lcgp']
    """
    if priors:
        return [p for p in PRIORS if p in priors]
    if cfg.selection.priors is not None:
        return list(cfg.selection.priors)
    if cfg.model.prior is not None:
        return [cfg.model.prior]
    return [p for p in PRIORS if cfg.group_key is not None or p not in MULTIGROUP_PRIORS]


def select(
    *,
    config: dict[str, Any],
    config_file: str | None = None,
    priors: list[str] | None = None,
    force: bool = False,
    device: str | None = None,
    report: Reporter = null_reporter,
) -> dict[str, Any]:
    """Compare priors, numbers of factors and prior options by held-out deviance; write ``selection/``.

    Parameters
    ----------
    config
        The config as a dict (:meth:`~sfact.pipeline.Config.to_dict`); its ``selection`` section
        gives the grid.
    config_file
        The file the config came from (named in error messages).
    priors
        Priors to compare; :func:`select_priors` when ``None``.
    force
        Redo it when the outputs exist.
    device
        Device of the fits (the runner gives ``"cpu"``: the fits run in a process pool).
    report
        Progress callback.

    Returns
    -------
    ``{"selection": folder, "best": {...}, "n_rows": ..., "time_s": ...}``, or
    ``{"skipped": True, ...}`` when the outputs exist.

    Examples
    --------
    >>> from sfact.pipeline import Config
    >>> from sfact.pipeline._stage_select import select
    >>> cfg = Config.from_dict({"dataset": {"loader": "osmfish"}, "output_dir": "out"})
    >>> select(config=cfg.to_dict(), priors=["svgp"])  # doctest: +SKIP
    """
    with _stage_context(config, config_file, "select") as (cfg, layout):
        if layout.done("select") and not force:
            return _skipped(
                f"{layout.selection_json} exists (use --force to redo it)",
                selection=str(layout.selection_dir),
            )
        adata, dev = _read_prepared(layout, cfg, device, honour_gpu=False)  # the runner gives "cpu"
        import matplotlib

        matplotlib.use("Agg")
        import sfact

        sel, tr = cfg.selection, cfg.training
        priors = select_priors(cfg, priors)
        n_factors = sel.n_factors if sel.n_factors is not None else [cfg.model.n_factors]
        from ._config_schema import _prior_options

        accepted = set().union(*(_prior_options(p) for p in priors))
        fixed = {  # the shared options (as in `model`) that a compared prior takes; the grid wins
            k: v
            for k, v in cfg.model.prior_kwargs.items()
            if k in accepted and k not in PRIORS and k not in sel.prior_kwargs_grid
        }
        _say(
            f"comparing {', '.join(priors)} x n_factors {n_factors}"
            + "".join(f" x {k} {v}" for k, v in sel.prior_kwargs_grid.items())
            + f" on {adata.n_obs} cells"
        )
        report(message="fitting the grid")
        df = sfact.tl.select_model(
            adata,
            priors=priors,
            n_factors=n_factors,
            prior_kwargs_grid=sel.prior_kwargs_grid or None,
            prior_kwargs=fixed or None,
            n_folds=sel.n_folds,
            heldout_fraction=sel.heldout_fraction,
            layer=cfg.preprocessing.layer,
            spatial_key=cfg.preprocessing.spatial_key,
            group_key=cfg.group_key,
            size_factors=cfg.model.size_factors,
            max_iter=tr.max_iter,
            tol=tr.tol,
            learning_rate=tr.learning_rate,
            init_iter=tr.init_iter,
            n_jobs=sel.n_jobs,
            device=dev,
            random_state=tr.random_state,
        )
        res = adata.uns["sfact_selection"]
        report(message="writing the table and the figure")
        layout.root.mkdir(parents=True, exist_ok=True)
        with _tmp_dir(layout.selection_dir) as tmp:
            df.to_csv(tmp / layout.selection_table.name, index=False)
            fig = sfact.pl.model_selection(adata, return_fig=True)
            fig.savefig(tmp / layout.selection_figure.name, dpi=cfg.figures.dpi)
            import matplotlib.pyplot as plt

            plt.close(fig)
            _write_json(
                tmp / layout.selection_json.name,
                {
                    "name": cfg.name,
                    "best": res["best"],
                    "params": res["params"],
                    "time_s": res["time_s"],
                    "results": df.to_dict(orient="records"),
                },
            )
            _swap_dir(tmp, layout.selection_dir)
        best = res["best"]
        _say(
            f"best: {best['prior']}, L={best['n_factors']}"
            + "".join(f", {k}={v}" for k, v in best["prior_kwargs"].items())
            + f": held-out deviance {best['heldout_deviance']:.4f} (baseline {best['baseline_deviance']:.4f})"
        )
        _say(f"wrote {layout.selection_dir}")
        return {
            "selection": str(layout.selection_dir),
            "best": best,
            "n_rows": len(df),
            "time_s": float(res["time_s"]),
        }
