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

table_key = """\
table_key
    With a ``spatialdata.SpatialData`` as ``adata``: the key of its table holding the results
    (``None`` for its only table; a key it does not hold raises a :class:`KeyError` naming its
    tables)."""

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
    Draw a single factor into this axes; its colour bar is drawn inside the axes' area, so it
    never overlaps a neighbouring panel of a grid."""

show = """\
show
    Show the figure; ``None`` follows ``scanpy.settings.autoshow`` (on by default). With
    ``show=False`` the plot returns its Axes instead, as scanpy's plots do."""

save = """\
save
    Write the figure to this file (its suffix sets the format; ``scanpy.settings.file_format_figs``
    is appended when there is none; missing folders are made), or with ``True`` to
    ``{scanpy.settings.figdir}/sfact_<plot>.<format>``. Written with ``bbox_inches="tight"``,
    so long labels are not cut at the figure's edge."""

return_fig = """\
return_fig
    Return the :class:`~matplotlib.figure.Figure` (neither shown nor closed)."""

title = """\
title
    Title replacing the default one. With several panels: a list of one title per panel, or a
    string for the figure's title (the panels keep theirs)."""

title_single = """\
title
    Title replacing the default one."""

figsize = """\
figsize
    Size of the new figure, ``(width, height)`` in inches; from the number of panels when
    ``None``. Not with ``ax`` (size the figure that holds it)."""

vmin = """\
vmin
    Lower colour limit: a number, a percentile of the drawn values as a string (``"p1"``, as in
    scanpy), or ``None`` for their minimum. Lower values take the lowest colour and the colour
    bar ends in a triangle at the bottom."""

vmax = """\
vmax
    Upper colour limit: a number, a percentile of the drawn values as a string (``"p99.5"``, as in
    scanpy: a few extreme cells then do not wash out the rest), or ``None`` for their maximum.
    Higher values take the top colour and the colour bar ends in a triangle at the top."""

vcenter = """\
vcenter
    Centre of a diverging colour scale (a number or a percentile string), mapped to the middle
    colour (:class:`~matplotlib.colors.TwoSlopeNorm`); it must lie between the limits."""

library_id = """\
library_id
    Samples to draw (values of the fit's ``sample_key`` column; squidpy's name for them), for a
    fit with several samples; all when ``None``."""

invert_y = """\
invert_y
    Draw y increasing downward, the image convention of :func:`scanpy.pl.spatial` and
    :func:`squidpy.pl.spatial_scatter` (the same coordinates give the same picture as theirs);
    ``False`` draws y upward."""

by = """\
by
    Rank genes by ``"share"`` (``W_dl / Σ_l W_dl``: how specific the gene is to the factor, the
    default of every gene plot) or ``"loading"`` (``W_dl``, which favours highly expressed
    genes); see :func:`sfact.get.top_genes`."""

# ---------------------------------------------------------------------------- Returns
returns_fig = """\
The :class:`~matplotlib.figure.Figure` with ``return_fig=True``; else, with ``show=False``, the
:class:`~matplotlib.axes.Axes` of the plot (a list of them, one per panel, when there are
several; colour bars not included); else ``None``."""

FRAGMENTS: dict[str, str] = {
    "adata": adata,
    "adata_enrichment": adata_enrichment,
    "key": key,
    "adata_selection": adata_selection,
    "key_selection": key_selection,
    "spatial_key": spatial_key,
    "table_key": table_key,
    "ncols": ncols,
    "cmap": cmap,
    "color": color,
    "size": size,
    "group": group,
    "ax": ax,
    "ax_factor": ax_factor,
    "show": show,
    "save": save,
    "return_fig": return_fig,
    "title": title,
    "title_single": title_single,
    "figsize": figsize,
    "vmin": vmin,
    "vmax": vmax,
    "vcenter": vcenter,
    "library_id": library_id,
    "invert_y": invert_y,
    "by": by,
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
