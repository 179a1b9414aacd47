"""A read-only view of the results of one fit stored in an AnnData (the one "is there a fit?" check)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .._keys import Keys, factor_names

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData


def missing_fit_message(keys: Keys, what: str | None = None) -> str:
    """The one message for "no fit under this key": where it was looked for and what to run."""
    return (
        f"No sfact fit under key {keys.key!r} (`adata.obsm[{keys.factors!r}]` not found): run "
        f"`sfact.tl.fit(adata, key_added={keys.key!r})` (or `sfact.tl.analyze`) "
        + (f"before {what}." if what else "first.")
    )


class FitView:
    """Read-only access to the slots :func:`sfact.tl.fit` (or :func:`sfact.tl.analyze`) wrote under one key.

    Built with :meth:`from_adata`, which checks once that a fit is there. The properties read
    the slots as they are stored (no copies of the arrays; do not modify them); nothing is
    ever written.

    Parameters
    ----------
    adata
        The AnnData holding the fit.
    keys
        Its slot names.
    """

    __slots__ = ("adata", "keys")

    def __init__(self, adata: AnnData, keys: Keys) -> None:
        self.adata = adata
        self.keys = keys

    @classmethod
    def from_adata(cls, adata: AnnData, key: str = "sfact", *, what: str | None = None) -> FitView:
        """The fit stored under ``key``; :class:`KeyError` when there is none.

        Parameters
        ----------
        adata
            AnnData after :func:`sfact.tl.fit`.
        key
            The fit's ``key_added``.
        what
            What needs the fit (ends the error message: "... before ``what``").

        Returns
        -------
        The view.
        """
        keys = Keys(key)
        if keys.factors not in adata.obsm or keys.uns not in adata.uns:
            raise KeyError(missing_fit_message(keys, what))
        return cls(adata, keys)

    # ------------------------------------------------------------------ the fit's own slots
    @property
    def key(self) -> str:
        """The fit's ``key_added``."""
        return self.keys.key

    @property
    def uns(self) -> dict[str, Any]:
        """``adata.uns[key]``."""
        return self.adata.uns[self.keys.uns]

    @property
    def factors(self) -> np.ndarray:
        """Factors ``exp(μ)`` (n_obs, n_factors), as stored."""
        return self.adata.obsm[self.keys.factors]

    @property
    def has_scales(self) -> bool:
        """Whether the posterior scales are stored."""
        return self.keys.scales in self.adata.obsm

    def _fit_slot(self, mapping: str, slot: str) -> np.ndarray:
        """``adata.<mapping>[slot]``, a slot :func:`sfact.tl.fit` writes; :class:`KeyError` when missing."""
        store = getattr(self.adata, mapping)
        if slot not in store:
            raise KeyError(
                f"`adata.{mapping}[{slot!r}]` not found: run `sfact.tl.fit(adata, key_added={self.key!r})`."
            )
        return store[slot]

    @property
    def scales(self) -> np.ndarray:
        """Posterior standard deviations of the log-factors (n_obs, n_factors)."""
        return self._fit_slot("obsm", self.keys.scales)

    @property
    def loadings(self) -> np.ndarray:
        """Loadings (n_vars, n_factors)."""
        return self._fit_slot("varm", self.keys.loadings)

    @property
    def n_factors(self) -> int:
        """Number of factors."""
        return int(np.shape(self.factors)[1])

    @property
    def factor_names(self) -> list[str]:
        """Names of the factors in their stored order (``factor_0``, ... when none are stored)."""
        names = self.uns.get("factor_names")
        return [str(v) for v in np.atleast_1d(names)] if names is not None else factor_names(self.n_factors)

    @property
    def params(self) -> dict[str, Any]:
        """The fit's settings (``uns[key]['params']``; empty when not stored)."""
        return self.uns.get("params", {})

    @property
    def layer(self) -> str | None:
        """Layer with the counts the fit used (``None``: ``adata.X``)."""
        return self.params.get("layer")

    @property
    def group_key(self) -> str | None:
        """The fit's ``group_key`` (``None`` without groups)."""
        return self.params.get("group_key")

    @property
    def moran(self) -> pd.DataFrame | None:
        """Moran's I table, indexed by factor name (``None`` when not stored)."""
        return self.uns.get("moranI")

    @property
    def metrics(self) -> dict[str, Any]:
        """Deviance, reconstruction error, iterations, ... (empty when not stored)."""
        return self.uns.get("metrics", {})

    @property
    def history(self) -> dict[str, Any] | None:
        """Training history, one array per recorded quantity (``None`` when not stored)."""
        return self.uns.get("history")

    def size_factors(self, Y=None) -> np.ndarray:
        """Size factors of the cells as the fit defined them (``params['size_factors']``).

        Parameters
        ----------
        Y
            The cells' counts; read from the fit's layer when ``None`` (needed for ``"total"``).

        Returns
        -------
        One positive value per cell.
        """
        mode = self.params.get("size_factors")
        if mode is None:
            return np.ones(self.adata.n_obs)
        if mode == "total":
            if Y is None:
                from .._utils import get_counts

                Y = get_counts(self.adata, self.layer)
            totals = np.asarray(Y.sum(axis=1)).ravel().astype(np.float64)
            ref = self.params.get("size_factor_reference")
            if ref is None:  # fits written before the reference was recorded: the training median
                ref = float(np.median(totals[totals > 0])) if (totals > 0).any() else 1.0
            return np.maximum(totals / float(ref), 1e-8)
        if mode not in self.adata.obs.columns:
            raise KeyError(f"`adata.obs[{mode!r}]` (the size factors of the fit) not found.")
        return np.asarray(self.adata.obs[mode], dtype=np.float64)

    # ------------------------------------------------------------------ per-group loadings
    @property
    def group_loadings_info(self) -> dict[str, Any] | None:
        """``uns[key]['group_loadings']`` (:func:`sfact.tl.group_loadings`), or ``None``."""
        return self.uns.get(self.keys.group_loadings_info)

    @property
    def groups_with_loadings(self) -> list[str]:
        """Groups whose loadings are stored (empty if none)."""
        info = self.group_loadings_info
        return [] if info is None else [str(g) for g in np.atleast_1d(info["groups"])]

    def group_loadings_key(self, group: str) -> str:
        """The ``varm`` key of one group's loadings, from the mapping the fit recorded.

        ``uns[key]['group_loadings']`` lists the ``groups`` and their ``varm_keys`` side by side:
        that mapping is authoritative (two groups never share a key). Without it (results
        written without the record) the key is derived from the name, trying the current and
        the older spelling (``/`` as ``_``).

        Parameters
        ----------
        group
            A group name.

        Returns
        -------
        The key (not necessarily present in ``adata.varm``).
        """
        group = str(group)
        info = self.group_loadings_info
        if info is not None and "groups" in info and "varm_keys" in info:
            groups = [str(g) for g in np.atleast_1d(info["groups"])]
            varm_keys = [str(k) for k in np.atleast_1d(info["varm_keys"])]
            if len(groups) == len(varm_keys):
                return dict(zip(groups, varm_keys, strict=True)).get(group, self.keys.group_loadings(group))
        slot = self.keys.group_loadings(group)
        legacy = self.keys.legacy_group_loadings(group)
        return legacy if slot not in self.adata.varm and legacy in self.adata.varm else slot

    def group_loadings(self, group: str) -> np.ndarray:
        """One group's loadings (n_vars, n_factors).

        Parameters
        ----------
        group
            A group with stored loadings.

        Returns
        -------
        The stored array.
        """
        slot = self.group_loadings_key(group)
        recorded = self.group_loadings_info is not None
        if slot not in self.adata.varm or (recorded and str(group) not in self.groups_with_loadings):
            raise KeyError(
                f"No loadings of group {str(group)!r} (`adata.varm[{slot!r}]`): run "
                f"`sfact.tl.group_loadings(adata, group_key=..., key_added={self.key!r})` "
                f"first (groups with loadings: {self.groups_with_loadings})."
            )
        return self.adata.varm[slot]

    def stacked_group_loadings(self) -> tuple[np.ndarray, list[str]]:
        """(G, D, L) per-group loadings (float64) and the group names.

        Returns
        -------
        ``(W_groups, groups)``.
        """
        info = self.group_loadings_info
        if info is None:
            raise KeyError(
                f"`adata.uns[{self.keys.uns!r}][{self.keys.group_loadings_info!r}]` not found: run "
                f"`sfact.tl.group_loadings(adata, group_key=..., key_added={self.key!r})` "
                "(or `sfact.tl.gene_enrichment`) first."
            )
        groups = [str(g) for g in np.atleast_1d(info["groups"])]
        vk = [str(k) for k in np.atleast_1d(info["varm_keys"])]
        missing = [k for k in vk if k not in self.adata.varm]
        if missing:
            raise KeyError(f"`adata.varm` lacks {missing[:3]}: run `sfact.tl.group_loadings` again.")
        if not vk:
            return np.zeros((0, self.adata.n_vars, self.loadings.shape[1])), []
        return np.stack([np.asarray(self.adata.varm[k], dtype=np.float64) for k in vk]), groups

    @property
    def enrichment(self) -> dict[str, Any]:
        """``uns[key]['enrichment']`` (:func:`sfact.tl.gene_enrichment`)."""
        enr = self.uns.get(self.keys.enrichment)
        if enr is None:
            raise KeyError(
                f"`adata.uns[{self.key!r}]['enrichment']` not found: run "
                f"`sfact.tl.gene_enrichment(adata, group_key=..., key_added={self.key!r})` first."
            )
        return enr

    # ------------------------------------------------------------------ inducing points
    @property
    def inducing_points(self) -> dict[str, Any]:
        """``uns[key]['inducing_points']``: the SVGP priors' inducing points, stored by :func:`sfact.tl.fit`.

        ``coords`` (M, p) in the data's units; with groups ``group_codes``, ``group_names`` and
        ``group_key``; with samples ``samples``. :class:`KeyError` naming the fix when missing.
        """
        rec = self.uns.get("inducing_points")
        if rec is not None:
            return rec
        prior = self.params.get("prior")
        if prior is not None and str(prior).removeprefix("mggp_") != "svgp":
            raise KeyError(
                f"The fit under key {self.key!r} has no inducing points: its prior {str(prior)!r} has none "
                "(only 'svgp' and 'mggp_svgp' do)."
            )
        raise KeyError(
            f"`adata.uns[{self.key!r}]['inducing_points']` not found (a fit written by an older sfact): "
            f"pass the trained model, or store them with `sfact.tl.analyze(adata, model, key_added={self.key!r})`."
        )

    # ------------------------------------------------------------------ group-wise factors
    @property
    def groupwise(self) -> tuple[np.ndarray, list[str]]:
        """Group-wise factors (n_obs, n_groups, n_factors) and the group names (:func:`sfact.tl.groupwise_factors`)."""
        if self.keys.groupwise not in self.adata.obsm or "groupwise_groups" not in self.uns:
            raise KeyError(
                f"`adata.obsm[{self.keys.groupwise!r}]` not found: run "
                f"`sfact.tl.groupwise_factors(adata, model, key_added={self.key!r})` first (multi-group priors)."
            )
        groups = [str(g) for g in np.atleast_1d(self.uns["groupwise_groups"])]
        return self.adata.obsm[self.keys.groupwise], groups

    def __repr__(self) -> str:
        return f"FitView(key={self.key!r}, n_obs={self.adata.n_obs}, n_factors={self.n_factors})"
