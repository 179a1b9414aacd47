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
        """``varm`` key of one group's loadings: the prefix and the group name, escaped for h5ad.

        ``%``, ``/`` and NUL in the name become ``%25``, ``%2F`` and ``%00`` (h5ad cannot store
        ``/`` or NUL in a key), so distinct groups always get distinct keys (``'A/B'`` gives
        ``'{key}_loadings_A%2FB'``, ``'A_B'`` gives ``'{key}_loadings_A_B'``). Names without these
        characters are kept as they are.
        """
        return f"{self.key}_loadings_{escape_name(str(group))}"

    def legacy_group_loadings(self, group: str) -> str:
        """The ``varm`` key older sfact versions gave a group's loadings (``/`` became ``_``: not unique)."""
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


# characters an h5ad file cannot hold in a key (HDF5 takes '/' as a path separator and ends a
# name at NUL); '' and '.' are no names at all (read back as the enclosing group)
_H5AD_UNSAFE = {"/": "%2F", "\x00": "%00"}


def escape_name(name: str) -> str:
    """``name`` with ``%``, ``/`` and NUL percent-encoded: injective, and safe as part of an h5ad key.

    Parameters
    ----------
    name
        Any string (a group name).

    Returns
    -------
    The escaped string; unchanged when ``name`` contains none of these characters.
    """
    out = name.replace("%", "%25")
    for char, code in _H5AD_UNSAFE.items():
        out = out.replace(char, code)
    return out


def check_key_added(key_added: object, *, argument: str = "key_added") -> str:
    """Check that ``key_added`` can name AnnData slots that survive ``write_h5ad`` / ``read_h5ad``.

    Keys are rejected rather than changed, so the slots are always where the user said.

    Parameters
    ----------
    key_added
        The key to check.
    argument
        The argument's name, for the error message.

    Returns
    -------
    ``key_added``.

    Raises
    ------
    TypeError
        When it is not a string.
    ValueError
        When it is empty, ``'.'``, or contains ``'/'`` or a NUL character.
    """
    if not isinstance(key_added, str):
        raise TypeError(f"`{argument}` must be a string, received {type(key_added).__name__} {key_added!r}.")
    if key_added in ("", "."):
        raise ValueError(
            f"`{argument}` must be a non-empty name other than '.', received {key_added!r}: "
            "an .h5ad file cannot store it. Pass e.g. `" + argument + "='sfact'`."
        )
    bad = [c for c in _H5AD_UNSAFE if c in key_added]
    if bad:
        fixed = key_added
        for c in bad:
            fixed = fixed.replace(c, "_")
        raise ValueError(
            f"`{argument}` {key_added!r} contains {' and '.join(repr(c) for c in bad)}, which an .h5ad "
            f"file cannot store in a key (`read_h5ad` would not read it back): pass e.g. "
            f"`{argument}={fixed!r}`."
        )
    return key_added


def factor_names(n_factors: int) -> list[str]:
    """Names of the factors, in Moran's I order: ``factor_0``, ``factor_1``, ..."""
    return [f"factor_{i}" for i in range(n_factors)]
