"""Per-group loadings (refit ``W`` on each group's cells, factors fixed) and gene enrichment."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import _logging as logg
from .._keys import Keys
from .._spatialdata import resolve_table_copy
from .._utils import group_codes, view_to_actual
from ..get._view import FitView
from ._compat import KEY_ADDED_WHY, renamed_kwarg

if TYPE_CHECKING:
    from anndata import AnnData

_W_FLOOR = 1e-8  # the floor of the loadings in the fit (sfact._core.module)


# ---------------------------------------------------------------------------- array level
def refit_loadings(
    Y,
    mu: np.ndarray,
    var: np.ndarray,
    s: np.ndarray,
    W0: np.ndarray,
    *,
    max_iter: int = 100,
    tol: float = 1e-5,
    batch_size: int = 10000,
    prior_strength: float = 0.0,
    W_prior: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Loadings of the cells of ``Y`` with the factors fixed, by multiplicative KL-NMF updates.

    The update is the one the fit uses (the exact maximizer of the Jensen lower bound of the
    ELBO in ``W`` with ``q`` fixed)::

        W_dl <- W_dl · Σ_n (y_nd / r_nd) e^{μ_nl} / Σ_n s_n e^{μ_nl + σ²_nl/2},
        r_nd = Σ_l W_dl e^{μ_nl},

    so the loadings of the training cells are a fixed point of it. Only the non-zeros of ``Y``
    are touched (a sparse ``Qᵀ P`` product per step, in cell batches); no dense cells x genes
    matrix is formed.

    Parameters
    ----------
    Y
        (n, D) counts, sparse or dense.
    mu, var
        (n, L) posterior means and variances of the log-factors.
    s
        (n,) size factors.
    W0
        (D, L) starting loadings (usually the global ones).
    max_iter
        Maximum number of updates.
    tol
        Stop when the relative change ``‖ΔW‖_F / ‖W‖_F`` of an update falls below this.
    batch_size
        Cells per batch.
    prior_strength
        ``α``: with ``α > 0`` the result is the MAP estimate under ``W_dl ~ Gamma(α + 1, α / W⁰_dl)``
        (mode ``W⁰``, worth about ``α`` counts per loading), updated by
        ``W <- (W · Σ_n (y/r) e^{μ} + α) / (Σ_n s e^{μ+σ²/2} + α / W⁰)``. Loadings the group's
        counts barely determine then stay near ``W⁰`` instead of drifting with the number of
        updates, and the updates converge; ``W⁰`` itself is still a fixed point when it
        maximizes the likelihood.
    W_prior
        ``W⁰``, the prior's mode; ``W0`` when ``None``.

    Returns
    -------
    ``(W, n_iter)``: the (D, L) loadings and the number of updates made.
    """
    Y = sp.csr_matrix(Y, dtype=np.float64)
    Y.sum_duplicates()
    n = Y.shape[0]
    mu = np.asarray(mu, dtype=np.float64)
    # shift each factor's log-scale for stability; W absorbs it (the update is scale-equivariant)
    shift = mu.max(0) if n else np.zeros(mu.shape[1])
    P = np.exp(mu - shift)  # e^{μ} / e^{shift}
    den = (np.asarray(s, dtype=np.float64)[:, None] * np.exp(mu - shift + 0.5 * np.asarray(var))).sum(0)
    W = np.maximum(np.asarray(W0, dtype=np.float64) * np.exp(shift)[None, :], 0.0)
    W = np.maximum(W, _W_FLOOR * np.exp(shift)[None, :])
    floor = _W_FLOOR * np.exp(shift)[None, :]
    W0s = np.maximum(np.asarray(W0 if W_prior is None else W_prior, dtype=np.float64), _W_FLOOR)
    W0s = W0s * np.exp(shift)[None, :]
    lengths = np.diff(Y.indptr)
    P32 = P.astype(np.float32)  # the rates at the non-zeros in float32: half the memory traffic
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007
        acc = np.zeros_like(W)
        W32 = W.astype(np.float32)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            lo, hi = Y.indptr[start], Y.indptr[stop]
            if hi == lo:
                continue
            cols = Y.indices[lo:hi]
            Pn = np.repeat(P32[start:stop], lengths[start:stop], axis=0)  # (nnz_b, L)
            r = np.maximum(np.einsum("kl,kl->k", Pn, W32[cols]).astype(np.float64), 1e-300)
            q = sp.csr_matrix(
                (Y.data[lo:hi] / r, cols, Y.indptr[start : stop + 1] - lo), shape=(stop - start, Y.shape[1])
            )
            acc += q.T @ P[start:stop]
        if prior_strength > 0:
            # MAP under W_dl ~ Gamma(α + 1, α / W⁰_dl) (mode W⁰): (W·acc + α) / (den + α / W⁰)
            W_new = (W * acc + prior_strength) / (den[None, :] + prior_strength / W0s)
            W_new = np.maximum(W_new, floor)
        else:
            W_new = np.maximum(W * acc / np.maximum(den, 1e-300)[None, :], floor)
        change = np.linalg.norm(W_new - W) / max(np.linalg.norm(W), 1e-300)
        W = W_new
        if change < tol:
            break
    return W / np.exp(shift)[None, :], n_iter


def enrichment_log2fc(W_groups: np.ndarray, W: np.ndarray, *, pseudocount: float = 0.05) -> np.ndarray:
    """log2 fold change of row-normalized group loadings against the global ones.

    Parameters
    ----------
    W_groups
        (G, D, L) loadings of each group.
    W
        (D, L) global loadings.
    pseudocount
        Added to both row-normalized loadings (each gene's shares of the factors, in [0, 1]).

    Returns
    -------
    (G, D, L) ``log2((Wg_dl / Σ_l Wg_dl + pc) / (W_dl / Σ_l W_dl + pc))``.
    """
    W_groups = np.asarray(W_groups, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    share = W / np.maximum(W.sum(-1, keepdims=True), 1e-300)
    share_g = W_groups / np.maximum(W_groups.sum(-1, keepdims=True), 1e-300)
    return np.log2((share_g + pseudocount) / (share[None] + pseudocount))


# ---------------------------------------------------------------------------- AnnData level
def _writable(fit: FitView, copy: bool) -> FitView:
    """The fit in the AnnData to write into: a copy when ``copy``, else its own (a view made actual)."""
    if copy:
        return FitView(fit.adata.copy(), fit.keys)
    view_to_actual(fit.adata)
    return FitView(fit.adata, fit.keys)


def _drop_group_slots(adata: AnnData, keys: Keys) -> None:
    """Remove per-group loadings and enrichment written earlier under ``keys`` (stale after a refit)."""
    uns = adata.uns.get(keys.uns, {})
    info = uns.get(keys.group_loadings_info) if isinstance(uns, dict) else None
    if info is not None:
        for k in np.atleast_1d(info.get("varm_keys", [])):
            if str(k) in adata.varm:
                del adata.varm[str(k)]
    if isinstance(uns, dict):
        uns.pop(keys.group_loadings_info, None)
        uns.pop(keys.enrichment, None)


def _group_codes(
    adata: AnnData, group_key: str, groups: list[str] | None
) -> tuple[np.ndarray, list[int], list[str]]:
    if group_key not in adata.obs.columns:
        raise KeyError(
            f"`adata.obs[{group_key!r}]` not found: pass an existing `group_key` "
            f"(columns: {list(adata.obs.columns)})."
        )
    col = adata.obs[group_key]
    cat = col.astype("category").cat.remove_unused_categories()
    names = [str(c) for c in cat.cat.categories]
    codes = cat.cat.codes.to_numpy().astype(np.int64)  # -1 for missing
    names_sel = names if groups is None else [str(g) for g in groups]
    sel = group_codes(
        names_sel,
        names,
        unknown=lambda u: f"Unknown groups {u} in `adata.obs[{group_key!r}]`; groups are {names}.",
    )
    return codes, sel.tolist(), names_sel


@renamed_kwarg("key", "key_added", why=KEY_ADDED_WHY)
def group_loadings(
    adata: AnnData,
    *,
    group_key: str | None = None,
    key_added: str = "sfact",
    groups: list[str] | None = None,
    max_iter: int = 100,
    tol: float = 1e-5,
    min_cells: int = 10,
    prior_strength: float = 1.0,
    batch_size: int = 10000,
    progress_bar: bool | None = None,
    table_key: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Loadings of each group's cells with the factors fixed (how each cell type uses the factors).

    For every group, ``W`` is refitted on the group's cells by the multiplicative updates the fit
    uses (factors ``q(F)`` fixed, read from ``adata.obsm``), starting from the global loadings,
    with a weak prior centred on them (``prior_strength``).
    Works for every prior, also post hoc from any ``group_key`` for priors fitted without groups.
    Sparse throughout: memory scales with the non-zeros, never with cells x genes.

    Parameters
    ----------
    adata
        AnnData after :func:`sfact.tl.fit` (or :func:`sfact.tl.analyze`).
    group_key
        Column of ``adata.obs`` with the groups; the fit's ``group_key`` when ``None``.
    key_added
        The fit's ``key_added``: the loadings are read from and written under it. (Called
        ``key`` before; ``key=`` still works in this release, with a :class:`FutureWarning`.)
    groups
        Groups to refit; all groups when ``None``.
    max_iter
        Maximum multiplicative updates per group.
    tol
        Stop a group when the relative change of its loadings falls below this.
    min_cells
        Groups with fewer cells are skipped (with a note).
    prior_strength
        Weight ``α``, in counts per loading, of a Gamma prior centred on the global loadings
        ``W⁰``: the refit is the MAP estimate under ``W_dl ~ Gamma(α + 1, α / W⁰_dl)``; ``0``
        gives the plain maximum-likelihood refit. Without it, loadings a small group's counts
        barely determine keep drifting with every update (on osmFISH, log2 fold changes moved
        by up to 4 between 100 and 1,000 updates), so the result would depend on ``max_iter``;
        with 1 they agree to 0.003 on average.
    batch_size
        Cells per batch.
    progress_bar
        Show progress over the groups; defaults to :attr:`sfact.settings.progress_bar`.
    table_key
        With a ``spatialdata.SpatialData`` as ``adata``: the key of its table holding the results
        (``None`` for its only table; a key it does not hold raises a :class:`KeyError` naming its
        tables); they are written into that table.
    copy
        Return a modified copy instead of writing to ``adata``; for a SpatialData, a deep copy of
        all of it (``spatialdata.deepcopy``, which loads its elements into memory) with the
        results in its table, the original left as it was.

    Returns
    -------
    ``None``, or a copy when ``copy=True`` (for a SpatialData, the SpatialData copy). Sets
    (``key = key_added``; per-group slots written
    earlier under the key are replaced):

    ``adata.varm['{key}_loadings_{group}']``
        (n_vars, n_factors) loadings of each group (``%``, ``/``, NUL in a group name are written
        ``%25``, ``%2F``, ``%00``: distinct groups never share a key).
    ``adata.uns['{key}']['group_loadings']``
        ``group_key``, ``groups``, ``varm_keys``, ``n_cells`` and ``n_iter`` per group,
        ``max_iter``, ``tol``, ``prior_strength``.

    Examples
    --------
    >>> sfact.tl.fit(adata, prior="pnmf", n_factors=5)  # doctest: +SKIP
    >>> sfact.tl.group_loadings(adata, group_key="ClusterName")  # doctest: +SKIP
    >>> adata.varm["sfact_loadings_Microglia"].shape  # doctest: +SKIP
    (33, 5)
    """
    from ._analysis import _adata_counts

    # a SpatialData's table (with copy=True: of a deep copy of it, written in place and returned)
    adata, sdata_copy = resolve_table_copy(adata, table_key, copy=copy, spatial_key=None)
    copy = copy and sdata_copy is None
    fit = FitView.from_adata(adata, key_added, what="`sfact.tl.group_loadings`")
    W = np.asarray(fit.loadings, dtype=np.float64)  # the global loadings (raises when missing)
    if group_key is None:
        group_key = fit.group_key
        if group_key is None:
            raise ValueError(
                "The fit has no groups: pass `group_key=` naming a column of `adata.obs` "
                "(group loadings work post hoc for any grouping)."
            )
    group_key = str(group_key)
    if max_iter < 1:
        raise ValueError(f"`max_iter` must be positive, received {max_iter}.")
    codes, sel, names = _group_codes(adata, group_key, groups)
    fit = _writable(fit, copy)
    adata, keys = fit.adata, fit.keys
    start = logg.info(f"refitting loadings of {len(names)} groups of {group_key!r}")
    Y = _adata_counts(adata, fit.layer)
    s = fit.size_factors(Y)
    factors = np.asarray(fit.factors, dtype=np.float64)
    scales = np.asarray(fit.scales, dtype=np.float64)
    mu = np.log(np.maximum(factors, 1e-300))
    var = scales**2
    Y = sp.csr_matrix(Y)
    results: dict[str, tuple[np.ndarray, int, int]] = {}
    skipped = []
    from .._logging import progress_bar as progress_bar_
    from .._settings import settings

    show = settings.progress_bar if progress_bar is None else progress_bar
    for code, name in progress_bar_(
        list(zip(sel, names, strict=True)), desc="group loadings", disable=not show
    ):
        idx = np.flatnonzero(codes == code)
        if idx.size < min_cells:
            skipped.append(f"{name} ({idx.size})")
            continue
        Wg, n_iter = refit_loadings(
            Y[idx],
            mu[idx],
            var[idx],
            s[idx],
            W,
            max_iter=max_iter,
            tol=tol,
            batch_size=batch_size,
            prior_strength=prior_strength,
        )
        results[name] = (Wg, n_iter, idx.size)
    if skipped:
        logg.info(f"    skipped groups with fewer than {min_cells} cells: {', '.join(skipped)}")
    from .._transaction import fit_transaction

    varm_keys = [keys.group_loadings(name) for name in results]
    done = list(results)
    with fit_transaction(adata, keys):  # the old groups' slots go and the new come, or nothing changes
        _drop_group_slots(adata, keys)
        for k, (Wg, _, _) in zip(varm_keys, results.values(), strict=True):
            adata.varm[k] = Wg.astype(np.float32)
        adata.uns[keys.uns][keys.group_loadings_info] = {
            "group_key": group_key,
            "groups": np.asarray(done, dtype=object).astype(str),
            "varm_keys": np.asarray(varm_keys, dtype=object).astype(str),
            "n_cells": np.asarray([results[g][2] for g in done], dtype=np.int64),
            "n_iter": np.asarray([results[g][1] for g in done], dtype=np.int64),
            "max_iter": int(max_iter),
            "tol": float(tol),
            "prior_strength": float(prior_strength),
        }
    logg.info(
        "    finished",
        time=start,
        deep=f"added {len(varm_keys)} '{keys.group_loadings_prefix}*' (adata.varm)",
    )
    return adata if copy else sdata_copy


@renamed_kwarg("key", "key_added", why=KEY_ADDED_WHY)
def gene_enrichment(
    adata: AnnData,
    *,
    group_key: str | None = None,
    key_added: str = "sfact",
    n_top: int = 10,
    pseudocount: float = 0.05,
    min_counts: int = 10,
    table_key: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Gene enrichment per factor and group: log2 fold change of group against global loadings.

    Each gene's loadings are row-normalized (its shares of the factors); the enrichment of gene
    ``d`` on factor ``l`` in group ``g`` is ``log2((share_g + pc) / (share + pc))``: positive when
    the group's expression of the gene is attributed to the factor more than overall. The
    per-group loadings come from :func:`group_loadings`, which is run first when they are
    missing or were computed for another ``group_key``.

    Parameters
    ----------
    adata
        AnnData after :func:`sfact.tl.fit`.
    group_key
        Column of ``adata.obs`` with the groups; that of existing group loadings, else the fit's,
        when ``None``.
    key_added
        The fit's ``key_added``: the loadings are read from and the enrichment written under it.
        (Called ``key`` before; ``key=`` still works in this release, with a :class:`FutureWarning`.)
    n_top
        Top enriched genes kept per factor and group in the ``top_genes`` table.
    pseudocount
        Added to both shares before the ratio. Shares near 0 are noisy (a gene a factor barely
        uses); without it they give fold changes of ±10 that drown the real differences. With
        0.05 a gene must move a visible part of its expression to reach ``|log2fc| > 1``.
    min_counts
        Genes with fewer total counts in a group get ``NaN`` (no evidence either way).
    table_key
        With a ``spatialdata.SpatialData`` as ``adata``: the key of its table holding the results
        (``None`` for its only table; a key it does not hold raises a :class:`KeyError` naming its
        tables); they are written into that table.
    copy
        Return a modified copy instead of writing to ``adata``; for a SpatialData, a deep copy of
        all of it (``spatialdata.deepcopy``, which loads its elements into memory) with the
        results in its table, the original left as it was.

    Returns
    -------
    ``None``, or a copy when ``copy=True`` (for a SpatialData, the SpatialData copy). Sets
    (``key = key_added``)
    ``adata.uns['{key}']['enrichment']`` with

    ``log2fc``
        (n_groups, n_vars, n_factors) float array.
    ``groups``, ``genes``, ``factor_names``
        The labels of its axes.
    ``top_genes``
        DataFrame with columns ``group``, ``factor``, ``rank``, ``gene``, ``log2fc``: the
        ``n_top`` most enriched genes (``log2fc > 0``) per group and factor.
    ``group_key``, ``pseudocount``, ``min_counts``
        The settings used.

    When :func:`group_loadings` is run first (no per-group loadings under the key, or ones for
    another ``group_key``), also what it sets:

    ``adata.varm['{key}_loadings_{group}']``
        (n_vars, n_factors) loadings of each group.
    ``adata.uns['{key}']['group_loadings']``
        The groups, their ``varm`` keys, cell counts and iterations (see :func:`group_loadings`).

    Examples
    --------
    >>> sfact.tl.gene_enrichment(adata, group_key="ClusterName")  # doctest: +SKIP
    >>> adata.uns["sfact"]["enrichment"]["top_genes"].head()  # doctest: +SKIP
    """
    from ._analysis import _adata_counts

    # a SpatialData's table (with copy=True: of a deep copy of it, written in place and returned)
    adata, sdata_copy = resolve_table_copy(adata, table_key, copy=copy, spatial_key=None)
    copy = copy and sdata_copy is None
    fit = FitView.from_adata(adata, key_added, what="`sfact.tl.gene_enrichment`")
    W = np.asarray(fit.loadings, dtype=np.float64)  # the global loadings (raises when missing)
    info = fit.group_loadings_info
    fit = _writable(fit, copy)
    adata, keys = fit.adata, fit.keys
    if info is None or (group_key is not None and str(info["group_key"]) != str(group_key)):
        group_loadings(adata, group_key=group_key, key_added=key_added)
        info = fit.group_loadings_info
    group_key = str(info["group_key"])
    Wg, groups = fit.stacked_group_loadings()
    lfc = enrichment_log2fc(Wg, W, pseudocount=pseudocount)
    # genes without counts in a group carry no evidence: their refitted shares are meaningless
    Y = sp.csr_matrix(_adata_counts(adata, fit.layer))
    col = adata.obs[group_key].astype(str).to_numpy()
    for k, g in enumerate(groups):
        totals = np.asarray(Y[col == g].sum(0)).ravel()
        lfc[k, totals < min_counts, :] = np.nan
    names = fit.factor_names
    genes = np.asarray(adata.var_names, dtype=object).astype(str)
    rows = []
    for k, g in enumerate(groups):
        for j, fname in enumerate(names):
            v = lfc[k, :, j]
            ok = np.flatnonzero(np.isfinite(v) & (v > 0))
            top = ok[np.argsort(-v[ok], kind="stable")[:n_top]]
            for rank, d in enumerate(top):
                rows.append((g, fname, rank, genes[d], float(v[d])))
    top_df = pd.DataFrame(rows, columns=["group", "factor", "rank", "gene", "log2fc"])
    top_df["rank"] = top_df["rank"].astype(np.int64)
    adata.uns[keys.uns][keys.enrichment] = {
        "log2fc": lfc.astype(np.float32),
        "groups": np.asarray(groups, dtype=object).astype(str),
        "genes": genes,
        "factor_names": np.asarray(names, dtype=object).astype(str),
        "top_genes": top_df,
        "group_key": group_key,
        "pseudocount": float(pseudocount),
        "min_counts": int(min_counts),
    }
    return adata if copy else sdata_copy
