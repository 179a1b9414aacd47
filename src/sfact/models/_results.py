"""Results of a trained :class:`~sfact.models.SpatialFactorization`: factors, loadings, predictions.

:class:`ResultsMixin` holds the model's read-out methods; the computations are in
:mod:`sfact.models._inference`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import is_multigroup
from .._utils import get_counts
from . import _inference

if TYPE_CHECKING:
    from anndata import AnnData

    from ._setup import ModelSetup

__all__ = ["ResultsMixin"]


class ResultsMixin:
    """Read-out methods of :class:`~sfact.models.SpatialFactorization` (mixed into it)."""

    setup: ModelSetup
    adata: AnnData | None
    device: str
    module: Any

    def inducing_points(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Inducing points in the data's coordinate units, and their group codes (multi-group priors).

        With several samples each point is unscaled with its own sample's offset (see
        :meth:`inducing_point_samples`).

        Returns
        -------
        ``(coords, groups)``: an (M, 2) array and an (M,) array of group codes (indices into
        ``setup.group_categories``) or ``None``.

        Examples
        --------
        >>> Z, Z_groups = model.inducing_points()  # doctest: +SKIP
        """
        from .._scaling import unscale

        Z, codes, samples = self._inducing()
        names = None if samples is None else np.asarray(self.setup.sample_categories, dtype=object)[samples]
        coords = unscale(Z, self.setup.scaling, names)
        return coords, (codes if self.setup.multigroup else None)

    def inducing_point_samples(self) -> np.ndarray | None:
        """The sample of each inducing point (several samples), or ``None`` with one sample.

        Returns
        -------
        An (M,) array of sample names (``setup.sample_categories``), in the order of
        :meth:`inducing_points`.

        Examples
        --------
        >>> model.inducing_point_samples()[:3]  # doctest: +SKIP
        array(['A', 'A', 'A'], dtype=object)
        """
        _, _, samples = self._inducing()
        return None if samples is None else np.asarray(self.setup.sample_categories, dtype=object)[samples]

    def _inducing(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Scaled inducing points, their group codes and their sample codes (kernel codes split)."""
        if self.module is None:
            raise RuntimeError(
                "The model is not trained yet: call `model.train()` (or fit with "
                "`sfact.tl.fit(adata, save_model=dir)` and load it with `SpatialFactorization.load(dir, adata)`)."
            )
        prior = self.module.prior
        Z = getattr(prior, "Z", None)
        if Z is None:
            raise ValueError(f"The {self.prior!r} prior has no inducing points; only the SVGP priors do.")
        codes = None
        if getattr(prior, "multigroup", False) and getattr(prior, "Z_groups", None) is not None:
            codes = prior.Z_groups.detach().cpu().numpy().astype(np.int64)
        samples = None
        if codes is not None and self.setup.n_sample > 1:  # the kernel's groups are sample x G + group
            G = self.setup.n_groups or 1
            samples, codes = codes // G, codes % G
        return Z.detach().cpu().double().numpy(), codes, samples

    def _marginals(self, adata: AnnData | None, batch_size: int = 10000):
        return _inference.marginals(self, adata, batch_size)

    def groupwise_factors(
        self, adata: AnnData | None = None, *, groups: list[str] | None = None, batch_size: int = 10000
    ) -> tuple[np.ndarray, list[str]]:
        """Factors ``exp(μ)`` of each cell as if it belonged to each group (multi-group priors).

        Parameters
        ----------
        adata
            Cells whose coordinates (and samples) are used, checked first as by
            :meth:`transform`; the training cells when ``None``.
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
        if not is_multigroup(self.prior):
            raise ValueError(f"Group-wise factors need a multi-group prior, not {self.prior!r}.")
        cats = list(self.setup.group_categories or ["all"])
        groups = list(cats) if groups is None else [str(g) for g in groups]
        unknown = [g for g in groups if g not in cats]
        if unknown:
            raise ValueError(f"Unknown groups {unknown}; the model knows {cats}.")
        if adata is None or adata is self.adata:
            X, kernel_codes = self._training_inputs()
            samples = None if kernel_codes is None or self.setup.n_sample == 1 else kernel_codes // len(cats)
        else:
            from ._newcells import check_new_cells

            adata = check_new_cells(self, adata, purpose="groupwise").adata
            X = self.setup.scaled_coords(adata)
            samples = self.setup.sample_codes(adata) if self.setup.n_sample > 1 else None
        out = np.empty((len(groups), X.shape[0], self.n_factors))
        for k, g in enumerate(groups):
            # each cell in group g of its own sample (the kernel's group is sample x G + group)
            codes = np.full(X.shape[0], cats.index(g), dtype=np.int64)
            if samples is not None:
                codes = codes + samples * len(cats)
            mu, _ = _inference.predict_arrays(self, X, codes, batch_size=batch_size)
            out[k] = np.exp(mu)
        return out, groups

    def gp_info(self) -> dict[str, Any]:
        """Kernel hyperparameters and inducing-point count (spatial priors), as plain values.

        Returns
        -------
        A dict: ``kernel``, ``lengthscale`` and ``sigma`` (lists, one value per kernel),
        ``group_diff_param`` (multi-group priors), ``num_inducing``, ``diagonal_only`` (whether
        the variational covariance is diagonal) and ``prior``; for the LCGP priors also
        ``n_neighbors`` and ``nugget``. Empty for ``pnmf``.

        Examples
        --------
        >>> model.gp_info()  # doctest: +SKIP
        {'kernel': 'matern32', 'lengthscale': [5.0], 'sigma': [1.0], 'group_diff_param': [1.0],
         'num_inducing': 1000, 'diagonal_only': True, 'prior': 'mggp_svgp'}
        """
        self._require_trained()
        info = getattr(self.module.prior, "gp_info", None)
        if info is None:
            return {}
        out = info()
        search = self.train_info.get("lengthscale_search")
        if search is not None:
            out["lengthscale_search"] = search
        return out

    def get_factors(
        self, adata: AnnData | None = None, *, expected: bool = False, batch_size: int = 10000
    ) -> np.ndarray:
        """Factors ``exp(μ)`` (N, L) of the training cells, or of the cells of ``adata``.

        Parameters
        ----------
        adata
            New cells: predicted from their coordinates (spatial priors) or fitted to their counts
            with the loadings fixed (``pnmf``), checked first as by :meth:`transform`. The
            training cells when ``None``.
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

    def fit_new_sample(
        self, adata: AnnData, *, max_iter: int = 300, num_inducing: int = 500
    ) -> tuple[np.ndarray, np.ndarray]:
        """Log-factors of the cells of samples (tissue sections) the model was not trained on.

        A new sample has no GP of its own in the model, so its factors cannot be predicted from
        coordinates. Instead, for each new sample of ``adata``: the cells' factors are fitted to
        their counts with the loadings fixed, then smoothed over the sample's own coordinates
        (scaled from its corner with the model's common factor) by the model's spatial prior —
        its kernel, hyperparameters and mean — by GP regression through ``num_inducing`` k-means
        inducing points, each cell's fitted log-factors a Gaussian observation with their
        fitted variance.

        Parameters
        ----------
        adata
            Cells of new samples, with counts, coordinates, the sample column (and the groups of
            a multi-group prior).
        max_iter
            Iterations of the fit of the factors to the counts.
        num_inducing
            Inducing points per new sample of the smoothing.

        Returns
        -------
        ``(mu, var)``, each an array (n_cells, n_factors), in the order of ``adata``.

        Raises
        ------
        ValueError
            Without samples, for cells of samples seen in training (use
            :meth:`get_log_factors` for those), or for cells that fail the checks of
            :meth:`transform` (genes, which may come in any order, counts, coordinates, groups).

        Examples
        --------
        >>> mu, var = model.fit_new_sample(adata_section5)  # doctest: +SKIP
        """
        from . import _inference

        return _inference.new_sample_marginals(self, adata, max_iter=max_iter, num_inducing=num_inducing)

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

        The cells are checked before anything is computed, for what is read: the genes (the
        model's, in any order; missing or extra genes raise, naming them) and counts (no NaN,
        infinite or negative values) for ``pnmf``; coordinates (numeric, finite, the training
        dimensions), groups and samples (seen in training; a new sample needs
        :meth:`fit_new_sample`) for the spatial priors. For those, an AnnData without genes
        (coordinates only) is accepted.

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

        Raises
        ------
        ValueError
            0 cells, or cells that fail the checks above (the message names the problem).
        KeyError
            Missing coordinates, group or sample column.

        Examples
        --------
        >>> train, test = sfact.tl.heldout_split(adata)  # doctest: +SKIP
        >>> model = sfact.models.SpatialFactorization(train, prior="svgp").train()  # doctest: +SKIP
        >>> factors, scales = model.transform(test)  # doctest: +SKIP
        """
        mu, var = _inference.new_marginals(self, adata_new, batch_size=batch_size, what="adata_new")
        return np.exp(mu), np.sqrt(var)

    def predict(self, adata_new: AnnData | None = None, *, batch_size: int = 10000) -> np.ndarray:
        """Expected counts ``E[λ_nd] = s_n Σ_l W_dl e^{μ_nl+σ²_nl/2}`` (dense, n x D).

        Size factors of new cells come from their own counts (``"total"``) or ``obs`` column.
        New cells are checked as by :meth:`transform`, and their genes always: they must be the
        model's, in any order, and their counts must be finite and non-negative.

        Parameters
        ----------
        adata_new
            New cells (see :meth:`transform`); the training cells when ``None``.
        batch_size
            Cells per batch of the GP predictive.

        Returns
        -------
        Dense array (n_cells, n_vars) of expected counts. Its columns follow the genes of
        ``adata_new`` in ``adata_new``'s own order (so they line up with its counts, also when
        its genes are the model's in another order); for the training cells, the model's order
        (:attr:`var_names`).

        Examples
        --------
        >>> Y_hat = model.predict(test)  # doctest: +SKIP
        """
        from ._newcells import check_new_cells

        self._require_trained()
        checked = None
        if adata_new is not None and adata_new is not self.adata:
            checked = check_new_cells(self, adata_new, purpose="predict", what="adata_new")
            adata = checked.adata  # the model's genes in the model's order
        else:
            adata = self.adata
        if adata is None:
            raise RuntimeError("No training data attached: pass `adata_new` (or `adata` to `load`).")
        mu, var = _inference.marginals(self, None if checked is None else adata, batch_size, checked=True)
        X = get_counts(adata, self.setup.layer) if self.setup.size_factors == "total" else None
        s = self.setup.size_factors_of(adata, X)
        W = self.get_loadings()
        out = s[:, None] * (np.exp(mu + 0.5 * var) @ W.T)
        offsets = self.gene_offsets_of(adata)
        if offsets is not None:
            out *= offsets[0][offsets[1]]
        return out if checked is None else checked.to_input_order(out)

    def get_gene_offsets(self) -> np.ndarray | None:
        """The per-sample gene offsets ``g`` (samples x genes, model order), or ``None`` without them.

        With ``gene_offsets`` the rates are ``s_n g_{s(n),d} Σ_l W_dl exp(F_nl)``; every gene's
        offsets have geometric mean 1 over the samples (weighted by their cells), so
        :meth:`get_loadings` are those of an average sample.

        Returns
        -------
        A float64 array (S, D), rows in ``setup.sample_categories`` order, or ``None``.

        Examples
        --------
        >>> g = model.get_gene_offsets()  # doctest: +SKIP
        """
        self._require_trained()
        if not getattr(self.module, "has_gene_offsets", False):
            return None
        return self.module.gene_offset.detach().cpu().double().numpy()

    def gene_offsets_of(self, adata: AnnData) -> tuple[np.ndarray, np.ndarray] | None:
        """``(g, codes)`` for rates of the cells of ``adata``: the offsets and each cell's sample code.

        ``None`` for a model without gene offsets. Cells of a sample the model was not trained on
        raise (their offsets are unknown: :meth:`fit_new_sample` gives their factors).

        Parameters
        ----------
        adata
            Cells of the model's samples.

        Returns
        -------
        ``(g, codes)``: a float64 (S, D) array and an int64 (n,) array, or ``None``.

        Examples
        --------
        >>> g, codes = model.gene_offsets_of(adata)  # doctest: +SKIP
        >>> rates_factor = g[codes]  # (n, D): each cell's own sample's offsets  # doctest: +SKIP
        """
        g = self.get_gene_offsets()
        if g is None:
            return None
        return g, self.setup.sample_codes(adata)

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
