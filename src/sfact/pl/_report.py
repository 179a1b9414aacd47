"""A self-contained HTML report of one fit."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._docs import doc_params

if TYPE_CHECKING:
    import os
    from pathlib import Path

    from anndata import AnnData


@doc_params
def report(
    adata: AnnData,
    path: str | os.PathLike,
    *,
    key: str = "sfact",
    table_key: str | None = None,
    title: str | None = None,
) -> Path:
    """Write a self-contained HTML report of the fit under ``key``.

    The page the command line writes for every data set (``sfact report``), for one fit: its
    metrics (held-out deviance against the baseline when the fit kept validation cells, train
    deviance, Moran's I, iterations, convergence, time, device), the ELBO curve, the factor
    maps (:func:`sfact.pl.factors`, one shared colour scale), the top genes, the gene
    enrichment by group when :func:`sfact.tl.analyze` computed it, and the fit's parameters and
    package versions. The images are PNGs embedded as ``data:`` URIs (downscaled to at most
    1000 pixels wide, 256 colours), and nothing is fetched from elsewhere, so the file opens
    in any browser without a server; a few hundred kB for a typical fit.

    Parameters
    ----------
    adata
        Annotated data with a fit (:func:`sfact.tl.fit`).
    path
        The HTML file to write (its folder is created); an existing file is replaced.
    {key}
    {table_key}
    title
        Title of the page; the prior and key by default.

    Returns
    -------
    The path written.

    Examples
    --------
    >>> import sfact
    >>> adata = sfact.datasets.osmfish()
    >>> sfact.pp.prepare(adata)
    >>> sfact.tl.fit(adata, prior="svgp", n_factors=5)  # doctest: +SKIP
    >>> sfact.pl.report(adata, "osmfish_report.html")  # doctest: +SKIP
    PosixPath('osmfish_report.html')
    """
    from .._spatialdata import resolve_table
    from ..pipeline._html_report import fit_report

    adata = resolve_table(adata, table_key, spatial_key=None)  # a SpatialData's table

    return fit_report(adata, path, key=key, title=title)
