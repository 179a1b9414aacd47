"""Pipeline configuration files: YAML validated into typed dataclasses.

A config describes one data set and (optionally) one prior::

    name: osmfish
    dataset: {loader: osmfish, group_key: ClusterName, subsample: null}
    preprocessing: {min_group_size: 10}          # keyword arguments of sfact.pp.prepare
    model: {prior: mggp_svgp, n_factors: 10, prior_kwargs: {num_inducing: 500}}
    training: {max_iter: 1000, tol: 1.0e-4, device: auto}
    analysis: {batch_size: 10000, n_neighs: 6}
    figures: {kinds: [factors, elbo, moran], dpi: 110}
    output_dir: outputs/osmfish                  # relative to this file's folder

``base: other.yaml`` starts from another config and overrides it key by key. Every key is
checked: an unknown key, a wrong type or a bad value raises :class:`ConfigError` naming the
key (``model.n_factors``) and the file, with a suggestion for misspelt keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

PriorName = Literal["pnmf", "svgp", "mggp_svgp", "lcgp", "mggp_lcgp"]
#: every prior, in the order ``run all`` plans them
PRIORS: tuple[str, ...] = get_args(PriorName)
#: priors with the multi-group kernel (they need a group key)
MULTIGROUP_PRIORS: tuple[str, ...] = ("mggp_svgp", "mggp_lcgp")

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

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
_UNSET: Any = object()


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
    elbo_mode: Literal["lower-bound", "expanded", "simple"] = "lower-bound"
    loadings_mode: Literal["multiplicative", "projected"] = "multiplicative"
    n_samples: int = 4
    prior_kwargs: dict[str, Any] = field(default_factory=dict)

    def prior_kwargs_for(self, prior: str) -> dict[str, Any]:
        """The options of ``prior``: shared keys it accepts, then its own section."""
        accepted = _prior_options(prior)
        out = {k: v for k, v in self.prior_kwargs.items() if k not in PRIORS and k in accepted}
        own = self.prior_kwargs.get(prior) or {}
        out.update(own)
        return out


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
        return _validate(dict(data), origins, {"": base_dir}, source=file)


# ---------------------------------------------------------------------------------------------
# generic validation
# ---------------------------------------------------------------------------------------------
_SECTIONS: dict[str, type] = {
    "dataset": DatasetConfig,
    "preprocessing": PreprocessingConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "analysis": AnalysisConfig,
    "figures": FiguresConfig,
}
_TOP_KEYS = ("name", "base", *_SECTIONS, "output_dir")


def _origin(origins: Mapping[str, str], key: str) -> str | None:
    """The file that set ``key`` (the deepest recorded prefix)."""
    parts = key.split(".")
    for i in range(len(parts), -1, -1):
        k = ".".join(parts[:i])
        if k in origins:
            return origins[k]
    return None


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        (arg,) = get_args(tp) or (Any,)
        return f"a list of {_type_name(arg)}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true/false"
    if tp is str:
        return "a string"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp``, or raise :class:`_Mismatch`."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        # exact type first (1 stays an int for `int | float`)
        for a in args:
            if a is not type(None) and get_origin(a) is None and type(value) is a:
                return value
        for a in args:
            try:
                return _coerce(value, a)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in get_args(tp) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if origin is list:
        (arg,) = get_args(tp) or (Any,)
        if not isinstance(value, list | tuple):
            raise _Mismatch
        return [_coerce(v, arg) for v in value]
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        return dict(value)
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported config type {tp!r}")  # pragma: no cover


def _section(cls: type, data: Any, key: str, origins: Mapping[str, str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"must be a mapping of options, received {data!r}.", key=key, file=_origin(origins, key)
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        full = f"{key}.{k}"
        if k not in names:
            raise ConfigError(
                f"unknown key {k!r} in `{key}`{_suggest(str(k), names)} (valid keys: {', '.join(names)})",
                key=full,
                file=_origin(origins, full),
            )
        try:
            kwargs[k] = _coerce(v, hints[k])
        except _Mismatch:
            raise ConfigError(
                f"must be {_type_name(hints[k])}, received {v!r}{_literal_hint(v, hints[k])}.",
                key=full,
                file=_origin(origins, full),
            ) from None
    return cls(**kwargs)


def _literal_hint(value: Any, tp: Any) -> str:
    """A "did you mean" for a misspelt choice."""
    choices: list[str] = []
    stack = [tp]
    while stack:
        t = stack.pop()
        if get_origin(t) is Literal:
            choices += [a for a in get_args(t) if isinstance(a, str)]
        elif get_origin(t) in (typing.Union, types.UnionType, list):
            stack += list(get_args(t))
    if isinstance(value, str) and choices:
        return _suggest(value, choices)
    if isinstance(value, list) and choices:
        bad = [v for v in value if v not in choices]
        if bad and isinstance(bad[0], str):
            return f" ({bad[0]!r} is not one of them{_suggest(bad[0], choices)})"
    return ""


def _prior_options(prior: str) -> set[str]:
    from sfact.models._config import CONFIGS

    cls = CONFIGS[prior]
    return {f.name for f in dataclasses.fields(cls) if f.name != "extra"}


def _resolve_path(value: str | None, key: str, base_dirs: Mapping[str, str]) -> str | None:
    if value is None:
        return None
    p = Path(os.path.expanduser(value))
    if not p.is_absolute():
        base = _origin(base_dirs, key) or os.getcwd()
        p = Path(base) / p
    return os.path.normpath(str(p))


def _validate(
    data: dict[str, Any],
    origins: Mapping[str, str],
    base_dirs: Mapping[str, str],
    *,
    source: str | os.PathLike | None,
) -> Config:
    from sfact.datasets._registry import LOADERS

    def err(msg: str, key: str) -> ConfigError:
        return ConfigError(msg, key=key, file=_origin(origins, key))

    for k in data:
        if k not in _TOP_KEYS:
            raise err(
                f"unknown key {k!r}{_suggest(str(k), _TOP_KEYS)} (valid keys: {', '.join(_TOP_KEYS)})", str(k)
            )
    data.pop("base", None)
    sections = {s: _section(cls, data.get(s), s, origins) for s, cls in _SECTIONS.items()}
    ds: DatasetConfig = sections["dataset"]
    model: ModelConfig = sections["model"]
    training: TrainingConfig = sections["training"]
    raw_dataset = data.get("dataset") or {}

    # dataset
    if "dataset" not in data:
        raise err("missing: give `dataset: {loader: NAME}` or `dataset: {path: FILE.h5ad}`.", "dataset")
    if ds.loader is None and ds.path is None:
        raise err("give a `loader` (a registered data set) or a `path` (an .h5ad file).", "dataset")
    if ds.loader is not None:
        if ds.loader not in LOADERS:
            raise err(
                f"unknown loader {ds.loader!r}{_suggest(ds.loader, sorted(LOADERS))} "
                f"(registered: {', '.join(sorted(LOADERS))})",
                "dataset.loader",
            )
        info = LOADERS[ds.loader]
        if info.needs_path and ds.path is None:
            raise err(f"the {ds.loader!r} loader reads a local file: set `dataset.path`.", "dataset.path")
        if not (info.needs_path or getattr(info, "accepts_path", False)) and ds.path is not None:
            raise err(
                f"the {ds.loader!r} loader takes no path (it is bundled); remove `dataset.path` or the loader.",
                "dataset.path",
            )
        if "group_key" not in raw_dataset:
            ds.group_key = info.group_key
        ds.loader_kwargs = _check_loader_kwargs(info, ds.loader_kwargs, err, base_dirs)
    elif ds.loader_kwargs:
        raise err("only for a `loader`, not for an .h5ad `path`.", "dataset.loader_kwargs")
    ds.path = _resolve_path(ds.path, "dataset.path", base_dirs)
    if ds.subsample is not None:
        s = ds.subsample
        if (isinstance(s, int) and s < 1) or (isinstance(s, float) and not 0 < s <= 1):
            raise err(
                f"must be a number of cells (int > 0) or a fraction in (0, 1], received {s!r}.",
                "dataset.subsample",
            )

    # name and output
    name = data.get("name")
    if name is None:
        name = ds.loader if ds.loader is not None else Path(ds.path or "data").stem
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise err(
            f"must be a string of letters, digits and `_.+-` (used in job names), received {name!r}.", "name"
        )
    output_dir = data.get("output_dir")
    if output_dir is None:
        output_dir = f"outputs/{name}"
    if not isinstance(output_dir, str):
        raise err(f"must be a path (string), received {output_dir!r}.", "output_dir")
    output_dir = _resolve_path(output_dir, "output_dir", base_dirs)

    # preprocessing
    pre: PreprocessingConfig = sections["preprocessing"]
    if pre.min_group_fraction is not None and not 0 <= pre.min_group_fraction <= 1:
        raise err(
            f"must be in [0, 1], received {pre.min_group_fraction}.", "preprocessing.min_group_fraction"
        )
    if pre.min_group_size is not None and pre.min_group_size < 0:
        raise err(f"must be >= 0, received {pre.min_group_size}.", "preprocessing.min_group_size")
    if pre.box_size <= 0:
        raise err(f"must be positive, received {pre.box_size}.", "preprocessing.box_size")
    if pre.max_mito_fraction is not None and pre.mito_prefix is None:
        raise err("needs `preprocessing.mito_prefix`.", "preprocessing.max_mito_fraction")

    # model
    if model.n_factors < 1:
        raise err(f"must be a positive integer, received {model.n_factors}.", "model.n_factors")
    if model.n_samples < 1:
        raise err(f"must be a positive integer, received {model.n_samples}.", "model.n_samples")
    if model.prior in MULTIGROUP_PRIORS and ds.group_key is None:
        raise err(
            f"the {model.prior!r} prior needs groups: set `dataset.group_key` (a column of obs) or use "
            f"{model.prior.removeprefix('mggp_')!r}.",
            "model.prior",
        )
    _check_prior_kwargs(model, err)

    # training
    for k in ("max_iter", "init_iter", "min_iter"):
        if getattr(training, k) < 0:
            raise err(f"must be >= 0, received {getattr(training, k)}.", f"training.{k}")
    if training.tol < 0:
        raise err(f"must be >= 0, received {training.tol}.", "training.tol")
    if training.learning_rate is not None and not training.learning_rate > 0:
        raise err(f"must be positive, received {training.learning_rate}.", "training.learning_rate")
    for k in ("batch_size", "y_batch_size"):
        v = getattr(training, k)
        if v is not None and v < 1:
            raise err(f"must be a positive integer or null, received {v}.", f"training.{k}")
    if not _DEVICE_RE.match(training.device):
        raise err(
            f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', received {training.device!r}.", "training.device"
        )

    # analysis and figures
    an: AnalysisConfig = sections["analysis"]
    for k in ("batch_size", "n_neighs", "n_top"):
        if getattr(an, k) < 1:
            raise err(f"must be a positive integer, received {getattr(an, k)}.", f"analysis.{k}")
    fig: FiguresConfig = sections["figures"]
    if fig.dpi < 1:
        raise err(f"must be a positive integer, received {fig.dpi}.", "figures.dpi")

    return Config(
        name=name,
        output_dir=output_dir,
        source=None if source is None else str(source),
        **sections,
    )


def _check_loader_kwargs(
    info: Any, kwargs: dict[str, Any], err, base_dirs: Mapping[str, str]
) -> dict[str, Any]:
    """Names checked against the loader's signature; path-typed values resolved like ``dataset.path``."""
    import inspect

    try:
        params = inspect.signature(info.fn).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    reserved = {"path", "subsample", "random_state"}
    names = [
        n for n, p in params.items() if n not in reserved and p.kind is not inspect.Parameter.VAR_POSITIONAL
    ]
    out = dict(kwargs)
    for k, v in kwargs.items():
        key = f"dataset.loader_kwargs.{k}"
        if k in reserved:
            raise err(f"set `dataset.{k}` instead of passing it to the loader.", key)
        if k not in names:
            raise err(
                f"the {info.name!r} loader has no argument {k!r}{_suggest(str(k), names)} "
                f"(arguments: {', '.join(names) or 'none'})",
                key,
            )
        if isinstance(v, str) and "Path" in str(params[k].annotation):
            out[k] = _resolve_path(v, key, base_dirs)
    return out


def _check_prior_kwargs(model: ModelConfig, err) -> None:
    """Every option must belong to some prior; values are checked by each planned prior's config."""
    from sfact.models._config import make_config

    priors = [model.prior] if model.prior is not None else list(PRIORS)
    options = {p: _prior_options(p) for p in PRIORS}
    all_options = sorted(set().union(*options.values()))
    for k, v in model.prior_kwargs.items():
        key = f"model.prior_kwargs.{k}"
        if k in PRIORS:
            if not isinstance(v, Mapping):
                raise err(f"options of the {k!r} prior must be a mapping, received {v!r}.", key)
            for kk in v:
                if kk not in options[k]:
                    raise err(
                        f"not an option of the {k!r} prior{_suggest(str(kk), sorted(options[k]))} "
                        f"(options: {', '.join(sorted(options[k]))})",
                        f"{key}.{kk}",
                    )
            continue
        if k not in all_options:
            raise err(
                f"not an option of any prior{_suggest(str(k), all_options)} (options: {', '.join(all_options)})",
                key,
            )
    for p in priors:
        kwargs = model.prior_kwargs_for(p)
        try:
            make_config(p, kwargs)
        except (TypeError, ValueError) as e:
            key = "model.prior_kwargs"
            for k, v in kwargs.items():  # name the option at fault when it fails on its own
                try:
                    make_config(p, {k: v})
                except (TypeError, ValueError):
                    own = k in (model.prior_kwargs.get(p) or {})
                    key = f"model.prior_kwargs.{p}.{k}" if own else f"model.prior_kwargs.{k}"
                    break
            raise err(f"invalid option of the {p!r} prior: {e}", key) from None


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError("config file not found.", file=path) from None
    except OSError as e:
        raise ConfigError(f"cannot read the config file: {e}", file=path) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", file=path) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"a config must be a mapping of sections, received {type(data).__name__}.", file=path
        )
    return data


def _merge(
    base: dict[str, Any],
    over: Mapping[str, Any],
    origins: dict[str, str],
    base_dirs: dict[str, str],
    file: str,
    prefix: str = "",
) -> dict[str, Any]:
    """Deep-merge ``over`` into ``base`` (mappings merged, other values replaced), recording origins."""
    out = dict(base)
    for k, v in over.items():
        key = f"{prefix}{k}"
        # sections and prior_kwargs merge key by key; everything else is replaced
        if (
            isinstance(v, Mapping)
            and isinstance(out.get(k), Mapping)
            and (prefix == "" or k == "prior_kwargs")
        ):
            out[k] = _merge(dict(out[k]), v, origins, base_dirs, file, prefix=f"{key}.")
        else:
            out[k] = v
            for o in [o for o in origins if o.startswith(f"{key}.")]:
                del origins[o]
            origins[key] = file
            base_dirs[key] = str(Path(file).resolve().parent)
    return out


def _load_raw(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str], dict[str, str]]:
    path = path.resolve() if path.exists() else path
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"`base` files form a cycle: {cycle}.", key="base", file=chain[-1])
    data = _read_yaml(path)
    base = data.get("base")
    origins: dict[str, str] = {}
    base_dirs: dict[str, str] = {}
    merged: dict[str, Any] = {}
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(
                f"must be the path of another config, received {base!r}.", key="base", file=path
            )
        base_path = Path(os.path.expanduser(base))
        if not base_path.is_absolute():
            base_path = path.parent / base_path
        if not base_path.exists():
            raise ConfigError(f"base config {str(base_path)!r} not found.", key="base", file=path)
        merged, origins, base_dirs = _load_raw(base_path, (*chain, path))
    origins[""] = str(path)
    base_dirs[""] = str(path.parent)
    own = {k: v for k, v in data.items() if k != "base"}
    merged = _merge(merged, own, origins, base_dirs, str(path))
    return merged, origins, base_dirs


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a YAML config file.

    Parameters
    ----------
    path
        The config file. ``base: other.yaml`` in it starts from ``other.yaml`` (relative to
        this file) and overrides it key by key.

    Returns
    -------
    The validated :class:`Config`; relative paths are resolved against the folder of the file
    that set them.

    Raises
    ------
    ConfigError
        Naming the key and file of the first problem.

    Examples
    --------
    >>> from sfact.pipeline import load_config
    >>> cfg = load_config("configs/osmfish/general.yaml")  # doctest: +SKIP
    >>> cfg.priors()  # doctest: +SKIP
    ['pnmf', 'svgp', 'mggp_svgp', 'lcgp', 'mggp_lcgp']
    """
    path = Path(path)
    merged, origins, base_dirs = _load_raw(path)
    return _validate(merged, origins, base_dirs, source=path)


def find_configs(folder: str | os.PathLike, config_name: str = "general.yaml") -> list[Path]:
    """Every file named ``config_name`` (a glob pattern is allowed) below ``folder``, sorted.

    Examples
    --------
    >>> from sfact.pipeline import find_configs
    >>> find_configs("configs", "general.yaml")  # doctest: +SKIP
    [PosixPath('configs/merfish/general.yaml'), PosixPath('configs/osmfish/general.yaml'), ...]
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"not a folder: {str(folder)!r}.")
    return sorted(p for p in folder.rglob(config_name) if p.is_file())


def write_prior_configs(
    general: str | os.PathLike,
    *,
    priors: list[str] | None = None,
    force: bool = False,
    dry_run: bool = False,
) -> tuple[list[Path], list[str]]:
    """Write one config per prior next to ``general`` (``pnmf.yaml``, ``svgp.yaml``, ...).

    Each written file is ``base: <general>`` plus ``model: {prior: <prior>}``, so it follows
    later edits of the general config and can override any key for its prior.

    Parameters
    ----------
    general
        The general config (usually without ``model.prior``).
    priors
        The priors to write; every prior that applies when ``None`` (the multi-group priors
        need a group key).
    force
        Overwrite existing files.
    dry_run
        Only return what would be written.

    Returns
    -------
    The paths (to be) written and notes (priors left out and why).

    Raises
    ------
    FileExistsError
        If a file exists and ``force`` is ``False`` (nothing is written then).

    Examples
    --------
    >>> from sfact.pipeline._config import write_prior_configs
    >>> paths, notes = write_prior_configs("configs/osmfish/general.yaml", dry_run=True)  # doctest: +SKIP
    """
    general = Path(general)
    cfg = load_config(general)
    notes: list[str] = []
    if priors is None:
        priors = list(PRIORS)
    chosen = []
    for p in priors:
        if p in MULTIGROUP_PRIORS and cfg.group_key is None:
            notes.append(f"{p}: left out, the data set has no group key (set `dataset.group_key`).")
            continue
        chosen.append(p)
    paths = [general.parent / f"{p}.yaml" for p in chosen]
    if general.resolve() in [p.resolve() for p in paths]:
        raise ConfigError(
            f"would overwrite the general config itself ({general.name}); rename it.", file=general
        )
    exist = [p for p in paths if p.exists()]
    if exist and not force:
        raise FileExistsError(
            f"{', '.join(str(p) for p in exist)} already exist{'s' if len(exist) == 1 else ''}; "
            "pass --force to overwrite."
        )
    for p, prior in zip(paths, chosen, strict=True):
        text = (
            f"# {prior} on {cfg.name}: everything from {general.name}, with the prior set.\n"
            f"# Written by `sfact generate`; add keys here to override {general.name} for this prior.\n"
            f"base: {general.name}\n"
            f"model:\n"
            f"  prior: {prior}\n"
        )
        if not dry_run:
            # validate before writing: the result must load
            tmp = p.with_name(f".{p.name}.tmp")
            tmp.write_text(text)
            try:
                load_config(tmp)
            except ConfigError:
                tmp.unlink()
                raise
            os.replace(tmp, p)
    return paths, notes


def config_to_yaml(cfg: Config) -> str:
    """The config as YAML text (every key, paths absolute)."""
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
