"""Synthetic spatial counts with known smooth factors, loadings and groups."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sfact._utils import check_random_state

if TYPE_CHECKING:
    from anndata import AnnData

_BOX = 100.0  # side of the square the coordinates are drawn in
_N_FEATURES = 256  # random Fourier features per smooth field
_CHUNK = 5000  # cells per chunk when drawing counts
_GROUP_CONTRAST = 1.0  # amplitude of the smooth logits that set the group probabilities
_DENSITY_ROWS = 2000  # cells used to calibrate `density`


def simulate(
    n_obs: int = 2000,
    n_vars: int = 200,
    n_factors: int = 5,
    *,
    n_groups: int = 3,
    n_samples: int = 1,
    sample_effect: float = 1.0,
    density: float | None = None,
    lengthscale: float = 15.0,
    group_effect: float = 1.0,
    size_factor_sd: float = 0.3,
    sparse: bool = True,
    random_state: int | np.random.Generator | None = 0,
) -> AnnData:
    r"""Simulate Poisson counts from known smooth spatial factors, loadings and groups.

    The generative model is the one sfact fits (see the design notes):

    1. Coordinates :math:`x_n` are uniform in the square :math:`[0, 100]^2`.
    2. Every cell gets a group :math:`c_n \in \{0, \dots, G-1\}` drawn from
       :math:`\mathrm{softmax}_g(h_g(x_n))`, where :math:`h_g` are independent smooth
       fields with lengthscale ``2 * lengthscale``. The group probabilities vary smoothly in
       space, so every group spans the whole tissue (spatially mixed cell types).
    3. Log-factors :math:`F_{nl} = u_l(x_n) + \texttt{group\_effect}\cdot\delta_l\, v_{c_n l}(x_n)
       + \texttt{sample\_effect}\cdot w_{s_n l}(x_n)` (the last term with ``n_samples > 1``),
       where :math:`u_l` (shared) and :math:`v_{gl}` (one per group and factor) are independent
       smooth fields with unit variance and the given ``lengthscale``, and :math:`\delta_l = 1`
       for the group-dependent factors (the even-numbered ones: 0, 2, 4, ...) and 0 otherwise.
       The group-dependent factors therefore differ by group at the same location, which is
       what a multi-group GP prior models; the others are shared by all groups. With
       ``n_samples = S > 1`` the cells are split evenly over S samples (tissue sections, each
       uniform over the same square, so their coordinates overlap), and every factor of sample
       :math:`s` adds its own smooth field :math:`w_{sl}` (unit variance, the given
       ``lengthscale``): sections share the loadings and the pattern :math:`u`, and differ by
       :math:`w` (at ``sample_effect = 1`` the log-factors of two sections at the same place
       correlate by 0.5 when ``group_effect = 0``).
    4. Loadings :math:`W \in \mathbb{R}_{\ge 0}^{D \times L}`: every gene has one main factor
       (genes are spread evenly over the factors), half of the genes a second one with a
       smaller weight, and a small background on the rest; rows are multiplied by a
       log-normal gene level (sd 0.5).
    5. Size factors :math:`s_n` are log-normal with mean 1 and log-scale sd ``size_factor_sd``.
    6. Counts :math:`y_{nd} \sim \mathrm{Poisson}(\lambda_{nd})`,
       :math:`\lambda_{nd} = s_n \sum_l W_{dl} \exp(F_{nl})`.

    Smooth fields are random Fourier feature draws (256 features) of a Gaussian process with the
    squared-exponential kernel :math:`\exp(-r^2 / 2\ell^2)`, so they cost :math:`O(N)` for any
    number of cells. When ``density`` is given, :math:`W` is multiplied by one scalar, found by
    bisection on up to 2,000 cells, such that the expected fraction of non-zero counts,
    :math:`\mathrm{mean}_{nd}(1 - e^{-\lambda_{nd}})`, equals ``density``; the stored loadings
    include that scalar, so the formula above holds exactly for the stored truth. Counts are
    drawn in chunks of 5,000 cells, so memory scales with the number of non-zeros (100,000 x
    2,000 at density 0.05 takes a few seconds and well under 1 GB).

    Parameters
    ----------
    n_obs
        Number of cells.
    n_vars
        Number of genes.
    n_factors
        Number of true factors :math:`L`.
    n_groups
        Number of groups (cell types) :math:`G`; 1 gives a single-group data set.
    n_samples
        Number of samples (sections) :math:`S`, in ``obs['sample']``.
    sample_effect
        Weight of the per-sample fields (``n_samples > 1``).
    density
        Target fraction of non-zero counts in ``(0, 1)``; ``None`` keeps the natural scale
        (a few counts per cell and gene on average with the default settings).
    lengthscale
        Lengthscale of the factor fields, in the units of the 100 x 100 box.
    group_effect
        Weight of the group-specific fields added to the group-dependent factors; 0 makes all
        factors shared by all groups.
    size_factor_sd
        Standard deviation of :math:`\log s_n`; 0 gives :math:`s_n = 1`.
    sparse
        Return ``X`` as a :class:`scipy.sparse.csr_matrix` (otherwise a dense
        :class:`numpy.ndarray`), float32 either way.
    random_state
        Seed or :class:`numpy.random.Generator`; the same seed gives the same data.

    Returns
    -------
    An :class:`~anndata.AnnData` with ``obs_names`` ``cell_0, ...`` and ``var_names``
    ``gene_0, ...``, and:

    `.X`
        Counts (float32; CSR when ``sparse``).
    `.obsm['spatial']`
        Coordinates (n_obs, 2) in :math:`[0, 100]^2`.
    `.obsm['factors_true']`
        True factors :math:`\exp(F)` (n_obs, n_factors).
    `.obsm['log_factors_true']`
        True log-factors :math:`F` (n_obs, n_factors) at each cell's own group.
    `.obsm['log_factors_true_groupwise']`
        True log-factors of every cell as if it belonged to each group
        (n_obs, n_groups, n_factors); ``[n, c_n]`` equals ``log_factors_true[n]``.
    `.varm['loadings_true']`
        True loadings :math:`W` (n_vars, n_factors).
    `.obs['group']`
        Categorical group, categories ``g0, ..., g{G-1}``.
    `.obs['sample']`
        Categorical sample, categories ``s0, ..., s{S-1}`` (only with ``n_samples > 1``).
    `.obs['size_factor_true']`
        True size factors :math:`s_n`.
    `.uns['simulate']`
        The parameters (plain values), plus ``group_factors`` (indices of the group-dependent
        factors) and ``rate_scale`` (the scalar applied for ``density``; 1 without it).

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.simulate(n_obs=500, n_vars=50, n_factors=3, density=0.1)
    >>> adata.obsm["factors_true"].shape
    (500, 3)
    >>> adata.obs["group"].cat.categories.tolist()
    ['g0', 'g1', 'g2']
    """
    from anndata import AnnData

    n_obs, n_vars, n_factors, n_groups = (
        _check_int(v, name)
        for v, name in (
            (n_obs, "n_obs"),
            (n_vars, "n_vars"),
            (n_factors, "n_factors"),
            (n_groups, "n_groups"),
        )
    )
    n_samples = _check_int(n_samples, "n_samples")
    if float(sample_effect) < 0:
        raise ValueError(f"`sample_effect` must be non-negative, received {sample_effect!r}.")
    if density is not None and not 0.0 < float(density) < 1.0:
        raise ValueError(f"`density` must be in (0, 1) or None, received {density!r}.")
    if not float(lengthscale) > 0:
        raise ValueError(f"`lengthscale` must be positive, received {lengthscale!r}.")
    if float(group_effect) < 0:
        raise ValueError(f"`group_effect` must be non-negative, received {group_effect!r}.")
    if float(size_factor_sd) < 0:
        raise ValueError(f"`size_factor_sd` must be non-negative, received {size_factor_sd!r}.")
    seed = int(random_state) if isinstance(random_state, int | np.integer) else None
    rng = check_random_state(random_state)

    coords = rng.uniform(0.0, _BOX, size=(n_obs, 2))
    if n_samples > 1:  # drawn only for several samples: single-sample data stay as they were
        samples = rng.permutation(np.arange(n_obs) % n_samples)
        a_sample = rng.standard_normal((_N_FEATURES, n_samples * n_factors))

    # Random Fourier features: one set of frequencies for the factor fields and one for the
    # (smoother) group-probability fields; independent N(0, 1) weights give independent fields.
    omega = rng.standard_normal((2, _N_FEATURES)) / float(lengthscale)
    phase = rng.uniform(0.0, 2 * np.pi, size=_N_FEATURES)
    omega_g = rng.standard_normal((2, _N_FEATURES)) / (2.0 * float(lengthscale))
    phase_g = rng.uniform(0.0, 2 * np.pi, size=_N_FEATURES)
    a_shared = rng.standard_normal((_N_FEATURES, n_factors))
    a_group = rng.standard_normal((_N_FEATURES, n_groups * n_factors))
    a_prob = rng.standard_normal((_N_FEATURES, n_groups))

    group_factors = np.arange(n_factors) % 2 == 0 if n_groups > 1 else np.zeros(n_factors, dtype=bool)
    ge = float(group_effect) * group_factors  # (L,)

    log_factors_gw = np.empty((n_obs, n_groups, n_factors))
    groups = np.empty(n_obs, dtype=np.int64)
    for start in range(0, n_obs, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n_obs))
        phi = _features(coords[sl], omega, phase)
        shared = phi @ a_shared  # (B, L)
        per_group = (phi @ a_group).reshape(-1, n_groups, n_factors)
        log_factors_gw[sl] = shared[:, None, :] + ge * per_group
        if n_samples > 1:
            own = (phi @ a_sample).reshape(-1, n_samples, n_factors)[np.arange(phi.shape[0]), samples[sl]]
            log_factors_gw[sl] += float(sample_effect) * own[:, None, :]
        logits = _GROUP_CONTRAST * (_features(coords[sl], omega_g, phase_g) @ a_prob)
        prob = np.exp(logits - logits.max(axis=1, keepdims=True))
        cum = np.cumsum(prob, axis=1)
        u = rng.uniform(size=(cum.shape[0], 1)) * cum[:, -1:]
        groups[sl] = np.minimum((u > cum).sum(axis=1), n_groups - 1)
    log_factors = log_factors_gw[np.arange(n_obs), groups]
    factors = np.exp(log_factors)

    loadings = _loadings(rng, n_vars, n_factors)
    sd = float(size_factor_sd)
    size_factors = np.exp(rng.normal(-0.5 * sd**2, sd, size=n_obs)) if sd > 0 else np.ones(n_obs)

    rate_scale = 1.0
    if density is not None:
        rows = np.sort(rng.choice(n_obs, size=min(n_obs, _DENSITY_ROWS), replace=False))
        rate = size_factors[rows, None] * (factors[rows] @ loadings.T)
        rate_scale = _calibrate(rate, float(density))
        loadings *= rate_scale

    chunks = []
    X_dense = None if sparse else np.empty((n_obs, n_vars), dtype=np.float32)
    for start in range(0, n_obs, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n_obs))
        rate = factors[sl] @ loadings.T
        rate *= size_factors[sl, None]
        counts = rng.poisson(rate)
        del rate
        if sparse:
            chunks.append(sp.csr_matrix(counts, dtype=np.float32))
        else:
            X_dense[sl] = counts
        del counts
    if sparse:
        X = sp.vstack(chunks, format="csr") if chunks else sp.csr_matrix((n_obs, n_vars), dtype=np.float32)
        X = sp.csr_matrix(X, dtype=np.float32)
    else:
        X = X_dense

    obs = pd.DataFrame(
        {
            "group": pd.Categorical.from_codes(groups, categories=[f"g{g}" for g in range(n_groups)]),
            "size_factor_true": size_factors,
        },
        index=pd.Index([f"cell_{i}" for i in range(n_obs)]),
    )
    if n_samples > 1:
        obs["sample"] = pd.Categorical.from_codes(samples, categories=[f"s{k}" for k in range(n_samples)])
    var = pd.DataFrame(index=pd.Index([f"gene_{j}" for j in range(n_vars)]))
    adata = AnnData(X=X, obs=obs, var=var)
    adata.obsm["spatial"] = coords
    adata.obsm["factors_true"] = factors
    adata.obsm["log_factors_true"] = log_factors
    adata.obsm["log_factors_true_groupwise"] = log_factors_gw
    adata.varm["loadings_true"] = loadings
    adata.uns["simulate"] = {
        "n_obs": n_obs,
        "n_vars": n_vars,
        "n_factors": n_factors,
        "n_groups": n_groups,
        "n_samples": n_samples,
        "sample_effect": float(sample_effect),
        "density": None if density is None else float(density),
        "lengthscale": float(lengthscale),
        "group_effect": float(group_effect),
        "size_factor_sd": sd,
        "sparse": bool(sparse),
        "random_state": seed,
        "group_factors": [int(i) for i in np.flatnonzero(group_factors)],
        "rate_scale": float(rate_scale),
    }
    return adata


def _check_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, received {value!r}.")
    return int(value)


def _features(coords: np.ndarray, omega: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Random Fourier features ``sqrt(2/R) cos(x @ omega + phase)`` (unit-variance fields)."""
    phi = coords @ omega
    phi += phase
    np.cos(phi, out=phi)
    phi *= np.sqrt(2.0 / omega.shape[1])
    return phi


def _loadings(rng: np.random.Generator, n_vars: int, n_factors: int) -> np.ndarray:
    """Non-negative loadings where every gene loads mainly on one factor, some on a second."""
    W = 0.02 * rng.gamma(1.0, 1.0, size=(n_vars, n_factors))
    main = rng.permutation(np.arange(n_vars) % n_factors)
    W[np.arange(n_vars), main] += rng.gamma(4.0, 0.25, size=n_vars)
    if n_factors > 1:
        second = (main + rng.integers(1, n_factors, size=n_vars)) % n_factors
        has_second = rng.uniform(size=n_vars) < 0.5
        idx = np.flatnonzero(has_second)
        W[idx, second[idx]] += rng.uniform(0.2, 0.6, size=idx.size)
    W *= np.exp(rng.normal(0.0, 0.5, size=(n_vars, 1)))
    return W


def _calibrate(rate: np.ndarray, density: float) -> float:
    """Scalar ``c`` with ``mean(1 - exp(-c * rate)) == density``, by bisection on ``log c``."""
    rate = rate.ravel()

    def frac(log_c: float) -> float:
        return float(-np.expm1(-np.exp(log_c) * rate).mean())

    lo, hi = -40.0, 40.0
    while hi - lo > 1e-6:
        mid = 0.5 * (lo + hi)
        if frac(mid) < density:
            lo = mid
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))
