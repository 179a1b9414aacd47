"""One self-contained HTML page per data set: the priors side by side, their figures, the config.

:func:`write_reports` (``sfact report``, and the end of ``sfact run all``) reads what the
pipeline wrote below a data set's ``output_dir`` (``<prior>/metrics.json``, ``results.h5ad``,
``figures/*.png``, ``model/metadata.json``, ``run_summary.json``) and writes
``<output_dir>/report.html``; :func:`fit_report` (:func:`sfact.pl.report`) does the same for
one fit in an AnnData. The page is rendered by jinja2 from ``templates/report.html.j2``; the
images are downscaled PNGs embedded as ``data:`` URIs, nothing is fetched from elsewhere, so the
file opens from disk in any browser, and the links to the outputs are relative to it.
"""

from __future__ import annotations

import base64
import io
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._config_schema import PRIORS
from ._layout import Layout, _write_text

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from anndata import AnnData
    from matplotlib.figure import Figure

    from ._config import Config

#: the report's file name in a data set's output folder
REPORT_FILE = "report.html"
#: widest embedded image, in pixels (wider PNGs are downscaled)
MAX_WIDTH = 1000
#: packages whose versions the report lists
_PACKAGES = ("sfact", "torch", "anndata", "scanpy", "squidpy", "numpy", "scipy", "matplotlib", "jinja2")


class ReportInputError(FileNotFoundError):
    """The outputs a report is made from do not exist (yet)."""


def report_path(layout: Layout) -> Path:
    """Where the report of the data set in ``layout`` is written."""
    return layout.root / REPORT_FILE


# -- images ------------------------------------------------------------------------------------
def _png_uri(source: Path | Figure, *, max_width: int = MAX_WIDTH) -> str:
    """A ``data:image/png;base64,...`` URI of a PNG file or a matplotlib figure, downscaled.

    Images wider than ``max_width`` pixels are resized; the colours are reduced to a 256-colour
    palette, which keeps plots exact to the eye at a fraction of the size.
    """
    from PIL import Image

    if isinstance(source, Path):
        img = Image.open(source)
        img.load()
    else:
        buf = io.BytesIO()
        source.savefig(buf, format="png", dpi=80, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(source)
        buf.seek(0)
        img = Image.open(buf)
        img.load()
    img = img.convert("RGB")
    if img.width > max_width:
        img = img.resize((max_width, max(1, round(img.height * max_width / img.width))), Image.LANCZOS)
    img = img.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def _elbo_figure(histories: Mapping[str, Sequence[float]]) -> Figure | None:
    """The ELBO of every fit against the iteration, one line per prior."""
    import numpy as np
    from matplotlib.figure import Figure

    curves = {k: np.asarray(v, dtype=float) for k, v in histories.items() if len(v)}
    if not curves:
        return None
    fig = Figure(figsize=(7.5, 3.2))
    ax = fig.add_subplot()
    for name, y in curves.items():
        x = np.arange(1, len(y) + 1)
        ax.plot(x, y, lw=1.4, label=name, marker="o" if len(y) < 10 else None, ms=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("ELBO")
    finite = np.concatenate([y[np.isfinite(y)] for y in curves.values()])
    if finite.size and max(len(y) for y in curves.values()) > 20:  # the first iterations flatten the rest
        lo, hi = np.percentile(finite, [5, 100])
        pad = 0.05 * (hi - lo) if hi > lo else 1.0
        ax.set_ylim(lo - pad, hi + pad)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# -- numbers -----------------------------------------------------------------------------------
def _num(value: Any, fmt: str = ".4g") -> str:
    if value is None:
        return "–"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return format(v, fmt) if math.isfinite(v) else "–"


def _seconds(value: Any) -> str:
    if value is None:
        return "–"
    v = float(value)
    return f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"


@dataclass
class _Prior:
    """One row of the table and one section of the page."""

    name: str
    n_factors: str = "–"
    validation: str = "–"
    baseline: str = "–"
    vs_baseline: str = "–"
    train_deviance: str = "–"
    moran: str = "–"
    n_iter: str = "–"
    converged: str = "–"
    time: str = "–"
    device: str = "–"
    best: bool = False
    figures: list[dict[str, str]] = field(default_factory=list)
    top_genes: list[dict[str, str]] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)
    details: str = ""
    score: float | None = None


def _row(name: str, metrics: Mapping[str, Any], params: Mapping[str, Any] | None = None) -> _Prior:
    """The table row of one fit from its metrics (``metrics.json`` or ``uns[key]['metrics']``)."""
    params = params or {}
    row = _Prior(name=name)
    n_factors = metrics.get("n_factors", params.get("n_factors"))
    row.n_factors = "–" if n_factors is None else str(n_factors)
    val, base = metrics.get("validation_deviance"), metrics.get("validation_baseline_deviance")
    row.validation, row.baseline = _num(val), _num(base)
    if val is not None and base is not None:
        row.vs_baseline = _num(float(val) - float(base), "+.3g")
        row.score = float(val)
    row.train_deviance = _num(metrics.get("deviance_per_entry"))
    moran = metrics.get("moranI")
    if isinstance(moran, dict) and moran:
        values = [float(v) for v in moran.values() if v is not None]
        if values:
            row.moran = f"{max(values):.3f} / {sum(values) / len(values):.3f}"
    row.n_iter = str(metrics.get("n_iter", "–"))
    conv = metrics.get("converged")
    row.converged = "–" if conv is None else ("yes" if conv else "no")
    times = [metrics.get(k) for k in ("init_time_s", "train_time_s") if metrics.get(k) is not None]
    row.time = _seconds(sum(float(t) for t in times)) if times else "–"
    row.device = str(metrics.get("device") or params.get("device") or "–")
    return row


def _top_genes_rows(adata: AnnData, *, key: str, n_genes: int = 6) -> list[dict[str, str]]:
    from ..get import top_genes

    df = top_genes(adata, key=key, n_genes=n_genes)
    moran = adata.uns[key].get("moranI")
    rows = []
    for factor, sub in df.groupby("factor", sort=False):
        genes = ", ".join(f"{g} ({s:.2f})" for g, s in zip(sub["gene"], sub["share"], strict=True))
        i = None
        if moran is not None and factor in getattr(moran, "index", ()):
            i = moran.loc[factor, "I"]
        rows.append({"factor": str(factor), "moran": _num(i, ".3f"), "genes": genes})
    return rows


def _versions() -> list[tuple[str, str]]:
    from importlib.metadata import PackageNotFoundError, version

    out = [("python", platform.python_version())]
    for name in _PACKAGES:
        try:
            out.append((name, version(name)))
        except PackageNotFoundError:
            continue
    return out


def _render(**context: Any) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    from .._version import __version__

    context.setdefault("created", time.strftime("%Y-%m-%d %H:%M"))
    context.setdefault("sfact_version", __version__)
    context.setdefault("versions", _versions())
    for k in ("extras", "links", "configs"):
        context.setdefault(k, [])
    context.setdefault("elbo_img", None)
    context.setdefault("n_obs", None)
    context.setdefault("n_vars", None)
    context.setdefault("best_note", "")
    return env.get_template("report.html.j2").render(**context)


def _mark_best(rows: list[_Prior]) -> str:
    scored = [r for r in rows if r.score is not None]
    if len(scored) < 2:
        return ""
    best = min(scored, key=lambda r: r.score)
    best.best = True
    return f"Highlighted: the lowest held-out deviance ({best.name})."


def _enrichment_figure(adata: AnnData, key: str) -> Figure | None:
    # the plot's own module, not sfact.pl: sfact.pl.report imports this module
    from ..pl._genes import enrichment_by_group

    if "enrichment" not in adata.uns[key]:
        return None
    return enrichment_by_group(adata, key=key, return_fig=True)


# -- one fit -----------------------------------------------------------------------------------
def fit_report(adata: AnnData, path: str | Path, *, key: str = "sfact", title: str | None = None) -> Path:
    """Write the report of the fit under ``key`` in ``adata`` to ``path``; see :func:`sfact.pl.report`."""
    from ..pl._factors import factors

    if key not in adata.uns or "metrics" not in adata.uns[key] or f"X_{key}" not in adata.obsm:
        raise KeyError(
            f"`adata.uns[{key!r}]` with metrics not found: fit a model first with "
            f"`sfact.tl.fit(adata, key_added={key!r})` (or pass the `key=` it was fitted under)."
        )
    uns = adata.uns[key]
    params = dict(uns.get("params", {}))
    metrics = dict(uns["metrics"])
    moran = uns.get("moranI")
    if moran is not None and "I" in getattr(moran, "columns", ()):
        metrics["moranI"] = {str(k): float(v) for k, v in moran["I"].items()}
    prior = str(params.get("prior", key))
    row = _row(prior, metrics, params)
    row.figures.append({"title": "Factors", "img": _png_uri(factors(adata, key=key, return_fig=True))})
    enr = _enrichment_figure(adata, key)
    if enr is not None:
        row.figures.append({"title": "Gene enrichment by group", "img": _png_uri(enr)})
    row.top_genes = _top_genes_rows(adata, key=key)
    history = uns.get("history", {})
    elbo = _elbo_figure({prior: history.get("elbo", [])}) if isinstance(history, dict) else None
    params_text = "\n".join(f"{k}: {v}" for k, v in params.items() if not isinstance(v, dict))
    html = _render(
        title=title or f"{prior} fit ({key})",
        priors=[row],
        elbo_img=None if elbo is None else _png_uri(elbo),
        n_obs=adata.n_obs,
        n_vars=adata.n_vars,
        configs=[(f"adata.uns[{key!r}]['params']", params_text)],
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text(path, html)
    return path


# -- a data set of the pipeline -----------------------------------------------------------------
def _analysed_priors(layout: Layout) -> list[str]:
    return [p for p in PRIORS if layout.metrics(p).is_file()]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _dataset_prior(layout: Layout, prior: str, summary: Mapping[str, Any]) -> tuple[_Prior, list[float]]:
    """The row and section of one analysed prior of a data set, and its ELBO history."""
    import anndata as ad

    root = layout.root
    metrics = _read_json(layout.metrics(prior))
    meta = _read_json(layout.model_dir(prior) / "metadata.json")
    adata = ad.read_h5ad(layout.results(prior)) if layout.results(prior).is_file() else None
    params = dict(adata.uns["sfact"].get("params", {})) if adata is not None else {}
    if adata is not None:  # the held-out metrics, written into uns by the analysis
        for k, v in adata.uns["sfact"].get("metrics", {}).items():
            metrics.setdefault(k, v)
    if not metrics.get("device"):
        job = summary.get("jobs", {}).get(f"{metrics.get('dataset', '')}/{prior}/train", {})
        metrics["device"] = job.get("device")
    row = _row(prior, metrics, params)
    figs = layout.figures(prior)
    if (figs / "factors.png").is_file():
        row.figures.append({"title": "Factors", "img": _png_uri(figs / "factors.png")})
    elif adata is not None:
        from ..pl._factors import factors

        row.figures.append({"title": "Factors", "img": _png_uri(factors(adata, return_fig=True))})
    if (figs / "groupwise_factors.png").is_file():
        row.figures.append({"title": "Factors per group", "img": _png_uri(figs / "groupwise_factors.png")})
    if (figs / "enrichment_by_group.png").is_file():
        row.figures.append(
            {"title": "Gene enrichment by group", "img": _png_uri(figs / "enrichment_by_group.png")}
        )
    if adata is not None:
        row.top_genes = _top_genes_rows(adata, key="sfact")
    links = [
        (name, _rel(path, root))
        for name, path in (
            ("results.h5ad", layout.results(prior)),
            ("metrics.json", layout.metrics(prior)),
            ("config.yaml", layout.fit_config(prior)),
            ("model/", layout.model_dir(prior)),
            ("log", layout.log(prior)),
        )
        if path.exists()
    ]
    links += [(f"figures/{p.name}", _rel(p, root)) for p in sorted(figs.glob("*.png"))]
    row.links = links
    if layout.fit_config(prior).is_file():
        row.details = layout.fit_config(prior).read_text()
    if meta.get("sfact_version"):
        row.details = f"# trained with sfact {meta['sfact_version']}\n" + row.details
    history = meta.get("history", {}).get("elbo")
    if history is None and adata is not None:
        history = adata.uns["sfact"].get("history", {}).get("elbo", [])
    return row, list(history or [])


def dataset_report(layout: Layout, configs: Sequence[Config]) -> Path:
    """Write the report of one data set (``configs`` write to ``layout.root``); its path.

    Raises
    ------
    ReportInputError
        When no prior of the data set has been analysed (no ``<prior>/metrics.json``).
    """
    from ._config_files import config_to_yaml

    priors = _analysed_priors(layout)
    if not priors:
        raise ReportInputError(_missing_message(layout, configs))
    summary = _read_json(layout.summary)
    rows, histories = [], {}
    for prior in priors:
        row, history = _dataset_prior(layout, prior, summary)
        rows.append(row)
        histories[prior] = history
    elbo = _elbo_figure(histories)
    extras = []
    if layout.selection_figure.is_file():
        extras.append({"title": "Model selection", "img": _png_uri(layout.selection_figure)})
    info = _read_json(layout.prepared_info)
    n_obs, n_vars = info.get("n_obs"), info.get("n_vars")
    if n_obs is None:
        m = _read_json(layout.metrics(priors[0]))
        n_obs, n_vars = m.get("n_obs"), m.get("n_vars")
    root = layout.root
    links = [
        (name, _rel(path, root))
        for name, path in (
            ("prepared.h5ad", layout.prepared),
            ("prepared.json", layout.prepared_info),
            ("run_summary.json", layout.summary),
            ("selection/", layout.selection_dir),
            ("logs/", layout.logs),
        )
        if path.exists()
    ]
    seen, config_texts = set(), []
    for cfg in configs:
        label = cfg.source or cfg.name
        if label in seen:
            continue
        seen.add(label)
        text = (
            Path(cfg.source).read_text() if cfg.source and Path(cfg.source).is_file() else config_to_yaml(cfg)
        )
        config_texts.append((str(label), text))
    html = _render(
        title=configs[0].name if configs else root.name,
        priors=rows,
        best_note=_mark_best(rows),
        elbo_img=None if elbo is None else _png_uri(elbo),
        extras=extras,
        n_obs=n_obs,
        n_vars=n_vars,
        configs=config_texts,
        links=links,
    )
    path = report_path(layout)
    _write_text(path, html)
    return path


def _missing_message(layout: Layout, configs: Sequence[Config]) -> str:
    source = next((c.source for c in configs if c.source), None) or "CONFIG"
    return (
        f"no analysed prior in {layout.root} (no <prior>/metrics.json): "
        f"run `sfact run all -c {source}` first."
    )


def _by_output(configs: Sequence[Config]) -> dict[Path, list[Config]]:
    groups: dict[Path, list[Config]] = {}
    for cfg in configs:
        groups.setdefault(Path(cfg.output_dir).resolve(), []).append(cfg)
    return groups


def write_reports(
    configs: Sequence[Config], *, missing: str = "raise", keep_existing: bool = False
) -> list[Path]:
    """Write ``report.html`` for the data set of every config; the paths written.

    Parameters
    ----------
    configs
        Validated configs; those with one ``output_dir`` make one report.
    missing
        ``"raise"``: raise :class:`ReportInputError` (before writing anything) when a data set
        has no analysed prior; ``"skip"``: leave such data sets out.
    keep_existing
        Leave an existing ``report.html`` as it is (its path is still returned).
    """
    groups = _by_output(configs)
    todo = []
    for root, cfgs in groups.items():
        layout = Layout(root)
        if not _analysed_priors(layout):
            if missing == "raise":
                raise ReportInputError(_missing_message(layout, cfgs))
            continue
        todo.append((layout, cfgs))
    return [
        report_path(layout)
        if keep_existing and report_path(layout).is_file()
        else dataset_report(layout, cfgs)
        for layout, cfgs in todo
    ]
