"""All-or-nothing writes to an AnnData: snapshot what a writer may touch, put it back on failure.

The ``tl`` writers compute first and write at the end; the writing itself (several slots, and
the per-group steps that read the slots just written) runs inside :func:`transaction`, so an
exception or Ctrl-C (:class:`KeyboardInterrupt`) part-way leaves the AnnData as it was.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    import pandas as pd
    from anndata import AnnData

    from ._keys import Keys

_MAPPINGS = ("obsm", "varm", "layers", "obsp", "varp")


@dataclass
class _FrameSnapshot:
    """``obs`` or ``var``: the frame object, its column order and copies of the named columns."""

    frame: pd.DataFrame
    columns: list[Any]
    saved: dict[Any, pd.Series] = field(default_factory=dict)

    @classmethod
    def take(cls, frame: pd.DataFrame, names: Iterable[str]) -> _FrameSnapshot:
        saved = {c: frame[c].copy() for c in names if c in frame.columns}
        return cls(frame=frame, columns=list(frame.columns), saved=saved)

    def restore(self, adata: AnnData, attr: str) -> None:
        if getattr(adata, attr) is not self.frame:
            setattr(adata, attr, self.frame)
        frame = self.frame
        added = [c for c in frame.columns if c not in self.columns]
        if added:
            frame.drop(columns=added, inplace=True)
        for position, name in enumerate(self.columns):
            if name not in self.saved:
                continue
            if name in frame.columns:
                frame[name] = self.saved[name]
            else:  # removed by the writer: back at its old place
                frame.insert(min(position, frame.shape[1]), name, self.saved[name])


@dataclass
class AnnDataSnapshot:
    """What :func:`transaction` restores.

    The arrays of ``obsm``, ``varm``, ``layers``, ``obsp``, ``varp`` and the top-level ``uns``
    entries are kept by reference (writers replace them, never change them in place): keys added
    later are removed, replaced ones put back. The ``uns`` entries named in ``uns_keys`` (which
    writers do change in place) are deep-copied; ``obs`` and ``var`` keep their column order,
    lose added columns, and get back copies of the named columns.
    """

    mappings: dict[str, dict[str, Any]]
    uns: dict[str, Any]
    uns_copies: dict[str, Any]
    obs: _FrameSnapshot
    var: _FrameSnapshot

    @classmethod
    def take(
        cls,
        adata: AnnData,
        *,
        uns_keys: Iterable[str] = (),
        obs_columns: Iterable[str] = (),
        var_columns: Iterable[str] = (),
    ) -> AnnDataSnapshot:
        """Snapshot ``adata`` (references, plus copies of the named entries and columns).

        Parameters
        ----------
        adata
            An actual (not view) AnnData.
        uns_keys
            ``uns`` entries to deep-copy (those a writer changes in place).
        obs_columns, var_columns
            Columns of ``obs`` / ``var`` a writer may overwrite or delete.

        Returns
        -------
        The snapshot.
        """
        return cls(
            mappings={name: dict(getattr(adata, name).items()) for name in _MAPPINGS},
            uns=dict(adata.uns.items()),
            uns_copies={k: copy.deepcopy(adata.uns[k]) for k in uns_keys if k in adata.uns},
            obs=_FrameSnapshot.take(adata.obs, obs_columns),
            var=_FrameSnapshot.take(adata.var, var_columns),
        )

    def restore(self, adata: AnnData) -> None:
        """Put ``adata`` back as it was when the snapshot was taken (in place)."""
        for name, before in self.mappings.items():
            store = getattr(adata, name)
            for k in [k for k in store.keys() if k not in before]:
                del store[k]
            for k, v in before.items():
                if k not in store or store[k] is not v:
                    store[k] = v
        uns = adata.uns
        for k in [k for k in uns.keys() if k not in self.uns]:
            del uns[k]
        for k, v in self.uns.items():
            if k in self.uns_copies:
                uns[k] = self.uns_copies[k]
            elif k not in uns or uns[k] is not v:
                uns[k] = v
        self.obs.restore(adata, "obs")
        self.var.restore(adata, "var")


@contextmanager
def transaction(
    adata: AnnData,
    *,
    uns_keys: Iterable[str] = (),
    obs_columns: Iterable[str] = (),
    var_columns: Iterable[str] = (),
) -> Iterator[AnnDataSnapshot]:
    """Run the block; on any exception, :class:`KeyboardInterrupt` included, restore ``adata`` and re-raise.

    Parameters
    ----------
    adata
        The AnnData written to (make a view actual first).
    uns_keys, obs_columns, var_columns
        See :meth:`AnnDataSnapshot.take`.

    Yields
    ------
    The snapshot taken on entry.
    """
    snapshot = AnnDataSnapshot.take(
        adata, uns_keys=uns_keys, obs_columns=obs_columns, var_columns=var_columns
    )
    try:
        yield snapshot
    except BaseException:
        snapshot.restore(adata)
        raise


def fit_transaction(adata: AnnData, keys: Keys) -> Any:
    """:func:`transaction` over every slot a fit under ``keys`` writes.

    Parameters
    ----------
    adata
        The AnnData written to.
    keys
        The fit's slot names.

    Returns
    -------
    The context manager.
    """
    return transaction(
        adata,
        uns_keys=[keys.uns],
        obs_columns=[keys.obs_deviance(), keys.obs_validation()],
        var_columns=[keys.var_deviance()],
    )
