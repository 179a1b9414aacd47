"""Held-out evaluation: fit on most cells, predict the rest from their coordinates."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._utils import check_random_state

if TYPE_CHECKING:
    from anndata import AnnData

    from ..models import SpatialFactorization


def heldout_split(
    adata: AnnData,
    *,
    fraction: float = 0.05,
    random_state: int | np.random.Generator | None = 0,
    table_key: str | None = None,
) -> tuple[AnnData, AnnData]:
    """Split cells at random into a training and a held-out set.

    The held-out cells are the first ``round(fraction · N)`` of
    ``numpy.random.default_rng(random_state).permutation(N)`` — the protocol of sfact's
    benchmarks.

    Parameters
    ----------
    adata
        All cells.
    fraction
        Fraction of cells held out (0 < fraction < 1).
    random_state
        Seed or :class:`numpy.random.Generator`.
    table_key
        With a ``spatialdata.SpatialData`` as ``adata``: the key of its table to split (``None``
        for its only table; a key it does not hold raises a :class:`KeyError` naming its
        tables). Without ``obsm['spatial']`` in the table, the centroids of the shapes or labels
        it annotates are written there first, so both parts have coordinates.

    Returns
    -------
    ``(train, test)`` copies (AnnData), each in the original cell order.

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.osmfish()
    >>> train, test = sfact.tl.heldout_split(adata)
    >>> test.n_obs
    242
    """
    from .._spatialdata import resolve_table

    adata = resolve_table(adata, table_key)  # a SpatialData's table
    test = heldout_mask(adata.n_obs, fraction=fraction, random_state=random_state)
    return adata[~test].copy(), adata[test].copy()


def heldout_mask(
    n_obs: int, *, fraction: float, random_state: int | np.random.Generator | None
) -> np.ndarray:
    """The held-out cells of :func:`heldout_split` as a boolean mask of length ``n_obs``."""
    if not 0 < fraction < 1:
        raise ValueError(f"`fraction` must be in (0, 1), received {fraction}.")
    n_test = round(fraction * n_obs)
    if n_test < 1 or n_test >= n_obs:
        raise ValueError(f"`fraction={fraction}` of {n_obs} cells leaves no training or no held-out cells.")
    perm = check_random_state(random_state).permutation(n_obs)
    test = np.zeros(n_obs, dtype=bool)
    test[perm[:n_test]] = True
    return test


def heldout_deviance(
    model: SpatialFactorization, adata_test: AnnData, *, batch_size: int = 10000, table_key: str | None = None
) -> float:
    """Mean Poisson deviance per matrix entry of held-out cells predicted by ``model``.

    The rates are ``E[λ_nd] = s_n Σ_l W_dl E[e^{F_nl}]`` with the factors predicted from the
    held-out cells' coordinates (and groups) for the spatial priors, or fitted to their counts
    with the loadings fixed for ``pnmf``; with ``size_factors="total"`` each held-out cell's own
    total count gives ``s_n`` (relative to the training median, as in training).

    For ``pnmf``, which has no model of space, the held-out cells' factors are fitted to the very
    counts being scored, so its value checks a fit but is *not* a prediction and cannot be
    ranked against the spatial priors (a warning says so); the benchmarks give ``pnmf`` the mean
    log-factors of each held-out cell's nearest training cells instead.

    Parameters
    ----------
    model
        A trained model.
    adata_test
        Held-out cells with counts, coordinates and (multi-group priors) groups; checked before
        anything is computed: the model's genes (in any order; missing or extra genes raise,
        naming them), counts without NaN, infinite or negative values, coordinates, groups and
        samples seen in training, at least one cell.
    batch_size
        Cells per batch of the GP predictive.
    table_key
        With a ``spatialdata.SpatialData`` as ``adata_test``: the key of its table of held-out
        cells (``None`` for its only table; a key it does not hold raises a :class:`KeyError`
        naming its tables). Without ``obsm`` coordinates (the model's ``spatial_key``) in the
        table, the centroids of the shapes or labels it annotates are written there first.

    Returns
    -------
    ``2 Σ [y log(y/λ) − (y − λ)] / (n_test · D)``.

    Examples
    --------
    >>> train, test = sfact.tl.heldout_split(adata)  # doctest: +SKIP
    >>> model = sfact.models.SpatialFactorization(train, prior="svgp").train()  # doctest: +SKIP
    >>> sfact.tl.heldout_deviance(model, test)  # doctest: +SKIP
    """
    from .._spatialdata import resolve_table
    from ..models._inference import marginals
    from ..models._newcells import check_new_cells
    from ._analysis import _adata_counts, poisson_deviance_sparse

    adata_test = resolve_table(adata_test, table_key, spatial_key=model.setup.spatial_key)  # SpatialData
    # before anything is computed: the model's genes (aligned to its order), finite non-negative
    # counts, coordinates, groups and samples
    adata_test = check_new_cells(model, adata_test, purpose="score", what="adata_test").adata
    if model.prior == "pnmf":
        from scanpy import logging as logg

        logg.warning(
            "`heldout_deviance` with `pnmf` fits the held-out cells' factors to the counts it scores: "
            "a check of the fit, not a prediction comparable with the spatial priors."
        )
    mu, var = marginals(model, adata_test, batch_size, checked=True)
    Y = _adata_counts(adata_test, model.setup.layer)
    s = model.size_factors(adata_test, Y)
    per_cell, _ = poisson_deviance_sparse(
        Y, np.exp(mu + 0.5 * var), model.get_loadings(), s, offsets=model.gene_offsets_of(adata_test)
    )
    return float(per_cell.sum() / (adata_test.n_obs * adata_test.n_vars))


def knn_deviance(
    train: AnnData,
    test: AnnData,
    *,
    n_neighbors: int = 20,
    shrink: float = 0.01,
    layer: str | None = None,
    spatial_key: str = "spatial",
    table_key: str | None = None,
) -> float:
    """Mean Poisson deviance per entry of a kNN composition smoother on held-out cells.

    A reference that any spatial model should beat: each held-out cell's gene composition is
    the average composition (counts / total) of its ``n_neighbors`` nearest training cells in
    ``obsm[spatial_key]``, mixed with the training data's overall gene share,
    ``q_nd = (1 − shrink) · mean_k(c_kd) + shrink · share_d`` (floored at ``1e-12``), and its
    rates are ``λ_nd = t_n q_nd`` with ``t_n`` its own total count — as
    :func:`sfact.tl.baseline_deviance` does with the global share alone. Training cells without
    counts are left out. It needs no fitting: a nearest-neighbour query and one pass over the
    held-out cells in blocks.

    Parameters
    ----------
    train
        Training cells: counts and coordinates.
    test
        Held-out cells with the same genes, in the same order.
    n_neighbors
        Training cells averaged per held-out cell (at most the number of training cells with
        counts).
    shrink
        Weight of the global gene share, in ``[0, 1]``; it keeps the rates of genes absent
        from the neighbours positive.
    layer
        Layer with the counts; ``X`` when ``None``.
    spatial_key
        Key of the coordinates in ``obsm``.
    table_key
        With a ``spatialdata.SpatialData`` as ``train`` or ``test`` (or both): the key of its
        table (``None`` for its only one; a key it does not hold raises a :class:`KeyError`
        naming its tables). Without ``obsm[spatial_key]`` in a table, the centroids of the
        shapes or labels it annotates are written there first.

    Returns
    -------
    ``2 Σ [y log(y/λ) − (y − λ)] / (n_test · D)``.

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.osmfish()
    >>> train, test = sfact.tl.heldout_split(adata)
    >>> round(sfact.tl.knn_deviance(train, test, n_neighbors=20), 2)
    5.68
    """
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    from .._spatialdata import is_spatialdata, resolve_table
    from .._utils import get_coordinates
    from ._analysis import _adata_counts

    if table_key is not None and not (is_spatialdata(train) or is_spatialdata(test)):
        resolve_table(train, table_key)  # raises: `table_key` is only for a SpatialData
    train, test = (  # a SpatialData's table
        resolve_table(x, table_key if is_spatialdata(x) else None, spatial_key=spatial_key)
        for x in (train, test)
    )
    if not isinstance(n_neighbors, int | np.integer) or n_neighbors < 1:
        raise ValueError(f"`n_neighbors` must be a positive integer, received {n_neighbors!r}.")
    if not 0 <= shrink <= 1:
        raise ValueError(f"`shrink` must be in [0, 1], received {shrink}.")
    from ..models._newcells import check_genes

    check_genes(
        train.var_names,
        test,
        what="test",
        reorder=False,
        reference="`train`",
        expected_name="train.var_names",
    )
    Ytr = sp.csr_matrix(_adata_counts(train, layer), dtype=np.float64)
    Yte = sp.csr_matrix(_adata_counts(test, layer), dtype=np.float64)
    tot_tr = np.asarray(Ytr.sum(1)).ravel()
    keep = tot_tr > 0
    if not keep.any():
        raise ValueError("`train` has no cell with counts: the kNN smoother needs training counts.")
    comp = sp.diags(1.0 / tot_tr[keep]) @ Ytr[keep]  # (n_keep, D) compositions, sparse
    share = np.asarray(Ytr.sum(0)).ravel()
    share = share / share.sum()
    k = int(min(n_neighbors, keep.sum()))
    tree = cKDTree(get_coordinates(train, spatial_key)[keep])
    _, nn = tree.query(get_coordinates(test, spatial_key), k=k)
    nn = np.asarray(nn).reshape(test.n_obs, k)
    n_test, D = Yte.shape
    total = 0.0
    step = max(1, 2_000_000 // max(D, 1))  # held-out cells per dense block
    for start in range(0, n_test, step):
        stop = min(start + step, n_test)
        b = stop - start
        avg = sp.csr_matrix(
            (np.full(b * k, 1.0 / k), nn[start:stop].ravel(), np.arange(0, b * k + 1, k)),
            shape=(b, comp.shape[0]),
        )
        q = np.maximum((1.0 - shrink) * (avg @ comp).toarray() + shrink * share[None, :], 1e-12)
        y = Yte[start:stop].toarray()
        lam = q * y.sum(1, keepdims=True)
        pos = y > 0
        total += 2.0 * (float((y[pos] * np.log(y[pos] / lam[pos])).sum()) - float((y - lam).sum()))
    return float(total / (n_test * D))


# ---------------------------------------------------------------------------- the guard of tl.fit
#: ``validation_fraction=None``: hold out this fraction ...
AUTO_VALIDATION_FRACTION = 0.05
#: ... when the data have at least this many cells (so at least 50 validation cells), else none
AUTO_VALIDATION_MIN_CELLS = 1000
#: neighbours of the kNN composition smoother recorded next to the model's validation deviance
VALIDATION_KNN_NEIGHBORS = 20
#: ``pnmf`` (no model of space): training cells whose log-factors are averaged per validation cell
PNMF_KNN_FACTORS = 10


def check_validation_fraction(validation_fraction: float | None) -> None:
    """Raise :class:`ValueError` unless ``validation_fraction`` is ``None`` or in ``[0, 0.5)``."""
    if validation_fraction is None:
        return
    ok = isinstance(validation_fraction, int | float | np.integer | np.floating) and not isinstance(
        validation_fraction, bool
    )
    if not ok or not np.isfinite(validation_fraction) or not 0 <= validation_fraction < 0.5:
        raise ValueError(
            f"`validation_fraction` must be in [0, 0.5) (0 turns the held-out check off, None "
            f"picks {AUTO_VALIDATION_FRACTION} with at least {AUTO_VALIDATION_MIN_CELLS} cells), "
            f"received {validation_fraction!r}."
        )


def resolve_validation_fraction(validation_fraction: float | None, n_obs: int) -> float:
    """The fraction actually held out: ``None`` → the automatic choice for ``n_obs`` cells."""
    check_validation_fraction(validation_fraction)
    if validation_fraction is None:
        return AUTO_VALIDATION_FRACTION if n_obs >= AUTO_VALIDATION_MIN_CELLS else 0.0
    return float(validation_fraction)


def validation_mask(
    adata: AnnData,
    fraction: float,
    *,
    random_state: int | np.random.Generator | None,
    group_key: str | None = None,
    sample_key: str | None = None,
) -> np.ndarray | None:
    """Boolean mask of the validation cells (``None`` when ``fraction`` is 0).

    The first ``round(fraction · N)`` cells of ``default_rng(random_state).permutation(N)``, as
    :func:`heldout_split` chooses them; with ``group_key`` (and ``sample_key``), the cells of a
    group (a sample, a group within a sample) that would have no training cell stay in training
    (the model must know every group and sample it predicts).
    """
    if fraction == 0:
        return None
    N = adata.n_obs
    n_val = round(fraction * N)
    if n_val < 1 or n_val >= N - 1:
        raise ValueError(
            f"`validation_fraction={fraction}` of {adata.n_obs} cells leaves no validation cell "
            "or too few training cells: pass a larger fraction, or 0 to turn the check off."
        )
    mask = heldout_mask(N, fraction=fraction, random_state=random_state)
    keys = [k for k in (group_key, sample_key) if k is not None and k in adata.obs.columns]
    if keys:
        labels = adata.obs[keys].astype(str).agg("\x1f".join, axis=1).to_numpy()
        trained = set(labels[~mask])
        mask &= np.array([g in trained for g in labels])
    return mask if mask.any() else None


def split_log_factors(
    model: SpatialFactorization, adata: AnnData, mask: np.ndarray, *, batch_size: int = 10000
) -> tuple[np.ndarray, np.ndarray]:
    """Log-factors ``(mu, var)`` of every cell of ``adata`` for a model trained on ``adata[~mask]``.

    The training cells get their posterior marginals; the validation cells (``mask``) the
    model's factors of new cells (:meth:`~sfact.models.SpatialFactorization.get_log_factors`):
    predicted from their coordinates by the spatial priors, fitted to their counts with the
    loadings fixed by ``pnmf``.
    """
    mu_tr, var_tr = model.get_log_factors(batch_size=batch_size)
    if mu_tr.shape[0] != int((~mask).sum()):
        raise ValueError(
            f"The model was trained on {mu_tr.shape[0]} cells, the mask has {int((~mask).sum())} "
            "training cells."
        )
    mu_te, var_te = model.get_log_factors(adata[mask], batch_size=batch_size)
    mu = np.empty((adata.n_obs, mu_tr.shape[1]))
    var = np.empty_like(mu)
    mu[~mask], var[~mask] = mu_tr, var_tr
    mu[mask], var[mask] = mu_te, var_te
    return mu, var


def validation_metrics(
    model: SpatialFactorization,
    adata: AnnData,
    mask: np.ndarray,
    *,
    fraction: float,
    log_factors: tuple[np.ndarray, np.ndarray] | None = None,
    batch_size: int = 10000,
) -> dict[str, float | int | bool]:
    """The held-out check of a model trained on ``adata[~mask]``, scored on ``adata[mask]``.

    The model's validation deviance uses the validation cells' factors predicted from their
    coordinates (and groups) by the spatial priors; ``pnmf``, which has no model of space, gets
    the mean log-factors of each validation cell's ``PNMF_KNN_FACTORS`` nearest training cells
    (its factors fitted to the very counts being scored would not be a prediction). Next to it:
    :func:`sfact.tl.baseline_deviance` and :func:`knn_deviance` (``VALIDATION_KNN_NEIGHBORS``).

    Parameters
    ----------
    model
        Trained on ``adata[~mask]``.
    adata
        All cells.
    mask
        The validation cells.
    fraction
        The validation fraction asked for (recorded).
    log_factors
        ``(mu, var)`` of all cells from :func:`split_log_factors`, if at hand.
    batch_size
        Cells per batch of the GP predictive.

    Returns
    -------
    ``validation_fraction``, ``n_validation``, ``validation_deviance``,
    ``validation_baseline_deviance``, ``validation_knn_deviance`` (mean deviance per entry) and
    ``validation_beats_baseline``.
    """
    from .._constants import GP_PRIORS
    from ._analysis import _adata_counts, baseline_deviance, poisson_deviance_sparse

    layer, spatial_key = model.setup.layer, model.setup.spatial_key
    train, test = adata[~mask], adata[mask]
    Ytr, Yte = _adata_counts(train, layer), _adata_counts(test, layer)
    if model.prior in GP_PRIORS:
        if log_factors is None:
            mu, var = model.get_log_factors(test, batch_size=batch_size)
        else:
            mu, var = log_factors[0][mask], log_factors[1][mask]
    else:
        from scipy.spatial import cKDTree

        mu_tr, var_tr = (
            model.get_log_factors(batch_size=batch_size)
            if log_factors is None
            else (log_factors[0][~mask], log_factors[1][~mask])
        )
        k = min(PNMF_KNN_FACTORS, train.n_obs)
        setup = model.setup
        _, nn = cKDTree(setup.scaled_coords(train)).query(setup.scaled_coords(test), k=k)
        nn = np.asarray(nn).reshape(test.n_obs, k)
        mu, var = mu_tr[nn].mean(axis=1), var_tr[nn].mean(axis=1)
    s = model.size_factors(test, Yte)
    per_cell, _ = poisson_deviance_sparse(
        Yte, np.exp(mu + 0.5 * var), model.get_loadings(), s, offsets=model.gene_offsets_of(test)
    )
    dev = float(per_cell.sum() / (test.n_obs * test.n_vars))
    base = baseline_deviance(Ytr, Yte)
    knn = knn_deviance(
        train, test, n_neighbors=VALIDATION_KNN_NEIGHBORS, layer=layer, spatial_key=spatial_key
    )
    return {
        "validation_fraction": float(fraction),
        "n_validation": int(mask.sum()),
        "validation_deviance": dev,
        "validation_baseline_deviance": float(base),
        "validation_knn_deviance": float(knn),
        "validation_beats_baseline": bool(dev < base),
    }


def guard_message(metrics: dict) -> str | None:
    """The warning (with advice) when the model does not beat the baseline; ``None`` when it does."""
    dev = metrics["validation_deviance"]
    base = metrics["validation_baseline_deviance"]
    if dev < base:
        return None
    return (
        f"The model does not beat the baseline on the {metrics['n_validation']} validation cells: "
        f"held-out deviance per entry {dev:.4g}, baseline (cell total x gene share) {base:.4g}, "
        f"kNN composition smoother {metrics['validation_knn_deviance']:.4g}. Its factors may not "
        "describe the tissue. Try another prior (e.g. `prior='svgp'`), fewer factors "
        "(`n_factors`), a longer lengthscale (`prior_kwargs={'lengthscale': ...}`, in the scaled "
        "units of `sfact.pp.prepare`), more iterations, or compare settings with "
        "`sfact.tl.select_model`."
    )
