"""Typed configurations of the priors (validated from ``prior_kwargs``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from .._constants import (
    ALLOCATIONS,
    KERNELS,
    NEIGHBOR_METHODS,
    NEIGHBOR_SELECTIONS,
    Allocation,
    KernelName,
    is_gpu,
)
from .._utils import check_float, check_int

if TYPE_CHECKING:
    from .._core.memory import DeviceDefaults

NeighborMethod = Literal["auto", "exact", "pynndescent"]
NeighborSelection = Literal["auto", "spatial", "correlation"]


@dataclass
class PNMFConfig:
    """Options of the ``pnmf`` prior (independent standard-normal log-factors).

    Attributes
    ----------
    init_scale
        Initial posterior standard deviation of the log-factors.

    Examples
    --------
    >>> model = sfact.models.SpatialFactorization(  # doctest: +SKIP
    ...     adata, prior="pnmf", prior_kwargs={"init_scale": 0.05}
    ... )
    """

    init_scale: float = 0.1

    def __post_init__(self) -> None:
        check_float(self.init_scale, "init_scale", positive=True)

    def _for_device(self, device: str, defaults: DeviceDefaults | None = None) -> PNMFConfig:
        """The config with every device-dependent default filled in (nothing to fill for ``pnmf``)."""
        return self


@dataclass
class GPConfig:
    """Kernel options shared by the Gaussian-process priors.

    The base of :class:`~sfact.models._config.SVGPConfig` and :class:`~sfact.models._config.LCGPConfig`.

    Attributes
    ----------
    kernel
        ``"matern32"`` or ``"rbf"``.
    lengthscale
        Kernel lengthscale in scaled units (coordinates span 100 units along the longer side
        after :func:`sfact.pp.prepare`); one value, or one per factor with ``per_factor_kernel``.
        ``"auto"`` (default): chosen from the data before training by the cross-validated
        deviance of a GP smoothing of the NMF start (see "The lengthscale is chosen from the
        data" in the model docs), then fixed unless ``train_lengthscale=True``; a number: fixed
        at it; ``None``: started at the ``"auto"`` choice and learned (see "Learned
        hyperparameters").
    sigma
        Kernel amplitude (prior standard deviation of the log-factors around their mean).
        Default 1, fixed unless ``train_sigma=True``; ``None``: starts at 1 and is learned.
    group_diff_param
        α of the multi-group kernel: 0 makes all groups one; large values make them independent.
        Default 1, fixed unless ``train_group_diff_param=True``; ``None``: starts at 1 and is
        learned.
    group_distances
        Optional (G, G) distances between groups, embedded by classical MDS; all pairs of
        different groups are at distance 1 when ``None``.
    sample_distance
        With several samples (``sample_key``): their distance in the multi-group kernel, in the
        units of ``group_distances``. ``"auto"`` (default): chosen from the data before training,
        with the lengthscale: independent samples, or the same place in two samples correlated by
        0.5, 0.9 or 0.99, whichever the cross-validated deviance of the search prefers
        (independence unless a correlation is better by more than the search's tolerance; see
        "Several samples" in the model docs). ``None``: independent GPs, one per sample (the
        distance is 1000, so the kernel between samples vanishes). A number d correlates the same
        place in two samples by ν^((3+p)/2) (Matérn-3/2) with ν = 1/(α d² + 1), for serial
        sections whose coordinates line up; with ``group_diff_param=None`` α, hence the
        correlation, is learned.
    per_factor_kernel
        One set of kernel hyperparameters per factor.
    train_lengthscale, train_sigma, train_group_diff_param
        Learn these hyperparameters; ``None`` (default): learned exactly when their value is
        ``None``.
    hyper_iter
        Learned hyperparameters train during the first ``hyper_iter`` iterations only, then they
        are frozen and what derives from them is cached (the speed of fixed hyperparameters);
        ``None``: they train for the whole fit.
    hyper_lr_scale
        Learning rate of the (log-scale) hyperparameters relative to ``learning_rate``.
    diagonal_only
        Diagonal variational covariance; ``None`` (default) uses it on the CPU only (and on a
        GPU whose memory does not hold a full one, see "Defaults from the device's memory" in the
        performance docs).
    """

    kernel: KernelName = "matern32"
    lengthscale: float | list[float] | str | None = "auto"
    sigma: float | list[float] | None = 1.0
    group_diff_param: float | None = 1.0
    group_distances: Any = None
    sample_distance: float | str | None = "auto"
    per_factor_kernel: bool = False
    train_lengthscale: bool | None = None
    train_sigma: bool | None = None
    train_group_diff_param: bool | None = None
    hyper_iter: int | None = 100
    hyper_lr_scale: float = 0.5
    diagonal_only: bool | None = None

    #: starting values of the learned hyperparameters (``None`` above): the lengthscale starts at
    #: the ``"auto"`` choice (with fewer than 100 cells, at this multiple of the median distance
    #: from a cell to its 10th nearest neighbour), and is kept
    #: within [LENGTHSCALE_BOUNDS[0] x the median 1st-neighbour distance, LENGTHSCALE_BOUNDS[1] x
    #: the longer side of the tissue]
    LENGTHSCALE_NN_MULTIPLE: ClassVar[float] = 4.0
    LENGTHSCALE_BOUNDS: ClassVar[tuple[float, float]] = (0.5, 2.0)
    SIGMA_START: ClassVar[float] = 1.0
    #: the lengthscale ``"auto"`` uses when there are too few cells to choose one (< 100)
    FALLBACK_LENGTHSCALE: ClassVar[float] = 5.0
    GROUP_DIFF_START: ClassVar[float] = 1.0
    NUGGET_START: ClassVar[float] = 0.03

    def __post_init__(self) -> None:
        if isinstance(self.lengthscale, str) and self.lengthscale != "auto":
            raise ValueError(
                f"`lengthscale` must be a positive number, 'auto' or None, received {self.lengthscale!r}."
            )
        _hyperparameter(self.lengthscale, "lengthscale", "a positive number, 'auto' or None")
        _hyperparameter(self.sigma, "sigma", "a positive number or None")
        if self.kernel not in KERNELS:
            raise ValueError(f"`kernel` must be 'matern32' or 'rbf', received {self.kernel!r}.")
        if isinstance(self.sample_distance, str):
            if self.sample_distance != "auto":
                raise ValueError(
                    f"`sample_distance` must be a positive number, 'auto' or None, received {self.sample_distance!r}."
                )
        elif self.sample_distance is not None:
            check_float(self.sample_distance, "sample_distance", positive=True)
        if self.group_diff_param is not None:
            check_float(self.group_diff_param, "group_diff_param", minimum=0)
        check_int(self.hyper_iter, "hyper_iter", minimum=0, none_ok=True)
        check_float(self.hyper_lr_scale, "hyper_lr_scale", positive=True)

    def _check_n_factors(self, n_factors: int) -> None:
        """Raise :class:`ValueError` unless every per-factor list (``lengthscale``, ``sigma``) fits ``n_factors``.

        A list holds one value, or one per factor with ``per_factor_kernel=True``.
        """
        for name in ("lengthscale", "sigma"):
            v = getattr(self, name)
            if v is None or isinstance(v, str) or np.ndim(v) == 0:
                continue
            n = len(v)
            if n == 1 or (self.per_factor_kernel and n == n_factors):
                continue
            if self.per_factor_kernel:
                fix = f"pass one value, or one per factor ({n_factors} values)"
            elif n == n_factors:
                fix = "pass one value, or set `per_factor_kernel=True` for one value per factor"
            else:
                fix = f"pass one value, or one per factor ({n_factors} values) with `per_factor_kernel=True`"
            raise ValueError(f"`{name}` has {n} values for a model with {n_factors} factors: {fix}.")

    def _trained(self, name: str) -> bool:
        """Whether hyperparameter ``name`` is learned: ``train_<name>``, or (when that is ``None``) its value is ``None``.

        ``lengthscale="auto"`` is chosen before training and then fixed (unless
        ``train_lengthscale=True``).
        """
        flag = getattr(self, f"train_{name}")
        return getattr(self, name) is None if flag is None else bool(flag)

    def _for_device(self, device: str, defaults: DeviceDefaults | None = None) -> GPConfig:
        """The config with every device-dependent default (``None``) filled in for ``device``.

        ``defaults``: the choice of :func:`sfact._core.memory.device_defaults` for the problem
        (:func:`memory_defaults`); ``None``: the plain defaults of the device.
        """
        if self.diagonal_only is None:
            diag = not is_gpu(device) if defaults is None else defaults.diagonal_only
            return dataclasses.replace(self, diagonal_only=diag)
        return self


@dataclass
class SVGPConfig(GPConfig):
    """Options of the ``svgp`` and ``mggp_svgp`` priors.

    Attributes
    ----------
    num_inducing
        Number of inducing points M; ``None`` picks what the device affords (1000 on CPU,
        3000 on GPU; fewer only when the device's memory does not hold them), capped by the number
        of cells.
    kernel
        ``"matern32"`` or ``"rbf"``.
    lengthscale
        Kernel lengthscale in scaled units (coordinates span 100 units along the longer side
        after :func:`sfact.pp.prepare`); one value, or one per factor with ``per_factor_kernel``.
        ``"auto"`` (default): chosen from the data before training, then fixed; a number: fixed;
        ``None``: started at the ``"auto"`` choice and learned (see :class:`GPConfig`).
    sigma
        Kernel amplitude (prior standard deviation of the log-factors around their mean);
        default 1 (fixed); ``None``: starts at 1 and is learned.
    group_diff_param
        α of the multi-group kernel: 0 makes all groups one; large values make them independent;
        default 1 (fixed); ``None``: starts at 1 and is learned.
    group_distances
        Optional (G, G) distances between groups, embedded by classical MDS; all pairs of
        different groups are at distance 1 when ``None``.
    sample_distance
        Distance between samples in the kernel (``sample_key``; ``"auto"`` by default: chosen from
        the data), as for :class:`GPConfig`.
    allocation
        How inducing points are split over groups: ``"proportional"``, ``"equal"``, ``"derived"``.
    per_factor_kernel
        One set of kernel hyperparameters per factor (slower: no sharing of ``L_zz⁻¹K_zx``).
    train_lengthscale, train_sigma, train_group_diff_param
        Learn these hyperparameters (``K_zz`` is then refactorized every step of the learning
        phase); ``None`` (default): learned exactly when their value is ``None``.
    hyper_iter
        Iterations of the hyperparameters' learning phase, after which they are frozen and
        ``L_zz⁻¹K_zx`` is cached again; ``None``: learned for the whole fit.
    hyper_lr_scale
        Learning rate of the (log-scale) hyperparameters relative to ``learning_rate``.
    diagonal_only
        Diagonal (whitened) variational covariance ``S``: O(B·M·L) per step instead of
        O(B·M²·L). ``None`` (default) uses it on the CPU and a full ``S`` on a GPU (a diagonal
        one on a GPU whose memory does not hold a full one).
    cache_budget
        Cache ``L_zz⁻¹K_zx`` of all training cells when M·N is at most this many numbers;
        ``None``: 5·10⁷ on the CPU (200 MB), 5·10⁸ on a GPU (2 GB in float32); when the plain
        defaults do not fit the device's memory, half of the memory budget instead (see
        "Defaults from the device's memory" in the performance docs).
    matmul_precision
        Precision of the large products of each step (``L_zz⁻¹K_zx`` with the variational mean
        and covariance, and their gradients): ``"auto"`` (default) TF32 tensor cores on CUDA for
        these products only (the kernel, the solves and the KL stay FP32) and FP32 elsewhere;
        ``"high"`` the same; ``"highest"`` plain FP32 everywhere; ``"tf32-emulated"`` for
        testing: TF32's rounding emulated in FP32 on any device (slower). See "Reduced
        precision" in the performance docs for the accuracy check.

    Examples
    --------
    >>> model = sfact.models.SpatialFactorization(  # doctest: +SKIP
    ...     adata,
    ...     prior="mggp_svgp",
    ...     group_key="ClusterName",
    ...     prior_kwargs={"num_inducing": 500, "lengthscale": 8.0},
    ... )
    """

    num_inducing: int | None = None
    allocation: Allocation = "proportional"
    cache_budget: int | None = None
    matmul_precision: Literal["auto", "highest", "high", "tf32-emulated"] = "auto"

    def __post_init__(self) -> None:
        check_int(self.num_inducing, "num_inducing", minimum=1, none_ok=True)
        check_int(self.cache_budget, "cache_budget", minimum=0, none_ok=True)
        if self.matmul_precision not in ("auto", "highest", "high", "tf32-emulated"):
            raise ValueError(
                "`matmul_precision` must be 'auto' (TF32 on CUDA, FP32 elsewhere), 'highest' (FP32), "
                f"'high' (TF32 on CUDA) or 'tf32-emulated' (testing), received {self.matmul_precision!r}."
            )
        super().__post_init__()
        if self.allocation not in ALLOCATIONS:
            raise ValueError(
                f"`allocation` must be 'proportional', 'equal' or 'derived', received {self.allocation!r}."
            )

    def _for_device(self, device: str, defaults: DeviceDefaults | None = None) -> SVGPConfig:
        """The config with ``diagonal_only``, ``num_inducing`` and ``cache_budget`` filled in for ``device``.

        ``defaults``: the choice of :func:`sfact._core.memory.device_defaults` for the problem
        (:func:`memory_defaults`); ``None``: the plain defaults of the device
        (:data:`sfact._core.memory.PLAIN_CPU`, :data:`~sfact._core.memory.PLAIN_GPU`).
        """
        from .._core.memory import PLAIN_CPU, PLAIN_GPU

        fill = PLAIN_GPU if is_gpu(device) else PLAIN_CPU
        if defaults is not None:
            fill = {k: getattr(defaults, k) for k in ("diagonal_only", "num_inducing", "cache_budget")}
        return dataclasses.replace(
            self,
            diagonal_only=fill["diagonal_only"] if self.diagonal_only is None else bool(self.diagonal_only),
            num_inducing=fill["num_inducing"] if self.num_inducing is None else int(self.num_inducing),
            cache_budget=fill["cache_budget"] if self.cache_budget is None else int(self.cache_budget),
        )


@dataclass
class LCGPConfig(GPConfig):
    """Options of the ``lcgp`` and ``mggp_lcgp`` priors (every training cell an inducing point).

    Attributes
    ----------
    n_neighbors
        K: each cell's prior conditions on its K nearest earlier cells (capped at N - 1).
    kernel
        ``"matern32"`` or ``"rbf"``.
    lengthscale
        Kernel lengthscale in scaled units (the longer side of the tissue spans 100);
        ``"auto"`` (default): chosen from the data before training, then fixed; a number: fixed;
        ``None``: started at the ``"auto"`` choice and learned (see :class:`GPConfig`).
    sigma
        Kernel amplitude; default 1 (fixed); ``None``: starts at 1 and is learned.
    group_diff_param
        α of the multi-group kernel; default 1 (fixed); ``None``: starts at 1 and is learned.
    group_distances
        Optional (G, G) distances between groups (classical MDS), as for ``svgp``.
    sample_distance
        Distance between samples in the kernel (``sample_key``), as for ``svgp``.
    per_factor_kernel
        One set of kernel hyperparameters per factor.
    train_lengthscale, train_sigma, train_group_diff_param
        Learn these hyperparameters (the K x K conditionals are then recomputed every step of the
        learning phase); ``None`` (default): learned exactly when their value is ``None``.
    hyper_iter
        Iterations of the hyperparameters' learning phase, after which they are frozen and the
        conditionals are cached again; ``None``: learned for the whole fit.
    hyper_lr_scale
        Learning rate of the (log-scale) hyperparameters relative to ``learning_rate``.
    nugget
        Independent cell-level prior variance, as a fraction of σ² (keeps conditional variances
        positive for cells with identical coordinates). Larger values fit held-out cells better
        on osmFISH and Visium prostate, smaller ones give smoother factors (higher Moran's I).
        Default 0.03 (fixed); ``None``: starts at 0.03 and is learned (within [1e-4, 1]).
    train_nugget
        Learn the nugget; ``None`` (default): learned exactly when ``nugget`` is ``None``.
    diagonal_only
        Mean-field posterior (diagonal L_u): O(B·K·L) per step instead of O(B·K²·L). ``None``
        (default) uses it on the CPU and the sparse L_u on a GPU.
    neighbor_method
        ``"auto"`` (exact kd-tree in 2-3 dimensions or up to 20,000 cells, pynndescent
        otherwise), ``"exact"`` or ``"pynndescent"``.
    neighbor_selection
        ``"spatial"`` (the K nearest cells) or ``"correlation"`` (the K most correlated under the
        multi-group kernel among the K nearest cells overall and of the cell's own group);
        ``"auto"``: correlation for ``mggp_lcgp``, spatial for ``lcgp``.
    order_seed
        Seed of the random ordering of the cells (the Vecchia factorization's order).

    Examples
    --------
    >>> model = sfact.models.SpatialFactorization(  # doctest: +SKIP
    ...     adata, prior="lcgp", prior_kwargs={"n_neighbors": 20, "nugget": 0.1}
    ... )
    """

    n_neighbors: int = 50
    nugget: float | None = 0.03
    train_nugget: bool | None = None
    neighbor_method: NeighborMethod = "auto"
    neighbor_selection: NeighborSelection = "auto"
    order_seed: int = 0

    def __post_init__(self) -> None:
        check_int(self.n_neighbors, "n_neighbors", minimum=1)
        check_int(self.order_seed, "order_seed")
        super().__post_init__()
        if self.nugget is not None:
            check_float(self.nugget, "nugget", positive=True)
        if self.neighbor_method not in NEIGHBOR_METHODS:
            raise ValueError(
                f"`neighbor_method` must be 'auto', 'exact' or 'pynndescent', received {self.neighbor_method!r}."
            )
        if self.neighbor_selection not in NEIGHBOR_SELECTIONS:
            raise ValueError(
                "`neighbor_selection` must be 'auto', 'spatial' or 'correlation', "
                f"received {self.neighbor_selection!r}."
            )


def _hyperparameter(value: Any, name: str, what: str) -> Any:
    """A kernel hyperparameter checked: ``None``, ``"auto"``, a positive finite number, or a list of them.

    Only checks: the value is kept as given (so the recorded options stay as the user wrote them).
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float | np.number) and not isinstance(value, bool | np.bool_):
        check_float(value, name, positive=True)
        return value
    try:
        values = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        values = None
    if values is None or values.ndim != 1 or values.size == 0 or isinstance(value, bool | np.bool_):
        raise ValueError(f"`{name}` must be {what}, or a list of positive numbers; received {value!r}.")
    if not (np.isfinite(values).all() and (values > 0).all()):
        raise ValueError(f"`{name}` must be positive and finite, received {values.tolist()}.")
    return value


CONFIGS = {
    "pnmf": PNMFConfig,
    "svgp": SVGPConfig,
    "mggp_svgp": SVGPConfig,
    "lcgp": LCGPConfig,
    "mggp_lcgp": LCGPConfig,
}


def make_config(prior: str, kwargs: dict[str, Any] | None) -> Any:
    """Validate ``kwargs`` into the prior's config; unknown keys raise a ``TypeError`` naming them."""
    cls = CONFIGS.get(prior)
    if cls is None:
        return None
    kwargs = dict(kwargs or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(
            f"Unknown option(s) {unknown} for the {prior!r} prior; valid options: {sorted(names)}."
        )
    return cls(**kwargs)


def memory_defaults(
    cfg: Any,
    prior: str,
    device: str,
    *,
    n_obs: int,
    n_vars: int,
    n_factors: int,
    nnz: int,
    n_dims: int = 2,
    itemsize: int = 4,
    batch_size: int | None = None,
    sampled: int = 0,
    memory_bytes: int | None = None,
) -> DeviceDefaults:
    """The defaults of ``prior`` (config ``cfg``) for this problem on ``device``, from its free memory.

    Reads what the user fixed from ``cfg`` (``num_inducing``, ``diagonal_only``, ``cache_budget``,
    ``per_factor_kernel``, ``n_neighbors``, learned hyperparameters) and calls
    :func:`sfact._core.memory.device_defaults` with the free memory of ``device``
    (:func:`sfact._core.memory.available_memory`, or ``memory_bytes``). Pass the result to the
    config's ``_for_device`` and take its ``batch_size`` when the user gave none.
    """
    from .._constants import prior_family
    from .._core import memory

    family = prior_family(prior)
    kw: dict[str, Any] = {}
    if isinstance(cfg, GPConfig):
        learned = any(cfg._trained(n) for n in ("lengthscale", "sigma", "group_diff_param"))
        kw.update(
            diagonal_only=cfg.diagonal_only,
            n_sets=int(n_factors) if cfg.per_factor_kernel else 1,
            learned_hyper=learned,
        )
    if isinstance(cfg, SVGPConfig):
        kw.update(num_inducing=cfg.num_inducing, cache_budget=cfg.cache_budget)
    if isinstance(cfg, LCGPConfig):
        kw.update(n_neighbors=cfg.n_neighbors)
    if memory_bytes is None:
        memory_bytes = memory.available_memory(device)
    return memory.device_defaults(
        int(memory_bytes),
        is_gpu=is_gpu(device),
        n_obs=n_obs,
        n_vars=n_vars,
        n_factors=n_factors,
        nnz=nnz,
        prior=family,  # type: ignore[arg-type]
        n_dims=n_dims,
        itemsize=itemsize,
        batch_size=batch_size,
        sampled=sampled,
        **kw,
    )


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-valued dict of a config (for JSON)."""
    if cfg is None:
        return {}
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, np.ndarray):
            v = v.tolist()
        out[f.name] = v
    return out
