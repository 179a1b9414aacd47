"""Pipeline configuration: the typed sections of a config file and the :class:`Config` itself.

A config describes one data set and (optionally) one prior::

    name: osmfish
    dataset: {loader: osmfish, group_key: ClusterName, subsample: null}
    preprocessing: {min_group_size: 10}          # keyword arguments of sfact.pp.prepare
    model: {prior: mggp_svgp, n_factors: 10, prior_kwargs: {num_inducing: 500}}
    training: {max_iter: 1000, tol: 1.0e-4, device: auto}
    analysis: {batch_size: 10000, n_neighs: 6}
    figures: {kinds: [factors, elbo, moran], dpi: 110}
    output_dir: outputs/osmfish                  # relative to this file's folder

``base: other.yaml`` starts from another config and overrides it key by key
(:mod:`._config_files`). Every key is checked: an unknown key, a wrong type
(:mod:`._config_coerce`) or a bad value (:mod:`._config_validate`) raises :class:`ConfigError`
naming the key (``model.n_factors``) and the file, with a suggestion for misspelt keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
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
    path
        An ``.h5ad`` file (without ``loader``), or the file/folder a path-reading loader needs;
        relative to the config file's folder.
    group_key
        Column of ``obs`` with the groups (cell types); defaults to the loader's default group
        key, ``null`` for no groups.
    subsample
        Keep this many cells (int) or this fraction (float in (0, 1]) before preprocessing.
    random_state
        Seed of the subsample.
    loader_kwargs
        Extra keyword arguments of the loader (names checked against its signature; file
        arguments are relative to the config file's folder, like ``path``).
    """

    loader: str | None = None
    path: str | None = None
    group_key: str | None = None
    subsample: int | float | None = None
    random_state: int = 0
    loader_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreprocessingConfig:
    """Keyword arguments of :func:`sfact.pp.prepare` (``group_key`` comes from ``dataset``)."""

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
    elbo_mode, loadings_mode, n_samples
        See :class:`sfact.models.SpatialFactorization`.
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
        ``n_samples`` and ``prior_kwargs`` (the options of that prior only).
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
        Seed of the model (initialization, batches).
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

    def train_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`sfact.models.SpatialFactorization.train`.

        Every key but ``device`` (the runner assigns it) and ``random_state`` (an argument of
        the model, see :meth:`Config.model_kwargs`).
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
class Config:
    """A validated pipeline config: one data set and (optionally) one prior.

    Build it with :func:`load_config` (from YAML) or :meth:`from_dict`.
    """

    name: str
    dataset: DatasetConfig
    output_dir: str
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    figures: FiguresConfig = field(default_factory=FiguresConfig)
    source: str | None = None
    """The config file (not a key of the YAML)."""

    # -- derived -------------------------------------------------------------------------
    @property
    def group_key(self) -> str | None:
        """The group key (``dataset.group_key``)."""
        return self.dataset.group_key

    def priors(self) -> list[str]:
        """The priors this config plans: ``model.prior``, or every prior that applies."""
        if self.model.prior is not None:
            return [self.model.prior]
        return [p for p in PRIORS if self.group_key is not None or p not in MULTIGROUP_PRIORS]

    def with_prior(self, prior: str) -> Config:
        """A copy with ``model.prior`` set and only that prior's options (mggp priors need a group key)."""
        d = self.to_dict()
        d["model"]["prior"] = prior
        d["model"]["prior_kwargs"] = self.model.prior_kwargs_for(prior)
        return Config.from_dict(d, file=self.source)

    def data_dict(self) -> dict[str, Any]:
        """The sections that determine the prepared data (``dataset`` and ``preprocessing``)."""
        d = self.to_dict()
        return {"dataset": d["dataset"], "preprocessing": d["preprocessing"]}

    def fit_dict(self) -> dict[str, Any]:
        """The sections that determine a trained model (data, ``model`` with its prior's options, ``training``)."""
        d = self.to_dict()
        model = dict(d["model"])
        if self.model.prior is not None:
            model["prior_kwargs"] = self.model.prior_kwargs_for(self.model.prior)
        return {**self.data_dict(), "model": model, "training": d["training"]}

    def model_kwargs(self, prior: str | None = None) -> dict[str, Any]:
        """Keyword arguments of :class:`sfact.models.SpatialFactorization` but ``adata`` and ``device``.

        :meth:`ModelConfig.model_kwargs` plus ``layer`` and ``spatial_key`` (``preprocessing``),
        ``group_key`` (``dataset``) and ``random_state`` (``training``).
        """
        return {
            **self.model.model_kwargs(prior),
            "layer": self.preprocessing.layer,
            "spatial_key": self.preprocessing.spatial_key,
            "group_key": self.group_key,
            "random_state": self.training.random_state,
        }

    # -- conversion ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-valued dict (paths absolute), accepted by :meth:`from_dict`; ``source`` is left out."""
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, file: str | os.PathLike | None = None, base_dir: str | None = None
    ) -> Config:
        """Validate a dict into a :class:`Config`.

        Parameters
        ----------
        data
            The config as parsed from YAML (without ``base``).
        file
            The file it came from, for error messages.
        base_dir
            Folder that relative paths are relative to; the file's folder (or the working
            directory) when ``None``.

        Returns
        -------
        The validated config.

        Examples
        --------
        >>> from sfact.pipeline import Config
        >>> cfg = Config.from_dict({"dataset": {"loader": "osmfish"}, "model": {"n_factors": 5}})
        >>> cfg.name, cfg.group_key, cfg.model.n_factors
        ('osmfish', 'ClusterName', 5)
        """
        if base_dir is None:
            base_dir = str(Path(file).resolve().parent) if file is not None else os.getcwd()
        origins = {"": str(file)} if file is not None else {}
        from ._config_validate import validate

        return validate(dict(data), origins, {"": base_dir}, source=file)


_SECTIONS: dict[str, type] = {
    "dataset": DatasetConfig,
    "preprocessing": PreprocessingConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "analysis": AnalysisConfig,
    "figures": FiguresConfig,
}
_TOP_KEYS = ("name", "base", *_SECTIONS, "output_dir")


def _prior_options(prior: str) -> set[str]:
    """The options of ``prior`` (the fields of its :mod:`sfact.models` config)."""
    from sfact.models._config import CONFIGS

    return {f.name for f in dataclasses.fields(CONFIGS[prior]) if f.name != "extra"}
