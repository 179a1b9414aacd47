"""The AnnData-facing model object, :class:`SpatialFactorization` (scvi-tools shape).

The object holds the :class:`~sfact.models.ModelSetup`, the training inputs (scaled
coordinates and group codes, computed once) and the torch module; the work is done elsewhere:
:mod:`sfact.models._setup` (validation, per-AnnData rules), :mod:`sfact.models._inference`
(marginals of training and new cells), :mod:`sfact.models._io` (save/load),
:mod:`sfact._core.factory` and :mod:`sfact._core.init` (building and initializing the module).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import PriorName, check_device
from .._keys import factor_names
from .._utils import resolve_device
from ._results import ResultsMixin
from ._setup import ModelSetup
from ._training import TrainingMixin

if TYPE_CHECKING:
    from anndata import AnnData

    from .._constants import ElboMode, LoadingsMode


class SpatialFactorization(TrainingMixin, ResultsMixin):
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
        Column of ``adata.obs`` with the groups (cell types) for the multi-group priors.
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
    sample_key
        Column of ``adata.obs`` with the sample (tissue section) of each cell; defaults to the one
        recorded by :func:`sfact.pp.prepare`, if any. The loadings are shared by all samples and
        every sample has its own GP over its own coordinates (independent or correlated across
        samples: see ``sample_distance`` of the prior; with ``group_key`` as well, the
        multi-group kernel within each sample). Each sample needs at least 10 cells; cells of
        samples the model was not trained on are fitted with :meth:`fit_new_sample`.
    gene_offsets
        With several samples: give the rates a per-sample gene offset,
        ``λ_nd = s_n g_{s(n),d} Σ_l W_dl exp(F_nl)`` (a gene detected more or less efficiently in
        one section, a batch effect), fitted in closed form with the loadings and shrunk towards 1;
        ``W`` stays the loadings of an average sample (see "Several samples" in the model docs).
        ``None`` (default): the package default for several samples; ``True`` needs
        ``sample_key``.

    Attributes
    ----------
    adata
        The training data (``None`` after :meth:`load` without ``adata``).
    setup
        The model's set-up (:class:`~sfact.models.ModelSetup`): prior, genes, scaling, groups, ...
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
        sample_key: str | None = None,
        gene_offsets: bool | None = None,
    ):
        if device is not None:
            check_device(device)
        setup = ModelSetup.from_adata(
            adata,
            prior=prior,
            n_factors=n_factors,
            layer=layer,
            spatial_key=spatial_key,
            group_key=group_key,
            size_factors=size_factors,
            elbo_mode=elbo_mode,
            loadings_mode=loadings_mode,
            n_samples=n_samples,
            prior_kwargs=prior_kwargs,
            random_state=random_state,
            sample_key=sample_key,
            gene_offsets=gene_offsets,
        )
        self._init(setup, adata, (setup.scaled_coords(adata), setup.kernel_codes(adata)), device)

    def _init(
        self,
        setup: ModelSetup,
        adata: AnnData | None,
        inputs: tuple[np.ndarray, np.ndarray | None] | None,
        device: str | None,
    ) -> None:
        """The one constructor path (``__init__`` and :meth:`load`): set-up, data, training inputs."""
        from .._core.train import History

        self.setup = setup
        self.adata = adata
        # scaled coordinates and group codes of the training cells: the one source of training
        # inputs (from ``adata`` at construction, or from a saved model)
        self._train_inputs = inputs
        self._inputs_t = None  # the same as tensors on ``self.device``
        self.device = resolve_device(device)
        self.module = None
        self._optimizer = None
        self._optimizer_state: dict | None = None
        self._data = None
        self._generator = None
        self.history_ = History()
        self.is_trained = False
        self.converged = False
        self.train_info: dict[str, Any] = {}

    @classmethod
    def _from_setup(
        cls,
        setup: ModelSetup,
        *,
        adata: AnnData | None,
        inputs: tuple[np.ndarray, np.ndarray | None] | None,
        device: str | None = None,
    ) -> SpatialFactorization:
        """A model from a set-up and training inputs (no validation of an AnnData): used by :meth:`load`."""
        obj = cls.__new__(cls)
        obj._init(setup, adata, inputs, device)
        return obj

    def _set_trained(self, module, *, history, train_info: dict, converged: bool, optimizer_state) -> None:
        """Attach a trained module and its training record (:meth:`load`)."""
        self.module = module
        self.history_ = history
        self.train_info = train_info
        self.converged = converged
        self.is_trained = True
        self._optimizer_state = optimizer_state

    # ------------------------------------------------------------------ set-up
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

        Examples
        --------
        >>> s = model.size_factors(adata_test)  # doctest: +SKIP
        """
        return self.setup.size_factors_of(adata, X)

    def check_vars(self, adata: AnnData) -> None:
        """Raise :class:`ValueError` unless ``adata`` has the model's genes in the model's order.

        Parameters
        ----------
        adata
            Cells to check.

        Examples
        --------
        >>> model.check_vars(adata_test[:, model.var_names])  # doctest: +SKIP
        """
        self.setup.check_vars(adata)

    def to_device(self, device: str | None = None) -> SpatialFactorization:
        """Move the model (and its optimizer state) to ``device``; returns the model.

        Parameters
        ----------
        device
            ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; :attr:`sfact.settings.device` when ``None``.

        Returns
        -------
        The model itself.

        Examples
        --------
        >>> model.to_device("cpu")  # doctest: +SKIP
        """
        from ._io import to_cpu

        device = resolve_device(device)
        if device != self.device:
            if self.module is not None:
                self.module.to(device=device)
            if self._optimizer is not None:
                self._optimizer_state = to_cpu(self._optimizer.state_dict())
                self._optimizer = None
            self._data = None
            self._inputs_t = None
            self.device = device
        return self

    @property
    def prior(self) -> str:
        """Name of the prior."""
        return self.setup.prior

    @property
    def n_factors(self) -> int:
        """Number of factors L."""
        return self.setup.n_factors

    @property
    def var_names(self) -> pd.Index:
        """Genes the model was set up with."""
        return pd.Index(list(self.setup.var_names))

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
            f"n_obs={self.setup.n_obs}, n_vars={self.setup.n_vars}, {state}, "
            f"{len(self.history_)} iterations)"
        )

    # ------------------------------------------------------------------ training data
    def _training_inputs(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Scaled coordinates and group codes of the training cells (stored at construction)."""
        if self._train_inputs is None:
            raise RuntimeError("No training data attached: pass `adata`.")
        return self._train_inputs

    def _training_tensors(self):
        """:meth:`_training_inputs` as tensors on the model's device (made once per device)."""
        if self._inputs_t is None:
            import torch

            from .._core.factory import torch_dtype

            X, g = self._training_inputs()
            Xt = torch.as_tensor(X, dtype=torch_dtype(self.setup.dtype), device=self.device)
            self._inputs_t = (Xt, None if g is None else torch.as_tensor(g, device=self.device))
        return self._inputs_t

    def _optimizer_state_dict(self) -> dict | None:
        return self._optimizer.state_dict() if self._optimizer is not None else self._optimizer_state

    # ------------------------------------------------------------------ results
    def _require_trained(self) -> None:
        if self.module is None:
            raise RuntimeError("The model is not trained yet: call `model.train()` first.")

    # ------------------------------------------------------------------ save / load
    def save(
        self, dir_path: str | os.PathLike, *, overwrite: bool = False, save_optimizer: bool = True
    ) -> None:
        """Save the model: tensors to ``model.pt`` (loadable with ``weights_only=True``), metadata to JSON.

        The save is atomic: the folder is written as a temporary sibling ``.<name>.tmp-<pid>``
        and renamed into place, so a failure (an exception, a full disk, Ctrl-C) leaves the
        previously saved model as it was and no half-written folder under ``dir_path``.

        Parameters
        ----------
        dir_path
            Folder to create, or an empty folder. It holds the model's files only: saving
            replaces the whole folder, so one holding other files raises :class:`FileExistsError`.
        overwrite
            Replace an existing saved model in ``dir_path``.
        save_optimizer
            Also save the optimizer state, so training continues exactly where it stopped.

        Examples
        --------
        >>> model.save("model_dir", overwrite=True)  # doctest: +SKIP
        >>> model = sfact.models.SpatialFactorization.load("model_dir", adata)  # doctest: +SKIP
        """
        from ._io import save_model

        save_model(self, dir_path, overwrite=overwrite, save_optimizer=save_optimizer)

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
            Training data to attach (needed to continue training); its genes and its number of
            cells must match the saved model's. A model saved by :func:`sfact.tl.fit` with
            validation cells was trained on the others:
            ``adata[~adata.obs['sfact_validation']]``.
        device
            Where to put the model; :attr:`sfact.settings.device` when ``None``.

        Returns
        -------
        The model, ready for :meth:`get_factors`, :meth:`transform` or :meth:`train`.

        Raises
        ------
        sfact.models.ModelFileError
            A file is truncated, edited, does not match the others (factor count, genes, shapes,
            dtype, format version), or holds Python objects other than tensors (never unpickled).

        Examples
        --------
        >>> model = sfact.models.SpatialFactorization.load("model_dir", adata)  # doctest: +SKIP
        >>> model.train(max_iter=100)  # continue training  # doctest: +SKIP
        """
        from ._io import load_model

        return load_model(cls, dir_path, adata, device=device)
