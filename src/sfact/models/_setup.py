""":class:`ModelSetup`: everything that defines a model before training, typed and frozen."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._constants import (
    ELBO_MODES,
    LOADINGS_MODES,
    PRIOR_NAMES,
    check_choice,
    is_multigroup,
    prior_family,
)
from .._scaling import apply_scaling, fit_scaling
from .._utils import (
    MISSING_LABELS,
    check_counts,
    check_in_memory,
    check_int,
    get_coordinates,
    get_counts,
    group_codes,
    slot_name,
    warn,
)

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["ModelSetup"]

_PREPARE_KEY = "sfact_prepare"  # sfact.pp.prepare's record in adata.uns
#: distance between the kernel coordinates of two samples: with the multi-group kernel's
#: ν = 1 / (α d² + 1) ≈ 1e-6 (α = 1), cells of different samples are independent a priori
SAMPLE_DISTANCE = 1000.0
#: ``gene_offsets=None``: whether models of several samples get per-sample gene offsets
GENE_OFFSETS_DEFAULT = True
#: fewest cells a sample needs
MIN_SAMPLE_CELLS = 10


def _recorded_key(adata: AnnData, name: str, given: str | None, spatial_key: str) -> str | None:
    """``given``, else the ``name`` (``group_key``, ``sample_key``) that :func:`sfact.pp.prepare` recorded.

    The recorded key applies only when ``pp.prepare`` scaled the same ``spatial_key``.
    """
    if given is not None:
        return given
    prep = adata.uns.get(_PREPARE_KEY, {})
    if prep.get(name) is not None and prep.get("spatial_key", spatial_key) == spatial_key:
        return str(prep[name])
    return None


def _samples(adata: AnnData, sample_key: str, family: str) -> tuple[tuple[str, ...], np.ndarray]:
    """The samples (in category order) and each cell's sample, checked."""
    if sample_key not in adata.obs.columns:
        raise KeyError(
            f"`adata.obs[{sample_key!r}]` not found: pass `sample_key=` naming the column with the samples "
            f"(available: {list(adata.obs.columns)})."
        )
    col = adata.obs[sample_key]
    labels = col.astype(str).to_numpy()
    n_missing = int(col.isna().sum()) or int(np.isin(labels, list(MISSING_LABELS)).sum())
    if n_missing:
        raise ValueError(
            f"`adata.obs[{sample_key!r}]` has {n_missing} cells without a sample (NaN, or a sample named "
            f"{sorted(MISSING_LABELS)}); drop them with `sfact.pp.prepare(adata, sample_key={sample_key!r})` "
            "first."
        )
    if isinstance(col.dtype, pd.CategoricalDtype):
        cats = tuple(str(c) for c in col.cat.categories if (labels == str(c)).any())
    else:
        cats = tuple(sorted(set(labels)))
    sizes = {c: int((labels == c).sum()) for c in cats}
    small = {c: n for c, n in sizes.items() if n < MIN_SAMPLE_CELLS}
    if small and family != "pnmf":
        raise ValueError(
            f"Samples with fewer than {MIN_SAMPLE_CELLS} cells cannot have their own spatial prior: {small}. "
            "Drop them or merge them with another sample."
        )
    return cats, labels


def _check_locations(
    coords: np.ndarray, spatial_key: str, prior: str, sample_key: str | None, labels: np.ndarray | None
) -> None:
    """Raise :class:`ValueError` when all cells (of a sample) sit at one location: a spatial prior sees nothing."""
    parts = {None: coords} if labels is None else {s: coords[labels == s] for s in dict.fromkeys(labels)}
    for sample, xy in parts.items():
        if len(xy) > 1 and not (xy != xy[0]).any():
            where = (
                "All cells"
                if sample is None
                else f"All cells of sample {sample!r} of `adata.obs[{sample_key!r}]`"
            )
            raise ValueError(
                f"{where} are at one location in `adata.obsm[{spatial_key!r}]` ({xy[0].tolist()}): the "
                f"spatial prior {prior!r} has no spatial variation to model. Pass `spatial_key=` naming the "
                "real coordinates, or use `prior='pnmf'`."
            )


def _totals(X: Any) -> np.ndarray:
    """Total count of each cell (float64)."""
    return np.asarray(X.sum(axis=1)).ravel().astype(np.float64)


@dataclass(frozen=True)
class ModelSetup:
    """The set-up of a :class:`~sfact.models.SpatialFactorization`, as plain values.

    Built once when the model is constructed (from the AnnData and the arguments), saved with
    the model as JSON (:meth:`~sfact.models.ModelSetup.to_dict` / :meth:`~sfact.models.ModelSetup.from_dict`), and read by everything that needs
    to apply the model to new cells (size factors, coordinate scaling, group codes, genes).

    Attributes
    ----------
    prior
        Name of the prior (one of ``sfact._constants.PRIOR_NAMES``).
    n_factors
        Number of factors L.
    layer
        Layer with the raw counts (``None``: ``adata.X``).
    spatial_key
        Key of the coordinates in ``adata.obsm``.
    group_key
        Column of ``adata.obs`` with the groups, or ``None``.
    group_categories
        The groups seen in training, in code order, or ``None``.
    size_factors
        ``"total"``, ``None`` or a column of ``adata.obs``.
    size_factor_reference
        Median total count of the training cells (``size_factors="total"``), else ``None``.
    elbo_mode, loadings_mode, n_samples
        Training modes.
    prior_kwargs
        The prior's validated configuration as a plain dict.
    scaling
        The coordinate scaling (``scale``, ``offset``, ``factor``, ``box_size``; with samples
        also ``sample_offsets``).
    var_names
        The genes, in the model's order.
    n_obs
        Number of training cells.
    seed
        Integer seed.
    dtype
        ``"float32"`` or ``"float64"``.
    sample_key
        Column of ``adata.obs`` with the samples (tissue sections), or ``None``.
    sample_categories
        The samples seen in training, in code order, or ``None``.
    gene_offsets
        Whether the rates carry a per-sample gene offset (several samples; see
        :class:`~sfact.models.SpatialFactorization`).

    Examples
    --------
    >>> model = sfact.models.SpatialFactorization(adata, prior="svgp", n_factors=5)  # doctest: +SKIP
    >>> model.setup.prior, model.setup.n_factors  # doctest: +SKIP
    ('svgp', 5)
    >>> model.setup.scaled_coords(adata_new)  # coordinates as the model sees them  # doctest: +SKIP
    """

    prior: str
    n_factors: int
    layer: str | None
    spatial_key: str
    group_key: str | None
    group_categories: tuple[str, ...] | None
    size_factors: str | None
    size_factor_reference: float | None
    elbo_mode: str
    loadings_mode: str
    n_samples: int
    prior_kwargs: dict[str, Any] = field(hash=False)
    scaling: dict[str, Any] = field(hash=False)
    var_names: tuple[str, ...]
    n_obs: int
    seed: int
    dtype: str
    sample_key: str | None = None
    sample_categories: tuple[str, ...] | None = None
    gene_offsets: bool = False

    def __post_init__(self) -> None:
        # tuples for the sequences, so the frozen object is really read-only where it matters
        if self.group_categories is not None and not isinstance(self.group_categories, tuple):
            object.__setattr__(self, "group_categories", tuple(str(c) for c in self.group_categories))
        if not isinstance(self.var_names, tuple):
            object.__setattr__(self, "var_names", tuple(str(v) for v in self.var_names))
        if self.sample_categories is not None and not isinstance(self.sample_categories, tuple):
            object.__setattr__(self, "sample_categories", tuple(str(c) for c in self.sample_categories))

    @property
    def multigroup(self) -> bool:
        """Whether the prior uses the multi-group kernel."""
        return is_multigroup(self.prior)

    @property
    def n_groups(self) -> int | None:
        """Number of groups G of a multi-group prior (1 without ``group_key``); ``None`` otherwise."""
        return len(self.group_categories or [None]) if self.multigroup else None

    @property
    def n_vars(self) -> int:
        """Number of genes."""
        return len(self.var_names)

    @property
    def n_sample(self) -> int:
        """Number of samples (tissue sections) S; 1 without ``sample_key``."""
        return len(self.sample_categories or [None])

    @property
    def kernel_multigroup(self) -> bool:
        """Whether the kernel has groups (a multi-group prior, or several samples; one sample is no sample)."""
        return self.multigroup or (self.n_sample > 1 and prior_family(self.prior) != "pnmf")

    @property
    def n_kernel_groups(self) -> int | None:
        """Number of groups of the kernel, S x G (G those of a multi-group prior, else 1), or ``None``."""
        if not self.kernel_multigroup:
            return None
        return self.n_sample * (self.n_groups or 1)

    def sample_of_group(self) -> np.ndarray | None:
        """The sample of each of the kernel's groups (several samples, spatial prior), else ``None``.

        Returns
        -------
        An int64 array (S·G,): ``k // G`` for group ``k``; ``None`` with one sample or ``pnmf``.

        Examples
        --------
        >>> model.setup.sample_of_group()  # 3 samples, one group  # doctest: +SKIP
        array([0, 1, 2])
        """
        if self.n_sample < 2 or not self.kernel_multigroup:
            return None
        return np.repeat(np.arange(self.n_sample, dtype=np.int64), self.n_groups or 1)

    def kernel_embedding(
        self, group_distances: Any = None, sample_distance: float | None = None
    ) -> np.ndarray | None:
        """Coordinates of the kernel's groups (see :meth:`~sfact.models.ModelSetup.kernel_codes`); ``None`` without groups.

        Without samples: the multi-group embedding (all groups at distance 1, or ``group_distances``
        embedded by MDS). With samples: each (sample, group) pair gets the sample's coordinates —
        every pair of samples at distance ``sample_distance``, by default ``SAMPLE_DISTANCE``
        (1000), so the kernel between cells of different samples vanishes (independent GPs, one
        per sample) — next to the group's.

        Parameters
        ----------
        group_distances
            The prior's ``group_distances`` option (G x G), or ``None``.
        sample_distance
            The prior's ``sample_distance`` option, or ``None`` (independent samples).

        Returns
        -------
        A (S·G, q) array, row ``s·G + g`` for group ``g`` of sample ``s``; ``None`` when the kernel
        has no groups.

        Examples
        --------
        >>> model.setup.kernel_embedding().shape  # 3 samples, one group  # doctest: +SKIP
        (3, 4)
        """
        from .._core.factory import group_embedding

        if not self.kernel_multigroup:
            return None
        G = self.n_groups or 1
        groups = group_embedding(G, group_distances) if self.multigroup else np.zeros((G, 1))
        if self.n_sample == 1:
            return groups
        S = self.n_sample
        d = SAMPLE_DISTANCE if sample_distance is None else float(sample_distance)
        samples = d * np.eye(S) / np.sqrt(2.0)
        return np.hstack([np.repeat(samples, G, axis=0), np.tile(groups, (S, 1))])

    # ------------------------------------------------------------------ construction
    @staticmethod
    def effective_group_key(adata: AnnData, *, group_key: str | None, spatial_key: str) -> str | None:
        """The group key a model of ``adata`` uses: ``group_key``, else the one recorded by :func:`sfact.pp.prepare`.

        The recorded key applies only when ``pp.prepare`` scaled the same ``spatial_key``.

        Parameters
        ----------
        adata
            The cells.
        group_key
            The key asked for (``None``: none given).
        spatial_key
            Key of the coordinates in ``adata.obsm``.

        Returns
        -------
        A column of ``adata.obs``, or ``None``.

        Examples
        --------
        >>> import sfact
        >>> adata = sfact.datasets.osmfish()
        >>> sfact.pp.prepare(adata, group_key="ClusterName")
        >>> sfact.models.ModelSetup.effective_group_key(adata, group_key=None, spatial_key="spatial")
        'ClusterName'
        """
        return _recorded_key(adata, "group_key", group_key, spatial_key)

    @staticmethod
    def effective_sample_key(adata: AnnData, *, sample_key: str | None, spatial_key: str) -> str | None:
        """The sample key a model of ``adata`` uses: ``sample_key``, else the one recorded by :func:`sfact.pp.prepare`.

        Parameters
        ----------
        adata
            The cells.
        sample_key
            The key asked for (``None``: none given).
        spatial_key
            Key of the coordinates in ``adata.obsm``.

        Returns
        -------
        A column of ``adata.obs``, or ``None``.

        Examples
        --------
        >>> sfact.pp.prepare(adata, sample_key="section")  # doctest: +SKIP
        >>> sfact.models.ModelSetup.effective_sample_key(adata, sample_key=None, spatial_key="spatial")  # doctest: +SKIP
        'section'
        """
        return _recorded_key(adata, "sample_key", sample_key, spatial_key)

    @classmethod
    def from_adata(
        cls,
        adata: AnnData,
        *,
        prior: str,
        n_factors: int,
        layer: str | None,
        spatial_key: str,
        group_key: str | None,
        size_factors: str | None,
        elbo_mode: str,
        loadings_mode: str,
        n_samples: int,
        prior_kwargs: dict[str, Any] | None,
        random_state: Any,
        sample_key: str | None = None,
        gene_offsets: bool | None = None,
    ) -> ModelSetup:
        """Validate the training data and the arguments of :class:`~sfact.models.SpatialFactorization`.

        Checks the counts, coordinates, groups and size factors of ``adata``, picks up the group
        key and coordinate scaling recorded by :func:`sfact.pp.prepare`, and records the median
        total count (``size_factors="total"``).

        Parameters
        ----------
        adata
            The training cells.
        prior, n_factors, layer, spatial_key, group_key, size_factors, elbo_mode, loadings_mode, n_samples, prior_kwargs, random_state, sample_key, gene_offsets
            As for :class:`~sfact.models.SpatialFactorization`.

        Returns
        -------
        The set-up.

        Examples
        --------
        >>> setup = sfact.models.ModelSetup.from_adata(  # doctest: +SKIP
        ...     adata, prior="svgp", n_factors=5, layer=None, spatial_key="spatial", group_key=None,
        ...     size_factors="total", elbo_mode="lower-bound", loadings_mode="multiplicative",
        ...     n_samples=4, prior_kwargs=None, random_state=0,
        ... )
        """
        from .._settings import settings
        from .._utils import seed_of
        from ._config import config_to_dict, make_config

        check_in_memory(adata)
        if prior not in PRIOR_NAMES:
            raise ValueError(f"Unknown prior {prior!r}; choose one of {PRIOR_NAMES}.")
        prior_config = make_config(prior, prior_kwargs)
        check_choice("elbo_mode", elbo_mode, ELBO_MODES)
        if loadings_mode not in LOADINGS_MODES:
            raise ValueError(
                f"`loadings_mode` must be 'multiplicative' or 'projected', received {loadings_mode!r}."
            )
        if not isinstance(n_factors, int | np.integer) or n_factors < 1:
            raise ValueError(f"`n_factors` must be a positive integer, received {n_factors!r}.")
        check_int(n_samples, "n_samples", minimum=1)
        if hasattr(prior_config, "_check_n_factors"):
            prior_config._check_n_factors(int(n_factors))
        if n_factors > adata.n_vars:
            raise ValueError(
                f"`n_factors={n_factors}` is more than the number of genes ({adata.n_vars}); "
                "choose at most as many factors as genes."
            )
        if adata.n_obs < 2:
            raise ValueError(f"Need at least 2 cells, received {adata.n_obs}.")
        X = get_counts(adata, layer)
        check_counts(X, slot_name(layer))
        if not _totals(X).any():
            raise ValueError(
                f"`{slot_name(layer)}` has no counts (every entry is 0): there is nothing to factorize. "
                "Pass `layer=` naming the layer with the raw counts, or check how the data were loaded."
            )
        coords = get_coordinates(adata, spatial_key)
        if not np.isfinite(coords).all():
            raise ValueError(
                f"`adata.obsm[{spatial_key!r}]` has NaN or infinite coordinates; remove those cells with "
                "`sfact.pp.prepare(adata)` first."
            )
        prep = adata.uns.get(_PREPARE_KEY, {})
        group_key = cls.effective_group_key(adata, group_key=group_key, spatial_key=spatial_key)
        group_categories = None if group_key is None else _group_categories(adata, group_key)
        if is_multigroup(prior) and group_key is None:
            warn(
                f"`prior={prior!r}` without `group_key`: all cells form one group, so the fit equals "
                f"{prior_family(prior)!r}. Pass `group_key=` (or set it in `sfact.pp.prepare`) to "
                "use the multi-group kernel."
            )
        sample_key = cls.effective_sample_key(adata, sample_key=sample_key, spatial_key=spatial_key)
        sample_categories, sample_labels = None, None
        if sample_key is not None:
            sample_categories, sample_labels = _samples(adata, sample_key, prior_family(prior))
        if prior_family(prior) != "pnmf":
            _check_locations(coords, spatial_key, prior, sample_key, sample_labels)
        n_sample = len(sample_categories or [None])
        if gene_offsets is None:
            gene_offsets = n_sample > 1 and GENE_OFFSETS_DEFAULT
        elif not isinstance(gene_offsets, (bool, np.bool_)):
            raise TypeError(f"`gene_offsets` must be True, False or None, received {gene_offsets!r}.")
        elif gene_offsets and n_sample < 2:
            raise ValueError(
                "`gene_offsets=True` needs several samples: pass `sample_key=` (a column of `adata.obs` "
                "with at least two samples), or leave `gene_offsets=None`."
            )
        prepared = prep.get("spatial_key", None) == spatial_key and "factor" in prep
        if prepared and sample_key is not None and prep.get("sample_key") != sample_key:
            prepared = False  # scaled without these samples: scale them here
        if prepared:
            # the scaling recorded by sfact.pp.prepare, so new data is scaled the same way
            scaling = {
                "scale": str(prep.get("scale", "box")),
                "offset": [float(v) for v in np.atleast_1d(prep["offset"])],
                "factor": float(prep["factor"]),
                "box_size": float(prep.get("box_size", 100.0)),
            }
            if sample_key is not None:
                offsets = prep.get("sample_offsets") or {}
                scaling["sample_offsets"] = {
                    str(k): [float(v) for v in np.atleast_1d(offsets[k])] for k in offsets
                }
                missing = sorted(set(sample_categories) - set(scaling["sample_offsets"]))
                if missing:
                    raise ValueError(
                        f"Samples {missing[:5]} of `adata.obs[{sample_key!r}]` have no recorded scaling; "
                        f"run `sfact.pp.prepare(adata, sample_key={sample_key!r})` again."
                    )
        else:
            scaling = fit_scaling(coords, "box", 100.0, samples=sample_labels)
        sf_reference = None
        if size_factors == "total":
            totals = _totals(X)
            sf_reference = float(np.median(totals[totals > 0])) if (totals > 0).any() else 1.0
        elif size_factors is not None:
            if size_factors not in adata.obs.columns:
                raise KeyError(
                    f"`size_factors={size_factors!r}` is neither 'total' nor a column of `adata.obs` "
                    f"(columns: {list(adata.obs.columns)})."
                )
            v = np.asarray(adata.obs[size_factors], dtype=np.float64)
            if not (np.isfinite(v).all() and (v > 0).all()):
                raise ValueError(f"`adata.obs[{size_factors!r}]` must be positive and finite.")
        return cls(
            prior=prior,
            n_factors=int(n_factors),
            layer=layer,
            spatial_key=spatial_key,
            group_key=group_key,
            group_categories=group_categories,
            size_factors=size_factors,
            size_factor_reference=sf_reference,
            elbo_mode=elbo_mode,
            loadings_mode=loadings_mode,
            n_samples=int(n_samples),
            prior_kwargs=config_to_dict(prior_config),
            scaling=scaling,
            var_names=[str(v) for v in adata.var_names],
            n_obs=int(adata.n_obs),
            seed=seed_of(random_state),
            dtype=settings.dtype,
            sample_key=sample_key,
            sample_categories=sample_categories,
            gene_offsets=bool(gene_offsets),
        )

    def prior_config(self) -> Any:
        """The prior's validated config (``sfact.models._config``) from ``prior_kwargs``.

        Returns
        -------
        A :class:`~sfact.models._config.PNMFConfig`, :class:`~sfact.models._config.SVGPConfig`
        or :class:`~sfact.models._config.LCGPConfig`.

        Examples
        --------
        >>> model.setup.prior_config().lengthscale  # doctest: +SKIP
        5.0
        """
        from ._config import make_config

        return make_config(self.prior, self.prior_kwargs)

    # ------------------------------------------------------------------ applied to an AnnData
    def counts(self, adata: AnnData, *, check: bool = True) -> sp.csr_matrix:
        """The counts of ``adata`` (from ``layer``) as a sparse matrix, checked unless ``check=False``.

        Parameters
        ----------
        adata
            Cells with the model's genes.
        check
            Check that they are counts (finite, non-negative; a warning if not integers).

        Returns
        -------
        A :class:`scipy.sparse.csr_matrix` (n_cells, n_genes), or the sparse matrix as stored.

        Examples
        --------
        >>> Y = model.setup.counts(adata_new)  # doctest: +SKIP
        """
        X = get_counts(adata, self.layer)
        if check:
            check_counts(X, slot_name(self.layer))
        return X if sp.issparse(X) else sp.csr_matrix(np.asarray(X))

    def size_factors_of(self, adata: AnnData, X: Any = None) -> np.ndarray:
        """Size factors of the cells of ``adata`` (``X``: their counts, read from ``adata`` when needed).

        ``"total"``: each cell's total count over ``size_factor_reference``; ``None``: all 1;
        otherwise the column ``size_factors`` of ``adata.obs``.

        Parameters
        ----------
        adata
            Cells.
        X
            Their counts, if at hand.

        Returns
        -------
        One positive value per cell (float64).

        Examples
        --------
        >>> s = model.setup.size_factors_of(adata_new)  # doctest: +SKIP
        """
        mode = self.size_factors
        if mode is None:
            return np.ones(adata.n_obs)
        if mode == "total":
            if X is None:
                X = get_counts(adata, self.layer)
            return np.maximum(_totals(X) / self.size_factor_reference, 1e-8)
        if mode not in adata.obs.columns:
            raise KeyError(f"`adata.obs[{mode!r}]` (the size factors) not found.")
        return np.asarray(adata.obs[mode], dtype=np.float64)

    def scaled_coords(self, adata: AnnData) -> np.ndarray:
        """Coordinates of ``adata`` scaled as the training cells' (float64, N x p).

        Parameters
        ----------
        adata
            Cells with coordinates in ``obsm[spatial_key]``.

        Returns
        -------
        Array (n_cells, n_dims): ``(coords - offset) / factor`` with the model's ``scaling``.

        Examples
        --------
        >>> X = model.setup.scaled_coords(adata_new)  # doctest: +SKIP
        """
        coords = get_coordinates(adata, self.spatial_key)
        if not np.isfinite(coords).all():
            raise ValueError(f"`adata.obsm[{self.spatial_key!r}]` has NaN or infinite coordinates.")
        return apply_scaling(coords, self.scaling, self.sample_labels(adata) if self.sample_key else None)

    def sample_labels(self, adata: AnnData) -> np.ndarray:
        """The sample of each cell of ``adata`` (strings), checked against the training samples.

        Parameters
        ----------
        adata
            Cells with samples in ``obs[sample_key]``.

        Returns
        -------
        A string array (n_cells,).

        Raises
        ------
        KeyError
            Without the sample column.
        ValueError
            With a missing sample, or a sample the model was not trained on.

        Examples
        --------
        >>> model.setup.sample_labels(adata_new)[:3]  # doctest: +SKIP
        array(['s0', 's0', 's1'], dtype=object)
        """
        sk = self.sample_key
        if sk is None:
            raise ValueError("The model has no samples (`sample_key`).")
        if sk not in adata.obs.columns:
            raise KeyError(f"`adata.obs[{sk!r}]` (the samples) not found.")
        col = adata.obs[sk]
        if col.isna().any():
            raise ValueError(f"`adata.obs[{sk!r}]` has {int(col.isna().sum())} missing samples.")
        labels = col.astype(str).to_numpy()
        unknown = sorted(set(labels) - set(self.sample_categories or ()))
        if unknown:
            raise ValueError(
                f"`adata.obs[{sk!r}]` has samples the model was not trained on: {unknown[:5]} (trained on "
                f"{list(self.sample_categories)[:10]}). The factors of a new sample cannot be predicted from "
                "coordinates: `model.fit_new_sample(adata)` fits them to its counts with the loadings fixed "
                "and smooths them over its coordinates."
            )
        return labels

    def kernel_codes(self, adata: AnnData) -> np.ndarray | None:
        """The kernel's group of each cell: ``sample x G + group`` (see :meth:`~sfact.models.ModelSetup.kernel_embedding`).

        Without samples this is :meth:`~sfact.models.ModelSetup.group_codes`.

        Parameters
        ----------
        adata
            Cells with the model's samples (and groups).

        Returns
        -------
        An int64 array (n_cells,), or ``None`` when the kernel has no groups.

        Examples
        --------
        >>> codes = model.setup.kernel_codes(adata_new)  # doctest: +SKIP
        """
        if not self.kernel_multigroup or self.n_sample == 1:
            return self.group_codes(adata)
        g = self.group_codes(adata) if self.multigroup else None
        return self.sample_codes(adata) * (self.n_groups or 1) + (0 if g is None else g)

    def sample_codes(self, adata: AnnData) -> np.ndarray:
        """Sample code of each cell of ``adata``: its index in ``sample_categories``.

        Parameters
        ----------
        adata
            Cells with the model's samples in ``obs[sample_key]``.

        Returns
        -------
        An int64 array (n_cells,).

        Examples
        --------
        >>> codes = model.setup.sample_codes(adata_new)  # doctest: +SKIP
        """
        return group_codes(self.sample_labels(adata), list(self.sample_categories))

    def group_codes(self, adata: AnnData) -> np.ndarray | None:
        """Group code of each cell of ``adata``: its index in ``group_categories``.

        Parameters
        ----------
        adata
            Cells with groups in ``obs[group_key]`` among the training groups.

        Returns
        -------
        An int64 array (n_cells,); ``None`` without ``group_key`` (all 0 for a multi-group prior).

        Examples
        --------
        >>> codes = model.setup.group_codes(adata_new)  # doctest: +SKIP
        """
        gk = self.group_key
        if gk is None:
            return np.zeros(adata.n_obs, dtype=np.int64) if self.multigroup else None
        if gk not in adata.obs.columns:
            raise KeyError(f"`adata.obs[{gk!r}]` (the groups) not found.")
        cats = list(self.group_categories)
        return group_codes(
            adata.obs[gk].astype(str).to_numpy(),
            cats,
            unknown=lambda u: (
                f"`adata.obs[{gk!r}]` has groups the model was not trained on: {sorted(set(u))[:5]}; "
                f"expected a subset of {cats}."
            ),
        )

    def check_vars(self, adata: AnnData) -> None:
        """Raise :class:`ValueError` unless ``adata`` has the genes of ``var_names``, in that order.

        Parameters
        ----------
        adata
            Cells to check.

        Examples
        --------
        >>> model.setup.check_vars(adata_new[:, model.var_names])  # doctest: +SKIP
        """
        from ._newcells import check_genes

        check_genes(self.var_names, adata, reorder=False)  # the one gene check (names missing/extra genes)

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-safe values (lists for the sequences); the format saved in ``metadata.json``.

        Returns
        -------
        A dict with one key per field.

        Examples
        --------
        >>> d = model.setup.to_dict()  # doctest: +SKIP
        >>> sfact.models.ModelSetup.from_dict(d) == model.setup  # doctest: +SKIP
        True
        """
        d = dataclasses.asdict(self)
        d["group_categories"] = None if self.group_categories is None else list(self.group_categories)
        d["var_names"] = list(self.var_names)
        d["sample_categories"] = None if self.sample_categories is None else list(self.sample_categories)
        return json.loads(json.dumps(d))  # deep copy, and proof that it is JSON-safe

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSetup:
        """Inverse of :meth:`~sfact.models.ModelSetup.to_dict`; unknown or missing keys raise :class:`ValueError` naming them.

        Parameters
        ----------
        d
            A dict as written by :meth:`~sfact.models.ModelSetup.to_dict`.

        Returns
        -------
        The set-up.

        Examples
        --------
        >>> setup = sfact.models.ModelSetup.from_dict(model.setup.to_dict())  # doctest: +SKIP
        """
        names = {f.name for f in dataclasses.fields(cls)}
        optional = {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        unknown = sorted(set(d) - names)
        missing = sorted(names - set(d) - optional)
        if unknown or missing:
            raise ValueError(
                "Model set-up does not match this version of sfact"
                + (f": unknown keys {unknown}" if unknown else "")
                + (f": missing keys {missing}" if missing else "")
                + "."
            )
        return cls(**d)

    def to_json(self) -> str:
        """:meth:`~sfact.models.ModelSetup.to_dict` as a JSON string.

        Returns
        -------
        A JSON string.

        Examples
        --------
        >>> text = model.setup.to_json()  # doctest: +SKIP
        """
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> ModelSetup:
        """Inverse of :meth:`~sfact.models.ModelSetup.to_json`.

        Parameters
        ----------
        text
            A JSON string written by :meth:`~sfact.models.ModelSetup.to_json`.

        Returns
        -------
        The set-up.

        Examples
        --------
        >>> setup = sfact.models.ModelSetup.from_json(model.setup.to_json())  # doctest: +SKIP
        """
        return cls.from_dict(json.loads(text))


def _group_categories(adata: AnnData, group_key: str) -> list[str]:
    """The groups of ``adata.obs[group_key]`` (in category order), checked for missing values."""
    if group_key not in adata.obs.columns:
        raise KeyError(
            f"`adata.obs[{group_key!r}]` not found: pass an existing `group_key` "
            f"(columns: {list(adata.obs.columns)})."
        )
    g = adata.obs[group_key]
    if g.isna().any():
        raise ValueError(
            f"`adata.obs[{group_key!r}]` has missing values; remove those cells with "
            f"`sfact.pp.prepare(adata, group_key={group_key!r})`."
        )
    # a missing value written as text ("nan", "None"): sfact.pp.prepare drops these cells, so the
    # model does not make a group of them
    as_text = g.astype(str).to_numpy()
    named = sorted(set(as_text) & MISSING_LABELS)
    if named:
        raise ValueError(
            f"`adata.obs[{group_key!r}]` has {int(np.isin(as_text, named).sum())} cells whose group is "
            f"{named[0]!r}, which sfact reads as a missing value: remove those cells with "
            f"`sfact.pp.prepare(adata, group_key={group_key!r})`, or rename the group."
        )
    cat = g.astype("category").cat.remove_unused_categories()
    return [str(c) for c in cat.cat.categories]
