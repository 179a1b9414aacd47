"""The pipeline's stages: top-level, picklable job functions and the output layout.

Each stage is called as ``fn(config=..., [prior=...], force=..., device=..., report=...)``
(see :mod:`sfact.pipeline._jobs`) with ``config`` a plain dict (:meth:`Config.to_dict`), and
returns a JSON-able dict. Outputs are written to a temporary sibling and renamed into place,
so a failure never leaves half an output nor destroys an earlier good one. A stage whose
outputs exist returns ``{"status": "skipped", ...}`` unless ``force=True``.

Output layout of a data set (``output_dir``)::

    prepared.h5ad, prepared.json          preprocess
    <prior>/model/, <prior>/config.yaml   train
    <prior>/results.h5ad, factors.npy, scales.npy, loadings.npy, names.json, metrics.json
                                          analyze
    <prior>/figures/*.png                 figures
    logs/preprocess.log, logs/<prior>.log
    run_summary.json                      written by the command line after each run
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._jobs import null_reporter

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ._config import Config
    from ._jobs import Reporter, Task


@dataclass(frozen=True)
class Layout:
    """Paths of one data set's outputs below ``root`` (the config's ``output_dir``).

    Examples
    --------
    >>> from pathlib import Path
    >>> from sfact.pipeline import Layout
    >>> layout = Layout(Path("outputs/osmfish"))
    >>> layout.results("svgp"), layout.log("svgp")
    (PosixPath('outputs/osmfish/svgp/results.h5ad'), PosixPath('outputs/osmfish/logs/svgp.log'))
    """

    root: Path

    @property
    def prepared(self) -> Path:
        """The preprocessed data."""
        return self.root / "prepared.h5ad"

    @property
    def prepared_info(self) -> Path:
        """What ``prepared.h5ad`` was made from (dataset and preprocessing sections, sizes)."""
        return self.root / "prepared.json"

    @property
    def summary(self) -> Path:
        """The run summary (status of every job of the latest runs)."""
        return self.root / "run_summary.json"

    @property
    def logs(self) -> Path:
        """Folder of the job logs."""
        return self.root / "logs"

    def log(self, prior: str | None = None) -> Path:
        """Log of the preprocessing (``prior=None``) or of a prior's train/analyze/figures jobs."""
        return self.logs / ("preprocess.log" if prior is None else f"{prior}.log")

    def prior_dir(self, prior: str) -> Path:
        """Folder of one prior's outputs."""
        return self.root / prior

    def model_dir(self, prior: str) -> Path:
        """The saved model (:meth:`sfact.models.SpatialFactorization.save`)."""
        return self.root / prior / "model"

    def fit_config(self, prior: str) -> Path:
        """The full config the model was trained with."""
        return self.root / prior / "config.yaml"

    def results(self, prior: str) -> Path:
        """The prepared data with every result of the analysis."""
        return self.root / prior / "results.h5ad"

    def metrics(self, prior: str) -> Path:
        """Metrics of the analysis (JSON); written last, it marks a complete analysis."""
        return self.root / prior / "metrics.json"

    def figures(self, prior: str) -> Path:
        """Folder of the PNGs."""
        return self.root / prior / "figures"

    def marker(self, task: Task, prior: str | None = None) -> Path:
        """The path whose existence means ``task`` finished."""
        if task == "preprocess":
            return self.prepared
        if prior is None:
            raise ValueError(f"The {task!r} stage needs a prior.")
        return {
            "train": self.model_dir(prior) / "metadata.json",
            "analyze": self.metrics(prior),
            "figures": self.figures(prior),
        }[task]

    def done(self, task: Task, prior: str | None = None) -> bool:
        """Whether the outputs of ``task`` exist."""
        return self.marker(task, prior).exists()


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _config(config: dict[str, Any] | Config, config_file: str | None) -> Config:
    from ._config import Config

    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    if config_file is not None:
        cfg.source = config_file
    return cfg


def _tmp_sibling(path: Path, tag: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(_jsonable(obj), indent=1) + "\n")


def _jsonable(obj: Any) -> Any:
    """Plain JSON values of numpy/pandas/path objects (NaN becomes ``null``)."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    return str(obj)


def _swap_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final``, replacing an existing one only on success."""
    old = None
    if final.exists():
        old = _tmp_sibling(final, "old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _tmp_dir(final: Path) -> Iterator[Path]:
    """A temporary sibling folder of ``final``, removed if the block fails."""
    tmp = _tmp_sibling(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _job_context(title: str) -> Iterator[None]:
    """Info-level logs to the job's stderr (its log file), no progress bars, Agg plots."""
    import scanpy as sc

    from .._settings import settings

    old = (sc.settings.verbosity, sc.settings.logfile, settings.progress_bar)
    sc.settings.logfile = sys.stderr  # re-bind scanpy's handler to where stderr goes now
    sc.settings.verbosity = 2
    settings.progress_bar = False
    t0 = time.perf_counter()
    _say(f"--- {title} ({time.strftime('%Y-%m-%d %H:%M:%S')})")
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sc.settings.verbosity, sc.settings.logfile, settings.progress_bar = old[0], old[1], old[2]
        _say(f"--- {title}: {time.perf_counter() - t0:.1f} s")


def _say(msg: str) -> None:
    print(msg, flush=True)


def _device(device: str | None, cfg: Config) -> str:
    from .._utils import resolve_device

    if device is None:
        device = cfg.training.device
    if cfg.training.device == "cpu":
        device = "cpu"
    return resolve_device(device)


def _skipped(reason: str, **extra: Any) -> dict[str, Any]:
    _say(f"skipped: {reason}")
    return {"status": "skipped", "skipped": True, "reason": reason, **extra}


def _require(path: Path, what: str, run_first: str, cfg: Config) -> None:
    if not path.exists():
        src = f" -c {cfg.source}" if cfg.source else ""
        raise FileNotFoundError(f"{what} not found ({path}): run `sfact {run_first}{src}` first.")


def _read_prepared(layout: Layout):
    import anndata as ad

    return ad.read_h5ad(layout.prepared)


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------
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
    ``{"status": "skipped", ...}`` when the output exists.

    Examples
    --------
    >>> from sfact.pipeline import Config, stages
    >>> cfg = Config.from_dict({"dataset": {"loader": "osmfish", "subsample": 500}, "output_dir": "out"})
    >>> stages.preprocess(config=cfg.to_dict())  # doctest: +SKIP
    {'prepared': 'out/prepared.h5ad', 'n_obs': 452, ...}
    """
    cfg = _config(config, config_file)
    layout = Layout(Path(cfg.output_dir))
    with _job_context(f"{cfg.name}: preprocess"):
        if layout.prepared.exists() and not force:
            return _skipped(
                f"{layout.prepared} exists (use --force to redo it)", prepared=str(layout.prepared)
            )
        import sfact
        from sfact.datasets._registry import _subsample

        ds = cfg.dataset
        report(message="loading data")
        if ds.loader is not None:
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
        sfact.pp.prepare(adata, group_key=ds.group_key, **pre)
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
        tmp = _tmp_sibling(layout.prepared)
        try:
            adata.write_h5ad(tmp)
            os.replace(tmp, layout.prepared)
        finally:
            if tmp.exists():
                tmp.unlink()
        info = {
            "name": cfg.name,
            **cfg.data_dict(),
            "n_obs": adata.n_obs,
            "n_vars": adata.n_vars,
            "group_key": ds.group_key,
            "n_groups": n_groups,
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
    the model is saved, so the ``analyze`` stage and every later use see one order.

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
    "resumed", "reordered", "device"}``, or ``{"status": "skipped", ...}``.

    Examples
    --------
    >>> stages.train(config=cfg.to_dict(), prior="pnmf")  # doctest: +SKIP
    """
    cfg = _config(config, config_file)
    layout = Layout(Path(cfg.output_dir))
    model_dir = layout.model_dir(prior)
    with _job_context(f"{cfg.name}/{prior}: train"):
        have_model = (model_dir / "metadata.json").exists()
        if have_model and not force and not resume:
            return _skipped(
                f"a model is saved in {model_dir} (use --resume to continue training, --force to retrain)",
                model_dir=str(model_dir),
            )
        _require(layout.prepared, "prepared data", "preprocess", cfg)
        from sfact.models import SpatialFactorization

        dev = _device(device, cfg)
        adata = _read_prepared(layout)
        tr = cfg.training
        resumed = bool(resume and have_model and not force)
        if resumed:
            report(message="loading the saved model")
            model = SpatialFactorization.load(model_dir, adata, device=dev)
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
            model = SpatialFactorization(
                adata,
                prior=prior,
                n_factors=cfg.model.n_factors,
                layer=cfg.preprocessing.layer,
                spatial_key=cfg.preprocessing.spatial_key,
                group_key=cfg.group_key,
                size_factors=cfg.model.size_factors,
                elbo_mode=cfg.model.elbo_mode,
                loadings_mode=cfg.model.loadings_mode,
                n_samples=cfg.model.n_samples,
                prior_kwargs=cfg.model.prior_kwargs_for(prior),
                device=dev,
                random_state=tr.random_state,
            )
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
        model.train(
            max_iter=tr.max_iter,
            tol=tr.tol,
            learning_rate=tr.learning_rate,
            batch_size=tr.batch_size,
            y_batch_size=tr.y_batch_size,
            kl_weight=tr.kl_weight,
            init_iter=tr.init_iter,
            min_iter=tr.min_iter,
            progress_bar=False,
            callback=callback,
        )
        n_run = len(model.history_) - n0
        elbo = float(model.history_.elbo[-1]) if len(model.history_) else None
        _say(
            f"trained {n_run} iterations ({len(model.history_)} in all), "
            f"{'converged' if model.converged else 'not converged'}, ELBO per entry {elbo}"
        )
        # the factor order is set once, here, before the model is saved: by descending Moran's I
        report(epoch=n_run, max_epoch=tr.max_iter, elbo=elbo, message="ordering the factors by Moran's I")
        import numpy as np

        from sfact.tl._analyze import order_by_moran

        order = order_by_moran(
            model, adata, n_neighs=cfg.analysis.n_neighs, batch_size=cfg.analysis.batch_size
        ).order
        reordered = not np.array_equal(order, np.arange(len(order)))
        if reordered:
            _say(f"factors reordered by Moran's I: {order.tolist()}")
        report(epoch=n_run, max_epoch=tr.max_iter, elbo=elbo, message="saving the model")
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        with _tmp_dir(model_dir) as tmp:
            model.save(tmp, overwrite=True)
            _swap_dir(tmp, model_dir)
        from ._config import config_to_yaml

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
        }


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
    The paths written and the main metrics, or ``{"status": "skipped", ...}``.

    Examples
    --------
    >>> stages.analyze(config=cfg.to_dict(), prior="pnmf")  # doctest: +SKIP
    """
    cfg = _config(config, config_file)
    layout = Layout(Path(cfg.output_dir))
    model_dir = layout.model_dir(prior)
    out_dir = layout.prior_dir(prior)
    with _job_context(f"{cfg.name}/{prior}: analyze"):
        if layout.metrics(prior).exists() and not force:
            return _skipped(f"{layout.metrics(prior)} exists (use --force to redo it)")
        _require(model_dir / "metadata.json", "saved model", "train", cfg)
        _require(layout.prepared, "prepared data", "preprocess", cfg)
        import numpy as np

        import sfact
        from sfact.get._view import FitView
        from sfact.models import SpatialFactorization

        dev = _device(device, cfg)
        adata = _read_prepared(layout)
        report(message="loading the model")
        model = SpatialFactorization.load(model_dir, adata, device=dev)
        group_key = model.setup.group_key
        an = cfg.analysis
        report(message="analysing")
        sfact.tl.analyze(
            adata,
            model,
            analyze_batch_size=an.batch_size,
            group_key=group_key,
            n_neighs=an.n_neighs,
            n_top=an.n_top,
            progress_bar=False,
        )
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
            (tmp / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=1) + "\n")
            # everything is written: move it into place, metrics.json last
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
    if prior in ("svgp", "mggp_svgp"):
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
    ``{"figures": [paths], "not_applicable": [kinds]}``, or ``{"status": "skipped", ...}``.

    Examples
    --------
    >>> stages.figures(config=cfg.to_dict(), prior="svgp")  # doctest: +SKIP
    """
    cfg = _config(config, config_file)
    layout = Layout(Path(cfg.output_dir))
    fig_dir = layout.figures(prior)
    with _job_context(f"{cfg.name}/{prior}: figures"):
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
                    fig.savefig(tmp / f"{kind}.png", dpi=cfg.figures.dpi)
                except Exception as e:
                    raise RuntimeError(f"Drawing the {kind!r} figure failed: {type(e).__name__}: {e}") from e
                finally:
                    plt.close("all")
                written.append(str(fig_dir / f"{kind}.png"))
                _say(f"figure {kind}: {time.perf_counter() - t:.1f} s")
            _swap_dir(tmp, fig_dir)
        _say(f"wrote {len(written)} figures to {fig_dir}")
        return {"figures": written, "not_applicable": not_applicable}


#: the job function of each task
STAGE_FUNCTIONS = {"preprocess": preprocess, "train": train, "analyze": analyze, "figures": figures}
