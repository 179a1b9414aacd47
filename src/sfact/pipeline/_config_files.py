"""Config files: YAML read, ``base:`` inheritance merged, configs found below folders and written.

:func:`load_config` reads a file, follows its ``base:`` chain (each file overrides the one it
starts from, key by key), records which file set each key (for error messages and relative
paths), and validates the result (:mod:`._config_validate`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._config import Config
from ._config_schema import MULTIGROUP_PRIORS, PRIORS, ConfigError
from ._config_validate import validate


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
    return Config(**validate(merged, origins, base_dirs, source=path))


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
    >>> from sfact.pipeline import write_prior_configs
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
