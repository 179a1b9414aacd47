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

__all__ = ["marginals", "new_marginals", "new_sample_marginals", "predict_arrays", "training_marginals"]


def _numpy(t) -> np.ndarray:
    return t.cpu().double().numpy()


def marginals(
    model: SpatialFactorization, adata: AnnData | None, batch_size: int, *, checked: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, var)`` of the training cells (``adata`` ``None`` or the training data) or of new cells.

    New cells are checked first (:func:`~sfact.models._newcells.check_new_cells`) unless
    ``checked`` (the caller did it and passes the aligned cells).
    """
    model._require_trained()
    if adata is None or adata is model.adata:
        return training_marginals(model, batch_size)
    return new_marginals(model, adata, batch_size=batch_size, checked=checked)


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
    model: SpatialFactorization,
    adata: AnnData,
    *,
    batch_size: int = 10000,
    max_iter: int = 300,
    checked: bool = False,
    what: str = "adata",
) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, var)`` of new cells: the GP predictive (spatial priors) or a fit to their counts (``pnmf``).

    The cells are checked first (genes aligned to the model's order) unless ``checked``.
    """
    from ._newcells import check_new_cells

    model._require_trained()
    if not checked:
        adata = check_new_cells(model, adata, purpose="factors", what=what).adata
    prior = model.module.prior
    if not (prior.per_cell and not prior.spatial):
        setup = model.setup
        return predict_arrays(
            model, setup.scaled_coords(adata), setup.kernel_codes(adata), batch_size=batch_size
        )
    # factors of new cells from their counts, loadings fixed
    return count_marginals(model, adata, max_iter=max_iter)


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


def new_sample_marginals(
    model: SpatialFactorization,
    adata: AnnData,
    *,
    max_iter: int = 300,
    num_inducing: int = 500,
) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, var)`` of the cells of samples the model was not trained on.

    For each new sample: its cells' factors are fitted to their counts with the loadings fixed
    (as new cells of ``pnmf``), then smoothed over the sample's own coordinates by the model's
    spatial prior (its kernel and hyperparameters, the within-sample group structure, its mean
    ``β``): GP regression through ``num_inducing`` k-means inducing points with each cell's
    fitted ``(mu, var)`` as a Gaussian observation of its log-factors. The sample's coordinates are
    scaled from its own corner with the model's common factor.
    """
    import copy

    import torch

    from .._core.inducing import inducing_points
    from .._utils import get_coordinates
    from ._newcells import check_new_cells

    model._require_trained()
    setup = model.setup
    if setup.sample_key is None:
        raise ValueError(
            "The model has no samples (`sample_key`): predict new cells with `model.get_log_factors(adata)`."
        )
    adata = check_new_cells(model, adata, purpose="new_sample").adata
    labels = adata.obs[setup.sample_key].astype(str).to_numpy()
    prior = model.module.prior
    if not prior.spatial:  # pnmf: the factors of new cells, whatever their sample
        return count_marginals(model, adata, max_iter=max_iter, known_samples=False)
    # 1. factors from the counts, loadings fixed (a per-cell prior)
    mu0, var0 = count_marginals(model, adata, max_iter=max_iter, known_samples=False)
    mu0, var0 = torch.as_tensor(mu0), torch.as_tensor(var0).clamp_min(1e-6)
    # 2. smoothed over each new sample's own coordinates by the model's spatial prior
    coords = get_coordinates(adata, setup.spatial_key)
    G = setup.n_groups or 1
    g = setup.group_codes(adata) if setup.multigroup else None
    k = copy.deepcopy(prior.kernel).to(device="cpu", dtype=torch.float64)  # float64 on the host
    beta = prior.beta.detach().double().cpu()
    if getattr(prior, "beta_sample", None) is not None:  # a new sample: the samples' average mean
        beta = beta + prior.beta_sample.detach().double().cpu().mean(0)
    mu_out = np.empty(tuple(mu0.shape))
    var_out = np.empty(tuple(var0.shape))
    for smp in dict.fromkeys(labels):
        cells = np.flatnonzero(labels == smp)
        xy = coords[cells]
        X = torch.as_tensor((xy - xy.min(axis=0)) / float(setup.scaling["factor"]), dtype=torch.float64)
        # within-sample groups: the codes of the first sample's block (the kernel depends only
        # on the distances of the group coordinates, the same in every sample)
        codes = None
        if k.multigroup:
            codes = torch.as_tensor(np.zeros(len(cells), dtype=np.int64) if g is None else g[cells])
        Z_np, Zg_np = inducing_points(
            X.numpy(), min(num_inducing, len(cells)), groups=None if codes is None else codes.numpy(),
            n_groups=G if codes is not None else None, random_state=setup.seed,
        )  # fmt: skip
        Z = torch.as_tensor(Z_np, dtype=torch.float64)
        Zg = None if Zg_np is None else torch.as_tensor(Zg_np)
        with torch.no_grad():
            Kzz = k(Z, Z, Zg, Zg)  # (n_sets, M, M)
            eye = torch.eye(Z.shape[0], dtype=torch.float64)
            Lzz = torch.linalg.cholesky(
                Kzz + 1e-6 * Kzz.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * eye
            )
            A = torch.linalg.solve_triangular(Lzz, k(Z, X, Zg, codes), upper=False)  # (n_sets, M, n)
            L = setup.n_factors
            if A.shape[0] == 1:
                A = A.expand(L, -1, -1)
            prec = 1.0 / var0[cells].T  # (L, n)
            resid = (mu0[cells] - beta).T  # (L, n)
            P = torch.einsum("lmn,ln,lkn->lmk", A, prec, A) + eye
            C = torch.linalg.cholesky(P)
            m = torch.cholesky_solve((A * (prec * resid)[:, None, :]).sum(-1, keepdim=True), C)[..., 0]
            mean = torch.einsum("lmn,lm->ln", A, m) + beta[:, None]
            V = torch.linalg.solve_triangular(C, A, upper=False)
            kxx = k.diag(X, codes).expand(L, -1)
            var = (kxx - A.pow(2).sum(1) + V.pow(2).sum(1)).clamp_min(1e-8)
        mu_out[cells] = mean.T.numpy()
        var_out[cells] = var.T.numpy()
    return mu_out, var_out


def count_marginals(
    model: SpatialFactorization, adata: AnnData, *, max_iter: int = 300, known_samples: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, var)`` of cells fitted to their counts with the model's loadings fixed.

    A per-cell prior: the ``pnmf`` prior, with the model's options for a ``pnmf`` model. A model
    with gene offsets applies its samples' offsets to cells of those samples
    (``known_samples``); a new sample's cells are fitted without offsets (those of an average
    sample).
    """
    import torch

    from .._core.factory import make_module, make_prior
    from .._core.init import fit_new_factors
    from ._config import PNMFConfig

    setup = model.setup
    data = model._build_data(adata, with_inputs=False)
    cfg = setup.prior_config() if setup.prior == "pnmf" else PNMFConfig()
    per_cell = make_prior("pnmf", setup.n_factors, cfg, n_obs=data.n_obs)
    module = make_module(per_cell, data.n_vars, "fixed", device=model.device, dtype=setup.dtype)
    with torch.no_grad():
        module.W.copy_(model.module.loadings())
    offsets = model.gene_offsets_of(adata) if known_samples else None
    if offsets is not None:
        g, codes = offsets
        module.enable_gene_offsets(torch.zeros(g.shape), torch.ones(g.shape[0]))
        with torch.no_grad():
            module.gene_offset.copy_(torch.as_tensor(g))
        data.sample = torch.as_tensor(codes, device=data.s.device)
    mu, var = fit_new_factors(module, data, seed=setup.seed, max_iter=max_iter)
    return _numpy(mu), _numpy(var)
