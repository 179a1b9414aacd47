"""Training of a :class:`~sfact.models.SpatialFactorization`: data on the device, initialization, :meth:`train`.

:class:`TrainingMixin` holds the model's training methods; the torch work is in
:mod:`sfact._core.factory`, :mod:`sfact._core.init` and :mod:`sfact._core.train`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import _logging as logg
from .._settings import settings
from .._utils import check_float, check_int

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from anndata import AnnData

    from ._model import SpatialFactorization
    from ._setup import ModelSetup

__all__ = ["SAMPLE_CORRELATIONS", "TrainingMixin", "sample_distance_for", "share_training_start"]

#: with ``sample_distance="auto"``: the correlations between two samples at the same place that
#: the search tries next to independence
SAMPLE_CORRELATIONS = (0.5, 0.9, 0.99)


def sample_distance_for(correlation: float, alpha: float, kernel: str, n_dims: int) -> float:
    """The distance between samples at which the multi-group kernel correlates them by ``correlation``.

    The kernel multiplies the covariance of two groups at the same place by ``ν^e`` with
    ``ν = 1 / (α d² + 1)`` and ``e = (3 + p) / 2`` (Matérn-3/2) or ``p / 2`` (RBF).

    Parameters
    ----------
    correlation
        In (0, 1).
    alpha
        The kernel's ``group_diff_param`` (> 0).
    kernel
        ``"matern32"`` or ``"rbf"``.
    n_dims
        Dimension p of the coordinates.

    Returns
    -------
    The distance ``d = sqrt((1/ν − 1) / α)``.
    """
    e = (3.0 + n_dims) / 2.0 if kernel == "matern32" else n_dims / 2.0
    nu = float(correlation) ** (1.0 / e)
    return float(((1.0 / nu - 1.0) / max(float(alpha), 1e-12)) ** 0.5)


@dataclass(frozen=True)
class _SharedStart:
    """The set-up that models of any prior on the same cells can share (:func:`sfact.tl.select_model`).

    The counts and size factors on the device and the KL-NMF start of :func:`sfact._core.init.nmf_start`
    with the state of the model's generator after it, so a model started from it trains exactly as
    if it had computed them itself. Valid for models with the same training cells, ``n_factors``,
    seed, ``init_iter``, layer, size factors, device and dtype.
    """

    n_obs: int
    n_factors: int
    seed: int
    init_iter: int
    device: str
    counts: Any
    s: Any
    H: Any
    W: Any
    generator_state: Any
    #: lengthscale searches (``lengthscale="auto"``) done from this start, by kernel
    searches: dict = field(default_factory=dict, compare=False)


def share_training_start(models: Sequence[SpatialFactorization], *, init_iter: int = 30) -> None:
    """Let untrained models on the same training cells share their data set-up and KL-NMF start.

    Private hook of :func:`sfact.tl.select_model`: the counts on the device, the size factors and
    the KL-NMF start (with the generator's state after it) are computed once, from the first
    model, and used by all, so each trains exactly as it would alone. The models must share the
    training cells, ``n_factors``, seed, layer, size factors and device; the prior and its options
    may differ. ``init_iter`` must be the one passed to each model's :meth:`train`.
    """
    if not models:
        return
    start = models[0]._make_shared_start(init_iter)
    for model in models:
        model._use_shared_start(start)


class TrainingMixin:
    """Training methods of :class:`~sfact.models.SpatialFactorization` (mixed into it)."""

    setup: ModelSetup
    adata: AnnData | None
    device: str
    module: Any
    #: set by :meth:`_use_shared_start`: the data and KL-NMF start to train from (private hook)
    _shared_start: _SharedStart | None = None

    def _make_shared_start(self, init_iter: int = 30) -> _SharedStart:
        """Compute this model's data and KL-NMF start once, for it and other models to share.

        Private hook of :func:`sfact.tl.select_model`: pass the result to
        :meth:`_use_shared_start` of every model on the same training cells with the same
        ``n_factors`` (any prior, any prior options), instead of letting each compute it.
        """
        import torch

        from .._core.init import nmf_start

        if self.adata is None:
            raise RuntimeError("No training data attached.")
        data = self._build_data(self.adata, with_inputs=False)
        generator = torch.Generator().manual_seed(self.setup.seed)
        H, W = nmf_start(data, self.setup.n_factors, int(init_iter), generator)
        return _SharedStart(
            n_obs=self.setup.n_obs,
            n_factors=self.setup.n_factors,
            seed=self.setup.seed,
            init_iter=int(init_iter),
            device=self.device,
            counts=data.counts,
            s=data.s,
            H=H,
            W=W,
            generator_state=generator.get_state(),
        )

    def _use_shared_start(self, start: _SharedStart) -> None:
        """Train from ``start`` (see :meth:`_make_shared_start`) instead of computing the data and NMF."""
        if self.module is not None:
            raise RuntimeError(
                "The model is already initialized; a shared start applies before training only."
            )
        mine = (self.setup.n_obs, self.setup.n_factors, self.setup.seed, self.device)
        theirs = (start.n_obs, start.n_factors, start.seed, start.device)
        if mine != theirs:
            raise ValueError(
                f"Shared start for (n_obs, n_factors, seed, device) = {theirs}, model has {mine}."
            )
        self._shared_start = start

    def _build_data(self, adata: AnnData, *, with_inputs: bool = True):
        """Counts and size factors of ``adata`` on the device (and the training inputs)."""
        import torch

        from .._core.data import SparseCounts
        from .._core.factory import torch_dtype
        from .._core.train import TrainData

        dtype = torch_dtype(self.setup.dtype)
        X = self.setup.counts(adata, check=adata is not self.adata)  # training data checked at set-up
        counts = SparseCounts(X, device=self.device, dtype=dtype)
        s = torch.as_tensor(self.setup.size_factors_of(adata, X), dtype=dtype, device=self.device)
        if not with_inputs:
            return TrainData(counts=counts, s=s)
        coords, groups = self._training_tensors()
        return TrainData(counts=counts, s=s, X=coords, groups=groups, sample=self._sample_tensor())

    def _sample_tensor(self):
        """The sample code of every training cell on the device (models with gene offsets), else ``None``."""
        if not self.setup.gene_offsets:
            return None
        import torch

        if self.adata is None:
            raise RuntimeError("Training a model with gene offsets needs its training data (`adata`).")
        return torch.as_tensor(self.setup.sample_codes(self.adata), device=self.device)

    def _shared_data(self, start: _SharedStart):
        """The training data from a shared start: its counts and size factors, this model's inputs."""
        from .._core.train import TrainData

        coords, groups = self._training_tensors()
        return TrainData(
            counts=start.counts, s=start.s, X=coords, groups=groups, sample=self._sample_tensor()
        )

    def _initialize(self, data, init_iter: int) -> None:
        from .._core.factory import make_module, make_prior
        from .._core.init import initialize, nmf_start

        setup = self.setup
        shared = self._shared_start
        if shared is None:
            start = nmf_start(data, setup.n_factors, init_iter, self._generator)
        else:
            if shared.init_iter != init_iter:
                raise ValueError(
                    f"Shared start with `init_iter={shared.init_iter}`, `train` got {init_iter}."
                )
            self._generator.set_state(shared.generator_state)  # as if this model had drawn the NMF start
            start = (shared.H, shared.W)
        defaults = getattr(self, "_device_defaults", None)  # chosen from the memory by train()
        cfg = self._resolve_lengthscale(setup.prior_config()._for_device(self.device, defaults), data, start)
        prior = make_prior(
            setup.prior,
            setup.n_factors,
            cfg,
            n_obs=data.n_obs,
            X=data.X,
            groups=data.groups,
            n_groups=setup.n_kernel_groups,
            seed=setup.seed,
            embedding=setup.kernel_embedding(cfg.group_distances, cfg.sample_distance)
            if setup.kernel_multigroup
            else None,
            sample_of_group=setup.sample_of_group(),
        )
        module = make_module(prior, data.n_vars, setup.loadings_mode, device=self.device, dtype=setup.dtype)
        if setup.gene_offsets:
            import torch

            c = data.counts
            totals = torch.zeros(setup.n_sample, c.n_vars, dtype=c.values.dtype, device=c.values.device)
            totals.index_put_((data.sample[c.row_of], c.indices), c.values, accumulate=True)
            module.enable_gene_offsets(
                totals, torch.bincount(data.sample, minlength=setup.n_sample).to(totals)
            )
        initialize(module, data, init_iter, self._generator, start=start)
        self.module = module

    def _sample_blocks(self, data):
        """The sample code of every training cell (several samples), else ``None``."""
        of_group = self.setup.sample_of_group()
        if of_group is None or data.groups is None:
            return None
        return of_group[data.groups.detach().cpu().numpy()]

    def _resolve_lengthscale(self, cfg, data, start):
        """``cfg`` with ``lengthscale="auto"`` (or ``None``) and ``sample_distance="auto"`` resolved.

        The search (:func:`sfact._core.lengthscale.choose_lengthscale`) runs on the KL-NMF
        ``start`` and is recorded in :attr:`lengthscale_search_`; with too few cells the
        prior's fallback lengthscale is used. ``None`` (learned) starts from the choice. With
        several samples and ``sample_distance="auto"`` the search runs once per candidate
        correlation between samples (:data:`SAMPLE_CORRELATIONS`, and independence); the
        candidate of the lowest deviance wins, independence unless a correlation is better by
        more than the search's tolerance (independent samples train faster).
        """
        import dataclasses

        import numpy as np

        self.lengthscale_search_ = None
        value = getattr(cfg, "lengthscale", 0.0)
        auto_ls = value is None or isinstance(value, str)
        auto_d = getattr(cfg, "sample_distance", None) == "auto"
        if auto_d and not (self.setup.n_sample > 1 and self.setup.kernel_multigroup):
            cfg, auto_d = dataclasses.replace(cfg, sample_distance=None), False
        if not (auto_ls or auto_d):
            return cfg
        from .._core.lengthscale import NUM_INDUCING, TOLERANCE, choose_lengthscale
        from ._setup import SAMPLE_DISTANCE

        multigroup = self.setup.kernel_multigroup
        alpha = cfg.GROUP_DIFF_START if cfg.group_diff_param is None else float(cfg.group_diff_param)
        ladder = None if auto_ls else np.atleast_1d(np.mean(np.asarray(value, dtype=float)))
        distances = (
            [None, *(sample_distance_for(c, alpha, cfg.kernel, data.X.shape[1]) for c in SAMPLE_CORRELATIONS)]
            if auto_d
            else [cfg.sample_distance]
        )
        searches = []
        for i, d in enumerate(distances):
            cand_ladder = ladder
            if auto_d and i > 0 and ladder is None and searches[0] is not None:
                # a correlation is tried near the independent samples' best lengthscale only
                lad0 = np.asarray(searches[0].ladder)
                j0 = int(np.argmin(searches[0].deviance))
                cand_ladder = lad0[max(j0 - 2, 0) : j0 + 3]
            emb = self.setup.kernel_embedding(cfg.group_distances, d) if multigroup else None
            key = (
                cfg.kernel,
                multigroup,
                alpha,
                None if emb is None else np.asarray(emb).tobytes(),
                None if cand_ladder is None else np.asarray(cand_ladder).tobytes(),
            )
            shared = self._shared_start
            if shared is not None and key in shared.searches:
                search = shared.searches[key]
            else:
                import torch

                independent = d is None or d >= SAMPLE_DISTANCE
                try:
                    search = choose_lengthscale(
                        data.X,
                        data.groups if multigroup else None,
                        data.counts,
                        data.s,
                        start[0],
                        start[1],
                        kernel=cfg.kernel,
                        group_embedding=emb,
                        group_diff_param=alpha,
                        seed=self.setup.seed,
                        ladder=cand_ladder,
                        blocks=self._sample_blocks(data) if independent else None,
                        # correlated samples share one smoothing: inducing points for all of them
                        num_inducing=NUM_INDUCING
                        if independent
                        else min(NUM_INDUCING * self.setup.n_sample, 2 * NUM_INDUCING),
                    )
                except torch.linalg.LinAlgError as err:  # a numerically singular smoothing: say so, go on
                    from .._utils import warn

                    warn(
                        f"The lengthscale search failed ({err}); using the fallback lengthscale. "
                        "Pass `prior_kwargs={'lengthscale': ...}` to choose one."
                    )
                    search = None
                if shared is not None:
                    shared.searches[key] = search
            searches.append(search)
        # the candidate between samples: independence unless a correlation is better by > TOLERANCE
        pick = 0
        if auto_d:
            best = [np.inf if s is None else float(np.min(s.deviance)) for s in searches]
            j = int(np.argmin(best))
            if np.isfinite(best[j]) and (not np.isfinite(best[0]) or best[j] < best[0] * (1.0 - TOLERANCE)):
                pick = j
            cfg = dataclasses.replace(cfg, sample_distance=distances[pick])
            corr = 0.0 if pick == 0 else SAMPLE_CORRELATIONS[pick - 1]
            logg.info(
                "    samples: "
                + ("independent" if pick == 0 else f"correlated by {corr:g} at the same place")
                + ", chosen from the data"
            )
        search = searches[pick]
        if search is not None:
            self.lengthscale_search_ = search.to_dict()
            if auto_d:
                self.lengthscale_search_["sample_correlation"] = corr
                self.lengthscale_search_["sample_candidates"] = {
                    str(c): (float("nan") if s is None else float(np.min(s.deviance)))  # h5ad: no None
                    for c, s in zip((0.0, *SAMPLE_CORRELATIONS), searches, strict=True)
                }
        if not auto_ls:
            return cfg
        if search is None:
            if value is None:  # learned: the data start of make_prior (a multiple of the spacing)
                return cfg
            chosen = cfg.FALLBACK_LENGTHSCALE
            logg.info(
                f"    lengthscale: {chosen:g} (not chosen from the data: too few cells, or the search failed)"
            )
        else:
            chosen = float(search.lengthscale)
            logg.info(
                f"    lengthscale: {chosen:.3g}, chosen from the data "
                f"(ladder {search.ladder[0]:.3g}-{search.ladder[-1]:.3g}, best {search.best:.3g})"
            )
        train = cfg._trained("lengthscale")
        return dataclasses.replace(cfg, lengthscale=chosen, train_lengthscale=train)

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
        distributed: bool = False,
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
            Show a progress bar with the ELBO, its relative change against ``tol`` and the time
            left estimated from that change (``?`` while there is no trend to go by; the bar has
            no total, as training ends at convergence rather than at ``max_iter``), then a
            one-line summary (iterations, converged or not, time, ELBO; an info message at
            verbosity 2 or more); defaults to :attr:`sfact.settings.progress_bar`.
        callback
            Called as ``callback(iteration, elbo_per_entry)`` after every iteration.
        distributed
            Data-parallel training of this one model by the processes of the initialized
            :mod:`torch.distributed` default group (started by ``torchrun``, or by
            :func:`sfact.models.train_distributed`), each on its own device: every process builds
            the same model on the same data and calls ``train`` with the same options; each step's
            batch is cut into one share per process, and gradients and loadings statistics are summed,
            so every process holds the same model, equal to the single-process fit with the same seed
            up to float rounding. Only process 0 shows progress and the summary.

        Returns
        -------
        The model itself, trained.

        Warns
        -----
        sfact.models.ConvergenceWarning
            When training stops at ``max_iter`` before converging, with advice (a larger
            ``max_iter``, or calling ``train`` again to continue).

        Raises
        ------
        ValueError
            Before anything is done, if an option is out of range: a negative, non-finite or
            fractional ``max_iter``, ``init_iter``, ``min_iter``, ``batch_size`` or ``y_batch_size``
            (which must be whole numbers, the batch sizes positive), a ``learning_rate`` that is not
            positive and finite, or a ``tol`` or ``kl_weight`` that is negative or not finite.
        sfact.models.TrainingError
            If the ELBO becomes non-finite; the message names the iteration and the model keeps
            its last finite parameters.
        RuntimeError
            With ``distributed=True`` when no :mod:`torch.distributed` group is initialized.

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

        # every option checked before anything moves or trains (integers where integers are meant)
        max_iter = check_int(max_iter, "max_iter", minimum=0)
        tol = check_float(tol, "tol", minimum=0)
        learning_rate = check_float(learning_rate, "learning_rate", positive=True, none_ok=True)
        batch_size = check_int(batch_size, "batch_size", minimum=1, none_ok=True)
        y_batch_size = check_int(y_batch_size, "y_batch_size", minimum=1, none_ok=True)
        kl_weight = check_float(kl_weight, "kl_weight", minimum=0)
        init_iter = check_int(init_iter, "init_iter", minimum=0)
        min_iter = check_int(min_iter, "min_iter", minimum=0)
        if callback is not None and not callable(callback):
            raise TypeError(f"`callback` must be callable or None, received {type(callback).__name__}.")
        if not isinstance(distributed, bool):
            raise TypeError(f"`distributed` must be True or False, received {distributed!r}.")
        parallel = None
        if distributed:
            from .._core.distributed import DataParallel

            parallel = DataParallel()  # raises, naming the fix, without an initialized group
        if learning_rate is None:
            learning_rate = 0.05 if self.prior == "pnmf" else 0.1
        if device is not None:
            self.to_device(device)
        N, D = self.setup.n_obs, self.setup.n_vars
        if batch_size is not None and batch_size > N:
            logg.info(f"    `batch_size={batch_size}` is more than the {N} cells; using {N}.")
            batch_size = N
        if y_batch_size is not None and y_batch_size > D:
            logg.info(f"    `y_batch_size={y_batch_size}` is more than the {D} genes; using {D}.")
            y_batch_size = D
        if settings.deterministic:
            torch.use_deterministic_algorithms(True)
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.setup.seed)
        if self._data is None:
            if self.adata is None:
                raise RuntimeError("No training data attached: pass `adata` to `SpatialFactorization.load`.")
            self.setup.check_vars(self.adata)
            if self.adata.n_obs != N:
                raise ValueError(f"Expected {N} cells (the training data), received {self.adata.n_obs}.")
            shared = self._shared_start
            self._data = self._build_data(self.adata) if shared is None else self._shared_data(shared)
        start = logg.info(
            f"training {self.prior} with {self.n_factors} factors on {N} cells x {D} genes ({self.device})"
        )
        if self.module is None or batch_size is None:  # defaults that fit the device's memory
            batch_size = self._memory_defaults(batch_size, parallel)
        if self.module is None:
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
            elbo_mode=self.setup.elbo_mode,
            n_samples=self.setup.n_samples,
            kl_weight=float(kl_weight),
            min_iter=int(min_iter),
        )
        self.module.train()
        show = settings.progress_bar if progress_bar is None else progress_bar
        lead = parallel is None or parallel.rank == 0  # the process that reports
        show = show and lead
        t_before = float(self.history_.time[-1]) if self.history_.time else 0.0
        result = train_loop(
            self.module,
            self._data,
            cfg,
            optimizer=self._optimizer,
            history=self.history_,
            generator=self._generator,
            progress_bar=show,
            callback=callback,
            parallel=parallel,
        )
        self.module.eval()
        self.is_trained = True
        self.converged = bool(result["converged"])
        previous = getattr(self, "train_info", None) or {}
        search = getattr(self, "lengthscale_search_", None) or previous.get("lengthscale_search")
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
        if search is not None:
            self.train_info["lengthscale_search"] = search
        memory = previous.get("memory_defaults")
        chosen = getattr(self, "_device_defaults", None)
        if chosen is not None and chosen.reduced:
            memory = chosen.to_dict()
        if memory is not None:
            self.train_info["memory_defaults"] = memory
        if lead:
            self._end_of_training(result, cfg, shown=show, seconds=self.train_info["train_time_s"] - t_before)
        logg.info("    finished", time=start)
        return self

    def _memory_defaults(self, batch_size: int | None, parallel) -> int | None:
        """The batch size to train with; before the first training, also the prior's memory defaults.

        Options left ``None`` are chosen from the device's free memory
        (:func:`sfact.models._config.memory_defaults`; the same for every process of data-parallel
        training, from the smallest free memory): exactly the plain defaults when they fit. A
        continued fit keeps a batch size chosen by an earlier call. Logs the choice when it differs
        from the plain defaults, and keeps it in :attr:`_device_defaults` (for ``train_info``).
        """
        from ._config import memory_defaults

        self._device_defaults = None
        previous = (getattr(self, "train_info", None) or {}).get("memory_defaults")
        if self.module is not None and previous is not None and batch_size is None:
            return previous["batch_size"] or None
        setup, data = self.setup, self._data
        cfg = setup.prior_config()
        if self.module is not None:  # the prior's options are those it was built with
            import dataclasses

            prior, fixed = self.module.prior, {}
            if hasattr(cfg, "diagonal_only"):
                fixed["diagonal_only"] = bool(prior.diagonal_only)
            if hasattr(cfg, "num_inducing"):
                fixed.update(num_inducing=int(prior.n_inducing), cache_budget=int(prior.cache_budget))
            cfg = dataclasses.replace(cfg, **fixed)
        memory_bytes = None
        open_choice = batch_size is None or any(
            getattr(cfg, name, False) is None for name in ("diagonal_only", "num_inducing", "cache_budget")
        )
        if parallel is not None and open_choice:  # every process must choose alike
            from .._core.memory import available_memory

            memory_bytes = int(parallel.min_over_processes(available_memory(self.device), data.counts.device))
        chosen = memory_defaults(
            cfg,
            setup.prior,
            self.device,
            n_obs=data.n_obs,
            n_vars=data.n_vars,
            n_factors=setup.n_factors,
            nnz=data.counts.nnz,
            n_dims=1 if data.X is None else int(data.X.shape[1]),
            itemsize=data.counts.values.element_size(),
            batch_size=batch_size,
            sampled=0 if setup.elbo_mode == "lower-bound" else int(setup.n_samples),
            memory_bytes=memory_bytes,
        )
        if chosen.reduced:
            logg.info(f"    defaults from the memory of {self.device}: {chosen.summary()}")
            self._device_defaults = chosen
        return batch_size if batch_size is not None else chosen.batch_size

    def _end_of_training(self, result: dict, cfg, *, shown: bool, seconds: float) -> None:
        """The summary line of every fit, and a warning with advice when it stopped unconverged."""
        from .._logging import summary
        from ._convergence import fit_summary, warn_not_converged

        if cfg.max_iter == 0:
            return
        n_iter, n_total = int(result["n_iter"]), len(self.history_)
        elbo = float(self.history_.elbo[-1]) if n_total else None
        line = fit_summary(
            self.prior,
            n_iter=n_iter,
            n_total=n_total,
            converged=self.converged,
            seconds=seconds,
            elbo=elbo,
            max_iter=cfg.max_iter,
        )
        summary(line, shown=shown)
        if not self.converged:
            warn_not_converged(
                n_iter=n_iter,
                n_total=n_total,
                max_iter=cfg.max_iter,
                tol=cfg.tol,
                change=float(result.get("change", float("inf"))),
                left=result.get("iterations_left"),
            )
