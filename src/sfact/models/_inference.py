"""Posterior marginals of the log-factors of a trained model: training cells, new cells, groups.

Functions of a :class:`~sfact.models.SpatialFactorization` (``model``); they read its stored
training inputs (:meth:`SpatialFactorization._training_tensors`), never the AnnData.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData

    from ._model import SpatialFactorization

__all__ = ["marginals", "new_marginals", "predict_arrays", "training_marginals"]


def _numpy(t) -> np.ndarray:
    return t.cpu().double().numpy()


def marginals(
    model: SpatialFactorization, adata: AnnData | None, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, var)`` of the training cells (``adata`` ``None`` or the training data) or of new cells."""
    model._require_trained()
    if adata is None or adata is model.adata:
        return training_marginals(model, batch_size)
    return new_marginals(model, adata, batch_size=batch_size)


def training_marginals(model: SpatialFactorization, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, var)`` of the training cells, from the stored training inputs (in batches)."""
    import torch

    from .._core.priors import PriorInput

    prior = model.module.prior
    N = model.setup.n_obs
    with torch.no_grad():
        if prior.per_cell:
            idx = torch.arange(N, device=model.device)
            mu, var = prior.marginals(PriorInput(idx=idx, n_total=N))
            return _numpy(mu), _numpy(var)
        X, g = model._training_tensors()
        mus, vars_ = [], []
        for start in range(0, N, batch_size):
            idx = torch.arange(start, min(start + batch_size, N), device=model.device)
            inp = PriorInput(
                idx=idx,
                n_total=N,
                X=X[idx],
                groups=None if g is None else g[idx],
                X_all=X,
                groups_all=g,
            )
            mu, var = prior.marginals(inp)
            mus.append(_numpy(mu))
            vars_.append(_numpy(var))
    return np.concatenate(mus), np.concatenate(vars_)


def new_marginals(
    model: SpatialFactorization, adata: AnnData, *, batch_size: int = 10000, max_iter: int = 300
) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, var)`` of new cells: the GP predictive (spatial priors) or a fit to their counts (``pnmf``)."""
    import torch

    model._require_trained()
    prior = model.module.prior
    if not (prior.per_cell and not prior.spatial):
        setup = model.setup
        return predict_arrays(
            model, setup.scaled_coords(adata), setup.kernel_codes(adata), batch_size=batch_size
        )
    # factors of new cells from their counts, loadings fixed
    from .._core.factory import make_module, make_prior
    from .._core.init import fit_new_factors

    setup = model.setup
    setup.check_vars(adata)
    data = model._build_data(adata, with_inputs=False)
    new_prior = make_prior(setup.prior, setup.n_factors, setup.prior_config(), n_obs=data.n_obs)
    module = make_module(new_prior, data.n_vars, "fixed", device=model.device, dtype=setup.dtype)
    with torch.no_grad():
        module.W.copy_(model.module.loadings())
    mu, var = fit_new_factors(module, data, seed=setup.seed, max_iter=max_iter)
    return _numpy(mu), _numpy(var)


def predict_arrays(
    model: SpatialFactorization, X_scaled: np.ndarray, codes: np.ndarray | None, *, batch_size: int = 10000
) -> tuple[np.ndarray, np.ndarray]:
    """GP predictive marginals at scaled coordinates (and group codes), in batches."""
    import torch

    from .._core.factory import torch_dtype

    X = torch.as_tensor(X_scaled, dtype=torch_dtype(model.setup.dtype), device=model.device)
    groups = None if codes is None else torch.as_tensor(codes, device=model.device)
    mus, vars_ = [], []
    with torch.no_grad():
        for start in range(0, X.shape[0], batch_size):
            sl = slice(start, min(start + batch_size, X.shape[0]))
            mu, var = model.module.prior.predict(X[sl], None if groups is None else groups[sl])
            mus.append(_numpy(mu))
            vars_.append(_numpy(var))
    return np.concatenate(mus), np.concatenate(vars_)
