"""Saving and loading a :class:`~sfact.models.SpatialFactorization` (format version 1).

A saved model is a directory with ``metadata.json`` (the :class:`~sfact.models.ModelSetup`,
the prior's constructor arguments, history and training info), ``model.pt`` (the module's
state dict, loadable with ``weights_only=True``), ``train_inputs.pt`` (scaled coordinates and
group codes of the training cells; spatial priors) and ``optimizer.pt`` (optional).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anndata import AnnData

    from ._model import SpatialFactorization

__all__ = ["FORMAT_VERSION", "load_model", "save_model", "to_cpu"]

FORMAT_VERSION = 1


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


def _save_atomic(obj: Any, path: str) -> None:
    import torch

    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def save_model(
    model: SpatialFactorization, dir_path: str | os.PathLike, *, overwrite: bool, save_optimizer: bool
) -> None:
    """See :meth:`SpatialFactorization.save`."""
    import torch

    from .._version import __version__

    model._require_trained()
    dir_path = os.fspath(dir_path)
    meta_path = os.path.join(dir_path, "metadata.json")
    if os.path.exists(meta_path) and not overwrite:
        raise FileExistsError(
            f"A model is already saved in {dir_path!r}; pass `overwrite=True` to replace it."
        )
    os.makedirs(dir_path, exist_ok=True)
    _save_atomic(
        {k: v.detach().cpu() for k, v in model.module.state_dict().items()},
        os.path.join(dir_path, "model.pt"),
    )
    if model.module.prior.spatial:
        X, g = model._training_inputs()
        inputs = {"X": torch.as_tensor(X)}
        if g is not None:
            inputs["groups"] = torch.as_tensor(g)
        _save_atomic(inputs, os.path.join(dir_path, "train_inputs.pt"))
    opt_path = os.path.join(dir_path, "optimizer.pt")
    opt_state = model._optimizer_state_dict()
    if save_optimizer and opt_state is not None:
        _save_atomic(to_cpu(opt_state), opt_path)
    elif os.path.exists(opt_path):
        os.remove(opt_path)
    meta = {
        "format_version": FORMAT_VERSION,
        "sfact_version": __version__,
        "setup": model.setup.to_dict(),
        "prior_config": model.module.prior.config(),
        "history": {k: v.tolist() for k, v in model.history_.as_dict().items()},
        "train_info": model.train_info,
        "converged": model.converged,
    }
    with open(meta_path + ".tmp", "w") as fh:
        json.dump(meta, fh, indent=1)
    os.replace(meta_path + ".tmp", meta_path)


def load_model(
    cls: type[SpatialFactorization],
    dir_path: str | os.PathLike,
    adata: AnnData | None = None,
    *,
    device: str | None = None,
) -> SpatialFactorization:
    """See :meth:`SpatialFactorization.load`."""
    import torch

    from .._core.module import FactorModule
    from .._core.registry import prior_class
    from .._core.train import History
    from ._setup import ModelSetup

    dir_path = os.fspath(dir_path)
    meta_path = os.path.join(dir_path, "metadata.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"No saved sfact model in {dir_path!r} (metadata.json is missing).")
    with open(meta_path) as fh:
        meta = json.load(fh)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"The model in {dir_path!r} was saved by a newer sfact ({meta.get('sfact_version')}); upgrade sfact."
        )
    setup = ModelSetup.from_dict(meta["setup"])
    pcls = prior_class(setup.prior)
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
    elif os.path.exists(os.path.join(dir_path, "train_inputs.pt")):
        saved = torch.load(os.path.join(dir_path, "train_inputs.pt"), map_location="cpu", weights_only=True)
        g = saved.get("groups")
        inputs = (saved["X"].numpy(), None if g is None else g.numpy())
    module = FactorModule(pcls(**meta["prior_config"]), setup.n_vars, loadings_mode=setup.loadings_mode)
    module.load_state_dict(
        torch.load(os.path.join(dir_path, "model.pt"), map_location="cpu", weights_only=True)
    )
    obj = cls._from_setup(setup, adata=adata, inputs=inputs, device=device)
    from .._core.factory import torch_dtype

    module.to(device=obj.device, dtype=torch_dtype(setup.dtype))
    module.eval()
    opt_path = os.path.join(dir_path, "optimizer.pt")
    obj._set_trained(
        module,
        history=History.from_dict(meta["history"]),
        train_info=meta.get("train_info", {}),
        converged=bool(meta.get("converged", False)),
        optimizer_state=torch.load(opt_path, map_location=obj.device, weights_only=True)
        if os.path.exists(opt_path)
        else None,
    )
    return obj
