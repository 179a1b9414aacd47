"""Pipeline configuration: the typed sections of a config file, its vocabulary and its error.

A config describes one data set and (optionally) one prior::

    name: osmfish
    dataset: {loader: osmfish, group_key: ClusterName, subsample: null}
    preprocessing: {min_group_size: 10}          # keyword arguments of sfact.pp.prepare
    model: {prior: mggp_svgp, n_factors: 10, prior_kwargs: {num_inducing: 500}}
    training: {max_iter: 1000, tol: 1.0e-4, device: auto}
    analysis: {batch_size: 10000, n_neighs: 6}
    figures: {kinds: [factors, elbo, moran], dpi: 110}
    output_dir: outputs/osmfish                  # relative to this file's folder

Each section is a dataclass here; :class:`~sfact.pipeline.Config` (:mod:`._config`) holds
them. ``base: other.yaml`` starts from another config and overrides it key by key
(:mod:`._config_files`). Every key is checked: an unknown key, a wrong type
(:mod:`._config_coerce`) or a bad value (:mod:`._config_validate`) raises :class:`ConfigError`
naming the key (``model.n_factors``) and the file, with a suggestion for misspelt keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .._constants import PRIOR_NAMES, ElboMode, LoadingsMode, PriorName, is_multigroup

#: every prior, in the order ``run all`` plans them
PRIORS: tuple[str, ...] = PRIOR_NAMES
#: priors with the multi-group kernel (they need a group key)
MULTIGROUP_PRIORS: tuple[str, ...] = tuple(p for p in PRIOR_NAMES if is_multigroup(p))

FigureKind = Literal[
    "factors",
    "scales",
    "elbo",
    "moran",
    "top_genes",
    "loadings",
    "factors_with_genes",
    "gene_enrichment",
    "enrichment_by_group",
    "enrichment_by_factor",
    "inducing_points",
    "groupwise_factors",
]
#: every figure the ``figures`` stage can draw (those that do not apply to a fit are left out)
FIGURE_KINDS: tuple[str, ...] = get_args(FigureKind)


class ConfigError(ValueError):
    """An invalid configuration file; the message names the key and the file.

    Attributes
    ----------
    key
        Dotted path of the offending key (``"model.n_factors"``), or ``None``.
    file
        The config file, or ``None`` for a config built from a dict.
    """

    def __init__(self, message: str, *, key: str | None = None, file: str | os.PathLike | None = None):
        self.key = key
        self.file = None if file is None else str(file)
        self.reason = message
        where = []
        if self.file is not None:
            where.append(self.file)
        if key:
            where.append(f"`{key}`")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


def _suggest(word: str, options: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------
@dataclass
class DatasetConfig:
    """Where the counts come from.

    Attributes
    ----------
    loader
        A registered loader (:func:`sfact.datasets.loaders`), e.g. ``"osmfish"``.
    reader
        Instead of ``loader``: a technology of :data:`sfact.datasets.READERS` (``xenium``,
        ``visium``, ``visium_hd``, ``merscope``, ``cosmx``, ``stereoseq``) or ``auto``; ``path``
        is then the instrument's output folder, read by :func:`sfact.datasets.read`
        (spatialdata-io), and ``loader_kwargs`` go to that reader.
    path
        An ``.h5ad`` file (without ``loader``), or the file/folder a path-reading loader needs;
        relative to the config file's folder.
    group_key
        Column of ``obs`` with the groups (cell types); defaults to the loader's default group
        key, ``null`` for no groups.
    sample_key
        Column of ``obs`` with the samples (tissue sections): each scaled from its own corner,
        shared loadings, one GP per sample; ``null`` (default) for one sample.
    subsample
        Keep this many cells (int) or this fraction (float in (0, 1]) before preprocessing.
    random_state
        Seed of the subsample.
    loader_kwargs
        Extra keyword arguments of the loader (names checked against its signature; file
        arguments are relative to the config file's folder, like ``path``).
    """

    loader: str | None = None
    reader: str | None = None
    path: str | None = None
    group_key: str | None = None
    sample_key: str | None = None
    subsample: int | float | None = None
    random_state: int = 0
    loader_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreprocessingConfig:
    """Keyword arguments of :func:`sfact.pp.prepare` (``group_key`` and ``sample_key`` come from ``dataset``)."""

    spatial_key: str = "spatial"
    layer: str | None = None
    min_group_fraction: float | None = None
    min_group_size: int | None = 10
    dropna: bool = True
    scale: Literal["box", "none"] = "box"
    box_size: float = 100.0
    scaled_key: str = "spatial_sfact"
    min_counts: float | None = None
    min_cells: int | None = None
    mito_prefix: str | None = None
    max_mito_fraction: float | None = None


@dataclass
class ModelConfig:
    """Arguments of :class:`sfact.models.SpatialFactorization`.

    Attributes
    ----------
    prior
        One prior; ``null`` (e.g. in ``general.yaml``) means every prior.
    n_factors
        Number of factors.
    size_factors
        ``"total"``, ``null`` or a column of ``obs``.
    elbo_mode, loadings_mode, n_samples, gene_offsets
        See :class:`sfact.models.SpatialFactorization` (``gene_offsets``: per-sample gene
        offsets with ``dataset.sample_key``; ``null`` is the package default).
    prior_kwargs
        Options of the prior (``num_inducing``, ``lengthscale``, ...). Each key is passed to the
        priors that have that option (it must be an option of at least one prior); a key that
        is a prior's name holds options for that prior only, e.g.
        ``{lengthscale: 5, svgp: {num_inducing: 500}}``.
    """

    prior: PriorName | None = None
    n_factors: int = 10
    size_factors: str | None = "total"
    elbo_mode: ElboMode = "lower-bound"
    loadings_mode: LoadingsMode = "multiplicative"
    n_samples: int = 4
    gene_offsets: bool | None = None
    prior_kwargs: dict[str, Any] = field(default_factory=dict)

    def prior_kwargs_for(self, prior: str) -> dict[str, Any]:
        """The options of ``prior``: shared keys it accepts, then its own section."""
        accepted = _prior_options(prior)
        out = {k: v for k, v in self.prior_kwargs.items() if k not in PRIORS and k in accepted}
        own = self.prior_kwargs.get(prior) or {}
        out.update(own)
        return out

    def model_kwargs(self, prior: str | None = None) -> dict[str, Any]:
        """The ``model`` section's keyword arguments of :class:`sfact.models.SpatialFactorization`.

        Parameters
        ----------
        prior
            The prior to build; ``model.prior`` when ``None``.

        Returns
        -------
        ``prior``, ``n_factors``, ``size_factors``, ``elbo_mode``, ``loadings_mode``,
        ``n_samples``, ``gene_offsets`` and ``prior_kwargs`` (the options of that prior only).
        :meth:`Config.model_kwargs` adds those set by the other sections.
        """
        prior = self.prior if prior is None else prior
        if prior is None:
            raise ValueError("`model.prior` is not set: pass the prior to build.")
        return {
            "prior": prior,
            "n_factors": self.n_factors,
            "size_factors": self.size_factors,
            "elbo_mode": self.elbo_mode,
            "loadings_mode": self.loadings_mode,
            "n_samples": self.n_samples,
            "gene_offsets": self.gene_offsets,
            "prior_kwargs": self.prior_kwargs_for(prior),
        }


@dataclass
class TrainingConfig:
    """Arguments of :meth:`sfact.models.SpatialFactorization.train`.

    Attributes
    ----------
    device
        ``auto`` (the device the runner assigns: a GPU when there is one), ``cpu`` (always
        the CPU), ``cuda`` or ``cuda:N`` (a GPU job; the runner picks which GPU).
    random_state
        Seed of the model (initialization, batches) and of the validation cells.
    validation_fraction
        Fraction of the cells held out of training for the baseline guard of
        :func:`sfact.tl.fit`, in ``[0, 0.5)``: the model's deviance on them is recorded next to
        the baseline's and a kNN smoother's in ``metrics.json``; ``0`` trains on all cells;
        ``null`` holds out 0.05 with at least 1000 cells, none otherwise.
    """

    max_iter: int = 1000
    tol: float = 1e-4
    learning_rate: float | None = None
    batch_size: int | None = None
    y_batch_size: int | None = None
    kl_weight: float = 1.0
    init_iter: int = 30
    min_iter: int = 20
    device: str = "auto"
    random_state: int = 0
    validation_fraction: float | None = None

    def train_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`sfact.models.SpatialFactorization.train`.

        Every key but ``device`` (the runner assigns it), ``random_state`` (an argument of
        the model, see :meth:`Config.model_kwargs`) and ``validation_fraction`` (the ``train``
        stage holds the validation cells out).
        """
        return {
            "max_iter": self.max_iter,
            "tol": self.tol,
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
            "y_batch_size": self.y_batch_size,
            "kl_weight": self.kl_weight,
            "init_iter": self.init_iter,
            "min_iter": self.min_iter,
        }


@dataclass
class AnalysisConfig:
    """Arguments of :func:`sfact.tl.analyze`.

    Attributes
    ----------
    batch_size
        Cells per batch of the factors / deviance computations.
    n_neighs
        Neighbours per cell of the spatial graph for Moran's I.
    n_top
        Top enriched genes kept per factor and group.
    groupwise
        For the multi-group priors, also compute the group-wise factors
        (:func:`sfact.tl.groupwise_factors`).
    """

    batch_size: int = 10000
    n_neighs: int = 6
    n_top: int = 10
    groupwise: bool = True


@dataclass
class FiguresConfig:
    """Which figures to draw.

    Attributes
    ----------
    kinds
        Figures to draw (see :data:`FIGURE_KINDS`); ``null`` draws every one that applies to
        the fit (inducing points only for SVGP priors, enrichment only with groups, ...).
    dpi
        Resolution of the PNGs.
    groups
        Rows of the group-wise factor figure; ``null``: the 4 largest groups.
    """

    kinds: list[FigureKind] | None = None
    dpi: int = 110
    groups: list[str] | None = None


@dataclass
class SelectionConfig:
    """Arguments of :func:`sfact.tl.select_model` for ``sfact select``.

    The fits use the ``model`` section's ``size_factors`` and its shared ``prior_kwargs`` (not
    the per-prior sections; a key also in ``prior_kwargs_grid`` takes the grid's values), the
    ``training`` section's ``max_iter``, ``tol``, ``learning_rate``, ``init_iter``, ``device``
    and ``random_state``.

    Attributes
    ----------
    priors
        Priors to compare; ``null``: the ``--prior`` options, else ``model.prior``, else every
        prior that applies (the multi-group priors need a group key).
    n_factors
        Numbers of factors to compare; ``null``: ``[model.n_factors]``.
    prior_kwargs_grid
        Prior options to compare, each with its values, e.g. ``{lengthscale: [5, 10, 20]}``.
    n_folds
        Folds of k-fold cross-validation over cells; ``null`` for one held-out split.
    heldout_fraction
        Fraction of cells held out by the single split.
    n_jobs
        Processes fitting in parallel; ``null``: one per CPU core.
    """

    priors: list[PriorName] | None = None
    n_factors: list[int] | None = None
    prior_kwargs_grid: dict[str, list[Any]] = field(default_factory=dict)
    n_folds: int | None = None
    heldout_fraction: float = 0.05
    n_jobs: int | None = None


_SECTIONS: dict[str, type] = {
    "dataset": DatasetConfig,
    "preprocessing": PreprocessingConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "analysis": AnalysisConfig,
    "figures": FiguresConfig,
    "selection": SelectionConfig,
}
_TOP_KEYS = ("name", "base", *_SECTIONS, "output_dir")


def _prior_options(prior: str) -> set[str]:
    """The options of ``prior`` (the fields of its :mod:`sfact.models` config)."""
    from sfact.models._config import CONFIGS

    return {f.name for f in dataclasses.fields(CONFIGS[prior])}
