"""The checks of a config's values, section by section, after their types were coerced.

:func:`validate` turns the merged mapping of a config file (or a dict) into the fields of a
:class:`~sfact.pipeline.Config`:
unknown keys and wrong types fail in :func:`._config_coerce.section`; here, values out of
range, a loader that does not exist, options no prior takes, and so on. Relative paths are
resolved against the folder of the file that set them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._constants import check_device, prior_family
from ._config_coerce import origin_of, section
from ._config_schema import (
    _SECTIONS,
    _TOP_KEYS,
    MULTIGROUP_PRIORS,
    PRIORS,
    ConfigError,
    _prior_options,
    _suggest,
)

if TYPE_CHECKING:
    from ._config_schema import (
        AnalysisConfig,
        DatasetConfig,
        FiguresConfig,
        ModelConfig,
        PreprocessingConfig,
        SelectionConfig,
        TrainingConfig,
    )

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

#: builds the :class:`ConfigError` of a key: ``err(message, "model.n_factors")``
_Err = Callable[[str, str], ConfigError]


def validate(
    data: dict[str, Any],
    origins: Mapping[str, str],
    base_dirs: Mapping[str, str],
    *,
    source: str | os.PathLike | None,
) -> dict[str, Any]:
    """Validate a merged config mapping into the fields of a :class:`~sfact.pipeline.Config`.

    Parameters
    ----------
    data
        The config (``base`` already merged in; a ``base`` key left in is ignored).
    origins
        The file that set each dotted key (``""`` for the whole config), for error messages.
    base_dirs
        The folder relative paths of each dotted key are relative to.
    source
        The config file, recorded as ``Config.source``.

    Returns
    -------
    The keyword arguments of ``Config``: ``name``, ``output_dir``, ``source`` and the sections.

    Raises
    ------
    ConfigError
        Naming the key and file of the first problem.
    """

    def err(msg: str, key: str) -> ConfigError:
        return ConfigError(msg, key=key, file=origin_of(origins, key))

    for k in data:
        if k not in _TOP_KEYS:
            raise err(
                f"unknown key {k!r}{_suggest(str(k), _TOP_KEYS)} (valid keys: {', '.join(_TOP_KEYS)})", str(k)
            )
    data.pop("base", None)
    sections = {s: section(cls, data.get(s), s, origins) for s, cls in _SECTIONS.items()}
    if "dataset" not in data:
        raise err("missing: give `dataset: {loader: NAME}` or `dataset: {path: FILE.h5ad}`.", "dataset")
    ds: DatasetConfig = sections["dataset"]
    _check_dataset(ds, data.get("dataset") or {}, err, base_dirs)
    name = _check_name(data.get("name"), ds, err)
    output_dir = _check_output_dir(data.get("output_dir"), name, err, base_dirs)
    _check_preprocessing(sections["preprocessing"], err)
    _check_model(sections["model"], ds, err)
    _check_training(sections["training"], err)
    _check_analysis_and_figures(sections["analysis"], sections["figures"], err)
    _check_selection(sections["selection"], sections["model"], ds, err)
    return {
        "name": name,
        "output_dir": output_dir,
        "source": None if source is None else str(source),
        **sections,
    }


def _check_dataset(
    ds: DatasetConfig, raw: Mapping[str, Any], err: _Err, base_dirs: Mapping[str, str]
) -> None:
    """Loader or path; the loader's default group key and checked ``loader_kwargs``; paths resolved."""
    from sfact.datasets._registry import LOADERS

    if ds.loader is None and ds.path is None and ds.reader is None:
        raise err(
            "give a `loader` (a registered data set), a `path` (an .h5ad file) or a `reader` and the "
            "`path` of an instrument's output folder.",
            "dataset",
        )
    if ds.reader is not None:
        from sfact.datasets._read import READERS

        if ds.loader is not None:
            raise err(
                "give `reader` (an output folder's technology) or `loader`, not both.", "dataset.reader"
            )
        if ds.reader != "auto" and ds.reader not in READERS:
            raise err(
                f"unknown reader {ds.reader!r}{_suggest(str(ds.reader), sorted(READERS))} "
                f"(technologies: auto, {', '.join(READERS)})",
                "dataset.reader",
            )
        if ds.path is None:
            raise err("a `reader` reads an output folder: set `dataset.path` to it.", "dataset.path")
    elif ds.loader is not None:
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
        if "group_key" not in raw:
            ds.group_key = info.group_key
        ds.loader_kwargs = _check_loader_kwargs(info, ds.loader_kwargs, err, base_dirs)
    elif ds.loader_kwargs and ds.reader is None:
        raise err("only for a `loader` or a `reader`, not for an .h5ad `path`.", "dataset.loader_kwargs")
    ds.path = _resolve_path(ds.path, "dataset.path", base_dirs)
    if ds.subsample is not None:
        s = ds.subsample
        if (isinstance(s, int) and s < 1) or (isinstance(s, float) and not 0 < s <= 1):
            raise err(
                f"must be a number of cells (int > 0) or a fraction in (0, 1], received {s!r}.",
                "dataset.subsample",
            )


def _check_name(name: Any, ds: DatasetConfig, err: _Err) -> str:
    """``name``, by default the loader's name or the ``.h5ad`` file's stem."""
    if name is None:
        name = ds.loader if ds.loader is not None else Path(ds.path or "data").stem
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise err(
            f"must be a string of letters, digits and `_.+-` (used in job names), received {name!r}.", "name"
        )
    return name


def _check_output_dir(output_dir: Any, name: str, err: _Err, base_dirs: Mapping[str, str]) -> str:
    """``output_dir`` as an absolute path, by default ``outputs/<name>``."""
    if output_dir is None:
        output_dir = f"outputs/{name}"
    if not isinstance(output_dir, str):
        raise err(f"must be a path (string), received {output_dir!r}.", "output_dir")
    return _resolve_path(output_dir, "output_dir", base_dirs)


def _check_preprocessing(pre: PreprocessingConfig, err: _Err) -> None:
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


def _check_model(model: ModelConfig, ds: DatasetConfig, err: _Err) -> None:
    if model.n_factors < 1:
        raise err(f"must be a positive integer, received {model.n_factors}.", "model.n_factors")
    if model.n_samples < 1:
        raise err(f"must be a positive integer, received {model.n_samples}.", "model.n_samples")
    if model.prior in MULTIGROUP_PRIORS and ds.group_key is None:
        raise err(
            f"the {model.prior!r} prior needs groups: set `dataset.group_key` (a column of obs) or use "
            f"{prior_family(model.prior)!r}.",
            "model.prior",
        )
    _check_prior_kwargs(model, err)


def _check_training(training: TrainingConfig, err: _Err) -> None:
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
    vf = training.validation_fraction
    if vf is not None and not 0 <= vf < 0.5:
        raise err(
            f"must be in [0, 0.5) (0: no validation cells; null: automatic), received {vf}.",
            "training.validation_fraction",
        )
    try:
        check_device(training.device)
    except ValueError:
        raise err(
            f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', received {training.device!r}.", "training.device"
        ) from None


def _check_analysis_and_figures(an: AnalysisConfig, fig: FiguresConfig, err: _Err) -> None:
    for k in ("batch_size", "n_neighs", "n_top"):
        if getattr(an, k) < 1:
            raise err(f"must be a positive integer, received {getattr(an, k)}.", f"analysis.{k}")
    if fig.dpi < 1:
        raise err(f"must be a positive integer, received {fig.dpi}.", "figures.dpi")


def _check_selection(sel: SelectionConfig, model: ModelConfig, ds: DatasetConfig, err: _Err) -> None:
    """The grid of ``sfact select``: known priors with their groups, positive n_factors, known options."""
    if sel.priors is not None:
        if not sel.priors:
            raise err("list at least one prior, or null for the default.", "selection.priors")
        for p in sel.priors:
            if p in MULTIGROUP_PRIORS and ds.group_key is None:
                raise err(
                    f"the {p!r} prior needs groups: set `dataset.group_key` or leave it out.",
                    "selection.priors",
                )
    if sel.n_factors is not None:
        if not sel.n_factors or any(n < 1 for n in sel.n_factors):
            raise err(f"must list positive integers, received {sel.n_factors}.", "selection.n_factors")
    priors = sel.priors or ([model.prior] if model.prior is not None else list(PRIORS))
    options = {p: _prior_options(p) for p in PRIORS}
    all_options = sorted(set().union(*options.values()))
    for k, values in sel.prior_kwargs_grid.items():
        key = f"selection.prior_kwargs_grid.{k}"
        if k not in all_options:
            raise err(
                f"not an option of any prior{_suggest(str(k), all_options)} (options: {', '.join(all_options)})",
                key,
            )
        if not any(k in options[p] for p in priors):
            raise err(f"not an option of the priors compared ({', '.join(priors)}).", key)
        if not values:
            raise err("list at least one value.", key)
    if sel.n_folds is not None and sel.n_folds < 2:
        raise err(
            f"must be an integer >= 2, or null for one split; received {sel.n_folds}.", "selection.n_folds"
        )
    if not 0 < sel.heldout_fraction < 1:
        raise err(f"must be in (0, 1), received {sel.heldout_fraction}.", "selection.heldout_fraction")
    if sel.n_jobs is not None and sel.n_jobs < 1:
        raise err(f"must be a positive integer or null, received {sel.n_jobs}.", "selection.n_jobs")


def _resolve_path(value: str | None, key: str, base_dirs: Mapping[str, str]) -> str | None:
    if value is None:
        return None
    p = Path(os.path.expanduser(value))
    if not p.is_absolute():
        base = origin_of(base_dirs, key) or os.getcwd()
        p = Path(base) / p
    return os.path.normpath(str(p))


def _check_loader_kwargs(
    info: Any, kwargs: dict[str, Any], err: _Err, base_dirs: Mapping[str, str]
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


def _check_prior_kwargs(model: ModelConfig, err: _Err) -> None:
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
