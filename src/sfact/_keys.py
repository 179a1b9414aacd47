"""Every AnnData slot sfact writes, derived from one ``key_added`` in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Slot names for a fit stored under ``key``."""

    key: str = "sfact"

    @property
    def factors(self) -> str:
        """``obsm`` key of the factors (N, L)."""
        return f"X_{self.key}"

    @property
    def scales(self) -> str:
        """``obsm`` key of the posterior scales (N, L)."""
        return f"X_{self.key}_scales"

    @property
    def loadings(self) -> str:
        """``varm`` key of the loadings (D, L)."""
        return f"{self.key}_loadings"

    def group_loadings(self, group: str) -> str:
        """``varm`` key of one group's loadings (``/`` in the name becomes ``_``: h5ad keys)."""
        return f"{self.key}_loadings_{str(group).replace('/', '_')}"

    @property
    def groupwise(self) -> str:
        """``obsm`` key of the group-wise factors (N, n_groups, L) of multi-group priors."""
        return f"X_{self.key}_groupwise"

    @property
    def group_loadings_prefix(self) -> str:
        """Prefix of the ``varm`` keys of the per-group loadings."""
        return f"{self.key}_loadings_"

    @property
    def uns(self) -> str:
        """``uns`` key of params, history, Moran's I, metrics."""
        return self.key

    def obs_deviance(self) -> str:
        """``obs`` column of the per-cell deviance."""
        return f"{self.key}_deviance"

    def obs_validation(self) -> str:
        """``obs`` column marking the validation cells of :func:`sfact.tl.fit` (``True``: held out)."""
        return f"{self.key}_validation"

    def var_deviance(self) -> str:
        """``var`` column of the per-gene deviance."""
        return f"{self.key}_deviance"

    @property
    def group_loadings_info(self) -> str:
        """Entry of ``uns[key]`` describing the per-group loadings (groups, varm keys, cells)."""
        return "group_loadings"

    @property
    def enrichment(self) -> str:
        """Entry of ``uns[key]`` with the gene enrichment of the groups."""
        return "enrichment"

    def as_dict(self) -> dict[str, str]:
        """The slots, for ``uns[key]["keys"]``."""
        return {"factors": self.factors, "scales": self.scales, "loadings": self.loadings, "uns": self.uns}


def factor_names(n_factors: int) -> list[str]:
    """Names of the factors, in Moran's I order: ``factor_0``, ``factor_1``, ..."""
    return [f"factor_{i}" for i in range(n_factors)]
