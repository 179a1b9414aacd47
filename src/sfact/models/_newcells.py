"""The one gate of every entry point that hands cells to a trained model.

:func:`check_new_cells` runs before any computation in :meth:`~sfact.models.SpatialFactorization.predict`,
:meth:`~sfact.models.SpatialFactorization.transform`, ``get_factors`` / ``get_scales`` /
``get_log_factors`` with an AnnData, ``groupwise_factors``, ``fit_new_sample``,
:func:`sfact.tl.heldout_deviance`, :func:`sfact.tl.analyze` and :func:`sfact.tl.groupwise_factors`.
It checks what the computation will read, and nothing else:

- genes: the model's set (:func:`check_genes`, also used by :meth:`~sfact.models.ModelSetup.check_vars`,
  so by :meth:`~sfact.models.SpatialFactorization.load`): the same genes in another order are
  aligned to the model's order; missing or extra genes raise, naming them;
- counts: no NaN, infinite or negative values (a warning if not integers);
- size factors read from an ``obs`` column: present, positive and finite;
- coordinates: present, numeric, finite, with the training number of dimensions;
- groups and samples: present, no missing values, among those seen in training (an unseen
  sample points to ``fit_new_sample``; ``fit_new_sample`` accepts only unseen ones);
- at least one cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._constants import prior_family
from .._utils import check_counts, get_counts, slot_name

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from ._model import SpatialFactorization
    from ._setup import ModelSetup

__all__ = ["CheckedCells", "check_genes", "check_new_cells"]

#: what the cells are for, which decides what is read (see :func:`check_new_cells`)
Purpose = Literal["factors", "groupwise", "predict", "score", "analyze", "new_sample"]
_PURPOSES = ("factors", "groupwise", "predict", "score", "analyze", "new_sample")


def _few(values: Sequence[str], n: int = 5) -> str:
    values = list(values)
    return repr(values[:n])[:-1] + (f", ... ({len(values) - n} more)]" if len(values) > n else "]")


def check_genes(
    expected: Sequence[str],
    adata: AnnData,
    *,
    what: str = "adata",
    reorder: bool = True,
    reference: str = "the model",
    expected_name: str = "model.var_names",
) -> np.ndarray | None:
    """Check that ``adata`` has the genes ``expected``; the positions that align it to them.

    Parameters
    ----------
    expected
        The genes, in the reference order (a model's ``var_names``).
    adata
        The cells whose ``var_names`` are checked.
    what
        How ``adata`` is named in messages.
    reorder
        Accept the same genes in another order (and return the positions that align them);
        otherwise that raises too.
    reference
        How the owner of ``expected`` is named in messages.
    expected_name
        The expression that gives ``expected`` to the user (for the suggested fix).

    Returns
    -------
    ``None`` when the genes are ``expected`` in that order; otherwise (``reorder``) the positions
    ``idx`` with ``adata.var_names[idx] == expected``.

    Raises
    ------
    ValueError
        Missing or extra genes (named), duplicated gene names, or (``reorder=False``) the same
        genes in another order.
    """
    expected = [str(v) for v in expected]
    received = pd.Index([str(v) for v in adata.var_names])
    if len(received) == len(expected) and (received == pd.Index(expected)).all():
        return None
    head = f"Genes do not match {reference}: expected its {len(expected)} genes, `{what}` has {len(received)}"
    if not received.is_unique:
        dup = received[received.duplicated()].unique()
        raise ValueError(
            f"{head}, with duplicated names {_few(dup)}. Make them unique (`{what}.var_names_make_unique()`) "
            f"or keep one of each, then subset with `{what}[:, {expected_name}]`."
        )
    have, want = set(received), set(expected)
    missing = [g for g in expected if g not in have]
    extra = [g for g in received if g not in want]
    if missing:
        raise ValueError(
            f"{head}; missing {len(missing)}: {_few(missing)}"
            + (f"; extra {len(extra)}: {_few(extra)}" if extra else "")
            + f". Every gene of {reference} is needed: pass cells measured on `{expected_name}`"
            + (f" (the extra genes are dropped by `{what}[:, {expected_name}]`)." if extra else ".")
        )
    if extra:
        raise ValueError(
            f"{head}; extra {len(extra)}: {_few(extra)}. Drop them with `{what}[:, {expected_name}]`."
        )
    if not reorder:
        raise ValueError(
            f"{head}: the same genes in another order. Reorder with `{what}[:, {expected_name}]`."
        )
    return received.get_indexer(expected)


@dataclass(frozen=True)
class CheckedCells:
    """Cells that passed :func:`check_new_cells`.

    ``adata`` has the model's genes in the model's order: the AnnData passed in, or a view of it
    with its genes reordered (``gene_index``, the position of each model gene in the input).
    """

    adata: AnnData
    gene_index: np.ndarray | None = None

    def to_input_order(self, values: np.ndarray) -> np.ndarray:
        """Per-gene ``values`` (last axis in the model's gene order) in the input's gene order."""
        if self.gene_index is None:
            return values
        out = np.empty_like(values)
        out[..., self.gene_index] = values
        return out


def _needs(setup: ModelSetup, purpose: str, n_vars: int) -> dict[str, bool]:
    """What a computation of ``purpose`` reads from the cells (so what is checked)."""
    from_counts = prior_family(setup.prior) == "pnmf"  # pnmf: factors of new cells from their counts
    spatial = not from_counts
    counts = (
        from_counts
        or purpose in ("score", "analyze", "new_sample")
        or (purpose == "predict" and setup.size_factors == "total")
    )
    genes = counts or purpose == "predict" or n_vars > 0  # coordinates alone (no genes) for a spatial prior
    sf_column = (counts or purpose == "predict") and setup.size_factors not in (None, "total")
    # coordinates scaled as in training (the GP), or for Moran's I (analyze)
    scaled = (spatial and purpose != "new_sample") or (purpose == "analyze" and setup.n_sample > 1)
    coords = scaled or purpose == "analyze" or (purpose == "new_sample" and spatial)
    groups = spatial and setup.multigroup and setup.group_key is not None and purpose != "groupwise"
    samples = setup.sample_key is not None and (scaled or purpose == "new_sample")
    return {
        "genes": genes,
        "counts": counts,
        "sf_column": sf_column,
        "coords": coords,
        "groups": groups,
        "samples": samples,
    }


def check_new_cells(
    model: SpatialFactorization,
    adata: AnnData,
    *,
    purpose: Purpose = "factors",
    what: str = "adata",
    reorder: bool = True,
) -> CheckedCells:
    """Check the cells handed to a trained model, before any computation.

    Parameters
    ----------
    model
        A trained model.
    adata
        The cells.
    purpose
        ``"factors"`` (``get_factors``, ``transform``, ...), ``"groupwise"``, ``"predict"``,
        ``"score"`` (:func:`sfact.tl.heldout_deviance`), ``"analyze"`` (:func:`sfact.tl.analyze`)
        or ``"new_sample"`` (``fit_new_sample``): decides what is read, so what is checked. The
        genes are checked whenever they are read (counts, per-gene output) and, for the
        coordinate-only uses of a spatial prior, unless ``adata`` has no genes at all.
    what
        How ``adata`` is named in messages (the caller's parameter name).
    reorder
        Align the same genes in another order to the model's order (``False``: raise instead,
        for callers that write per-gene results into ``adata``).

    Returns
    -------
    The :class:`CheckedCells`.

    Raises
    ------
    ValueError
        0 cells; genes other than the model's; NaN, infinite or negative counts; non-numeric,
        non-finite or wrongly shaped coordinates; missing, unknown (or, for ``new_sample``,
        known) groups or samples; size factors that are not positive and finite.
    KeyError
        A missing layer, coordinates, group, sample or size-factor column.
    """
    if purpose not in _PURPOSES:  # pragma: no cover - internal
        raise ValueError(f"Unknown purpose {purpose!r}.")
    model._require_trained()
    setup = model.setup
    if adata.n_obs == 0:
        raise ValueError(f"`{what}` has 0 cells: pass at least one cell.")
    needs = _needs(setup, purpose, adata.n_vars)
    gene_index = None
    if needs["genes"]:
        gene_index = check_genes(setup.var_names, adata, what=what, reorder=reorder)
    if needs["counts"]:
        slot = slot_name(setup.layer).replace("adata", what, 1)
        check_counts(get_counts(adata, setup.layer), slot)
    if needs["sf_column"]:
        _check_size_factors(adata, setup.size_factors, what)
    if needs["coords"]:
        _check_coordinates(setup, adata, what)
    if needs["groups"]:
        _check_labels(adata, setup.group_key, "groups", what)
        setup.group_codes(adata)  # unknown groups raise, naming them
    if needs["samples"]:
        if purpose == "new_sample":
            _check_new_samples(setup, adata, what)
        else:
            _check_labels(adata, setup.sample_key, "samples", what)
            setup.sample_labels(adata)  # unseen samples raise, pointing at `fit_new_sample`
    aligned = adata if gene_index is None else adata[:, gene_index]
    return CheckedCells(adata=aligned, gene_index=gene_index)


def _check_coordinates(setup: ModelSetup, adata: AnnData, what: str) -> None:
    key = setup.spatial_key
    if key not in adata.obsm:
        raise KeyError(
            f"`{what}.obsm[{key!r}]` not found: the model reads the coordinates of new cells under its "
            f"`spatial_key` {key!r} (available: {list(adata.obsm.keys())})."
        )
    raw = adata.obsm[key]
    raw = raw.to_numpy() if isinstance(raw, pd.DataFrame) else raw
    try:
        coords = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{what}.obsm[{key!r}]` must hold numeric coordinates, received dtype {np.asarray(raw).dtype} "
            "that does not convert to numbers."
        ) from None
    n_dims = len(setup.scaling["offset"])
    if coords.ndim != 2 or coords.shape != (adata.n_obs, n_dims):
        raise ValueError(
            f"`{what}.obsm[{key!r}]` must be (n_obs, {n_dims}) like the training coordinates, "
            f"received shape {coords.shape}."
        )
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        raise ValueError(
            f"`{what}.obsm[{key!r}]` has {int(bad.sum())} cells with NaN or infinite coordinates; remove them "
            f"first (`{what}[np.isfinite({what}.obsm[{key!r}]).all(axis=1)]`)."
        )


def _check_labels(adata: AnnData, key: str, name: str, what: str) -> None:
    if key not in adata.obs.columns:
        raise KeyError(
            f"`{what}.obs[{key!r}]` ({name}) not found: the model needs the {name} of new cells in the "
            f"column it was trained with (columns: {list(adata.obs.columns)[:10]})."
        )
    n_missing = int(adata.obs[key].isna().sum())
    if n_missing:
        raise ValueError(
            f"`{what}.obs[{key!r}]` has {n_missing} cells without {name}: remove them or fill them in "
            f"with {name} the model was trained on."
        )


def _check_new_samples(setup: ModelSetup, adata: AnnData, what: str) -> None:
    sk = setup.sample_key
    if sk is None:
        raise ValueError(
            "The model has no samples (`sample_key`): predict new cells with `model.get_log_factors(adata)`."
        )
    _check_labels(adata, sk, "samples", what)
    labels = adata.obs[sk].astype(str).to_numpy()
    known = sorted(set(labels) & set(setup.sample_categories or ()))
    if known:
        raise ValueError(
            f"Samples {known[:5]} of `{what}.obs[{sk!r}]` were seen in training: predict their cells with "
            "`model.get_log_factors(adata)`."
        )


def _check_size_factors(adata: AnnData, column: str, what: str) -> None:
    if column not in adata.obs.columns:
        raise KeyError(
            f"`{what}.obs[{column!r}]` (the model's size factors) not found: new cells need their size "
            "factors in the column the model was trained with."
        )
    try:
        v = np.asarray(adata.obs[column], dtype=np.float64)
    except (TypeError, ValueError):
        v = np.array([np.nan])
    if not (np.isfinite(v).all() and (v > 0).all()):
        raise ValueError(f"`{what}.obs[{column!r}]` (the size factors) must be positive and finite.")
