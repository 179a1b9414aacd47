"""``sfact.tl.analyze``: every analysis of a fitted model, in cell batches, written to AnnData."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .. import _logging as logg
from .._keys import Keys, check_key_added
from .._spatialdata import resolve_table_copy
from .._transaction import fit_transaction
from .._utils import view_to_actual

INDUCING_POINTS = "inducing_points"
"""Entry of ``adata.uns[key]`` with the inducing points (:func:`inducing_point_record`)."""

if TYPE_CHECKING:
    from collections.abc import Callable

    import pandas as pd
    from anndata import AnnData

    from ..models import SpatialFactorization


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    """Drop ``None`` values and turn containers into h5ad-friendly plain values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if v is None:
            continue
        if isinstance(v, dict):
            out[k] = _plain(v)
        elif isinstance(v, list | tuple):
            if len(v) == 0:
                continue
            out[k] = np.asarray(v)
        elif isinstance(v, np.generic):
            out[k] = v.item()
        else:
            out[k] = v
    return out


@dataclass(frozen=True)
class LogFactors:
    """Log-factors of all cells and the Moran's I of their factors, in the model's factor order."""

    mu: np.ndarray
    """Posterior means of the log-factors (n_obs, n_factors)."""
    var: np.ndarray
    """Posterior variances of the log-factors (n_obs, n_factors)."""
    moran: pd.DataFrame
    """Moran's I of ``exp(mu)``, indexed by factor name."""
    order: np.ndarray
    """The permutation applied to the model (``order[k]``: old index of factor k); identity if none."""


def _log_factors(
    adata: AnnData,
    model: SpatialFactorization,
    *,
    n_neighs: int,
    batch_size: int,
    marginals: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """``(mu, var, moran)`` of the cells of ``adata`` in the model's current factor order.

    ``marginals``: their ``(mu, var)`` when already computed (e.g. by
    :func:`sfact.tl._heldout.split_log_factors`).
    """
    from .._keys import factor_names
    from .._utils import get_coordinates
    from ._analysis import morans_i

    if marginals is None:
        mu, var = model.get_log_factors(None if adata is model.adata else adata, batch_size=batch_size)
    else:
        mu, var = marginals
    coords = (
        _moran_coords(adata, model)
        if model.setup.n_sample > 1
        else get_coordinates(adata, model.setup.spatial_key)
    )
    moran = morans_i(np.exp(mu), coords, names=factor_names(model.n_factors), n_neighs=n_neighs)
    return mu, var, moran


def _moran_coords(adata: AnnData, model: SpatialFactorization) -> np.ndarray:
    """Coordinates whose nearest-neighbour graph stays within each sample.

    The scaled coordinates (every sample from its own corner), each sample moved along the first
    axis by ten times the largest extent: Moran's I is then pooled over the samples' own graphs.
    """
    setup = model.setup
    X = setup.scaled_coords(adata)
    codes = setup.sample_codes(adata)
    shift = 10.0 * max(float(np.ptp(X, axis=0).max()), 1.0)
    X = X.copy()
    X[:, 0] += codes * shift
    return X


def order_by_moran(
    model: SpatialFactorization,
    adata: AnnData | None = None,
    *,
    n_neighs: int = 6,
    batch_size: int = 10000,
    marginals: tuple[np.ndarray, np.ndarray] | None = None,
) -> LogFactors:
    """Order a freshly trained model's factors by descending Moran's I, in place.

    The one place the order is set: :func:`sfact.tl.fit` and the pipeline's ``train`` stage call
    it right after training, before anything is written or saved; :func:`sfact.tl.analyze`
    never reorders. The factors of all cells are computed (in batches), their Moran's I on the
    spatial graph of ``adata``, and :meth:`~sfact.models.SpatialFactorization.reorder_factors`
    applies the permutation (loadings, variational parameters, per-factor kernels together).

    Parameters
    ----------
    model
        A trained model; permuted in place.
    adata
        The cells for Moran's I (their coordinates under the model's ``spatial_key``); the
        model's training data when ``None``.
    n_neighs
        Neighbours per cell of the spatial graph.
    batch_size
        Cells per batch of the factors.
    marginals
        The log-factors ``(mu, var)`` of the cells of ``adata`` in the model's current order,
        when already computed (a fit with validation cells); computed when ``None``.

    Returns
    -------
    The log-factors and the Moran's I table in the new order (pass them on to
    :func:`compute_analysis` to save computing the factors again).
    """
    from ._analysis import moran_order

    adata = model.adata if adata is None else adata
    mu, var, moran = _log_factors(adata, model, n_neighs=n_neighs, batch_size=batch_size, marginals=marginals)
    order = moran_order(moran)
    if not np.array_equal(order, np.arange(len(order))):
        model.reorder_factors(order)
        names = list(moran.index)
        mu, var = mu[:, order], var[:, order]
        moran = moran.iloc[order].copy()
        moran.index = names
    return LogFactors(mu=mu, var=var, moran=moran, order=order)


@dataclass(frozen=True)
class Analysis:
    """Everything :func:`sfact.tl.analyze` computes, before it is written to an AnnData.

    Made by :func:`compute_analysis` (which changes neither the model nor the AnnData) and
    written by :func:`write_analysis`; the arrays are the values written (``float32`` where the
    slots are).
    """

    factors: np.ndarray
    """Factors ``exp(μ)`` (n_obs, n_factors), float32."""
    scales: np.ndarray
    """Posterior standard deviations ``σ`` of the log-factors (n_obs, n_factors), float32."""
    loadings: np.ndarray
    """Loadings (n_vars, n_factors), float32."""
    deviance_cell: np.ndarray
    """Poisson deviance per cell."""
    deviance_gene: np.ndarray
    """Poisson deviance per gene."""
    moran: pd.DataFrame
    """Moran's I table, indexed by factor name."""
    factor_names: list[str]
    """Names of the factors."""
    params: dict[str, Any]
    """The model's settings and the analysis'."""
    metrics: dict[str, Any]
    """Deviance, reconstruction error, ELBO, iterations, convergence, times."""
    history: dict[str, Any]
    """Training history, one list per recorded quantity."""
    gp: dict[str, Any]
    """Kernel hyperparameters (:meth:`~sfact.models.SpatialFactorization.gp_info`)."""
    samples: pd.DataFrame | None = None
    """With several samples: one row per sample (cells, deviance per entry, Moran's I per factor)."""
    inducing: dict[str, Any] | None = None
    """The SVGP priors' inducing points (:func:`inducing_point_record`); ``None`` for the other priors."""

    def uns(self, keys: Keys) -> dict[str, Any]:
        """The entry of ``adata.uns[key]`` (plain values; ``moranI`` a copy)."""
        out = {
            "params": self.params,
            "history": dict(self.history),
            "moranI": self.moran.copy(),
            "metrics": self.metrics,
            "factor_names": np.asarray(self.factor_names),
            "gp": self.gp,
            "keys": keys.as_dict(),
        }
        if self.samples is not None:
            out["samples"] = self.samples.copy()
        if self.inducing is not None:
            out[INDUCING_POINTS] = {
                k: v.copy() if isinstance(v, np.ndarray) else v for k, v in self.inducing.items()
            }
        return _plain(out)


def compute_analysis(
    adata: AnnData,
    model: SpatialFactorization,
    *,
    batch_size: int = 10000,
    n_neighs: int = 6,
    log_factors: LogFactors | None = None,
    step: Callable[[str], None] | None = None,
) -> Analysis:
    """Compute every analysis of ``model`` on the cells of ``adata``, changing neither.

    Parameters
    ----------
    adata
        The cells: the training data, or new cells with the model's genes.
    model
        A trained model; the results are in its factor order.
    batch_size
        Cells per batch.
    n_neighs
        Neighbours per cell of the spatial graph used for Moran's I.
    log_factors
        The log-factors and Moran's I of these cells in the model's current order (from
        :func:`order_by_moran`); computed when ``None``.
    step
        Called with the name of each step as it starts (progress).

    Returns
    -------
    The :class:`Analysis`.
    """
    from .._version import __version__
    from ._analysis import _adata_counts, poisson_deviance_sparse, reconstruction_error

    step = step or (lambda name: None)
    setup = model.setup
    step("factors")
    if log_factors is None:
        mu, var, moran = _log_factors(adata, model, n_neighs=n_neighs, batch_size=batch_size)
    else:
        mu, var, moran = log_factors.mu, log_factors.var, log_factors.moran
    step("Moran's I")
    W = model.get_loadings()
    Y = _adata_counts(adata, setup.layer)
    s = model.size_factors(adata, Y)
    expected = np.exp(mu + 0.5 * var)
    step("deviance")
    offsets = model.gene_offsets_of(adata)  # per-sample gene offsets, or None
    dev_cell, dev_gene = poisson_deviance_sparse(Y, expected, W, s, batch_size=batch_size, offsets=offsets)
    step("reconstruction error")
    recon = reconstruction_error(Y, expected, W, s, batch_size=batch_size, offsets=offsets)
    params = {
        "prior": setup.prior,
        "n_factors": setup.n_factors,
        "layer": setup.layer,
        "spatial_key": setup.spatial_key,
        "group_key": setup.group_key,
        "sample_key": setup.sample_key,
        "size_factors": setup.size_factors,
        "size_factor_reference": setup.size_factor_reference,
        "elbo_mode": setup.elbo_mode,
        "loadings_mode": setup.loadings_mode,
        "random_state": setup.seed,
        "device": model.device,
        "dtype": setup.dtype,
        "version": __version__,
        "analyze_batch_size": int(batch_size),
        **{
            k: v
            for k, v in model.train_info.items()
            if k not in ("n_iter", "converged", "train_time_s", "init_time_s")
        },
    }
    n_entries = adata.n_obs * adata.n_vars
    history = model.history_
    metrics = {
        "deviance": float(dev_cell.sum()),
        "deviance_per_entry": float(dev_cell.sum() / n_entries),
        "reconstruction_error": recon,
        "elbo_per_entry": float(history.elbo[-1]) if history.elbo else np.nan,
        "n_iter": len(history),
        "converged": bool(model.converged),
        "train_time_s": float(model.train_info.get("train_time_s", 0.0)),
        "init_time_s": float(model.train_info.get("init_time_s", 0.0)),
    }
    return Analysis(
        factors=np.exp(mu).astype(np.float32),
        scales=np.sqrt(var).astype(np.float32),
        loadings=W.astype(np.float32),
        deviance_cell=dev_cell,
        deviance_gene=dev_gene,
        moran=moran,
        factor_names=[str(n) for n in moran.index],
        params=params,
        metrics=metrics,
        history=dict(history.as_dict().items()),
        gp=model.gp_info(),
        samples=_sample_table(adata, model, np.exp(mu), dev_cell, n_neighs=n_neighs, names=list(moran.index))
        if setup.n_sample > 1
        else None,
        inducing=inducing_point_record(model),
    )


def inducing_point_record(model: SpatialFactorization) -> dict[str, Any] | None:
    """The inducing points of an SVGP prior as ``adata.uns[key]['inducing_points']`` stores them.

    Everything :func:`sfact.pl.inducing_points` needs without the model, in types an ``.h5ad``
    file stores as they are (no ``None``, no object arrays).

    Parameters
    ----------
    model
        A trained model.

    Returns
    -------
    ``None`` for priors without inducing points (``pnmf``, the LCGP priors); else a dict with
    ``coords`` (M, p) float32 in the data's coordinate units (:meth:`~sfact.models.SpatialFactorization.inducing_points`),
    and, for multi-group priors with groups, ``group_codes`` (M,) int64 (indices into
    ``group_names``), ``group_names`` (G,) str and ``group_key`` (str); with several
    samples ``samples`` (M,) str, each point's sample.
    """
    from .._constants import prior_family

    if prior_family(model.prior) != "svgp":
        return None
    coords, codes = model.inducing_points()
    out: dict[str, Any] = {"coords": np.asarray(coords, dtype=np.float32)}
    setup = model.setup
    if codes is not None and setup.group_categories is not None and setup.group_key is not None:
        out["group_codes"] = np.asarray(codes, dtype=np.int64)
        out["group_names"] = np.asarray([str(g) for g in setup.group_categories], dtype=str)
        out["group_key"] = str(setup.group_key)
    samples = model.inducing_point_samples()
    if samples is not None:
        out["samples"] = np.asarray([str(v) for v in samples], dtype=str)
    return out


def _sample_table(
    adata: AnnData,
    model: SpatialFactorization,
    factors: np.ndarray,
    dev_cell: np.ndarray,
    *,
    n_neighs: int,
    names: list[str],
) -> pd.DataFrame:
    """One row per sample: cells, deviance per entry, and Moran's I of each factor within the sample."""
    import pandas as pd

    from ._analysis import morans_i

    setup = model.setup
    labels = setup.sample_labels(adata)
    X = setup.scaled_coords(adata)
    rows = []
    for name in setup.sample_categories:
        cells = labels == name
        n = int(cells.sum())
        row: dict[str, Any] = {"n_obs": n}
        row["deviance_per_entry"] = float(dev_cell[cells].sum() / max(n * adata.n_vars, 1))
        if n >= 3:
            moran = morans_i(factors[cells], X[cells], names=names, n_neighs=n_neighs)["I"]
            row.update({f"moranI_{f}": float(moran[f]) for f in names})
        rows.append(row)
    table = pd.DataFrame(rows, index=pd.Index(list(setup.sample_categories), name=None))
    return table


def write_analysis(adata: AnnData, result: Analysis, *, key_added: str = "sfact") -> None:
    """Write an :class:`Analysis` to ``adata`` under ``key_added``, replacing what was there.

    Per-group loadings, enrichment and group-wise factors written earlier under the key are
    removed (they belong to another fit or order). Writing the same result twice gives the
    same AnnData.

    Parameters
    ----------
    adata
        The cells the analysis was computed on.
    result
        From :func:`compute_analysis`.
    key_added
        Base key of every slot written.
    """
    from ._groups import _drop_group_slots

    keys = Keys(key_added)
    _drop_group_slots(adata, keys)
    if keys.groupwise in adata.obsm:
        del adata.obsm[keys.groupwise]
    adata.obsm[keys.factors] = result.factors.copy()
    adata.obsm[keys.scales] = result.scales.copy()
    adata.varm[keys.loadings] = result.loadings.copy()
    adata.obs[keys.obs_deviance()] = result.deviance_cell
    adata.var[keys.var_deviance()] = result.deviance_gene
    adata.uns[keys.uns] = result.uns(keys)


def analyze(
    adata: AnnData,
    model: SpatialFactorization,
    *,
    key_added: str = "sfact",
    analyze_batch_size: int = 10000,
    group_key: str | Literal[False] | None = None,
    n_neighs: int = 6,
    n_top: int = 10,
    progress_bar: bool | None = None,
    table_key: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """(Re)compute every analysis of a fitted model and write it to ``adata``.

    Factors and scales of all cells are computed in batches of ``analyze_batch_size`` cells
    (the GP forward never holds all cells at once), in the model's factor order; the model is
    not changed. Models from :func:`sfact.tl.fit` and from the pipeline are already ordered by
    descending Moran's I (the order is set once, right after training). Deviance and
    reconstruction error touch only the non-zeros of the counts: no cells x genes matrix is
    formed. With groups (the model's ``group_key``, or ``group_key=``), per-group loadings and
    gene enrichment follow (:func:`sfact.tl.group_loadings`, :func:`sfact.tl.gene_enrichment`),
    as in :func:`sfact.tl.fit`. The inducing points of the SVGP priors are stored too, so
    :func:`sfact.pl.inducing_points` works without the model (also after ``write_h5ad``).

    Everything is computed before anything is written, and the writing (with the per-group
    steps) is one transaction: on any failure or Ctrl-C, ``adata`` is put back as it was.

    Parameters
    ----------
    adata
        The cells to analyse: the training data, or new cells with the model's genes.
    model
        A trained :class:`~sfact.models.SpatialFactorization` (left unchanged).
    key_added
        Base key of every slot written; slots written earlier under it are replaced. A key an
        ``.h5ad`` file cannot store (empty, ``'.'``, or containing ``'/'`` or NUL) is refused.
    analyze_batch_size
        Cells per batch.
    group_key
        Column of ``adata.obs`` for per-group loadings and gene enrichment; when ``None`` the
        model's (the ``group_key`` it was fitted with, e.g. recorded by :func:`sfact.pp.prepare`),
        as :func:`sfact.tl.fit` does; ``False`` leaves the group steps out. They are left out too
        when the model has no groups, or ``adata`` (new cells of a single-group prior) lacks the
        model's column.
    n_neighs
        Neighbours per cell of the spatial graph used for Moran's I.
    n_top
        Top enriched genes kept per factor and group.
    progress_bar
        Show the analysis steps' progress; defaults to :attr:`sfact.settings.progress_bar`.
    table_key
        With a ``spatialdata.SpatialData`` as ``adata``: the key of its table to use
        (``None`` for its only table); the results are written into that table, so
        ``sdata.write()`` keeps them. Without ``obsm[spatial_key]`` (the model's ``spatial_key``)
        in the table, the centroids of the shapes or labels it annotates are written there first
        (as squidpy finds them).
    copy
        Return a modified copy instead of writing to ``adata``; for a SpatialData, a deep copy of
        all of it (``spatialdata.deepcopy``, which loads its elements into memory) with the
        results in its table, the original left as it was.

    Returns
    -------
    ``None``, or a copy when ``copy=True`` (for a SpatialData, the SpatialData copy). Sets (with
    ``key = key_added``):

    ``adata.obsm['X_{key}']``, ``adata.obsm['X_{key}_scales']``
        Factors ``exp(μ)`` and posterior standard deviations ``σ`` (n_obs, n_factors).
    ``adata.varm['{key}_loadings']``
        Loadings (n_vars, n_factors).
    ``adata.obs['{key}_deviance']``, ``adata.var['{key}_deviance']``
        Poisson deviance per cell and per gene.
    ``adata.uns['{key}']``
        ``params``, ``history``, ``moranI``, ``metrics``, ``factor_names``, ``keys``, ``gp``;
        for the SVGP priors ``inducing_points`` (``coords`` in the data's units, float32; with
        groups ``group_codes``, ``group_names``, ``group_key``; with samples ``samples``); with
        groups also ``group_loadings`` and ``enrichment``.
    ``adata.varm['{key}_loadings_{group}']``
        With groups: per-group loadings (group names escaped: ``/`` is written ``%2F``;
        the keys are recorded in ``uns['{key}']['group_loadings']['varm_keys']``).

    Examples
    --------
    >>> model = sfact.models.SpatialFactorization.load("model_dir", adata)  # doctest: +SKIP
    >>> sfact.tl.analyze(adata, model)  # the model's group_key: enrichment too  # doctest: +SKIP
    """
    check_key_added(key_added)
    adata, sdata_copy = resolve_table_copy(
        adata, table_key, copy=copy, spatial_key=model.setup.spatial_key
    )  # a SpatialData's table (with copy=True: of a deep copy of it, written in place and returned)
    copy = copy and sdata_copy is None
    from ..models._newcells import check_new_cells

    check_new_cells(model, adata, purpose="analyze", reorder=False)  # genes, counts, coordinates, ...
    if group_key is False:
        group_key = None
    elif group_key is None:
        group_key = model.setup.group_key
        if group_key is not None and group_key not in adata.obs.columns:
            logg.info(f"    no `adata.obs[{group_key!r}]` (the model's groups): group loadings left out")
            group_key = None
    elif not isinstance(group_key, str):
        raise TypeError(
            f"`group_key` must be a column of `adata.obs`, None (the model's) or False (no groups), "
            f"received {group_key!r}."
        )
    if copy:
        adata = adata.copy()
    else:
        view_to_actual(adata)
    _analyze(
        adata,
        model,
        key_added=key_added,
        analyze_batch_size=analyze_batch_size,
        group_key=group_key,
        n_neighs=n_neighs,
        n_top=n_top,
        progress_bar=progress_bar,
    )
    return adata if copy else sdata_copy


def _check_batch_size(analyze_batch_size: int) -> None:
    if analyze_batch_size < 1:
        raise ValueError(f"`analyze_batch_size` must be positive, received {analyze_batch_size}.")


def _analyze(
    adata: AnnData,
    model: SpatialFactorization,
    *,
    key_added: str,
    analyze_batch_size: int,
    group_key: str | None,
    n_neighs: int,
    n_top: int,
    progress_bar: bool | None = None,
    log_factors: LogFactors | None = None,
) -> None:
    """Compute, then write, per-group loadings and enrichment (with ``group_key``) in one transaction."""
    from .._logging import progress_bar as progress_bar_
    from .._logging import set_status
    from .._settings import settings
    from ._groups import gene_enrichment, group_loadings

    _check_batch_size(analyze_batch_size)
    check_key_added(key_added)
    if group_key is not None and group_key not in adata.obs.columns:
        raise KeyError(
            f"`adata.obs[{group_key!r}]` not found: pass an existing `group_key` "
            f"(columns: {list(adata.obs.columns)})."
        )
    keys = Keys(key_added)
    start = logg.info(f"analysing {adata.n_obs} cells in batches of {analyze_batch_size}")
    show = settings.progress_bar if progress_bar is None else progress_bar
    bar = progress_bar_(total=5 if group_key is None else 7, desc="analysing", disable=not show)
    steps: list[str] = []

    def step(name: str) -> None:  # one tick per finished step
        if steps:
            bar.update()
        steps.append(name)
        set_status(bar, name)

    deep = (
        f"added\n    '{keys.factors}', '{keys.scales}' (adata.obsm)\n    '{keys.loadings}' (adata.varm)\n"
        f"    '{keys.obs_deviance()}' (adata.obs, adata.var)\n    '{keys.uns}' (adata.uns)"
    )
    try:
        result = compute_analysis(
            adata, model, batch_size=analyze_batch_size, n_neighs=n_neighs, log_factors=log_factors, step=step
        )
        # the per-group steps read the slots just written: all of it or none (Ctrl-C included)
        with fit_transaction(adata, keys):
            step("writing")
            write_analysis(adata, result, key_added=key_added)
            if group_key is not None:
                step("group loadings")
                group_loadings(
                    adata,
                    group_key=group_key,
                    key_added=key_added,
                    batch_size=analyze_batch_size,
                    progress_bar=show,
                )
                step("gene enrichment")
                gene_enrichment(adata, key_added=key_added, n_top=n_top)
                deep += f"\n    '{keys.group_loadings_prefix}*' (adata.varm)"
        bar.update()
    finally:
        bar.close()
    logg.info("    finished analysis", time=start, deep=deep)
