"""The AnnData-facing model object, :class:`SpatialFactorization` (scvi-tools shape)."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import _logging as logg
from .._keys import factor_names
from .._settings import settings
from .._utils import (
    check_counts,
    check_random_state,
    get_coordinates,
    get_counts,
    resolve_device,
    seed_of,
    slot_name,
    warn,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from anndata import AnnData

    from ._setup import ModelSetup

PriorName = Literal["pnmf", "svgp", "mggp_svgp", "lcgp", "mggp_lcgp"]
ElboMode = Literal["lower-bound", "expanded", "simple"]
LoadingsMode = Literal["multiplicative", "projected"]

_FORMAT_VERSION = 1
_PREPARE_KEY = "sfact_prepare"


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float64": torch.float64}[name]


class SpatialFactorization:
    """Non-negative spatial factorization of counts with a (Gaussian-process) prior on log-factors.

    ``y_nd ~ Poisson(s_n Σ_l W_dl exp(F_nl))`` with non-negative loadings ``W`` and a prior on the
    log-factors ``F``; see the model page of the docs. Construct it from an AnnData, call
    :meth:`train`, then read the results with :meth:`get_factors`, :meth:`get_loadings`, ...

    Parameters
    ----------
    adata
        Cells x genes with raw counts and coordinates in ``adata.obsm[spatial_key]``.
    prior
        Prior on the log-factors: ``"pnmf"`` (independent standard normal, non-spatial),
        ``"svgp"``, ``"mggp_svgp"``, ``"lcgp"`` or ``"mggp_lcgp"``.
    n_factors
        Number of factors L (at most the number of genes).
    layer
        Layer with the raw counts; ``adata.X`` when ``None``.
    spatial_key
        Key in ``adata.obsm`` of the coordinates.
    group_key
        Column of ``adata.obs`` with the groups (cell types, samples) for the multi-group priors.
        Defaults to the one recorded by :func:`sfact.pp.prepare`, if any.
    size_factors
        ``"total"`` (default: each cell's total count over the median total of the training
        cells, so factors describe composition and new cells are predicted at their own depth),
        ``None`` (all 1), or a column of ``adata.obs`` with positive values.
    elbo_mode
        ``"lower-bound"`` (analytic, sparse, default), ``"expanded"`` (Monte Carlo first term) or
        ``"simple"`` (full Monte Carlo).
    loadings_mode
        ``"multiplicative"`` (KL-NMF majorize-minimize update after each step, default) or
        ``"projected"`` (Adam and clamping).
    n_samples
        Monte Carlo samples per step for the ``expanded`` and ``simple`` modes.
    prior_kwargs
        Extra arguments of the prior (kernel, inducing points, ...): the fields of
        :class:`~sfact.models._config.PNMFConfig` (``pnmf``),
        :class:`~sfact.models._config.SVGPConfig` (``svgp``, ``mggp_svgp``) or
        :class:`~sfact.models._config.LCGPConfig` (``lcgp``, ``mggp_lcgp``); an unknown name
        raises a :class:`TypeError` listing the valid ones.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; defaults to :attr:`sfact.settings.device`.
    random_state
        Seed (int) or :class:`numpy.random.Generator` for initialization, batching and sampling.

    Attributes
    ----------
    adata
        The training data (``None`` after :meth:`load` without ``adata``).
    device
        The device the model lives on: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (``"auto"`` resolved).
    module
        The torch module (prior, variational parameters and loadings); ``None`` until trained.
    history_
        The raw training history; :attr:`history` gives it as a DataFrame.
    is_trained
        Whether :meth:`train` has run (or the model was loaded).
    converged
        Whether the last :meth:`train` call met ``tol``.
    train_info
        Settings and timings of the last :meth:`train` call, as plain values.

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.osmfish()
    >>> model = sfact.models.SpatialFactorization(adata, prior="pnmf", n_factors=5)
    >>> model.train(max_iter=50, progress_bar=False)  # doctest: +SKIP
    >>> factors = model.get_factors()  # doctest: +SKIP
    """

    def __init__(
        self,
        adata: AnnData,
        *,
        prior: PriorName = "mggp_svgp",
        n_factors: int = 10,
        layer: str | None = None,
        spatial_key: str = "spatial",
        group_key: str | None = None,
        size_factors: str | None = "total",
        elbo_mode: ElboMode = "lower-bound",
        loadings_mode: LoadingsMode = "multiplicative",
        n_samples: int = 4,
        prior_kwargs: dict[str, Any] | None = None,
        device: str | None = None,
        random_state: int | np.random.Generator | None = 0,
    ):
        from .._core.module import ELBO_MODES
        from .._core.priors import prior_class
        from ._config import config_to_dict, make_config

        prior_class(prior)  # unknown -> ValueError, not yet implemented -> NotImplementedError
        prior_config = make_config(prior, prior_kwargs)
        if elbo_mode not in ELBO_MODES:
            raise ValueError(f"`elbo_mode` must be one of {ELBO_MODES}, received {elbo_mode!r}.")
        if loadings_mode not in ("multiplicative", "projected"):
            raise ValueError(
                f"`loadings_mode` must be 'multiplicative' or 'projected', received {loadings_mode!r}."
            )
        if not isinstance(n_factors, int | np.integer) or n_factors < 1:
            raise ValueError(f"`n_factors` must be a positive integer, received {n_factors!r}.")
        if n_factors > adata.n_vars:
            raise ValueError(
                f"`n_factors={n_factors}` is more than the number of genes ({adata.n_vars}); "
                "choose at most as many factors as genes."
            )
        if adata.n_obs < 2:
            raise ValueError(f"Need at least 2 cells, received {adata.n_obs}.")
        if device is not None:
            from .._settings import _check_device

            _check_device(device)
        slot = slot_name(layer)
        X = get_counts(adata, layer)
        check_counts(X, slot)
        coords = get_coordinates(adata, spatial_key)
        if not np.isfinite(coords).all():
            raise ValueError(
                f"`adata.obsm[{spatial_key!r}]` has NaN or infinite coordinates; remove those cells with "
                "`sfact.pp.prepare(adata)` first."
            )
        prep = adata.uns.get(_PREPARE_KEY, {})
        if (
            group_key is None
            and prep.get("group_key") is not None
            and prep.get("spatial_key", spatial_key) == spatial_key
        ):
            group_key = str(prep["group_key"])
        group_categories: list[str] | None = None
        if group_key is not None:
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
            cat = g.astype("category").cat.remove_unused_categories()
            group_categories = [str(c) for c in cat.cat.categories]
        if prior.startswith("mggp") and group_key is None:
            warn(
                f"`prior={prior!r}` without `group_key`: all cells form one group, so the fit equals "
                f"{prior.removeprefix('mggp_')!r}. Pass `group_key=` (or set it in `sfact.pp.prepare`) to "
                "use the multi-group kernel."
            )
        if prep.get("spatial_key", None) == spatial_key and "factor" in prep:
            # the scaling recorded by sfact.pp.prepare, so new data is scaled the same way
            scaling = {
                "scale": str(prep.get("scale", "box")),
                "offset": [float(v) for v in np.atleast_1d(prep["offset"])],
                "factor": float(prep["factor"]),
                "box_size": float(prep.get("box_size", 100.0)),
            }
        else:
            from ..pp._prepare import _fit_scaling

            scaling = _fit_scaling(coords, "box", 100.0)
        sf_reference = None
        if size_factors is not None:
            if size_factors == "total":
                totals = np.asarray(X.sum(axis=1)).ravel().astype(np.float64)
                sf_reference = float(np.median(totals[totals > 0])) if (totals > 0).any() else 1.0
            elif size_factors not in adata.obs.columns:
                raise KeyError(
                    f"`size_factors={size_factors!r}` is neither 'total' nor a column of `adata.obs` "
                    f"(columns: {list(adata.obs.columns)})."
                )
            else:
                v = np.asarray(adata.obs[size_factors], dtype=np.float64)
                if not (np.isfinite(v).all() and (v > 0).all()):
                    raise ValueError(f"`adata.obs[{size_factors!r}]` must be positive and finite.")
        self.adata = adata
        self._setup: dict[str, Any] = {
            "prior": prior,
            "n_factors": int(n_factors),
            "layer": layer,
            "spatial_key": spatial_key,
            "group_key": group_key,
            "group_categories": group_categories,
            "size_factors": size_factors,
            "size_factor_reference": sf_reference,
            "elbo_mode": elbo_mode,
            "loadings_mode": loadings_mode,
            "n_samples": int(n_samples),
            "prior_kwargs": config_to_dict(prior_config),
            "scaling": scaling,
            "var_names": [str(v) for v in adata.var_names],
            "n_obs": int(adata.n_obs),
            "seed": seed_of(random_state),
            "dtype": settings.dtype,
        }
        self._rng = check_random_state(self._setup["seed"])
        self.device = resolve_device(device)
        self.module = None
        self._optimizer = None
        self._optimizer_state: dict | None = None
        self._data = None
        self._generator = None
        from .._core.train import History

        self.history_ = History()
        self.is_trained = False
        self.converged = False
        self.train_info: dict[str, Any] = {}
        self._train_inputs = None

    # ------------------------------------------------------------------ set-up
    @property
    def setup(self) -> ModelSetup:
        """The model's set-up (:class:`~sfact.models.ModelSetup`): prior, genes, scaling, groups, ..."""
        from ._setup import ModelSetup

        cached = getattr(self, "_setup_obj", None)
        if cached is None:
            cached = ModelSetup.from_dict(self._setup)
            self._setup_obj = cached
        return cached

    def size_factors(self, adata: AnnData, X=None) -> np.ndarray:
        """Size factors of the cells of ``adata`` as the model computes them (``X``: their counts, if at hand).

        Parameters
        ----------
        adata
            Cells with the model's genes.
        X
            Their counts (read from ``adata`` when ``None``).

        Returns
        -------
        One positive value per cell.
        """
        if X is None and self._setup["size_factors"] == "total":
            X = get_counts(adata, self._setup["layer"])
        return self._size_factors(adata, X)

    def check_vars(self, adata: AnnData) -> None:
        """Raise :class:`ValueError` unless ``adata`` has the model's genes in the model's order.

        Parameters
        ----------
        adata
            Cells to check.
        """
        self._check_vars(adata)

    def inducing_points(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Inducing points in the data's coordinate units, and their group codes (multi-group priors).

        Returns
        -------
        ``(coords, groups)``: an (M, 2) array and an (M,) array of group codes or ``None``.
        """
        if self.module is None:
            raise RuntimeError(
                "The model is not trained yet: call `model.train()` (or fit with "
                "`sfact.tl.fit(adata, save_model=dir)` and load it with `SpatialFactorization.load(dir, adata)`)."
            )
        prior = self.module.prior
        Z = getattr(prior, "Z", None)
        if Z is None:
            raise ValueError(f"The {self.prior!r} prior has no inducing points; only the SVGP priors do.")
        Z = Z.detach().cpu().double().numpy()
        scaling = self._setup["scaling"]
        coords = Z * float(scaling["factor"]) + np.asarray(scaling["offset"], dtype=float)[None, :]
        groups = None
        if getattr(prior, "multigroup", False) and getattr(prior, "Z_groups", None) is not None:
            groups = prior.Z_groups.detach().cpu().numpy().astype(np.int64)
        return coords, groups

    def to_device(self, device: str | None = None) -> SpatialFactorization:
        """Move the model (and its optimizer state) to ``device``; returns the model.

        Parameters
        ----------
        device
            ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; :attr:`sfact.settings.device` when ``None``.

        Returns
        -------
        The model itself.
        """
        device = resolve_device(device)
        if device != self.device:
            if self.module is not None:
                self.module.to(device=device)
            if self._optimizer is not None:
                self._optimizer_state = _to_cpu(self._optimizer.state_dict())
                self._optimizer = None
            self._data = None
            self.device = device
        return self

    @property
    def prior(self) -> str:
        """Name of the prior."""
        return self._setup["prior"]

    @property
    def n_factors(self) -> int:
        """Number of factors L."""
        return self._setup["n_factors"]

    @property
    def var_names(self) -> pd.Index:
        """Genes the model was set up with."""
        return pd.Index(self._setup["var_names"])

    @property
    def factor_names(self) -> list[str]:
        """Names of the factors."""
        return factor_names(self.n_factors)

    @property
    def history(self) -> pd.DataFrame:
        """Per-iteration ELBO (per matrix entry), expected log-likelihood, KL and elapsed seconds."""
        d = self.history_.as_dict()
        return pd.DataFrame(d, index=pd.RangeIndex(1, len(self.history_) + 1, name="iteration"))

    def __repr__(self) -> str:
        state = "trained" if self.is_trained else "untrained"
        return (
            f"SpatialFactorization(prior={self.prior!r}, n_factors={self.n_factors}, "
            f"n_obs={self._setup['n_obs']}, n_vars={len(self._setup['var_names'])}, {state}, "
            f"{len(self.history_)} iterations)"
        )

    def _size_factors(self, adata: AnnData, X) -> np.ndarray:
        mode = self._setup["size_factors"]
        if mode is None:
            return np.ones(adata.n_obs)
        if mode == "total":
            totals = np.asarray(X.sum(axis=1)).ravel().astype(np.float64)
            return np.maximum(totals / self._setup["size_factor_reference"], 1e-8)
        if mode not in adata.obs.columns:
            raise KeyError(f"`adata.obs[{mode!r}]` (the size factors) not found.")
        return np.asarray(adata.obs[mode], dtype=np.float64)

    def _scaled_coords(self, adata: AnnData) -> np.ndarray:
        from ..pp._prepare import _apply_scaling

        coords = get_coordinates(adata, self._setup["spatial_key"])
        if not np.isfinite(coords).all():
            raise ValueError(f"`adata.obsm[{self._setup['spatial_key']!r}]` has NaN or infinite coordinates.")
        return _apply_scaling(coords, self._setup["scaling"])

    def _group_codes(self, adata: AnnData) -> np.ndarray | None:
        gk = self._setup["group_key"]
        if gk is None:
            return np.zeros(adata.n_obs, dtype=np.int64) if self.prior.startswith("mggp") else None
        if gk not in adata.obs.columns:
            raise KeyError(f"`adata.obs[{gk!r}]` (the groups) not found.")
        cats = self._setup["group_categories"]
        values = adata.obs[gk].astype(str).to_numpy()
        lookup = {c: i for i, c in enumerate(cats)}
        unknown = sorted(set(values) - set(lookup))
        if unknown:
            raise ValueError(
                f"`adata.obs[{gk!r}]` has groups the model was not trained on: {unknown[:5]}; "
                f"expected a subset of {cats}."
            )
        return np.array([lookup[v] for v in values], dtype=np.int64)

    def _check_vars(self, adata: AnnData) -> None:
        expected = self._setup["var_names"]
        received = [str(v) for v in adata.var_names]
        if received != expected:
            missing = [v for v in expected if v not in set(received)]
            raise ValueError(
                f"Genes do not match the model: expected {len(expected)} genes "
                f"({expected[:3]}...), received {len(received)} ({received[:3]}...)"
                + (f"; missing {missing[:5]}" if missing else "; same genes in another order")
                + ". Subset/reorder with `adata[:, model.var_names]`."
            )

    def _counts_csr(self, adata: AnnData):
        X = get_counts(adata, self._setup["layer"])
        if adata is not self.adata:  # the training data was checked when the model was set up
            check_counts(X, slot_name(self._setup["layer"]))
        return X if sp.issparse(X) else sp.csr_matrix(np.asarray(X))

    def _build_data(self, adata: AnnData, device: str):
        import torch

        from .._core.data import SparseCounts
        from .._core.train import TrainData

        dtype = _torch_dtype(self._setup["dtype"])
        X = self._counts_csr(adata)
        counts = SparseCounts(X, device=device, dtype=dtype)
        s = torch.as_tensor(self._size_factors(adata, X), dtype=dtype, device=device)
        coords = torch.as_tensor(self._scaled_coords(adata), dtype=dtype, device=device)
        codes = self._group_codes(adata)
        groups = None if codes is None else torch.as_tensor(codes, device=device)
        return TrainData(counts=counts, s=s, X=coords, groups=groups)

    def _make_prior(self, data):
        """Build the prior for ``data`` (inducing points from its coordinates and groups)."""
        from .._core.priors import prior_class
        from ._config import make_config

        cls = prior_class(self.prior)
        cfg = make_config(self.prior, self._setup["prior_kwargs"])
        if self.prior == "pnmf":
            return cls(self.n_factors, data.n_obs, init_scale=cfg.init_scale)
        from .._core.inducing import inducing_points
        from .._core.kernels import mds_embedding

        X = data.X.detach().cpu().double().numpy()
        multigroup = self.prior.startswith("mggp")
        groups = data.groups.detach().cpu().numpy() if (multigroup and data.groups is not None) else None
        n_groups = len(self._setup["group_categories"] or [None]) if multigroup else None
        embedding = None
        if multigroup:
            if cfg.group_distances is not None:
                Dg = np.asarray(cfg.group_distances, dtype=np.float64)
                if Dg.shape != (n_groups, n_groups):
                    raise ValueError(
                        f"`group_distances` must be ({n_groups}, {n_groups}) for the {n_groups} groups, "
                        f"received {Dg.shape}."
                    )
                embedding = mds_embedding(Dg)
            else:
                embedding = np.eye(n_groups) / np.sqrt(2.0)  # every pair of groups at squared distance 1
        if self.prior.endswith("lcgp"):
            from .._core.lcgp import LCGPPrior

            return LCGPPrior(
                self.n_factors,
                X,
                groups,
                n_neighbors=cfg.n_neighbors,
                kernel=cfg.kernel,
                lengthscale=cfg.lengthscale,
                sigma=cfg.sigma,
                group_embedding=embedding,
                group_diff_param=cfg.group_diff_param,
                per_factor_kernel=cfg.per_factor_kernel,
                train_lengthscale=cfg.train_lengthscale,
                train_sigma=cfg.train_sigma,
                train_group_diff_param=cfg.train_group_diff_param,
                nugget=cfg.nugget,
                diagonal_only=(not str(self.device).startswith("cuda"))
                if cfg.diagonal_only is None
                else bool(cfg.diagonal_only),
                neighbor_method=cfg.neighbor_method,
                neighbor_selection=cfg.neighbor_selection,
                order_seed=cfg.order_seed,
            )
        M = cfg.num_inducing
        if M is None:
            M = 3000 if str(self.device).startswith("cuda") else 1000
        if M > data.n_obs:
            logg.info(f"    `num_inducing={M}` is more than the {data.n_obs} cells; using {data.n_obs}.")
            M = data.n_obs
        Z, Zg = inducing_points(
            X,
            int(M),
            groups=groups,
            n_groups=n_groups,
            allocation=cfg.allocation,
            random_state=self._setup["seed"],
        )
        return cls(
            self.n_factors,
            Z,
            Zg,
            kernel=cfg.kernel,
            lengthscale=cfg.lengthscale,
            sigma=cfg.sigma,
            group_embedding=embedding,
            group_diff_param=cfg.group_diff_param,
            per_factor_kernel=cfg.per_factor_kernel,
            train_lengthscale=cfg.train_lengthscale,
            train_sigma=cfg.train_sigma,
            train_group_diff_param=cfg.train_group_diff_param,
            diagonal_only=(not str(self.device).startswith("cuda"))
            if cfg.diagonal_only is None
            else bool(cfg.diagonal_only),
            cache_budget=(500_000_000 if str(self.device).startswith("cuda") else 50_000_000)
            if cfg.cache_budget is None
            else int(cfg.cache_budget),
        )

    def _initialize(self, data, init_iter: int) -> None:
        import torch

        from .._core.data import kl_nmf
        from .._core.module import FactorModule

        prior = self._make_prior(data)
        module = FactorModule(prior, data.n_vars, loadings_mode=self._setup["loadings_mode"])
        module.to(device=self.device, dtype=_torch_dtype(self._setup["dtype"]))
        # init_iter = 0: random start (no KL-NMF), kept for comparisons
        H, W = kl_nmf(
            data.counts, self.n_factors, n_iter=init_iter, size_factors=data.s, generator=self._generator
        )
        if init_iter == 0:
            H = torch.exp(0.1 * torch.randn(H.shape, generator=self._generator, dtype=H.dtype).to(H.device))
        # NMF factors have exact zeros; flooring them at 5% of a factor's mean keeps the
        # log-factors within reach of the prior (a floor of 1e-3 made spatial fits need
        # ~10x more iterations to reach the same ELBO; benchmarks/bench_init.py)
        logH = torch.log(H.clamp_min(0.05))
        center = logH.mean(0)
        with torch.no_grad():
            module.W.copy_((W * torch.exp(center)[None, :]).clamp_min(module.w_floor))
        prior.init_from_log_factors(
            logH - center, data.prior_input(torch.arange(data.n_obs, device=self.device))
        )
        self.module = module

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_iter: int = 1000,
        *,
        tol: float = 1e-4,
        learning_rate: float | None = None,
        batch_size: int | None = None,
        y_batch_size: int | None = None,
        kl_weight: float = 1.0,
        init_iter: int = 30,
        min_iter: int = 20,
        device: str | None = None,
        progress_bar: bool | None = None,
        callback: Callable[[int, float], None] | None = None,
    ) -> SpatialFactorization:
        """Train the model; a second call continues where the first stopped (history appended).

        Parameters
        ----------
        max_iter
            Maximum number of iterations (passes over the cells) in this call.
        tol
            Stop when the per-iteration relative change of the smoothed ELBO falls below this.
        learning_rate
            Adam learning rate of the variational parameters; ``None`` uses 0.05 for ``pnmf``
            and 0.1 for the GP priors.
        batch_size
            Cells per step; all cells when ``None``. Clamped to the number of cells.
        y_batch_size
            Genes per step (the likelihood is rescaled); all genes when ``None``.
        kl_weight
            Weight of the KL term (1 is the standard ELBO).
        init_iter
            Iterations of the KL-NMF used to initialize the factors and loadings (first call
            only). ``0`` starts from random log-factors and random loadings instead; the NMF start
            reaches a given ELBO sooner (``benchmarks/bench_init.py``).
        min_iter
            Iterations before convergence is checked.
        device
            Move the model to this device first (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``).
        progress_bar
            Show a progress bar with the ELBO; defaults to :attr:`sfact.settings.progress_bar`.
        callback
            Called as ``callback(iteration, elbo_per_entry)`` after every iteration.

        Returns
        -------
        The model itself, trained.

        Raises
        ------
        sfact.models.TrainingError
            If the ELBO becomes non-finite; the message names the iteration and the model keeps
            its last finite parameters.

        Examples
        --------
        >>> import sfact
        >>> adata = sfact.datasets.osmfish()
        >>> sfact.pp.prepare(adata, group_key="ClusterName")
        >>> model = sfact.models.SpatialFactorization(adata, prior="mggp_svgp", n_factors=5)
        >>> model.train(max_iter=200)  # doctest: +SKIP
        >>> model.train(max_iter=100)  # continues; the history is appended  # doctest: +SKIP
        >>> model.history["elbo"].tail()  # doctest: +SKIP
        """
        import torch

        from .._core.train import TrainConfig, make_optimizer, train_loop

        if max_iter < 0:
            raise ValueError(f"`max_iter` must be >= 0, received {max_iter}.")
        if learning_rate is None:
            learning_rate = 0.05 if self.prior == "pnmf" else 0.1
        if device is not None:
            self.to_device(device)
        N, D = self._setup["n_obs"], len(self._setup["var_names"])
        if batch_size is not None and batch_size > N:
            logg.info(f"    `batch_size={batch_size}` is more than the {N} cells; using {N}.")
            batch_size = N
        if y_batch_size is not None and y_batch_size > D:
            logg.info(f"    `y_batch_size={y_batch_size}` is more than the {D} genes; using {D}.")
            y_batch_size = D
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"`batch_size` must be positive, received {batch_size}.")
        if settings.deterministic:
            torch.use_deterministic_algorithms(True)
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self._setup["seed"])
        if self._data is None:
            self._check_vars(self.adata)
            if self.adata.n_obs != N:
                raise ValueError(f"Expected {N} cells (the training data), received {self.adata.n_obs}.")
            self._data = self._build_data(self.adata, self.device)
        start = logg.info(
            f"training {self.prior} with {self.n_factors} factors on {N} cells x {D} genes ({self.device})"
        )
        if self.module is None:
            import time

            t_init = time.perf_counter()
            self._initialize(self._data, init_iter)
            self._init_time_s = time.perf_counter() - t_init
        if self._optimizer is None:
            self._optimizer = make_optimizer(self.module, learning_rate)
            if self._optimizer_state is not None:
                self._optimizer.load_state_dict(self._optimizer_state)
                self._optimizer_state = None
        cfg = TrainConfig(
            max_iter=int(max_iter),
            tol=float(tol),
            learning_rate=float(learning_rate),
            batch_size=batch_size,
            y_batch_size=y_batch_size,
            elbo_mode=self._setup["elbo_mode"],
            n_samples=self._setup["n_samples"],
            kl_weight=float(kl_weight),
            min_iter=int(min_iter),
        )
        self.module.train()
        show = settings.progress_bar if progress_bar is None else progress_bar
        result = train_loop(
            self.module,
            self._data,
            cfg,
            optimizer=self._optimizer,
            history=self.history_,
            generator=self._generator,
            progress_bar=show,
            callback=callback,
        )
        self.module.eval()
        self.is_trained = True
        self.converged = bool(result["converged"])
        self.train_info = {
            "max_iter": int(max_iter),
            "tol": float(tol),
            "learning_rate": float(learning_rate),
            "batch_size": batch_size if batch_size is not None else N,
            "y_batch_size": y_batch_size if y_batch_size is not None else D,
            "kl_weight": float(kl_weight),
            "init_iter": int(init_iter),
            "n_iter": len(self.history_),
            "converged": self.converged,
            "train_time_s": float(self.history_.time[-1]) if self.history_.time else 0.0,
            "init_time_s": float(getattr(self, "_init_time_s", 0.0)),
        }
        if not self.converged and max_iter > 0:
            logg.info(
                f"    not converged after {result['n_iter']} iterations (tol={tol}); call `train` again to continue."
            )
        logg.info("    finished", time=start)
        return self

    # ------------------------------------------------------------------ results
    def _require_trained(self) -> None:
        if self.module is None:
            raise RuntimeError("The model is not trained yet: call `model.train()` first.")

    def _training_inputs(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Scaled coordinates and group codes of the training cells."""
        if self.adata is not None:
            return self._scaled_coords(self.adata), self._group_codes(self.adata)
        if getattr(self, "_train_inputs", None) is not None:
            return self._train_inputs
        raise RuntimeError("No training data attached: pass `adata`.")

    def _marginals_training(self, batch_size: int):
        import torch

        data = self._data
        if data is None:
            data = self._data = self._build_data(self.adata, self.device)
        N = data.n_obs
        mus, vars_ = [], []
        with torch.no_grad():
            for start in range(0, N, batch_size):
                idx = torch.arange(start, min(start + batch_size, N), device=self.device)
                mu, var = self.module.prior.marginals(data.prior_input(idx))
                mus.append(mu.cpu().double().numpy())
                vars_.append(var.cpu().double().numpy())
        return np.concatenate(mus), np.concatenate(vars_)

    def _marginals(self, adata: AnnData | None, batch_size: int = 10000):
        self._require_trained()
        if adata is None or adata is self.adata:
            if not self.module.prior.per_cell and self._data is None and self.adata is None:
                if getattr(self, "_train_inputs", None) is None:
                    raise RuntimeError("No training data attached: pass `adata`.")
                X, g = self._train_inputs
                return self._predict_arrays(X, g, batch_size=batch_size)
            if self.module.prior.per_cell:
                import torch

                from .._core.priors import PriorInput

                with torch.no_grad():
                    idx = torch.arange(self._setup["n_obs"], device=self.device)
                    mu, var = self.module.prior.marginals(PriorInput(idx=idx, n_total=len(idx)))
                return mu.cpu().double().numpy(), var.cpu().double().numpy()
            return self._marginals_training(batch_size)
        return self._transform_marginals(adata, batch_size=batch_size)

    def _transform_marginals(self, adata: AnnData, *, batch_size: int = 10000, max_iter: int = 300):
        import torch

        self._require_trained()
        if self.module.prior.per_cell and not self.module.prior.spatial:
            # factors of new cells from their counts, loadings fixed
            from .._core.module import FactorModule
            from .._core.train import History, TrainConfig, TrainData, make_optimizer, train_loop

            self._check_vars(adata)
            data_full = self._build_data(adata, self.device)
            data = TrainData(counts=data_full.counts, s=data_full.s)
            prior = self._make_prior(data)
            module = FactorModule(prior, data.n_vars, loadings_mode="fixed")
            module.to(device=self.device, dtype=_torch_dtype(self._setup["dtype"]))
            with torch.no_grad():
                module.W.copy_(self.module.loadings())
            H = self._nonneg_project(data, module.W, n_iter=50)
            prior.init_from_log_factors(
                torch.log(H.clamp_min(1e-3)), data.prior_input(torch.arange(data.n_obs, device=self.device))
            )
            opt = make_optimizer(module, 0.05)
            gen = torch.Generator().manual_seed(self._setup["seed"])
            train_loop(
                module,
                data,
                TrainConfig(max_iter=max_iter, tol=1e-6, learning_rate=0.05, min_iter=20),
                optimizer=opt,
                history=History(),
                generator=gen,
                progress_bar=False,
            )
            with torch.no_grad():
                idx = torch.arange(data.n_obs, device=self.device)
                mu, var = prior.marginals(data.prior_input(idx))
            return mu.cpu().double().numpy(), var.cpu().double().numpy()
        return self._predict_marginals(adata, batch_size=batch_size)

    def _predict_marginals(self, adata: AnnData, *, batch_size: int = 10000):
        return self._predict_arrays(
            self._scaled_coords(adata), self._group_codes(adata), batch_size=batch_size
        )

    def _predict_arrays(self, X_scaled: np.ndarray, codes: np.ndarray | None, *, batch_size: int = 10000):
        """GP predictive marginals at scaled coordinates (and group codes), in batches."""
        import torch

        X = torch.as_tensor(X_scaled, dtype=_torch_dtype(self._setup["dtype"]), device=self.device)
        groups = None if codes is None else torch.as_tensor(codes, device=self.device)
        mus, vars_ = [], []
        with torch.no_grad():
            for start in range(0, X.shape[0], batch_size):
                sl = slice(start, min(start + batch_size, X.shape[0]))
                mu, var = self.module.prior.predict(X[sl], None if groups is None else groups[sl])
                mus.append(mu.cpu().double().numpy())
                vars_.append(var.cpu().double().numpy())
        return np.concatenate(mus), np.concatenate(vars_)

    def groupwise_factors(
        self, adata: AnnData | None = None, *, groups: list[str] | None = None, batch_size: int = 10000
    ) -> tuple[np.ndarray, list[str]]:
        """Factors ``exp(μ)`` of each cell as if it belonged to each group (multi-group priors).

        Parameters
        ----------
        adata
            Cells whose coordinates are used; the training cells when ``None``.
        groups
            Group names to evaluate; all training groups when ``None``.
        batch_size
            Cells per batch of the GP predictive.

        Returns
        -------
        ``(factors, groups)``: an array (n_groups, n_cells, n_factors) and the group names.

        Raises
        ------
        ValueError
            If the prior is not a multi-group one, or a group is unknown.

        Examples
        --------
        >>> F, groups = model.groupwise_factors(groups=["Microglia", "Pericytes"])  # doctest: +SKIP
        >>> F.shape  # doctest: +SKIP
        (2, 4839, 5)
        """
        self._require_trained()
        if not self.prior.startswith("mggp"):
            raise ValueError(f"Group-wise factors need a multi-group prior, not {self.prior!r}.")
        cats = self._setup["group_categories"] or ["all"]
        groups = list(cats) if groups is None else [str(g) for g in groups]
        unknown = [g for g in groups if g not in cats]
        if unknown:
            raise ValueError(f"Unknown groups {unknown}; the model knows {cats}.")
        if adata is None:
            if self.adata is not None:
                X = self._scaled_coords(self.adata)
            elif getattr(self, "_train_inputs", None) is not None:
                X = self._train_inputs[0]
            else:
                raise RuntimeError("No training data attached: pass `adata`.")
        else:
            X = self._scaled_coords(adata)
        out = np.empty((len(groups), X.shape[0], self.n_factors))
        for k, g in enumerate(groups):
            codes = np.full(X.shape[0], cats.index(g), dtype=np.int64)
            mu, _ = self._predict_arrays(X, codes, batch_size=batch_size)
            out[k] = np.exp(mu)
        return out, groups

    def gp_info(self) -> dict[str, Any]:
        """Kernel hyperparameters and inducing-point count (spatial priors), as plain values.

        Returns
        -------
        A dict: ``kernel``, ``lengthscale`` and ``sigma`` (lists, one value per kernel),
        ``group_diff_param`` (multi-group priors), ``num_inducing`` and ``prior``; for the LCGP
        priors also ``n_neighbors`` and ``nugget``. Empty for ``pnmf``.

        Examples
        --------
        >>> model.gp_info()  # doctest: +SKIP
        {'kernel': 'matern32', 'lengthscale': [5.0], 'sigma': [1.0], 'group_diff_param': [1.0],
         'num_inducing': 1000, 'prior': 'mggp_svgp'}
        """
        self._require_trained()
        info = getattr(self.module.prior, "gp_info", None)
        return {} if info is None else info()

    @staticmethod
    def _nonneg_project(data, W, n_iter: int = 50):
        """Multiplicative KL-NMF updates of the factors of new cells with ``W`` fixed."""
        import torch

        counts = data.counts
        rows, cols, y = counts.row_of, counts.indices, counts.values
        H = torch.ones(data.n_obs, W.shape[1], dtype=W.dtype, device=W.device)
        H = H * (data.s.new_tensor(counts.row_totals) / (data.s * W.sum()).clamp_min(1e-12))[
            :, None
        ].clamp_min(1e-3)
        den = (data.s[:, None] * W.sum(0)[None, :]).clamp_min(1e-12)
        for _ in range(n_iter):
            r = (H[rows] * W[cols]).sum(1).clamp_min(1e-12)
            num = torch.zeros_like(H).index_add_(0, rows, (y / r)[:, None] * W[cols])
            H = (H * num / den).clamp_min(1e-10)
        return H

    def get_factors(
        self, adata: AnnData | None = None, *, expected: bool = False, batch_size: int = 10000
    ) -> np.ndarray:
        """Factors ``exp(μ)`` (N, L) of the training cells, or of the cells of ``adata``.

        Parameters
        ----------
        adata
            New cells: predicted from their coordinates (spatial priors) or fitted to their counts
            with the loadings fixed (``pnmf``). The training cells when ``None``.
        expected
            Return the posterior mean ``E[e^F] = exp(μ + σ²/2)`` instead of ``exp(μ)``.
        batch_size
            Cells per batch of the GP forward.

        Returns
        -------
        Array (n_cells, n_factors).

        Examples
        --------
        >>> F = model.get_factors()  # doctest: +SKIP
        >>> F.shape  # doctest: +SKIP
        (4839, 5)
        >>> F_new = model.get_factors(adata_new)  # doctest: +SKIP
        """
        mu, var = self._marginals(adata, batch_size)
        return np.exp(mu + 0.5 * var) if expected else np.exp(mu)

    def get_scales(self, adata: AnnData | None = None, *, batch_size: int = 10000) -> np.ndarray:
        """Posterior standard deviations σ (N, L) of the log-factors.

        Parameters
        ----------
        adata
            New cells (see :meth:`get_factors`); the training cells when ``None``.
        batch_size
            Cells per batch of the GP forward.

        Returns
        -------
        Array (n_cells, n_factors).

        Examples
        --------
        >>> sigma = model.get_scales()  # doctest: +SKIP
        """
        _, var = self._marginals(adata, batch_size)
        return np.sqrt(var)

    def get_log_factors(
        self, adata: AnnData | None = None, *, batch_size: int = 10000
    ) -> tuple[np.ndarray, np.ndarray]:
        """Posterior means ``μ`` and variances ``σ²`` (each N x L) of the log-factors.

        Parameters
        ----------
        adata
            New cells (see :meth:`get_factors`); the training cells when ``None``.
        batch_size
            Cells per batch of the GP forward.

        Returns
        -------
        ``(mu, var)``, each an array (n_cells, n_factors).

        Examples
        --------
        >>> mu, var = model.get_log_factors()  # doctest: +SKIP
        """
        return self._marginals(adata, batch_size)

    def get_loadings(self) -> np.ndarray:
        """Non-negative loadings ``W`` (D, L).

        Returns
        -------
        Array (n_vars, n_factors), rows in the order of :attr:`var_names`.

        Examples
        --------
        >>> import pandas as pd
        >>> W = model.get_loadings()  # doctest: +SKIP
        >>> pd.DataFrame(W, index=model.var_names, columns=model.factor_names)  # doctest: +SKIP
        """
        self._require_trained()
        return self.module.loadings().detach().cpu().double().numpy()

    def transform(self, adata_new: AnnData, *, batch_size: int = 10000) -> tuple[np.ndarray, np.ndarray]:
        """Factors and scales of new cells.

        From their coordinates (and groups) through the GP predictive for the spatial priors; from
        their counts with the loadings fixed for ``pnmf``.

        Parameters
        ----------
        adata_new
            New cells with the model's genes, coordinates in ``obsm[spatial_key]`` and, for the
            multi-group priors, groups in ``obs[group_key]`` among the training groups.
        batch_size
            Cells per batch of the GP predictive.

        Returns
        -------
        ``(factors, scales)``, each (n_new, n_factors): ``exp(μ)`` and ``σ``.

        Examples
        --------
        >>> train, test = sfact.tl.heldout_split(adata)  # doctest: +SKIP
        >>> model = sfact.models.SpatialFactorization(train, prior="svgp").train()  # doctest: +SKIP
        >>> factors, scales = model.transform(test)  # doctest: +SKIP
        """
        mu, var = self._transform_marginals(adata_new, batch_size=batch_size)
        return np.exp(mu), np.sqrt(var)

    def predict(self, adata_new: AnnData | None = None, *, batch_size: int = 10000) -> np.ndarray:
        """Expected counts ``E[λ_nd] = s_n Σ_l W_dl e^{μ_nl+σ²_nl/2}`` (dense, n x D).

        Size factors of new cells come from their own counts (``"total"``) or ``obs`` column.

        Parameters
        ----------
        adata_new
            New cells (see :meth:`transform`); the training cells when ``None``.
        batch_size
            Cells per batch of the GP predictive.

        Returns
        -------
        Dense array (n_cells, n_vars) of expected counts.

        Examples
        --------
        >>> Y_hat = model.predict(test)  # doctest: +SKIP
        """
        adata = self.adata if adata_new is None else adata_new
        mu, var = self._marginals(adata_new, batch_size)
        X = get_counts(adata, self._setup["layer"]) if self._setup["size_factors"] == "total" else None
        s = self._size_factors(adata, X)
        W = self.get_loadings()
        return s[:, None] * (np.exp(mu + 0.5 * var) @ W.T)

    # ------------------------------------------------------------------ reorder
    def reorder_factors(self, order: np.ndarray) -> None:
        """Permute the factors everywhere in the model (``order[k]`` is the old index of factor k).

        Loadings, variational parameters and per-factor kernels are permuted together;
        :func:`sfact.tl.fit` and :func:`sfact.tl.analyze` use it to order the factors by Moran's I.
        The optimizer state is reset (its moments belong to the old order).

        Parameters
        ----------
        order
            A permutation of ``0..n_factors-1``.

        Examples
        --------
        >>> model.reorder_factors([1, 0, 2, 3, 4])  # swap the first two factors  # doctest: +SKIP
        """
        import torch

        self._require_trained()
        order = np.asarray(order, dtype=np.int64)
        if sorted(order.tolist()) != list(range(self.n_factors)):
            raise ValueError(f"`order` must be a permutation of 0..{self.n_factors - 1}, received {order}.")
        self.module.reorder(torch.as_tensor(order, device=self.device))
        self._optimizer_state = None
        self._optimizer = None  # Adam moments belong to the old order

    # ------------------------------------------------------------------ save / load
    def save(
        self, dir_path: str | os.PathLike, *, overwrite: bool = False, save_optimizer: bool = True
    ) -> None:
        """Save the model: tensors to ``model.pt`` (loadable with ``weights_only=True``), metadata to JSON.

        Parameters
        ----------
        dir_path
            Directory to create.
        overwrite
            Replace an existing saved model in ``dir_path``.
        save_optimizer
            Also save the optimizer state, so training continues exactly where it stopped.

        Examples
        --------
        >>> model.save("model_dir", overwrite=True)  # doctest: +SKIP
        >>> model = sfact.models.SpatialFactorization.load("model_dir", adata)  # doctest: +SKIP
        """
        import torch

        self._require_trained()
        dir_path = os.fspath(dir_path)
        meta_path = os.path.join(dir_path, "metadata.json")
        if os.path.exists(meta_path) and not overwrite:
            raise FileExistsError(
                f"A model is already saved in {dir_path!r}; pass `overwrite=True` to replace it."
            )
        os.makedirs(dir_path, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        tmp = os.path.join(dir_path, "model.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, os.path.join(dir_path, "model.pt"))
        if self.module.prior.spatial:
            X, g = self._training_inputs()
            inputs = {"X": torch.as_tensor(X)}
            if g is not None:
                inputs["groups"] = torch.as_tensor(g)
            torch.save(inputs, os.path.join(dir_path, "train_inputs.pt.tmp"))
            os.replace(
                os.path.join(dir_path, "train_inputs.pt.tmp"), os.path.join(dir_path, "train_inputs.pt")
            )
        opt_path = os.path.join(dir_path, "optimizer.pt")
        if save_optimizer and (self._optimizer is not None or self._optimizer_state is not None):
            opt_state = self._optimizer.state_dict() if self._optimizer is not None else self._optimizer_state
            torch.save(_to_cpu(opt_state), opt_path + ".tmp")
            os.replace(opt_path + ".tmp", opt_path)
        elif os.path.exists(opt_path):
            os.remove(opt_path)
        from .. import __version__

        meta = {
            "format_version": _FORMAT_VERSION,
            "sfact_version": __version__,
            "setup": self._setup,
            "prior_config": self.module.prior.config(),
            "history": {k: v.tolist() for k, v in self.history_.as_dict().items()},
            "train_info": self.train_info,
            "converged": self.converged,
        }
        with open(meta_path + ".tmp", "w") as fh:
            json.dump(meta, fh, indent=1)
        os.replace(meta_path + ".tmp", meta_path)

    @classmethod
    def load(
        cls, dir_path: str | os.PathLike, adata: AnnData | None = None, *, device: str | None = None
    ) -> SpatialFactorization:
        """Load a model saved with :meth:`~sfact.models.SpatialFactorization.save`.

        Parameters
        ----------
        dir_path
            Directory written by :meth:`save`.
        adata
            Training data to attach (needed to continue training); its genes must match the
            saved model's, and for ``pnmf`` its number of cells too.
        device
            Where to put the model; :attr:`sfact.settings.device` when ``None``.

        Returns
        -------
        The model, ready for :meth:`get_factors`, :meth:`transform` or :meth:`train`.

        Examples
        --------
        >>> model = sfact.models.SpatialFactorization.load("model_dir", adata)  # doctest: +SKIP
        >>> model.train(max_iter=100)  # continue training  # doctest: +SKIP
        """
        import torch

        from .._core.train import History

        dir_path = os.fspath(dir_path)
        meta_path = os.path.join(dir_path, "metadata.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"No saved sfact model in {dir_path!r} (metadata.json is missing).")
        with open(meta_path) as fh:
            meta = json.load(fh)
        if meta.get("format_version", 0) > _FORMAT_VERSION:
            raise ValueError(
                f"The model in {dir_path!r} was saved by a newer sfact ({meta.get('sfact_version')}); upgrade sfact."
            )
        setup = meta["setup"]
        obj = cls.__new__(cls)
        obj._setup = setup
        obj.adata = None
        if adata is not None:
            obj._check_vars(adata)
            from .._core.priors import prior_class

            if prior_class(setup["prior"]).per_cell and adata.n_obs != setup["n_obs"]:
                raise ValueError(
                    f"Cells do not match the model: expected {setup['n_obs']} cells, received {adata.n_obs}."
                )
            obj.adata = adata
        obj._rng = check_random_state(setup["seed"])
        obj.device = resolve_device(device)
        obj._data = None
        obj._generator = None
        obj._optimizer = None
        obj.history_ = History.from_dict(meta["history"])
        obj.train_info = meta.get("train_info", {})
        obj.converged = bool(meta.get("converged", False))
        obj.is_trained = True
        from .._core.module import FactorModule
        from .._core.priors import prior_class

        pcls = prior_class(setup["prior"])
        prior = pcls(**meta["prior_config"])
        module = FactorModule(prior, len(setup["var_names"]), loadings_mode=setup["loadings_mode"])
        state = torch.load(os.path.join(dir_path, "model.pt"), map_location="cpu", weights_only=True)
        module.load_state_dict(state)
        module.to(device=obj.device, dtype=_torch_dtype(setup["dtype"]))
        module.eval()
        obj.module = module
        obj._train_inputs = None
        inputs_path = os.path.join(dir_path, "train_inputs.pt")
        if os.path.exists(inputs_path):
            inputs = torch.load(inputs_path, map_location="cpu", weights_only=True)
            g = inputs.get("groups")
            obj._train_inputs = (inputs["X"].numpy(), None if g is None else g.numpy())
        opt_path = os.path.join(dir_path, "optimizer.pt")
        obj._optimizer_state = (
            torch.load(opt_path, map_location=obj.device, weights_only=True)
            if os.path.exists(opt_path)
            else None
        )
        return obj


def _to_cpu(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
