"""``sfact.tl.fit``: build a :class:`~sfact.models.SpatialFactorization`, train it, write the results."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _logging as logg
from .._keys import Keys, check_key_added
from .._spatialdata import resolve_table_copy
from .._transaction import fit_transaction, transaction
from .._utils import view_to_actual

if TYPE_CHECKING:
    from anndata import AnnData

    from ..models import SpatialFactorization
    from ..models._model import ElboMode, LoadingsMode, PriorName


def fit(
    adata: AnnData,
    *,
    prior: PriorName = "mggp_svgp",
    n_factors: int = 10,
    layer: str | None = None,
    spatial_key: str = "spatial",
    group_key: str | None = None,
    sample_key: str | None = None,
    gene_offsets: bool | None = None,
    size_factors: str | None = "total",
    key_added: str = "sfact",
    max_iter: int = 1000,
    tol: float = 1e-4,
    learning_rate: float | None = None,
    batch_size: int | None = None,
    y_batch_size: int | None = None,
    elbo_mode: ElboMode = "lower-bound",
    loadings_mode: LoadingsMode = "multiplicative",
    prior_kwargs: dict[str, Any] | None = None,
    analyze_batch_size: int = 10000,
    n_neighs: int = 6,
    validation_fraction: float | None = None,
    save_model: str | os.PathLike | None = None,
    device: str | None = None,
    random_state: int | np.random.Generator | None = 0,
    progress_bar: bool | None = None,
    return_model: bool = False,
    table_key: str | None = None,
    copy: bool = False,
) -> AnnData | SpatialFactorization | tuple[AnnData, SpatialFactorization] | None:
    """Fit a spatial factorization and write factors, loadings and diagnostics to ``adata``.

    A thin wrapper: builds :class:`sfact.models.SpatialFactorization`, trains it, computes the
    factors of every cell in batches, orders the factors (in the model too) by descending
    Moran's I and writes the results (:func:`sfact.tl.analyze`).

    **All or nothing.** Nothing is written if training fails, and the writing (results,
    per-group loadings, enrichment, validation, ``save_model``) is one transaction: if any of it
    fails or is interrupted (Ctrl-C), ``adata`` is put back as it was before the call, so a
    failed re-fit under the same ``key_added`` keeps the previous fit intact.

    **The baseline guard.** With ``validation_fraction`` > 0 (by default 0.05 when there are at
    least 1000 cells), that fraction of the cells, drawn with ``random_state`` as
    :func:`sfact.tl.heldout_split` draws them, is held out: the model is trained on the other
    cells only and predicts the held-out ones from their coordinates (and groups). Their mean
    Poisson deviance per entry is recorded next to that of the baseline "cell total × gene
    share" (:func:`sfact.tl.baseline_deviance`) and of a kNN composition smoother
    (:func:`sfact.tl.knn_deviance`, 20 neighbours), and a warning with advice is issued when
    the model does not beat the baseline. ``pnmf``, which has no model of space, is scored with
    the mean log-factors of each held-out cell's 10 nearest training cells.
    The model is **not** refitted on all cells (that would double the cost): the final model is
    the one trained on the other cells, and the results of every cell are written, the
    held-out cells' factors being the model's factors of new cells (predicted from coordinates
    by the spatial priors, fitted to their counts with the loadings fixed by ``pnmf``).
    ``validation_fraction=0`` trains on all cells, exactly as without the guard.

    Parameters
    ----------
    adata
        Cells x genes with raw counts and coordinates (ideally after :func:`sfact.pp.prepare`).
    prior
        ``"pnmf"``, ``"svgp"``, ``"mggp_svgp"``, ``"lcgp"`` or ``"mggp_lcgp"``.
    n_factors
        Number of factors L.
    layer
        Layer with raw counts; ``adata.X`` when ``None``.
    spatial_key
        Key of the coordinates in ``adata.obsm``.
    group_key
        Column of ``adata.obs`` with the groups (multi-group priors); defaults to the one
        recorded by :func:`sfact.pp.prepare`.
    sample_key
        Column of ``adata.obs`` with the samples (tissue sections): shared loadings, one GP per
        sample (see :class:`~sfact.models.SpatialFactorization`); defaults to the one recorded by
        :func:`sfact.pp.prepare`. Moran's I is then computed within each sample.
    gene_offsets
        With several samples: a per-sample gene offset in the rates (on by default; see
        :class:`~sfact.models.SpatialFactorization`).
    size_factors
        ``None``, ``"total"`` or a column of ``adata.obs``; see
        :class:`~sfact.models.SpatialFactorization`.
    key_added
        Base key of every slot written. A key an ``.h5ad`` file cannot store (empty, ``'.'``, or
        containing ``'/'`` or NUL) is refused before anything runs.
    max_iter
        Maximum iterations (passes over the cells).
    tol
        Convergence tolerance on the smoothed relative ELBO change per iteration.
    learning_rate
        Adam learning rate; ``None`` uses 0.05 for ``pnmf`` and 0.1 for the GP priors.
    batch_size
        Cells per step (all when ``None``).
    y_batch_size
        Genes per step (all when ``None``).
    elbo_mode
        ``"lower-bound"``, ``"expanded"`` or ``"simple"``.
    loadings_mode
        ``"multiplicative"`` or ``"projected"``.
    prior_kwargs
        Extra arguments of the prior (see :class:`~sfact.models.SpatialFactorization`).
    analyze_batch_size
        Cells per batch when computing the factors of all cells.
    n_neighs
        Neighbours per cell of the spatial graph used for Moran's I.
    validation_fraction
        Fraction of the cells held out for the baseline guard, in ``[0, 0.5)``; ``0`` turns it
        off (the model is trained on all cells); ``None`` holds out 0.05 of the cells when
        there are at least 1000, none otherwise.
    save_model
        Directory to save the trained model to (see :meth:`~sfact.models.SpatialFactorization.save`).
        With validation cells the saved model is trained on the other cells: load it with
        ``SpatialFactorization.load(save_model)`` (its training inputs are saved) or with
        ``adata[~adata.obs['{key}_validation']]``.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    random_state
        Seed or :class:`numpy.random.Generator`.
    progress_bar
        Show training and analysis progress; defaults to :attr:`sfact.settings.progress_bar`.
    return_model
        Also return the trained :class:`~sfact.models.SpatialFactorization` (factors in the
        written order), to continue training (``model.train(...)``), predict new cells, save it,
        or pass it to :func:`sfact.tl.groupwise_factors`. Without it the model is not kept
        (everything :mod:`sfact.pl` and :mod:`sfact.get` need is in ``adata``, the inducing points
        included).
    table_key
        With a ``spatialdata.SpatialData`` as ``adata``: the key of its table to use
        (``None`` for its only table); the results are written into that table, so
        ``sdata.write()`` keeps them. Without ``obsm[spatial_key]`` in the table, the centroids
        of the shapes or labels it annotates are written there first (as squidpy finds them).
    copy
        Return a modified copy instead of writing to ``adata``; for a SpatialData, a deep copy of
        all of it (``spatialdata.deepcopy``, which loads its elements into memory) with the
        results in its table, the original left as it was.

    Returns
    -------
    ``None``; the copy with ``copy=True`` (for a SpatialData, the SpatialData copy); the model with
    ``return_model=True``; the tuple ``(copy, model)`` with both (the model's training data is then the copy, or its training
    cells when validation cells were held out). Sets (with ``key = key_added``):

    ``adata.obsm['X_{key}']``
        Factors ``exp(μ)`` (n_obs, n_factors), ordered by descending Moran's I.
    ``adata.obsm['X_{key}_scales']``
        Posterior standard deviations of the log-factors (n_obs, n_factors).
    ``adata.varm['{key}_loadings']``
        Non-negative loadings (n_vars, n_factors).
    ``adata.obs['{key}_deviance']`` and ``adata.var['{key}_deviance']``
        Poisson deviance per cell and per gene.
    ``adata.uns['{key}']``
        ``params`` (plain values), ``history`` (ELBO per entry, log-likelihood, KL, time per
        iteration), ``moranI`` (DataFrame with squidpy's columns, indexed by factor name),
        ``metrics`` (deviance, deviance per entry, reconstruction error, iterations,
        convergence, training time; with validation cells also ``validation_fraction``,
        ``n_validation``, ``validation_deviance``, ``validation_baseline_deviance``,
        ``validation_knn_deviance``, ``validation_beats_baseline``), ``factor_names``, ``keys``,
        and for the GP priors ``gp``
        (kernel, lengthscale, sigma, group_diff_param, num_inducing); for the SVGP priors
        ``inducing_points`` (``coords`` in the data's units; with groups ``group_codes``,
        ``group_names``, ``group_key``; with samples ``samples``). When the fit has groups
        (``group_key``, or the one recorded by :func:`sfact.pp.prepare`), also
        ``group_loadings`` and ``enrichment`` (see :func:`sfact.tl.gene_enrichment`).
    ``adata.varm['{key}_loadings_{group}']``
        When the fit has groups: each group's loadings (see :func:`sfact.tl.group_loadings`;
        ``%``, ``/`` and NUL in a group name are written ``%25``, ``%2F``, ``%00``, and the
        keys are recorded in ``uns['{key}']['group_loadings']['varm_keys']``).
    ``adata.obs['{key}_validation']``
        With validation cells: ``True`` for the cells held out of training.

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.osmfish()
    >>> sfact.pp.prepare(adata, group_key="ClusterName")
    >>> sfact.tl.fit(adata, prior="pnmf", n_factors=5, max_iter=100)  # doctest: +SKIP
    >>> adata.obsm["X_sfact"].shape  # doctest: +SKIP
    (4839, 5)
    >>> m = adata.uns["sfact"]["metrics"]  # doctest: +SKIP
    >>> m["validation_deviance"] < m["validation_baseline_deviance"]  # doctest: +SKIP
    True

    Keep the model to train on where the fit stopped, or for the model-level tools:

    >>> model = sfact.tl.fit(adata, max_iter=100, return_model=True)  # doctest: +SKIP
    >>> model.train(max_iter=200)  # continues; then write the results again  # doctest: +SKIP
    >>> sfact.tl.analyze(adata, model)  # doctest: +SKIP
    """
    from .._utils import check_in_memory, check_int
    from ..models import ModelSetup, SpatialFactorization
    from ._analyze import _analyze, _check_batch_size, order_by_moran
    from ._heldout import resolve_validation_fraction, validation_mask

    # every check of the arguments before anything is copied, split or trained
    check_key_added(key_added)
    # a SpatialData's table (with copy=True: of a deep copy of it, written in place and returned)
    adata, sdata_copy = resolve_table_copy(adata, table_key, copy=copy, spatial_key=spatial_key)
    copy = copy and sdata_copy is None
    fraction = resolve_validation_fraction(validation_fraction, adata.n_obs)
    _check_batch_size(analyze_batch_size)
    check_int(n_neighs, "n_neighs", minimum=1)  # Moran's I runs after training: check it before
    check_in_memory(adata)
    if save_model is not None:  # a folder that cannot take the model: say so before training
        from ..models._io import check_save_target

        check_save_target(save_model, overwrite=True)
    if copy:
        adata = adata.copy()
    mask = None
    if fraction > 0:
        gk = ModelSetup.effective_group_key(adata, group_key=group_key, spatial_key=spatial_key)
        sk = ModelSetup.effective_sample_key(adata, sample_key=sample_key, spatial_key=spatial_key)
        mask = validation_mask(adata, fraction, random_state=random_state, group_key=gk, sample_key=sk)
    model = SpatialFactorization(
        adata if mask is None else adata[~mask].copy(),
        prior=prior,
        n_factors=n_factors,
        layer=layer,
        spatial_key=spatial_key,
        group_key=group_key,
        size_factors=size_factors,
        elbo_mode=elbo_mode,
        loadings_mode=loadings_mode,
        prior_kwargs=prior_kwargs,
        device=device,
        random_state=random_state,
        sample_key=sample_key,
        gene_offsets=gene_offsets,
    )
    start = logg.info(f"fitting sfact ({prior}, {n_factors} factors)")
    model.train(
        max_iter=max_iter,
        tol=tol,
        learning_rate=learning_rate,
        batch_size=batch_size,
        y_batch_size=y_batch_size,
        device=device,
        progress_bar=progress_bar,
    )
    if not copy:
        view_to_actual(adata)
        if mask is None:
            model.adata = adata
    marginals = checks = None
    if mask is not None:
        from ._heldout import split_log_factors, validation_metrics

        marginals = split_log_factors(model, adata, mask, batch_size=analyze_batch_size)
        checks = validation_metrics(
            model, adata, mask, fraction=fraction, log_factors=marginals, batch_size=analyze_batch_size
        )
    # the one place the factor order is set: by descending Moran's I, before anything is written
    log_factors = order_by_moran(
        model, adata, n_neighs=n_neighs, batch_size=analyze_batch_size, marginals=marginals
    )
    keys = Keys(key_added)
    # one transaction: on any failure or Ctrl-C from here on, adata is put back as it was
    with fit_transaction(adata, keys):
        _analyze(
            adata,
            model,
            key_added=key_added,
            analyze_batch_size=analyze_batch_size,
            group_key=model.setup.group_key,
            n_neighs=n_neighs,
            n_top=10,
            progress_bar=progress_bar,
            log_factors=log_factors,
        )
        write_validation(adata, keys, mask, checks)
        if save_model is not None:
            model.save(save_model, overwrite=True)
    logg.info(
        "    finished",
        time=start,
        deep=(
            f"added\n    '{keys.factors}', '{keys.scales}' (adata.obsm)\n    '{keys.loadings}' (adata.varm)\n"
            f"    '{keys.uns}' (adata.uns)"
            + ("" if mask is None else f"\n    '{keys.obs_validation()}' (adata.obs)")
        ),
    )
    out = adata if copy else sdata_copy  # None, the AnnData copy or the SpatialData copy
    if return_model:
        return model if out is None else (out, model)
    return out


def write_validation(
    adata: AnnData, keys: Keys, mask: np.ndarray | None, checks: dict | None, *, guard: bool = True
) -> None:
    """Write the baseline guard's results after the analysis, and (``guard``) warn when the model loses.

    With ``mask`` ``None`` (no validation cells) only removes a validation column left by an
    earlier fit under the same key.
    """
    col = keys.obs_validation()
    if mask is None or checks is None:
        if col in adata.obs.columns:
            del adata.obs[col]
        return
    from .._utils import warn
    from ._heldout import guard_message

    adata.obs[col] = np.asarray(mask, dtype=bool)
    adata.uns[keys.uns]["metrics"].update(checks)
    if not guard:
        return
    logg.info(
        f"    held-out check on {checks['n_validation']} cells, deviance per entry: "
        f"model {checks['validation_deviance']:.4g}, baseline {checks['validation_baseline_deviance']:.4g}, "
        f"kNN smoother {checks['validation_knn_deviance']:.4g}"
    )
    message = guard_message(checks)
    if message is not None:
        warn(message)


def groupwise_factors(
    adata: AnnData,
    model: SpatialFactorization,
    *,
    groups: list[str] | None = None,
    key_added: str = "sfact",
    batch_size: int = 10000,
    table_key: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Each cell's factors as if it belonged to each group (multi-group priors).

    The GP predictive is evaluated at every cell's coordinates with its group set to ``g``, for
    each group ``g``: "what would this factor look like in cell type g".

    Parameters
    ----------
    adata
        Cells with coordinates (usually the training data).
    model
        A trained multi-group model (``mggp_svgp``), e.g. from
        :meth:`sfact.models.SpatialFactorization.load`.
    groups
        Groups to evaluate; all the model's groups when ``None``.
    key_added
        Base key of the slots written.
    batch_size
        Cells per batch of the GP predictive.
    table_key
        With a ``spatialdata.SpatialData`` as ``adata``: the key of its table to use
        (``None`` for its only table; a key it does not hold raises a :class:`KeyError` naming its
        tables); the results are written into it.
    copy
        Return a modified copy instead of writing to ``adata``; for a SpatialData, a deep copy of
        all of it (``spatialdata.deepcopy``, which loads its elements into memory) with the
        results in its table, the original left as it was.

    Returns
    -------
    ``None``, or a copy when ``copy=True`` (for a SpatialData, the SpatialData copy). Sets

    ``adata.obsm['X_{key}_groupwise']``
        (n_obs, n_groups, n_factors) factors ``exp(μ)`` with every cell assigned to each group.
    ``adata.uns['{key}']['groupwise_groups']``
        The group names along the second axis.

    Both are written together: on a failure nothing is.

    Examples
    --------
    >>> model = sfact.models.SpatialFactorization.load("model_dir")  # doctest: +SKIP
    >>> sfact.tl.groupwise_factors(adata, model)  # doctest: +SKIP
    """
    check_key_added(key_added)
    adata, sdata_copy = resolve_table_copy(
        adata, table_key, copy=copy, spatial_key=model.setup.spatial_key
    )  # a SpatialData's table (with copy=True: of a deep copy of it, written in place and returned)
    copy = copy and sdata_copy is None
    if copy:
        adata = adata.copy()
    else:
        view_to_actual(adata)
    F, names = model.groupwise_factors(adata, groups=groups, batch_size=batch_size)
    keys = Keys(key_added)
    F = np.transpose(F, (1, 0, 2)).astype(np.float32)
    with transaction(adata, uns_keys=[keys.uns]):
        adata.obsm[keys.groupwise] = F
        adata.uns.setdefault(keys.uns, {})["groupwise_groups"] = np.asarray(names)
    return adata if copy else sdata_copy
