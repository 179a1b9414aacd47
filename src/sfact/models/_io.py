"""Saving and loading a :class:`~sfact.models.SpatialFactorization` (format version 1).

A saved model is a folder with ``metadata.json`` (the :class:`~sfact.models.ModelSetup`,
the prior's constructor arguments, history and training info), ``model.pt`` (the module's
state dict, loadable with ``weights_only=True``), ``train_inputs.pt`` (scaled coordinates and
group codes of the training cells; spatial priors) and ``optimizer.pt`` (optional).

Saving is atomic (:mod:`sfact._atomic`): the folder is written as a temporary sibling
``.<name>.tmp-<pid>`` and swapped in by renames, so a failure leaves the previous model as it
was and no half folder under the final name. Loading reads the tensor files with
``weights_only=True`` only (no Python object is ever unpickled) and checks the metadata against
the tensors before building anything; every problem is a :class:`~sfact.models.ModelFileError`
naming the file and what is wrong.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._exceptions import ModelFileError

if TYPE_CHECKING:
    from anndata import AnnData

    from ._model import SpatialFactorization
    from ._setup import ModelSetup

__all__ = ["FORMAT_VERSION", "MODEL_FILES", "check_save_target", "load_model", "save_model", "to_cpu"]

FORMAT_VERSION = 1

#: the files of a saved model; a folder holding only these (and their old ``.tmp`` leftovers) may be replaced
MODEL_FILES = ("metadata.json", "model.pt", "train_inputs.pt", "optimizer.pt")
#: files the operating system drops into folders; they do not stop a model folder from being replaced
_SYSTEM_FILES = (".DS_Store", "Thumbs.db", "desktop.ini")
_DTYPES = ("float32", "float64")
_RESAVE = "Re-save the model with `model.save(dir, overwrite=True)`, or load a copy you trust."


def to_cpu(obj: Any) -> Any:
    """Tensors (in nested dicts, lists and tuples) detached and moved to the CPU."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


# ---------------------------------------------------------------------------------------- save
def check_save_target(dir_path: str | os.PathLike, *, overwrite: bool) -> Path:
    """Raise :class:`FileExistsError` unless a model may be saved to ``dir_path``; the folder to write.

    A model may be saved to a new path, an empty folder, or (with ``overwrite=True``) a folder
    holding a saved model. A folder holding other files is refused even with ``overwrite``:
    saving replaces the whole folder. Cheap, so callers can check before a long training.

    Parameters
    ----------
    dir_path
        The folder passed to :meth:`~sfact.models.SpatialFactorization.save`.
    overwrite
        Whether an existing model may be replaced.

    Returns
    -------
    The folder's real path (a symbolic link to a folder is followed, so the link stays).
    """
    shown = os.fspath(dir_path)
    path = Path(os.path.realpath(shown))
    if path.exists() and not path.is_dir():
        raise FileExistsError(
            f"{shown!r} exists and is not a folder; pass a folder path to save the model in."
        )
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir())
        foreign = [
            n
            for n in names
            if n not in MODEL_FILES
            and n not in _SYSTEM_FILES
            and not (n.endswith(".tmp") and n[: -len(".tmp")] in MODEL_FILES)
        ]
        if foreign:
            more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            raise FileExistsError(
                f"{shown!r} holds files that are not part of a saved sfact model ({foreign[:5]}{more}); "
                "saving replaces the whole folder, so pass a new or empty folder."
            )
        if not overwrite and any(n in MODEL_FILES for n in names):
            raise FileExistsError(
                f"A model is already saved in {shown!r}; pass `overwrite=True` to replace it."
            )
    return path


def _write_metadata(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def save_model(
    model: SpatialFactorization, dir_path: str | os.PathLike, *, overwrite: bool, save_optimizer: bool
) -> None:
    """See :meth:`SpatialFactorization.save`."""
    import torch

    from .._atomic import atomic_dir, remove_stale_siblings
    from .._version import __version__

    model._require_trained()
    path = check_save_target(dir_path, overwrite=overwrite)
    # everything in memory first: a failure here writes nothing
    state = {k: v.detach().cpu() for k, v in model.module.state_dict().items()}
    inputs = None
    if model.module.prior.spatial:
        X, g = model._training_inputs()
        inputs = {"X": torch.as_tensor(X)}
        if g is not None:
            inputs["groups"] = torch.as_tensor(g)
    opt_state = model._optimizer_state_dict() if save_optimizer else None
    meta = {
        "format_version": FORMAT_VERSION,
        "sfact_version": __version__,
        "setup": model.setup.to_dict(),
        "prior_config": model.module.prior.config(),
        "history": {k: v.tolist() for k, v in model.history_.as_dict().items()},
        "train_info": model.train_info,
        "converged": model.converged,
    }
    meta_text = json.dumps(meta, indent=1) + "\n"
    remove_stale_siblings(path)  # left by a save that was killed
    with atomic_dir(path, overwrite=True) as tmp:
        torch.save(state, tmp / "model.pt")
        if inputs is not None:
            torch.save(inputs, tmp / "train_inputs.pt")
        if opt_state is not None:
            torch.save(to_cpu(opt_state), tmp / "optimizer.pt")
        _write_metadata(tmp / "metadata.json", meta_text)  # last: the folder's completion mark


# ---------------------------------------------------------------------------------------- load
def _bad(path: Path | str, problem: str, fix: str = _RESAVE) -> ModelFileError:
    return ModelFileError(f"Cannot load {os.fspath(path)!r}: {problem}. {fix}")


def _torch_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with sfact's errors (torch's text never shown)."""
    import torch

    problem = None
    try:
        with warnings.catch_warnings():
            # e.g. "Detected pickle protocol 4": noise before the refusal below
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(\.|$)")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            problem = (
                "it is not a weights-only sfact model file: it holds Python objects other than "
                "tensors, which sfact refuses to unpickle because unpickling can run arbitrary code"
            )
        else:
            problem = "it is not a model file written by sfact (it cannot be read as a torch tensor file)"
    except Exception as err:  # truncated zip, empty file, text, ...: torch raises all sorts
        problem = (
            "it is truncated or not a model file written by sfact "
            f"(reading it as a torch tensor file failed: {type(err).__name__})"
        )
    raise _bad(
        path,
        problem,
        "Load only model folders written by `SpatialFactorization.save`; re-save the model from its "
        "source, or use a copy you trust.",
    ) from None


def _is_int(v: Any) -> bool:
    import numbers

    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _read_metadata(meta_path: Path) -> dict[str, Any]:
    problem = None
    try:
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except json.JSONDecodeError as err:
        problem = (
            f"it is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}; truncated or edited?)"
        )
    except UnicodeDecodeError:
        problem = "it is not UTF-8 text (not a metadata file written by sfact)"
    except (ValueError, RecursionError) as err:
        problem = f"it is not valid JSON ({type(err).__name__})"
    if problem is not None:
        raise _bad(meta_path, problem) from None
    if not isinstance(meta, dict):
        raise _bad(meta_path, f"it holds a JSON {type(meta).__name__}, not the object sfact writes")
    if "format_version" not in meta:
        raise _bad(meta_path, "`format_version` is missing (not a metadata file written by sfact)")
    version = meta["format_version"]
    if not _is_int(version):
        raise _bad(
            meta_path,
            f"`format_version` must be an integer, found {version!r} ({type(version).__name__})",
        )
    if version > FORMAT_VERSION:
        raise _bad(
            meta_path,
            f"`format_version` is {version}: the model was saved by a newer sfact "
            f"({meta.get('sfact_version')!r}); this sfact reads format version {FORMAT_VERSION}",
            "Upgrade sfact.",
        )
    if version < 1:
        raise _bad(meta_path, f"`format_version` must be 1 to {FORMAT_VERSION}, found {version}")
    for key, kind in (("setup", dict), ("prior_config", dict), ("history", dict), ("train_info", dict)):
        if key == "train_info" and key not in meta:
            continue
        if not isinstance(meta.get(key), kind):
            found = "missing" if key not in meta else f"a {type(meta[key]).__name__}"
            raise _bad(meta_path, f"`{key}` must be a JSON object, found {found}")
    return meta


def _check_setup(meta_path: Path, meta: dict[str, Any]) -> ModelSetup:
    """The :class:`ModelSetup` of ``metadata.json``, its values checked (they size the tensors)."""
    from .._constants import ELBO_MODES, LOADINGS_MODES, PRIOR_NAMES
    from ._setup import ModelSetup

    problem = None
    try:
        setup = ModelSetup.from_dict(meta["setup"])
    except (TypeError, ValueError) as err:
        problem = f"`setup` is not a model set-up of this sfact ({err})"
    if problem is not None:
        raise _bad(meta_path, problem) from None
    checks = [
        (setup.prior in PRIOR_NAMES, f"`setup.prior` must be one of {PRIOR_NAMES}, found {setup.prior!r}"),
        (
            _is_int(setup.n_factors) and setup.n_factors >= 1,
            f"`setup.n_factors` must be a positive integer, found {setup.n_factors!r}",
        ),
        (
            _is_int(setup.n_obs) and setup.n_obs >= 1,
            f"`setup.n_obs` must be a positive integer, found {setup.n_obs!r}",
        ),
        (setup.dtype in _DTYPES, f"`setup.dtype` must be one of {_DTYPES}, found {setup.dtype!r}"),
        (len(setup.var_names) >= 1, "`setup.var_names` is empty"),
        (len(set(setup.var_names)) == len(setup.var_names), "`setup.var_names` has duplicate genes"),
        (
            setup.loadings_mode in LOADINGS_MODES,
            f"`setup.loadings_mode` must be one of {LOADINGS_MODES}, found {setup.loadings_mode!r}",
        ),
        (
            setup.elbo_mode in ELBO_MODES,
            f"`setup.elbo_mode` must be one of {ELBO_MODES}, found {setup.elbo_mode!r}",
        ),
        (isinstance(setup.scaling, dict), "`setup.scaling` must be a JSON object"),
        (isinstance(setup.prior_kwargs, dict), "`setup.prior_kwargs` must be a JSON object"),
    ]
    for ok, problem in checks:
        if not ok:
            raise _bad(meta_path, problem)
    cfg = meta["prior_config"]
    for key, expected in (("n_factors", setup.n_factors), ("n_obs", setup.n_obs)):
        if key in cfg and cfg[key] != expected:
            raise _bad(
                meta_path,
                f"`prior_config.{key}` is {cfg[key]!r} but `setup.{key}` is {expected!r}; the file was edited",
            )
    return setup


def _build_module(meta_path: Path, meta: dict[str, Any], setup: ModelSetup):
    from .._core.module import FactorModule
    from .._core.registry import prior_class

    problem = None
    try:
        prior = prior_class(setup.prior)(**meta["prior_config"])
        module = FactorModule(prior, setup.n_vars, loadings_mode=setup.loadings_mode)
        if setup.gene_offsets:  # the buffers' shapes; their values come from model.pt
            import torch

            module.enable_gene_offsets(torch.zeros(setup.n_sample, setup.n_vars), torch.ones(setup.n_sample))
    except Exception as err:  # the prior's own checks (TypeError for unknown keys, ValueError, ...)
        problem = f"`prior_config` does not describe a {setup.prior!r} prior ({type(err).__name__}: {err})"
    if problem is not None:
        raise _bad(meta_path, problem) from None
    return module


def _shape(t) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _check_state(pt_path: Path, state: Any, module, setup: ModelSetup) -> None:
    """Raise unless the tensors of ``model.pt`` fit the module that ``metadata.json`` describes."""
    import torch

    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise _bad(pt_path, f"it holds a {type(state).__name__}, not the named tensors of an sfact model")
    meta_name = "metadata.json"
    if "W" not in state:
        raise _bad(pt_path, "the loadings `W` are missing (not an sfact model file)")
    W = state["W"]
    if W.ndim != 2:
        raise _bad(pt_path, f"the loadings `W` must be 2-D, found shape {_shape(W)}")
    if W.shape[1] != setup.n_factors:
        raise _bad(
            pt_path,
            f"its loadings `W` have {W.shape[1]} factors but {meta_name} says n_factors={setup.n_factors}; "
            "the two files do not belong together (edited or mixed up)",
        )
    if W.shape[0] != setup.n_vars:
        raise _bad(
            pt_path,
            f"its loadings `W` have {W.shape[0]} genes but {meta_name} lists {setup.n_vars}; "
            "the two files do not belong together (edited or mixed up)",
        )
    expected = module.state_dict()
    shapes = [
        f"`{k}` {_shape(v)} (expected {_shape(expected[k])})"
        for k, v in state.items()
        if k in expected and _shape(v) != _shape(expected[k])
    ]
    if shapes:
        more = f" and {len(shapes) - 3} more" if len(shapes) > 3 else ""
        raise _bad(
            pt_path,
            f"tensor shapes do not match {meta_name}: {', '.join(shapes[:3])}{more}",
        )
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()})
    if dtypes and dtypes != [setup.dtype]:
        raise _bad(pt_path, f"its tensors are {', '.join(dtypes)} but {meta_name} says dtype {setup.dtype!r}")
    params = {name for name, _ in module.named_parameters()}
    bad = [k for k in sorted(params & set(state)) if not bool(torch.isfinite(state[k]).all())]
    if bad:
        raise _bad(pt_path, f"parameters {bad[:5]} hold NaN or infinite values")
    problem = None
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as err:
        problem = f"its tensors do not fit the model in {meta_name} ({' '.join(str(err).split())})"
    if problem is not None:
        raise _bad(pt_path, problem) from None


def _check_inputs(path: Path, saved: Any, setup: ModelSetup):
    import numpy as np
    import torch

    if not isinstance(saved, dict) or not isinstance(saved.get("X"), torch.Tensor):
        raise _bad(path, "it must hold the training coordinates `X` as a tensor")
    X, g = saved["X"], saved.get("groups")
    if X.ndim != 2 or X.shape[0] != setup.n_obs or not X.is_floating_point():
        raise _bad(
            path,
            f"the training coordinates `X` must be a float array of {setup.n_obs} rows (setup.n_obs in "
            f"metadata.json), found {X.dtype} of shape {_shape(X)}",
        )
    if not bool(torch.isfinite(X).all()):
        raise _bad(path, "the training coordinates `X` hold NaN or infinite values")
    if g is not None and (
        not isinstance(g, torch.Tensor) or g.ndim != 1 or g.shape[0] != setup.n_obs or g.is_floating_point()
    ):
        raise _bad(path, f"the group codes `groups` must be {setup.n_obs} integers")
    return X.numpy(), None if g is None else np.asarray(g.numpy())


def _missing_hint(dir_path: Path) -> str:
    """Where an interrupted save left the previous model, if it did."""
    from .._atomic import stale_siblings

    olds = [p for p in stale_siblings(dir_path) if ".old-" in p.name]
    if not olds:
        return ""
    return (
        f"; a save was interrupted and the previous model is in {str(olds[-1])!r}: "
        f"`sfact._atomic.remove_stale_siblings({str(dir_path)!r})` puts it back"
    )


def load_model(
    cls: type[SpatialFactorization],
    dir_path: str | os.PathLike,
    adata: AnnData | None = None,
    *,
    device: str | None = None,
) -> SpatialFactorization:
    """See :meth:`SpatialFactorization.load`."""
    from .._core.factory import torch_dtype
    from .._core.train import History

    shown = os.fspath(dir_path)
    root = Path(shown)
    meta_path = root / "metadata.json"
    if not meta_path.exists():
        why = "metadata.json is missing" if root.is_dir() else "no such folder"
        raise FileNotFoundError(f"No saved sfact model in {shown!r} ({why}{_missing_hint(root)}).")
    # every file is read and checked before anything is built
    meta = _read_metadata(meta_path)
    setup = _check_setup(meta_path, meta)
    module = _build_module(meta_path, meta, setup)
    pt_path = root / "model.pt"
    if not pt_path.exists():
        raise _bad(pt_path, "the file is missing, so the folder holds no trained tensors")
    _check_state(pt_path, _torch_load(pt_path), module, setup)
    problem = None
    try:
        history = History.from_dict(meta["history"])
    except (TypeError, ValueError) as err:
        problem = f"`history` must hold lists of numbers ({err})"
    if problem is not None:
        raise _bad(meta_path, problem) from None
    opt_path = root / "optimizer.pt"
    opt_state = None
    if opt_path.exists():
        opt_state = _torch_load(opt_path)
        if not (
            isinstance(opt_state, dict)
            and isinstance(opt_state.get("state"), dict)
            and isinstance(opt_state.get("param_groups"), list)
        ):
            raise _bad(opt_path, "it is not an optimizer state (`state` and `param_groups`)")

    inputs = None
    if adata is not None:
        setup.check_vars(adata)
        # the training cells: every prior's training marginals are indexed by them
        if adata.n_obs != setup.n_obs:
            raise ValueError(
                f"Cells do not match the model: expected {setup.n_obs} cells, received {adata.n_obs}. "
                "A model saved by `sfact.tl.fit` with validation cells was trained on the others: pass "
                "`adata[~adata.obs['sfact_validation']]`, or load it without `adata`."
            )
        inputs = (setup.scaled_coords(adata), setup.kernel_codes(adata))
    elif (root / "train_inputs.pt").exists():
        inputs = _check_inputs(root / "train_inputs.pt", _torch_load(root / "train_inputs.pt"), setup)
    obj = cls._from_setup(setup, adata=adata, inputs=inputs, device=device)
    module.to(device=obj.device, dtype=torch_dtype(setup.dtype))
    module.eval()
    obj._set_trained(
        module,
        history=history,
        train_info=meta.get("train_info", {}),
        converged=bool(meta.get("converged", False)),
        optimizer_state=opt_state,
    )
    return obj
