"""``sfact.tl.select_model``: a grid of priors x ``n_factors`` x prior options, ranked by held-out deviance.

Every setting is fitted on the training cells of each fold and scored on the fold's held-out cells
(:func:`sfact.tl.heldout_deviance`, against :func:`sfact.tl.baseline_deviance`). The work shared
by the settings is done once: per fold the split, the baseline and, per ``n_factors``, the counts
on the device and the KL-NMF start of training (shared between priors and prior options through
the private hook ``share_training_start`` of :mod:`sfact.models._training`);
the fits run in one process pool.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .. import _logging as logg
from .._constants import PRIOR_NAMES
from .._keys import check_key_added
from .._spatialdata import resolve_table
from .._utils import check_random_state, seed_of

if TYPE_CHECKING:
    from anndata import AnnData

    from ..models import SpatialFactorization

__all__ = ["select_model"]

#: neighbours whose training factors give a held-out cell's factors under ``pnmf`` (no model of space)
PNMF_KNN = 10
#: the columns of the table, around the grid's hyperparameters (after ``n_factors``)
SETTING_COLUMNS = ("prior", "n_factors")
RESULT_COLUMNS = (
    "fold",
    "n_train",
    "n_test",
    "heldout_deviance",
    "baseline_deviance",
    "n_iter",
    "converged",
    "fit_time_s",
)


@dataclasses.dataclass(frozen=True)
class _Setting:
    index: int
    prior: str
    n_factors: int
    hyper: tuple[tuple[str, Any], ...]  # the grid's values that apply to this prior
    prior_kwargs: tuple[tuple[str, Any], ...]  # the fixed options that apply to this prior


@dataclasses.dataclass(frozen=True)
class _Task:
    fold: int
    test_idx: np.ndarray
    settings: tuple[_Setting, ...]  # all with the same n_factors


def select_model(
    adata: AnnData,
    *,
    priors: Sequence[str] = ("svgp", "lcgp"),
    n_factors: Sequence[int] | int = (10,),
    prior_kwargs_grid: Mapping[str, Sequence[Any]] | None = None,
    prior_kwargs: Mapping[str, Any] | None = None,
    n_folds: int | None = None,
    heldout_fraction: float = 0.05,
    layer: str | None = None,
    spatial_key: str = "spatial",
    group_key: str | None = None,
    size_factors: str | None = "total",
    max_iter: int = 1000,
    tol: float = 1e-4,
    learning_rate: float | None = None,
    init_iter: int = 30,
    n_jobs: int | None = None,
    device: str | None = None,
    random_state: int | np.random.Generator | None = 0,
    key_added: str = "sfact_selection",
    table_key: str | None = None,
) -> pd.DataFrame:
    """Rank priors, numbers of factors and prior options by held-out deviance.

    Every setting of the grid ``priors`` x ``n_factors`` x ``prior_kwargs_grid`` is fitted on
    the training cells of each fold and scored by the mean Poisson deviance per entry of the
    fold's held-out cells, predicted from their coordinates (:func:`sfact.tl.heldout_deviance`;
    for ``pnmf``, which has no model of space, a held-out cell's log-factors are the mean of
    those of its 10 nearest training cells). The best setting has the lowest mean held-out
    deviance over the folds.

    With ``n_folds=None`` there is one split, the package's protocol
    (:func:`sfact.tl.heldout_split` with ``fraction=heldout_fraction`` and the seed); with
    ``n_folds=k`` the cells are cut into ``k`` folds at random (seeded), each held out once. Per
    fold, the split, the baseline and, per ``n_factors``, the counts on the device and the
    KL-NMF start of training are computed once and shared by every prior and prior option, so
    each fit trains exactly as a separate fit with the same seed would. Fits run in a pool of
    ``n_jobs`` processes (each with ``cpus // n_jobs`` torch threads); the results do not depend
    on ``n_jobs``.

    Parameters
    ----------
    adata
        Cells x genes with raw counts and coordinates (ideally after :func:`sfact.pp.prepare`).
    priors
        Priors to compare (see :class:`~sfact.models.SpatialFactorization`).
    n_factors
        Numbers of factors L to compare.
    prior_kwargs_grid
        Prior options to compare, each with its values, e.g. ``{"lengthscale": [5, 10, 20]}``:
        every combination is tried for each prior that has the option (the others are fitted
        once, with the column empty). Values are scalars.
    prior_kwargs
        Fixed prior options, passed to every prior that has them.
    n_folds
        Number of folds (at least 2) of k-fold cross-validation over cells; ``None`` for the
        single held-out split.
    heldout_fraction
        Fraction of cells held out by the single split (``n_folds=None``), in (0, 1).
    layer
        Layer with raw counts; ``adata.X`` when ``None``.
    spatial_key
        Key of the coordinates in ``adata.obsm``.
    group_key
        Column of ``adata.obs`` with the groups (multi-group priors); defaults to the one
        recorded by :func:`sfact.pp.prepare`.
    size_factors
        ``None``, ``"total"`` or a column of ``adata.obs`` (see
        :class:`~sfact.models.SpatialFactorization`).
    max_iter
        Maximum iterations of each fit.
    tol
        Convergence tolerance of each fit.
    learning_rate
        Adam learning rate; ``None`` uses each prior's default.
    init_iter
        KL-NMF iterations of the (shared) initialization.
    n_jobs
        Processes fitting in parallel; ``None`` uses one per available CPU core, at most one per
        task (a fold and a number of factors, or a part of one). On a GPU the fits run one after
        another in this process.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; defaults to :attr:`sfact.settings.device`.
    random_state
        Seed of the split or folds and of every fit.
    key_added
        Key in ``adata.uns`` of the results (one an ``.h5ad`` file can store: not empty or
        ``'.'``, without ``'/'`` or NUL).
    table_key
        With a ``spatialdata.SpatialData`` as ``adata``: the key of its table to use (``None``
        for its only table; a key it does not hold raises a :class:`KeyError` naming its
        tables); the results are written into that table. Without ``obsm[spatial_key]`` in the
        table, the centroids of the shapes or labels it annotates are written there first.

    Returns
    -------
    The tidy table, one row per setting and fold, with columns ``prior``, ``n_factors``, one
    column per option of ``prior_kwargs_grid`` (empty where the prior has no such option),
    ``fold``, ``n_train``, ``n_test``, ``heldout_deviance`` and ``baseline_deviance`` (mean
    Poisson deviance per entry of the held-out cells), ``n_iter``, ``converged`` and
    ``fit_time_s`` (seconds; the first setting of each fold and ``n_factors`` includes the shared
    initialization). Also sets

    ``adata.uns[key_added]``
        ``results`` (the table), ``best`` (the best setting: ``prior``, ``n_factors``,
        ``prior_kwargs`` and the mean ``heldout_deviance`` and ``baseline_deviance``),
        ``params`` (the grid and settings, plain values) and ``time_s`` (the wall time).

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.osmfish()
    >>> sfact.pp.prepare(adata)
    >>> df = sfact.tl.select_model(  # doctest: +SKIP
    ...     adata, priors=["svgp", "lcgp"], n_factors=[5, 10], prior_kwargs_grid={"lengthscale": [5, 10, 20]}
    ... )
    >>> adata.uns["sfact_selection"]["best"]  # doctest: +SKIP
    """
    from .._utils import resolve_device

    t0 = time.perf_counter()
    adata = resolve_table(adata, table_key, spatial_key=spatial_key)  # a SpatialData's table
    priors_, ns = _check_grid_axes(adata, priors, n_factors)
    grid = _check_grid(prior_kwargs_grid, "prior_kwargs_grid")
    if prior_kwargs is not None and not isinstance(prior_kwargs, Mapping):
        raise TypeError(
            f"`prior_kwargs` must map option names to values, received {type(prior_kwargs).__name__}."
        )
    fixed = dict(prior_kwargs or {})
    settings, hyper_names = _expand(priors_, ns, grid, fixed)
    seed = seed_of(random_state)
    folds = _fold_indices(adata.n_obs, n_folds, heldout_fraction, seed)
    check_key_added(key_added)
    for name, value, low in (("max_iter", max_iter, 0), ("init_iter", init_iter, 0)):
        if not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low}, received {value!r}.")
    device = resolve_device(device)
    data_adata, group_key = _checked_data(
        adata, settings, layer=layer, spatial_key=spatial_key, group_key=group_key, size_factors=size_factors
    )
    tasks, n_workers = _plan(settings, folds, n_jobs, device)
    options = {
        "spatial_key": spatial_key,
        "group_key": group_key,
        "size_factors": size_factors,
        "max_iter": int(max_iter),
        "tol": float(tol),
        "learning_rate": learning_rate,
        "init_iter": int(init_iter),
        "device": device,
        "seed": seed,
    }
    start = logg.info(
        f"selecting a model: {len(settings)} settings x {len(folds)} fold(s) on {adata.n_obs} cells "
        f"({len(tasks)} tasks, {n_workers} process(es))"
    )
    rows = _run(data_adata, tasks, options, n_workers)
    best = _best(rows, settings)
    df = _table(rows, settings, hyper_names)
    elapsed = time.perf_counter() - t0
    params = {
        "priors": list(priors_),
        "n_factors": [int(n) for n in ns],
        "prior_kwargs_grid": {k: list(v) for k, v in grid.items()},
        "prior_kwargs": fixed,
        "n_folds": len(folds) if n_folds is not None else 1,
        "heldout_fraction": float(heldout_fraction) if n_folds is None else float("nan"),
        "layer": layer,
        "spatial_key": spatial_key,
        "group_key": group_key,
        "size_factors": size_factors,
        "max_iter": int(max_iter),
        "tol": float(tol),
        "learning_rate": learning_rate,
        "init_iter": int(init_iter),
        "n_jobs": int(n_workers),
        "device": device,
        "random_state": seed,
    }
    from .._utils import view_to_actual
    from .._version import __version__

    view_to_actual(adata)
    adata.uns[key_added] = {
        "results": df,
        "best": best,
        "params": _plain(params | {"version": __version__}),
        "time_s": float(elapsed),
    }
    label = _setting_label(best["prior"], best["n_factors"], best["prior_kwargs"])
    logg.info(
        f"    best: {label}, held-out deviance {best['heldout_deviance']:.4f} "
        f"(baseline {best['baseline_deviance']:.4f})",
    )
    logg.info("    finished", time=start, deep=f"added\n    '{key_added}' (adata.uns)")
    return df


# ---------------------------------------------------------------------------- checks (before any fit)
def _check_grid_axes(adata: AnnData, priors: Any, n_factors: Any) -> tuple[list[str], list[int]]:
    if isinstance(priors, str):
        priors = [priors]
    priors_ = list(dict.fromkeys(priors or []))
    if not priors_:
        raise ValueError(f"`priors` must name at least one prior of {PRIOR_NAMES}, received {priors!r}.")
    unknown = [p for p in priors_ if p not in PRIOR_NAMES]
    if unknown:
        raise ValueError(f"`priors` has unknown prior(s) {unknown}; choose from {PRIOR_NAMES}.")
    ns_in = [n_factors] if isinstance(n_factors, int | np.integer) else list(n_factors or [])
    if not ns_in:
        raise ValueError("`n_factors` must list at least one number of factors.")
    for n in ns_in:
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"`n_factors` must be positive integers, received {n!r} in {ns_in!r}.")
        if n > adata.n_vars:
            raise ValueError(
                f"`n_factors` has {n}, more than the number of genes ({adata.n_vars}); "
                "choose at most as many factors as genes."
            )
    return priors_, [int(n) for n in dict.fromkeys(ns_in)]


def _check_grid(grid: Mapping[str, Sequence[Any]] | None, name: str) -> dict[str, list[Any]]:
    if grid is None:
        return {}
    if not isinstance(grid, Mapping):
        raise TypeError(f"`{name}` must map option names to lists of values, received {type(grid).__name__}.")
    out = {}
    for key, values in grid.items():
        if isinstance(values, str) or not isinstance(values, Sequence | np.ndarray):
            raise TypeError(f"`{name}[{key!r}]` must be a list of values, received {values!r}.")
        vals = [v.item() if isinstance(v, np.generic) else v for v in values]
        if not vals:
            raise ValueError(f"`{name}[{key!r}]` is empty; give at least one value.")
        bad = [v for v in vals if not isinstance(v, int | float | str | bool)]
        if bad:
            raise TypeError(f"`{name}[{key!r}]` values must be scalars (numbers or strings), received {bad}.")
        out[str(key)] = list(dict.fromkeys(vals))
    return out


def _option_names(prior: str) -> set[str]:
    from ..models._config import CONFIGS

    return {f.name for f in dataclasses.fields(CONFIGS[prior]) if f.name != "extra"}


def _expand(
    priors: list[str], ns: list[int], grid: dict[str, list[Any]], fixed: dict[str, Any]
) -> tuple[list[_Setting], list[str]]:
    """Every setting of the grid, each checked against its prior's options (no fitting)."""
    from ..models._config import make_config

    options = {p: _option_names(p) for p in priors}
    for what, keys in (("prior_kwargs_grid", grid), ("prior_kwargs", fixed)):
        for key in keys:
            if not any(key in options[p] for p in priors):
                valid = sorted(set().union(*options.values()))
                raise ValueError(
                    f"`{what}` has {key!r}, an option of none of the priors {priors}; valid options: {valid}."
                )
    both = sorted(set(grid) & set(fixed))
    if both:
        raise ValueError(
            f"{both} are in both `prior_kwargs_grid` and `prior_kwargs`; give each in one of them."
        )
    settings: list[_Setting] = []
    for prior in priors:
        names = [k for k in grid if k in options[prior]]
        fixed_p = tuple((k, v) for k, v in fixed.items() if k in options[prior])
        for n in ns:
            for combo in itertools.product(*(grid[k] for k in names)):
                hyper = tuple(zip(names, combo, strict=True))
                try:
                    make_config(prior, dict(fixed_p) | dict(hyper))
                except (TypeError, ValueError) as err:
                    raise ValueError(f"Invalid options for prior {prior!r} in the grid: {err}") from err
                settings.append(_Setting(len(settings), prior, n, hyper, fixed_p))
    return settings, list(grid)


def _fold_indices(n_obs: int, n_folds: int | None, fraction: float, seed: int) -> list[np.ndarray]:
    """Held-out cell indices of each fold (sorted), from ``seed``."""
    from ._heldout import heldout_mask

    if n_folds is None:
        if not isinstance(fraction, float | int) or not 0 < fraction < 1:
            raise ValueError(f"`heldout_fraction` must be in (0, 1), received {fraction!r}.")
        n_test = round(fraction * n_obs)
        if n_test < 1 or n_test >= n_obs - 1:
            raise ValueError(
                f"`heldout_fraction={fraction}` of {n_obs} cells leaves no held-out cells or too few "
                "training cells; pass a larger or smaller fraction."
            )
        return [np.flatnonzero(heldout_mask(n_obs, fraction=fraction, random_state=seed))]
    if isinstance(n_folds, bool) or not isinstance(n_folds, int | np.integer) or n_folds < 2:
        raise ValueError(f"`n_folds` must be an integer >= 2 (or None for one split), received {n_folds!r}.")
    if n_obs < 2 * n_folds:
        raise ValueError(
            f"`n_folds={n_folds}` needs at least {2 * n_folds} cells (2 per fold), received {n_obs}; "
            "pass fewer folds."
        )
    perm = check_random_state(seed).permutation(n_obs)
    return [np.sort(part) for part in np.array_split(perm, int(n_folds))]


def _checked_data(
    adata: AnnData,
    settings: list[_Setting],
    *,
    layer: str | None,
    spatial_key: str,
    group_key: str | None,
    size_factors: str | None,
) -> tuple[AnnData, str | None]:
    """Check the data once per prior (as a fit would), and a slim copy with what the fits read.

    Returns the copy (counts in ``X``, the coordinates, the group, sample and size-factor columns,
    the record of :func:`sfact.pp.prepare`) and the group key in use.
    """
    import anndata as ad

    from ..models import ModelSetup
    from ..pp._prepare import UNS_KEY as _PREPARE_KEY
    from ._analysis import _adata_counts

    setup = None
    for prior in dict.fromkeys(s.prior for s in settings):
        first = next(s for s in settings if s.prior == prior)
        setup = ModelSetup.from_adata(
            adata,
            prior=prior,
            n_factors=first.n_factors,
            layer=layer,
            spatial_key=spatial_key,
            group_key=group_key,
            size_factors=size_factors,
            elbo_mode="lower-bound",
            loadings_mode="multiplicative",
            n_samples=4,
            prior_kwargs=dict(first.prior_kwargs) | dict(first.hyper),
            random_state=0,
        )
    group_key = setup.group_key
    cols = [
        c for c in (group_key, setup.sample_key, size_factors) if c is not None and c in adata.obs.columns
    ]
    cols = list(dict.fromkeys(cols))
    slim = ad.AnnData(
        X=_adata_counts(adata, layer).copy(),
        obs=adata.obs[cols].copy(),
        var=pd.DataFrame(index=adata.var_names.copy()),
        obsm={spatial_key: np.asarray(adata.obsm[spatial_key]).copy()},
    )
    if _PREPARE_KEY in adata.uns:
        slim.uns[_PREPARE_KEY] = dict(adata.uns[_PREPARE_KEY])
    return slim, group_key


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _plan(
    settings: list[_Setting], folds: list[np.ndarray], n_jobs: int | None, device: str
) -> tuple[list[_Task], int]:
    """Tasks (a fold, a number of factors, its settings or a part of them) and the number of processes."""
    from .._constants import is_gpu

    if n_jobs is not None and (
        isinstance(n_jobs, bool) or not isinstance(n_jobs, int | np.integer) or n_jobs < 1
    ):
        raise ValueError(f"`n_jobs` must be a positive integer or None, received {n_jobs!r}.")
    by_n: dict[int, list[_Setting]] = {}
    for s in settings:
        by_n.setdefault(s.n_factors, []).append(s)
    n_groups = len(folds) * len(by_n)
    import multiprocessing as mp

    jobs = 1 if is_gpu(device) else (_available_cpus() if n_jobs is None else int(n_jobs))
    if jobs > 1 and mp.current_process().daemon:  # e.g. a Dask worker: no child processes allowed
        logg.info("    in a daemonic process: the fits run one after another in this process.")
        jobs = 1
    if is_gpu(device) and n_jobs not in (None, 1):
        logg.info(f"    `n_jobs={n_jobs}` on {device}: the fits run one after another in this process.")
    tasks = []
    for fold, test_idx in enumerate(folds):
        for group in by_n.values():
            # a group shares one KL-NMF start; with several processes it is cut into parts so that
            # there are about two tasks per process (the fits of a grid differ in cost)
            n_parts = 1 if jobs == 1 else min(len(group), max(1, math.ceil(2 * jobs / n_groups)))
            for part in np.array_split(np.arange(len(group)), n_parts):
                tasks.append(_Task(fold, test_idx, tuple(group[i] for i in part)))
    return tasks, max(1, min(jobs, len(tasks)))


# ---------------------------------------------------------------------------- the fits
_WORKER_ADATA: AnnData | None = None


def _init_worker(adata: AnnData, n_threads: int, verbosity: int) -> None:
    import torch

    from .._settings import settings

    global _WORKER_ADATA
    _WORKER_ADATA = adata
    torch.set_num_threads(n_threads)
    settings.verbosity = verbosity


def _worker_task(task: _Task, options: dict[str, Any]) -> list[dict[str, Any]]:
    return _run_task(_WORKER_ADATA, task, options)


def _run(adata: AnnData, tasks: list[_Task], options: dict[str, Any], n_workers: int) -> list[dict[str, Any]]:
    if n_workers <= 1:
        rows = []
        for task in tasks:
            rows += _run_task(adata, task, options)
        return rows
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from .._settings import settings

    threads = max(1, _available_cpus() // n_workers)
    with ProcessPoolExecutor(
        max_workers=n_workers,
        mp_context=mp.get_context("spawn"),  # torch is not fork-safe once its thread pool has started
        initializer=_init_worker,
        initargs=(adata, threads, min(settings.verbosity, 1)),
    ) as pool:
        futures = [pool.submit(_worker_task, task, options) for task in tasks]
        rows = []
        for fut in futures:
            rows += fut.result()
    return rows


def _run_task(adata: AnnData, task: _Task, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Fit the task's settings on its fold's training cells, from one shared start; score them."""
    from .._exceptions import TrainingError
    from ..models import SpatialFactorization
    from ..models._training import share_training_start
    from ._analysis import baseline_deviance

    test_mask = np.zeros(adata.n_obs, dtype=bool)
    test_mask[task.test_idx] = True
    train, test = adata[~test_mask].copy(), adata[test_mask].copy()
    baseline = baseline_deviance(train.X, test.X)
    models, t_build = [], []
    for s in task.settings:
        t0 = time.perf_counter()
        models.append(
            SpatialFactorization(
                train,
                prior=s.prior,
                n_factors=s.n_factors,
                spatial_key=options["spatial_key"],
                group_key=options["group_key"],
                size_factors=options["size_factors"],
                prior_kwargs=dict(s.prior_kwargs) | dict(s.hyper),
                device=options["device"],
                random_state=options["seed"],
            )
        )
        t_build.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    share_training_start(models, init_iter=options["init_iter"])
    t_build[0] += time.perf_counter() - t0  # the shared start counts in the first setting's time
    rows = []
    for i, (s, model) in enumerate(zip(task.settings, models, strict=True)):
        t0 = time.perf_counter() - t_build[i]
        try:
            model.train(
                options["max_iter"],
                tol=options["tol"],
                learning_rate=options["learning_rate"],
                init_iter=options["init_iter"],
                progress_bar=False,
            )
            dev = _heldout(model, train, test, options["spatial_key"])
        except TrainingError as err:
            logg.warning(f"{_setting_label(s.prior, s.n_factors, dict(s.hyper))}, fold {task.fold}: {err}")
            dev = float("nan")
        rows.append(
            {
                "setting": s.index,
                "fold": task.fold,
                "n_train": int(train.n_obs),
                "n_test": int(test.n_obs),
                "heldout_deviance": dev,
                "baseline_deviance": baseline,
                "n_iter": len(model.history_),
                "converged": bool(model.converged),
                "fit_time_s": time.perf_counter() - t0,
            }
        )
    return rows


def _heldout(model: SpatialFactorization, train: AnnData, test: AnnData, spatial_key: str) -> float:
    """Held-out deviance: predicted from the coordinates, or (``pnmf``) from the nearest training cells."""
    from ._heldout import heldout_deviance

    if model.prior != "pnmf":
        return heldout_deviance(model, test)
    from scipy.spatial import cKDTree

    from ._analysis import _adata_counts, poisson_deviance_sparse

    mu, var = model.get_log_factors()
    k = min(PNMF_KNN, train.n_obs)
    _, nn = cKDTree(np.asarray(train.obsm[spatial_key], np.float64)).query(
        np.asarray(test.obsm[spatial_key], np.float64), k=k
    )
    nn = nn.reshape(test.n_obs, k)
    expected = np.exp(mu[nn].mean(axis=1) + 0.5 * var[nn].mean(axis=1))
    Y = _adata_counts(test, None)
    per_cell, _ = poisson_deviance_sparse(
        Y, expected, model.get_loadings(), model.size_factors(test, Y), offsets=model.gene_offsets_of(test)
    )
    return float(per_cell.sum() / (test.n_obs * test.n_vars))


# ---------------------------------------------------------------------------- results
def _table(rows: list[dict[str, Any]], settings: list[_Setting], hyper_names: list[str]) -> pd.DataFrame:
    rows = sorted(rows, key=lambda r: (r["setting"], r["fold"]))
    records = []
    for r in rows:
        s = settings[r.pop("setting")]
        hyper = dict(s.hyper)
        records.append(
            {"prior": s.prior, "n_factors": s.n_factors, **{k: hyper.get(k) for k in hyper_names}, **r}
        )
    df = pd.DataFrame.from_records(records, columns=[*SETTING_COLUMNS, *hyper_names, *RESULT_COLUMNS])
    for k in hyper_names:  # numbers as floats (NaN where the prior lacks the option), else strings
        values = [v for v in df[k] if v is not None]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            df[k] = df[k].astype(np.float64)
        else:
            df[k] = ["" if v is None else str(v) for v in df[k]]
    df["prior"] = df["prior"].astype(str)
    for c in ("n_factors", "fold", "n_train", "n_test", "n_iter"):
        df[c] = df[c].astype(np.int64)
    df["converged"] = df["converged"].astype(bool)
    df.index = pd.RangeIndex(len(df)).astype(str)  # string index: h5ad writes it as is
    return df


def _setting_columns(df: pd.DataFrame) -> list[str]:
    end = list(df.columns).index("fold")
    return list(df.columns[:end])


def _setting_means(df: pd.DataFrame) -> pd.DataFrame:
    """Mean held-out and baseline deviance of each setting over the folds, in the table's order."""
    cols = _setting_columns(df)
    key = df[cols].astype(str).agg("|".join, axis=1)
    order = list(dict.fromkeys(key))
    g = df.groupby(key, sort=False)
    out = g[cols].first()
    out["heldout_deviance"] = g["heldout_deviance"].mean()
    out["baseline_deviance"] = g["baseline_deviance"].mean()
    out["n_folds"] = g["fold"].size()
    return out.loc[order].reset_index(drop=True)


def _best(rows: list[dict[str, Any]], settings: list[_Setting]) -> dict[str, Any]:
    """The setting with the lowest mean held-out deviance over the folds (the first of ties), with its options."""
    by_setting: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_setting.setdefault(r["setting"], []).append(r)
    means = {
        i: (
            np.nanmean([r["heldout_deviance"] for r in rs]),
            float(np.mean([r["baseline_deviance"] for r in rs])),
        )
        if not all(np.isnan(r["heldout_deviance"]) for r in rs)
        else (np.nan, np.nan)
        for i, rs in sorted(by_setting.items())
    }
    finite = {i: m for i, m in means.items() if np.isfinite(m[0])}
    if not finite:
        raise RuntimeError("Every fit of the grid failed (non-finite ELBO); see the warnings above.")
    i = min(finite, key=lambda k: (finite[k][0], k))
    s = settings[i]
    return {
        "prior": s.prior,
        "n_factors": int(s.n_factors),
        "prior_kwargs": dict(s.hyper),  # the values as given (not as the table's column types)
        "heldout_deviance": float(finite[i][0]),
        "baseline_deviance": float(finite[i][1]),
    }


def _setting_label(prior: str, n_factors: int, hyper: Mapping[str, Any]) -> str:
    parts = [f"{prior}, L={n_factors}"] + [
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in hyper.items()
    ]
    return ", ".join(parts)


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    """Values h5ad can store: ``None`` left out, nested dicts kept."""
    out = {}
    for k, v in d.items():
        if v is None:
            continue
        out[k] = _plain(v) if isinstance(v, dict) else v
    return out
