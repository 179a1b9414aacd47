"""Docstring fragments shared by the plotting functions, and the decorator that fills them in.

A docstring line that holds only ``{name}`` (any indentation) is replaced by the fragment
``name``, each of its lines indented like the placeholder. Only whole-line placeholders are
touched, so other braces in a docstring (``adata.uns['{group_key}_colors']``) stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

# ---------------------------------------------------------------------------- Parameters
adata = """\
adata
    AnnData after :func:`sfact.tl.fit`."""

adata_enrichment = """\
adata
    AnnData after :func:`sfact.tl.gene_enrichment`."""

key = """\
key
    The fit's ``key_added``."""

adata_selection = """\
adata
    AnnData after :func:`sfact.tl.select_model`."""

key_selection = """\
key
    The ``key_added`` of :func:`sfact.tl.select_model`."""

spatial_key = """\
spatial_key
    Key of the coordinates in ``adata.obsm``."""

ncols = """\
ncols
    Panels per row."""

cmap = """\
cmap
    Colour map."""

color = """\
color
    Bar colour."""

size = """\
size
    Marker size; chosen from the number of cells when ``None``."""

group = """\
group
    Use one group's loadings (from :func:`sfact.tl.group_loadings`)."""

ax = """\
ax
    Draw into this axes."""

ax_factor = """\
ax
    Draw a single factor into this axes."""

show = """\
show
    Show the figure (default when ``return_fig`` is False)."""

return_fig = """\
return_fig
    Return the :class:`~matplotlib.figure.Figure` instead of showing it."""

# ---------------------------------------------------------------------------- Returns
returns_fig = "The figure when ``return_fig=True``, else ``None``."

FRAGMENTS: dict[str, str] = {
    "adata": adata,
    "adata_enrichment": adata_enrichment,
    "key": key,
    "adata_selection": adata_selection,
    "key_selection": key_selection,
    "spatial_key": spatial_key,
    "ncols": ncols,
    "cmap": cmap,
    "color": color,
    "size": size,
    "group": group,
    "ax": ax,
    "ax_factor": ax_factor,
    "show": show,
    "return_fig": return_fig,
    "returns_fig": returns_fig,
}
"""The fragments by placeholder name."""


def fill_doc(doc: str, fragments: dict[str, str] | None = None) -> str:
    """``doc`` with every whole-line ``{name}`` replaced by its fragment, indented like it.

    Parameters
    ----------
    doc
        A docstring.
    fragments
        The fragments by name; :data:`FRAGMENTS` when ``None``.

    Returns
    -------
    The filled docstring; :class:`KeyError` for a placeholder without a fragment.
    """
    fragments = FRAGMENTS if fragments is None else fragments
    out = []
    for line in doc.splitlines():
        stripped = line.strip()
        if len(stripped) > 2 and stripped[0] == "{" and stripped[-1] == "}" and stripped[1:-1].isidentifier():
            name = stripped[1:-1]
            if name not in fragments:
                raise KeyError(f"No docstring fragment {name!r}; fragments are {sorted(fragments)}.")
            indent = line[: len(line) - len(line.lstrip())]
            out += [indent + part if part else part for part in fragments[name].splitlines()]
        else:
            out.append(line)
    return "\n".join(out) + ("\n" if doc.endswith("\n") else "")


def doc_params(func: F) -> F:
    """Decorator: fill the shared fragments into ``func``'s docstring (see :func:`fill_doc`)."""
    if func.__doc__:
        func.__doc__ = fill_doc(func.__doc__)
    return func
