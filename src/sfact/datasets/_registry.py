"""Data sets by name: the loader registry used by :func:`sfact.datasets.load` and the CLI configs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData


@dataclass(frozen=True)
class LoaderInfo:
    """A named data set loader: an entry of :data:`~sfact.datasets.LOADERS`.

    :func:`~sfact.datasets.load` calls ``fn`` with the arguments the data set needs.

    Examples
    --------
    >>> import sfact
    >>> info = sfact.datasets.LOADERS["osmfish"]
    >>> info.group_key, info.needs_path
    ('ClusterName', False)
    """

    name: str
    """The name :func:`~sfact.datasets.load` and the CLI configs use, e.g. ``"osmfish"``."""
    fn: Callable[..., AnnData]
    """Called as ``fn(**kwargs)`` (with ``path=`` when ``needs_path``)."""
    group_key: str | None
    """The default group key (cell type / sample column of ``obs``), ``None`` when there is none."""
    needs_path: bool
    """The data are read from a local file or folder given as ``path``."""
    description: str
    """One line shown by :func:`~sfact.datasets.loaders`."""
    accepts_path: bool = False
    """``path`` is optional (e.g. an already-downloaded file, or where to download it); implied by
    ``needs_path``."""
    subsamples: bool = False
    """``fn`` takes ``subsample=`` and ``random_state=`` and draws the same cells as
    :func:`~sfact.datasets.load` would, but before reading the counts into memory;
    :func:`~sfact.datasets.load` then passes them through."""


LOADERS: dict[str, LoaderInfo] = {}
"""Every registered loader by name: the bundled and public data sets (as a table:
:func:`~sfact.datasets.loaders`)."""


def register(info: LoaderInfo) -> LoaderInfo:
    """Add a loader to :data:`LOADERS` (a name can be registered once)."""
    if info.name in LOADERS:
        raise ValueError(f"A loader named {info.name!r} is already registered.")
    LOADERS[info.name] = info
    return info


def _check_subsample(subsample: int | float | None) -> None:
    if subsample is None:
        return
    if isinstance(subsample, bool) or not (
        (isinstance(subsample, float) and 0 < subsample <= 1)
        or (isinstance(subsample, int | np.integer) and subsample > 0)
    ):
        raise ValueError(
            f"`subsample` must be a number of cells (int > 0) or a fraction in (0, 1], received {subsample!r}."
        )


def _subsample_indices(n: int, subsample: int | float | None, random_state: int) -> np.ndarray | None:
    """Sorted indices of the cells :func:`load` keeps out of ``n``, or ``None`` for all of them."""
    _check_subsample(subsample)
    if subsample is None:
        return None
    k = round(subsample * n) if isinstance(subsample, float) else int(subsample)
    if k >= n:
        return None
    return np.sort(np.random.default_rng(random_state).choice(n, size=k, replace=False))


def _subsample(adata: AnnData, subsample: int | float | None, random_state: int) -> AnnData:
    idx = _subsample_indices(adata.n_obs, subsample, random_state)
    return adata if idx is None else adata[idx].copy()


def load(
    name: str,
    *,
    path: str | None = None,
    subsample: int | float | None = None,
    random_state: int = 0,
    **kwargs: Any,
) -> AnnData:
    """Load a data set by loader name (see :func:`sfact.datasets.loaders`).

    Parameters
    ----------
    name
        A registered loader, e.g. ``"osmfish"`` or ``"visium_prostate"``.
    path
        Local file or folder, for the loaders that read one (``needs_path``), or an optional one
        for the loaders that can also download their data (``accepts_path``).
    subsample
        Keep this many cells (int) or this fraction of them (float in (0, 1]), drawn without
        replacement with ``numpy.random.default_rng(random_state)``, in their original order
        (loaders with ``subsamples`` draw the same cells before reading the counts).
    random_state
        Seed of the subsample.
    **kwargs
        Passed to the loader.

    Returns
    -------
    The loaded :class:`~anndata.AnnData`.

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.load("osmfish", subsample=1000)
    >>> adata.n_obs
    1000
    """
    if name not in LOADERS:
        raise KeyError(f"Unknown data set loader {name!r}; available: {sorted(LOADERS)}.")
    info = LOADERS[name]
    _check_subsample(subsample)
    if info.needs_path:
        if path is None:
            raise ValueError(f"The {name!r} loader reads a local file: pass `path`.")
        kwargs["path"] = path
    elif path is not None:
        if not info.accepts_path:
            raise ValueError(f"The {name!r} loader takes no `path` (it is bundled).")
        kwargs["path"] = path
    if info.subsamples:
        return info.fn(subsample=subsample, random_state=random_state, **kwargs)
    adata = info.fn(**kwargs)
    return _subsample(adata, subsample, random_state)


def loaders() -> pd.DataFrame:
    """The registered loaders: name, default group key, whether a path is needed, description.

    Returns
    -------
    A :class:`~pandas.DataFrame` indexed by loader name.

    Examples
    --------
    >>> import sfact
    >>> "osmfish" in sfact.datasets.loaders().index
    True
    """
    import pandas as pd

    rows = [
        {"name": i.name, "group_key": i.group_key, "needs_path": i.needs_path, "description": i.description}
        for i in LOADERS.values()
    ]
    return pd.DataFrame(rows).set_index("name")


def _register_bundled() -> None:
    from ._datasets import osmfish, visium_dentate_gyrus, visium_prostate

    register(LoaderInfo("osmfish", osmfish, "ClusterName", False, "osmFISH mouse cortex, bundled"))
    register(
        LoaderInfo("visium_prostate", visium_prostate, "list_ID", False, "Visium prostate pair, bundled")
    )
    register(
        LoaderInfo("visium_dentate_gyrus", visium_dentate_gyrus, None, False, "Visium dentate gyrus, bundled")
    )


_register_bundled()
