"""The pipeline's stages: top-level, picklable job functions.

Each stage is called as ``fn(config=..., [prior=...], force=..., device=..., report=...)``
(see :mod:`sfact.pipeline._jobs`) with ``config`` a plain dict (:meth:`Config.to_dict`), and
returns a JSON-able dict. Outputs go where :class:`~sfact.pipeline.Layout` says, written to a
temporary sibling and renamed into place (:mod:`._layout`), so a failure never leaves half an
output nor destroys an earlier good one. A stage whose outputs exist returns
``{"skipped": True, ...}`` unless ``force=True``.

The ``figures`` stage lives in :mod:`._stage_figures`; what all stages share (their config,
log context, skipping) in :mod:`._stage_utils`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._atomic import atomic_file
from ._jobs import null_reporter
from ._layout import Layout, _json_text, _swap_dir, _tmp_dir, _tmp_sibling, _write_json, _write_text
from ._stage_figures import figures
from ._stage_select import select
from ._stage_utils import _read_prepared, _require, _say, _skipped, _stage_context

if TYPE_CHECKING:
    from ._jobs import Reporter

__all__ = ["STAGE_FUNCTIONS", "Layout", "analyze", "figures", "preprocess", "select", "train"]


def preprocess(
    *,
    config: dict[str, Any],
    config_file: str | None = None,
    force: bool = False,
    device: str | None = None,
    report: Reporter = null_reporter,
) -> dict[str, Any]:
    """Load the data set and run :func:`sfact.pp.prepare`; write ``prepared.h5ad``.

    Parameters
    ----------
    config
        The config as a dict (:meth:`~sfact.pipeline.Config.to_dict`).
    config_file
        The file the config came from (named in error messages).
    force
        Redo it when ``prepared.h5ad`` exists.
    device
        Unused (preprocessing runs on the CPU).
    report
        Progress callback.

    Returns
    -------
    ``{"prepared": path, "n_obs": ..., "n_vars": ..., "n_groups": ...}``, or
    ``{"skipped": True, ...}`` when the output exists.

    Examples
    --------
    >>> from sfact.pipeline import Config, stages
    >>> cfg = Config.from_dict({"dataset": {"loader": "osmfish", "subsample": 500}, "output_dir": "out"})
    >>> stages.preprocess(config=cfg.to_dict())  # doctest: +SKIP
    {'prepared': 'out/prepared.h5ad', 'n_obs': 452, ...}
    """
    with _stage_context(config, config_file, "preprocess") as (cfg, layout):
        if layout.prepared.exists() and not force:
            return _skipped(
                f"{layout.prepared} exists (use --force to redo it)", prepared=str(layout.prepared)
            )
        import sfact
        from sfact.datasets._registry import _subsample

        ds = cfg.dataset
        report(message="loading data")
        if ds.reader is not None:
            _say(f"reading {ds.path} ({ds.reader})")
            adata = _subsample(
                sfact.datasets.read(ds.path, ds.reader, **ds.loader_kwargs), ds.subsample, ds.random_state
            )
        elif ds.loader is not None:
            _say(f"loading {ds.loader!r}" + (f" from {ds.path}" if ds.path else ""))
            adata = sfact.datasets.load(
                ds.loader,
                path=ds.path,
                subsample=ds.subsample,
                random_state=ds.random_state,
                **ds.loader_kwargs,
            )
        else:
            import anndata as ad

            if not Path(ds.path).exists():
                src = f" (set in {cfg.source})" if cfg.source else ""
                raise FileNotFoundError(f"`dataset.path` {ds.path!r} does not exist{src}.")
            _say(f"reading {ds.path}")
            adata = _subsample(ad.read_h5ad(ds.path), ds.subsample, ds.random_state)
        _say(f"loaded {adata.n_obs} cells x {adata.n_vars} genes")
        report(message="preparing")
        pre = cfg.to_dict()["preprocessing"]
        sfact.pp.prepare(adata, group_key=ds.group_key, sample_key=ds.sample_key, **pre)
        n_groups = None
        if ds.group_key is not None:
            n_groups = len(adata.obs[ds.group_key].cat.categories)
        _say(
            f"prepared: {adata.n_obs} cells x {adata.n_vars} genes"
            + (f", {n_groups} groups in {ds.group_key!r}" if n_groups is not None else "")
        )
        if adata.n_obs < 2:
            raise ValueError(
                f"Only {adata.n_obs} cells are left after preprocessing; relax the filters in `preprocessing`."
            )
        report(message="writing prepared.h5ad")
        layout.root.mkdir(parents=True, exist_ok=True)
        with atomic_file(layout.prepared) as tmp:
            adata.write_h5ad(tmp)
        info = {
            "name": cfg.name,
            **cfg.data_dict(),
            "n_obs": adata.n_obs,
            "n_vars": adata.n_vars,
            "group_key": ds.group_key,
            "n_groups": n_groups,
            "sample_key": ds.sample_key,
        }
        _write_json(layout.prepared_info, info)
        _say(f"wrote {layout.prepared}")
        return {
            "prepared": str(layout.prepared),
            "n_obs": adata.n_obs,
            "n_vars": adata.n_vars,
            "n_groups": n_groups,
        }


def train(
    *,
    config: dict[str, Any],
    prior: str,
    config_file: str | None = None,
    force: bool = False,
    resume: bool = False,
    device: str | None = None,
    report: Reporter = null_reporter,
) -> dict[str, Any]:
    """Train one prior on ``prepared.h5ad``, order its factors, and save the model to ``<prior>/model``.

    The factors are ordered by descending Moran's I (:func:`sfact.tl.fit` does the same) before
    the model is saved, so the ``analyze`` stage and every later use see one order. With
    ``training.validation_fraction`` (by default 0.05 of the cells when there are at least
    1000), the model is trained on the other cells and checked on the held-out ones against
    the baseline and a kNN smoother, as :func:`sfact.tl.fit` does (a warning when it does not
    beat the baseline); the held-out cells and the metrics are saved to
    ``<prior>/model/validation.json``, and ``resume`` keeps the same cells.

    Parameters
    ----------
    config
        The config as a dict.
    config_file
        The file the config came from (named in error messages).
    prior
        The prior to train.
    force
        Train afresh when a saved model exists (it is replaced only when training succeeds).
    resume
        Load the saved model and continue training (history appended); train afresh when
        there is none.
    device
        ``"cpu"``, ``"cuda:0"``, ...; the config's ``training.device`` when ``None``.
    report
        Called with ``epoch``, ``max_epoch`` and ``elbo`` during training.

    Returns
    -------
    ``{"model_dir", "n_iter", "n_iter_run", "converged", "elbo_per_entry", "train_time_s",
    "resumed", "reordered", "device"}`` and, with validation cells, the held-out metrics of
    :func:`sfact.tl.fit` (``validation_deviance``, ...); or ``{"skipped": True, ...}``.

    Examples
    --------
    >>> stages.train(config=cfg.to_dict(), prior="pnmf")  # doctest: +SKIP
    """
    with _stage_context(config, config_file, "train", prior) as (cfg, layout):
        model_dir = layout.model_dir(prior)
        have_model = (model_dir / "metadata.json").exists()
        if have_model and not force and not resume:
            return _skipped(
                f"a model is saved in {model_dir} (use --resume to continue training, --force to retrain)",
                model_dir=str(model_dir),
            )
        adata, dev = _read_prepared(layout, cfg, device)
        from sfact.models import SpatialFactorization

        tr = cfg.training
        resumed = bool(resume and have_model and not force)
        if resumed:
            # the same validation cells as the saved model's
            mask, saved_checks = _saved_validation(model_dir, adata)
            fraction = 0.0 if saved_checks is None else float(saved_checks["validation_fraction"])
        else:
            fraction = _fraction(tr.validation_fraction, adata.n_obs)
            mask = _validation_cells(adata, cfg, prior, fraction)
        train_adata = adata if mask is None else adata[~mask].copy()
        if resumed:
            report(message="loading the saved model")
            model = SpatialFactorization.load(model_dir, train_adata, device=dev)
            saved = model.setup
            if saved.prior != prior or saved.n_factors != cfg.model.n_factors:
                raise ValueError(
                    f"The model saved in {model_dir} is {saved.prior!r} with {saved.n_factors} factors, "
                    f"the config asks for {prior!r} with {cfg.model.n_factors}: use --force to train afresh."
                )
            _say(f"resuming from {model_dir} after {len(model.history_)} iterations")
        else:
            if resume:
                _say(f"no saved model in {model_dir}: training from scratch")
            model = SpatialFactorization(train_adata, **cfg.model_kwargs(prior), device=dev)
        n0 = len(model.history_)
        last = [0.0]
        every = max(1, tr.max_iter // 20)

        def callback(iteration: int, elbo: float) -> None:
            k = iteration - n0
            now = time.monotonic()
            if k == 1 or k == tr.max_iter or now - last[0] >= 0.5:
                last[0] = now
                report(epoch=k, max_epoch=tr.max_iter, elbo=elbo)
            if k % every == 0 or k == 1:
                _say(f"iteration {iteration}: ELBO per entry {elbo:.6g}")

        report(epoch=0, max_epoch=tr.max_iter, message="training")
        import warnings

        from sfact.models import ConvergenceWarning

        with warnings.catch_warnings():
            # the model's advice (call `model.train` again) is not the CLI's: this stage logs its own
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.train(**tr.train_kwargs(), progress_bar=False, callback=callback)
        n_run = len(model.history_) - n0
        elbo = float(model.history_.elbo[-1]) if len(model.history_) else None
        seconds = float(model.train_info.get("train_time_s", 0.0))
        _say(
            f"trained {n_run} iterations ({len(model.history_)} in all) in {seconds:.1f} s, "
            f"{'converged' if model.converged else 'not converged'}, ELBO per entry {elbo}"
        )
        if not model.converged and n_run > 0:
            _log_not_converged(model, tr, prior, config_file)
        # the factor order is set once, here, before the model is saved: by descending Moran's I
        report(epoch=n_run, max_epoch=tr.max_iter, elbo=elbo, message="ordering the factors by Moran's I")
        import numpy as np

        from sfact.tl._analyze import order_by_moran

        marginals = checks = None
        if mask is not None:
            from sfact import _logging as logg
            from sfact.tl._heldout import guard_message, split_log_factors, validation_metrics

            report(epoch=n_run, max_epoch=tr.max_iter, elbo=elbo, message="held-out check")
            bs = cfg.analysis.batch_size
            marginals = split_log_factors(model, adata, mask, batch_size=bs)
            checks = validation_metrics(
                model, adata, mask, fraction=fraction, log_factors=marginals, batch_size=bs
            )
            _say(
                f"held-out check on {checks['n_validation']} cells, deviance per entry: model "
                f"{checks['validation_deviance']:.6g}, baseline {checks['validation_baseline_deviance']:.6g}, "
                f"kNN smoother {checks['validation_knn_deviance']:.6g}"
            )
            message = guard_message(checks)
            if message is not None:
                logg.warning(message)
        order = order_by_moran(
            model,
            adata,
            n_neighs=cfg.analysis.n_neighs,
            batch_size=cfg.analysis.batch_size,
            marginals=marginals,
        ).order
        reordered = not np.array_equal(order, np.arange(len(order)))
        if reordered:
            _say(f"factors reordered by Moran's I: {order.tolist()}")
        report(epoch=n_run, max_epoch=tr.max_iter, elbo=elbo, message="saving the model")
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        with _tmp_dir(model_dir) as tmp:
            model.save(tmp, overwrite=True)
            if mask is not None:
                _write_json(
                    tmp / VALIDATION_FILE,
                    {"cells": [str(c) for c in adata.obs_names[mask]], "metrics": checks},
                )
            _swap_dir(tmp, model_dir)
        from ._config_files import config_to_yaml

        _write_text(layout.fit_config(prior), config_to_yaml(cfg.with_prior(prior)))
        _say(f"wrote {model_dir}")
        return {
            "model_dir": str(model_dir),
            "n_iter": len(model.history_),
            "n_iter_run": n_run,
            "converged": bool(model.converged),
            "elbo_per_entry": elbo,
            "train_time_s": float(model.train_info.get("train_time_s", 0.0)),
            "resumed": resumed,
            "reordered": reordered,
            "device": str(model.device),
            **(checks or {}),
        }


def _log_not_converged(model: Any, tr: Any, prior: str, config_file: str | None) -> None:
    """A warning in the job's log when training stopped at ``training.max_iter`` unconverged, with the CLI's advice."""
    from sfact import _logging as logg
    from sfact._core.train import TrainConfig, relative_change

    change = relative_change(model.history_.elbo, TrainConfig().window)
    finite = change < float("inf")
    how = (
        f"the ELBO still changes by {change:.1e} per iteration (relative)" if finite else "too few iterations"
    )
    cfg_file = config_file or "<config>"
    logg.warning(
        f"training {prior} stopped at `training.max_iter: {tr.max_iter}` before converging ({how}, "
        f"`training.tol: {tr.tol:g}`): raise `training.max_iter` in the config and train again with "
        f"--force, or continue from the saved model with `sfact train -c {cfg_file} --prior {prior} --resume`."
    )


def analyze(
    *,
    config: dict[str, Any],
    prior: str,
    config_file: str | None = None,
    force: bool = False,
    device: str | None = None,
    report: Reporter = null_reporter,
) -> dict[str, Any]:
    """Analyse a trained prior (:func:`sfact.tl.analyze`) and write results, arrays and metrics.

    The results are in the saved model's factor order (by descending Moran's I: the ``train``
    stage orders the factors before it saves the model); the model is not changed.

    Parameters
    ----------
    config
        The config as a dict.
    config_file
        The file the config came from (named in error messages).
    prior
        The prior to analyse.
    force
        Redo it when ``metrics.json`` exists.
    device
        Where to compute the factors; the config's ``training.device`` when ``None``.
    report
        Progress callback.

    Returns
    -------
    The paths written and the main metrics, or ``{"skipped": True, ...}``.

    Examples
    --------
    >>> stages.analyze(config=cfg.to_dict(), prior="pnmf")  # doctest: +SKIP
    """
    with _stage_context(config, config_file, "analyze", prior) as (cfg, layout):
        model_dir = layout.model_dir(prior)
        out_dir = layout.prior_dir(prior)
        if layout.metrics(prior).exists() and not force:
            return _skipped(f"{layout.metrics(prior)} exists (use --force to redo it)")
        _require(model_dir / "metadata.json", "saved model", "train", cfg)
        adata, dev = _read_prepared(layout, cfg, device)
        import numpy as np

        import sfact
        from sfact.get._view import FitView
        from sfact.models import SpatialFactorization

        mask, checks = _saved_validation(model_dir, adata)
        report(message="loading the model")
        model = SpatialFactorization.load(
            model_dir, adata if mask is None else adata[~mask].copy(), device=dev
        )
        group_key = model.setup.group_key
        an = cfg.analysis
        report(message="analysing")
        if mask is None:
            sfact.tl.analyze(
                adata,
                model,
                analyze_batch_size=an.batch_size,
                group_key=group_key,
                n_neighs=an.n_neighs,
                n_top=an.n_top,
                progress_bar=False,
            )
        else:
            # every cell: the training cells' marginals, the held-out cells' predicted factors
            from sfact._keys import Keys
            from sfact.tl._analyze import LogFactors, _analyze, _log_factors
            from sfact.tl._fit import write_validation
            from sfact.tl._heldout import split_log_factors

            marginals = split_log_factors(model, adata, mask, batch_size=an.batch_size)
            mu, var, moran = _log_factors(
                adata, model, n_neighs=an.n_neighs, batch_size=an.batch_size, marginals=marginals
            )
            _analyze(
                adata,
                model,
                key_added="sfact",
                analyze_batch_size=an.batch_size,
                group_key=group_key,
                n_neighs=an.n_neighs,
                n_top=an.n_top,
                progress_bar=False,
                log_factors=LogFactors(mu=mu, var=var, moran=moran, order=np.arange(model.n_factors)),
            )
            write_validation(adata, Keys("sfact"), mask, checks, guard=False)
        if prior.startswith("mggp") and an.groupwise:
            report(message="group-wise factors")
            sfact.tl.groupwise_factors(adata, model, batch_size=an.batch_size)
        fit = FitView.from_adata(adata)
        names = fit.factor_names
        moran = fit.moran
        metrics = {
            "dataset": cfg.name,
            "prior": prior,
            "n_obs": adata.n_obs,
            "n_vars": adata.n_vars,
            "n_factors": len(names),
            "group_key": group_key,
            **fit.metrics,
            "moranI": {n: float(v) for n, v in zip(moran.index, moran["I"], strict=True)},
            "gp": dict(fit.uns.get("gp", {})),
            "device": str(model.device),
        }
        report(message="writing results")
        with _tmp_dir(out_dir / "results") as tmp:
            adata.write_h5ad(tmp / "results.h5ad")
            np.save(tmp / "factors.npy", np.asarray(fit.factors))
            np.save(tmp / "scales.npy", np.asarray(fit.scales))
            np.save(tmp / "loadings.npy", np.asarray(fit.loadings))
            (tmp / "names.json").write_text(
                json.dumps(
                    {
                        "factors": names,
                        "genes": list(map(str, adata.var_names)),
                        "cells": list(map(str, adata.obs_names)),
                    }
                )
            )
            (tmp / "metrics.json").write_text(_json_text(metrics))
            # everything is written: move it into place, metrics.json (the marker of a finished
            # analysis) last, and gone meanwhile, so that a kill in between leaves no marker
            # next to a mix of old and new files
            layout.metrics(prior).unlink(missing_ok=True)
            for f in (
                "results.h5ad",
                "factors.npy",
                "scales.npy",
                "loadings.npy",
                "names.json",
                "metrics.json",
            ):
                os.replace(tmp / f, out_dir / f)
        shutil.rmtree(_tmp_sibling(out_dir / "results"), ignore_errors=True)
        _say(f"wrote {layout.results(prior)} and the arrays, {layout.metrics(prior)}")
        m = fit.metrics
        return {
            "results": str(layout.results(prior)),
            "metrics": str(layout.metrics(prior)),
            "deviance_per_entry": float(m["deviance_per_entry"]),
            "reconstruction_error": float(m["reconstruction_error"]),
            "moranI_max": float(moran["I"].max()),
        }


#: the file of the model folder with the validation cells and the held-out metrics
VALIDATION_FILE = "validation.json"


def _fraction(validation_fraction: float | None, n_obs: int) -> float:
    from sfact.tl._heldout import resolve_validation_fraction

    return resolve_validation_fraction(validation_fraction, n_obs)


def _validation_cells(adata, cfg, prior: str, fraction: float):
    """The validation cells of a fresh training run (``None``: none), as :func:`sfact.tl.fit` draws them."""
    from sfact.models import ModelSetup
    from sfact.tl._heldout import validation_mask

    if fraction == 0:
        return None
    kw = cfg.model_kwargs(prior)
    gk = ModelSetup.effective_group_key(
        adata, group_key=kw.get("group_key"), spatial_key=kw.get("spatial_key", "spatial")
    )
    sk = ModelSetup.effective_sample_key(
        adata, sample_key=kw.get("sample_key"), spatial_key=kw.get("spatial_key", "spatial")
    )
    return validation_mask(
        adata, fraction, random_state=cfg.training.random_state, group_key=gk, sample_key=sk
    )


def _saved_validation(model_dir: Path, adata):
    """``(mask, metrics)`` of the validation cells saved with a model; ``(None, None)`` without."""
    import numpy as np

    path = model_dir / VALIDATION_FILE
    if not path.exists():
        return None, None
    saved = json.loads(path.read_text())
    cells = set(saved["cells"])
    mask = np.array([str(c) in cells for c in adata.obs_names])
    if int(mask.sum()) != len(cells):
        raise ValueError(
            f"{path} names {len(cells)} validation cells, {int(mask.sum())} of them are in the "
            "prepared data: the data changed since training; use --force to train afresh."
        )
    return mask, dict(saved["metrics"])


#: the job function of each task
STAGE_FUNCTIONS = {
    "preprocess": preprocess,
    "select": select,
    "train": train,
    "analyze": analyze,
    "figures": figures,
}
