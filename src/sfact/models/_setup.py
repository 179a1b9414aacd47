""":class:`ModelSetup`: everything that defines a model before training, typed and frozen."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelSetup"]


@dataclass(frozen=True)
class ModelSetup:
    """The set-up of a :class:`~sfact.models.SpatialFactorization`, as plain values.

    Built once when the model is constructed (from the AnnData and the arguments), saved with
    the model as JSON (:meth:`to_dict` / :meth:`from_dict`), and read by everything that needs
    to apply the model to new cells (size factors, coordinate scaling, group codes, genes).

    Attributes
    ----------
    prior
        Name of the prior (one of :data:`sfact._constants.PRIOR_NAMES`).
    n_factors
        Number of factors L.
    layer
        Layer with the raw counts (``None``: ``adata.X``).
    spatial_key
        Key of the coordinates in ``adata.obsm``.
    group_key
        Column of ``adata.obs`` with the groups, or ``None``.
    group_categories
        The groups seen in training, in code order, or ``None``.
    size_factors
        ``"total"``, ``None`` or a column of ``adata.obs``.
    size_factor_reference
        Median total count of the training cells (``size_factors="total"``), else ``None``.
    elbo_mode, loadings_mode, n_samples
        Training modes.
    prior_kwargs
        The prior's validated configuration as a plain dict.
    scaling
        The coordinate scaling (``scale``, ``offset``, ``factor``, ``box_size``).
    var_names
        The genes, in the model's order.
    n_obs
        Number of training cells.
    seed
        Integer seed.
    dtype
        ``"float32"`` or ``"float64"``.
    """

    prior: str
    n_factors: int
    layer: str | None
    spatial_key: str
    group_key: str | None
    group_categories: tuple[str, ...] | None
    size_factors: str | None
    size_factor_reference: float | None
    elbo_mode: str
    loadings_mode: str
    n_samples: int
    prior_kwargs: dict[str, Any] = field(hash=False)
    scaling: dict[str, Any] = field(hash=False)
    var_names: tuple[str, ...]
    n_obs: int
    seed: int
    dtype: str

    def __post_init__(self) -> None:
        # tuples for the sequences, so the frozen object is really read-only where it matters
        if self.group_categories is not None and not isinstance(self.group_categories, tuple):
            object.__setattr__(self, "group_categories", tuple(str(c) for c in self.group_categories))
        if not isinstance(self.var_names, tuple):
            object.__setattr__(self, "var_names", tuple(str(v) for v in self.var_names))

    @property
    def multigroup(self) -> bool:
        """Whether the prior uses the multi-group kernel."""
        from .._constants import is_multigroup

        return is_multigroup(self.prior)

    @property
    def n_vars(self) -> int:
        """Number of genes."""
        return len(self.var_names)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-safe values (lists for the sequences); the format saved in ``metadata.json``."""
        d = dataclasses.asdict(self)
        d["group_categories"] = None if self.group_categories is None else list(self.group_categories)
        d["var_names"] = list(self.var_names)
        return json.loads(json.dumps(d))  # deep copy, and proof that it is JSON-safe

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSetup:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ValueError` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        missing = sorted(names - set(d))
        if unknown or missing:
            raise ValueError(
                "Model set-up does not match this version of sfact"
                + (f": unknown keys {unknown}" if unknown else "")
                + (f": missing keys {missing}" if missing else "")
                + "."
            )
        return cls(**d)

    def to_json(self) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> ModelSetup:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))
