"""The ``sfact`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import get_args

from ._version import __version__
from .pipeline._jobs import STAGES
from .pipeline._runner import Executor


def _demo(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import sfact

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    sfact.settings.verbosity = 2
    t0 = time.perf_counter()
    print(
        f"sfact {sfact.__version__}: demo on the bundled osmFISH data (prior={args.prior}, L={args.n_factors})"
    )
    adata = sfact.datasets.osmfish()
    sfact.pp.prepare(adata, group_key="ClusterName")
    print(
        f"  data: {adata.n_obs} cells x {adata.n_vars} genes, {len(adata.obs['ClusterName'].cat.categories)} cell types"
    )
    sfact.tl.fit(
        adata,
        prior=args.prior,
        n_factors=args.n_factors,
        max_iter=args.max_iter,
        device=args.device,
        save_model=out / "model",
        random_state=args.seed,
    )
    h5ad = out / "osmfish_sfact.h5ad"
    adata.write_h5ad(h5ad)
    fig = sfact.pl.factors(adata, return_fig=True)
    png = out / "factors.png"
    fig.savefig(png, dpi=110)
    m = adata.uns["sfact"]["metrics"]
    moran = adata.uns["sfact"]["moranI"]
    print(
        f"  trained {m['n_iter']} iterations in {m['train_time_s']:.1f} s "
        f"({'converged' if m['converged'] else 'not converged'}); "
        f"train deviance per entry {m['deviance_per_entry']:.4f}"
    )
    print("  Moran's I per factor: " + ", ".join(f"{i:.2f}" for i in moran["I"]))
    print(f"  wrote {h5ad}, {png} and {out / 'model'}  (total {time.perf_counter() - t0:.1f} s)")
    return 0


_PIPELINE_HELP = {
    "preprocess": "load the data set and run sfact.pp.prepare -> prepared.h5ad",
    "select": "compare priors, numbers of factors and prior options by held-out deviance "
    "(config section `selection`) -> selection/",
    "train": "train each prior on prepared.h5ad -> <prior>/model/",
    "analyze": "analyse each trained prior -> <prior>/results.h5ad, arrays, metrics.json",
    "figures": "draw each analysed prior's figures -> <prior>/figures/*.png",
}

_EPILOG = """\
examples:
  sfact run all -c configs/osmfish/general.yaml          every prior of one data set
  sfact run all -c configs/ --config-name general.yaml   every data set below configs/
  sfact run train analyze -c svgp.yaml --resume          continue training, then re-analyse
  sfact select -c configs/osmfish/general.yaml           model selection (section `selection`)
  sfact generate -c configs/osmfish/general.yaml         pnmf.yaml, svgp.yaml, ... next to it
  sfact report -c configs/osmfish/general.yaml           report.html: every prior on one page
  sfact run all -c general.yaml --dry-run                print the plan, run nothing

Exit status: 0 when every job is done or skipped, 1 when a job failed, 2 for usage or
config errors.
"""


def _device_ok(device: str) -> bool:
    """Whether ``device`` names a worker slot: ``cpu``, ``cuda`` or ``cuda:N`` (not ``auto``)."""
    from ._constants import check_device

    try:
        check_device(device)
    except ValueError:
        return False
    return device != "auto"


def _devices(value: str) -> list[str]:
    devices = [d.strip() for d in value.split(",") if d.strip()]
    bad = [d for d in devices if not _device_ok(d)]
    if bad or not devices:
        raise argparse.ArgumentTypeError(
            f"devices must be cpu, cuda or cuda:N separated by commas, received {value!r}"
        )
    return devices


def _add_pipeline_options(p: argparse.ArgumentParser, *, resume: bool) -> None:
    p.add_argument(
        "-c",
        "--config",
        action="append",
        required=True,
        metavar="PATH",
        help="config file, or a folder searched for --config-name files (repeatable)",
    )
    p.add_argument(
        "--config-name",
        default="general.yaml",
        metavar="NAME",
        help="file name (glob pattern allowed) searched for below folders given to -c (default: general.yaml)",
    )
    p.add_argument(
        "--prior",
        action="append",
        metavar="PRIOR",
        help="run only these priors (repeatable or comma-separated; default: the config's model.prior, "
        "or every prior that applies when it has none)",
    )
    p.add_argument("--force", action="store_true", help="redo stages whose outputs exist")
    if resume:
        p.add_argument(
            "--resume",
            action="store_true",
            help="continue training from the saved model (history appended); train afresh when there is none",
        )
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan and exit without running or writing"
    )
    p.add_argument(
        "--executor",
        choices=get_args(Executor),
        default="local",
        help="local: worker processes, one job per GPU plus one CPU job; dask: a Dask cluster "
        "(--scheduler); serial: one job after the other in this process (debugging) (default: local)",
    )
    p.add_argument("--scheduler", metavar="ADDRESS", help="Dask scheduler address (with --executor dask)")
    p.add_argument("--devices", type=_devices, metavar="LIST", help="devices to use, e.g. cpu,cuda:0,cuda:1")
    p.add_argument("--plain", action="store_true", help="plain progress lines instead of the live table")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sfact``."""
    p = argparse.ArgumentParser(
        prog="sfact",
        description="Spatial factorization of spatial transcriptomics data.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"sfact {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage, help_ in _PIPELINE_HELP.items():
        s = sub.add_parser(stage, help=help_, description=f"{help_}.")
        _add_pipeline_options(s, resume=stage == "train")
        s.set_defaults(func=_pipeline, stages=[stage])
    r = sub.add_parser(
        "run",
        help="run several stages in pipeline order (all: every stage but select)",
        description="Run the given stages, sorted into pipeline order; `all` runs every stage but "
        "`select` (model selection, many fits: name it to run it). "
        "Nothing unrequested is added: a stage whose input is missing fails, naming what to run first.",
    )
    r.add_argument("stages", nargs="+", choices=("all", *STAGES), metavar="STAGE")
    _add_pipeline_options(r, resume=True)
    r.set_defaults(func=_pipeline)
    rep = sub.add_parser(
        "report",
        help="write one self-contained HTML report per data set -> report.html",
        description="Write <output_dir>/report.html for each data set: the priors side by side "
        "(deviances, Moran's I, iterations, time, device), the ELBO curves, the factor maps, the top "
        "genes, the config and the versions; images embedded, nothing fetched. `sfact run all` "
        "writes it at its end.",
    )
    rep.add_argument(
        "-c",
        "--config",
        action="append",
        required=True,
        metavar="PATH",
        help="config file, or a folder searched for --config-name files (repeatable)",
    )
    rep.add_argument(
        "--config-name",
        default="general.yaml",
        metavar="NAME",
        help="file name (glob pattern allowed) searched for below folders given to -c (default: general.yaml)",
    )
    rep.set_defaults(func=_html_report)
    g = sub.add_parser(
        "generate",
        help="write one config per prior next to a general config",
        description="Write pnmf.yaml, svgp.yaml, ... next to the general config: each starts from it "
        "(`base:`) with `model.prior` set.",
    )
    g.add_argument("-c", "--config", required=True, metavar="PATH", help="the general config")
    g.add_argument(
        "--prior", action="append", metavar="PRIOR", help="only these priors (default: all that apply)"
    )
    g.add_argument("--force", action="store_true", help="overwrite existing files")
    g.add_argument("--dry-run", action="store_true", help="print what would be written")
    g.set_defaults(func=_generate)
    d = sub.add_parser(
        "demo", help="fit the bundled osmFISH data and write an .h5ad and a PNG of the factors"
    )
    d.add_argument("--output", "-o", default="demo_output", help="output folder (default: demo_output)")
    d.add_argument("--prior", default="mggp_svgp", help="prior (default: mggp_svgp, groups: ClusterName)")
    d.add_argument("--n-factors", type=int, default=10, help="number of factors (default: 10)")
    d.add_argument("--max-iter", type=int, default=1000, help="maximum iterations (default: 1000)")
    d.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    d.set_defaults(func=_demo)
    return p


def _priors(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    from .pipeline import PRIORS, ConfigError
    from .pipeline._config_schema import _suggest

    out = []
    for v in values:
        for p in v.split(","):
            p = p.strip()
            if p not in PRIORS:
                raise ConfigError(
                    f"unknown prior {p!r}{_suggest(p, PRIORS)} (priors: {', '.join(PRIORS)})", key="--prior"
                )
            if p not in out:
                out.append(p)
    return out


def _error(msg: object) -> int:
    print(f"sfact: error: {msg}", file=sys.stderr)
    return 2


def _pipeline(args: argparse.Namespace) -> int:
    from .pipeline import ConfigError, collect_configs, make_plan, print_plan, run_plan, write_summaries
    from .pipeline._plan import check_plan

    t0 = time.perf_counter()
    if args.executor != "dask" and args.scheduler:
        return _error("--scheduler needs --executor dask.")
    try:
        priors = _priors(args.prior)
        configs = collect_configs(args.config, args.config_name)
        plan = make_plan(
            configs,
            args.stages,
            priors=priors,
            force=args.force,
            resume=getattr(args, "resume", False),
        )
        # output folders (created, cleared of what killed runs left) and devices, before anything runs
        check_plan(
            plan,
            devices=args.devices,
            executor=args.executor,
            scheduler=args.scheduler,
            dry_run=args.dry_run,
        )
    except ConfigError as e:
        return _error(e)
    print_plan(plan)
    if args.dry_run:
        print("Dry run: nothing was run or written.")
        return 0
    if not plan.jobs:
        if plan.skipped:
            print(
                "Nothing to run: every requested output exists (--force redoes, --resume continues training)."
            )
        else:
            print("Nothing to run.")
    results = run_plan(
        plan,
        executor=args.executor,
        scheduler=args.scheduler,
        devices=args.devices,
        live=False if args.plain else None,
    )
    summaries = write_summaries(plan, results, command=args.command_line)
    rc = _report(results, summaries, time.perf_counter() - t0, ran=bool(plan.jobs))
    if "all" in args.stages:
        _end_of_run_reports(configs, keep_existing=not plan.jobs)
    return rc


def _end_of_run_reports(configs, *, keep_existing: bool) -> None:
    """``report.html`` of every data set with an analysed prior, after ``sfact run all``; a failure only warns.

    With ``keep_existing`` (nothing ran), an existing report is left as it is.
    """
    from .pipeline._html_report import write_reports

    try:
        paths = write_reports(configs, missing="skip", keep_existing=keep_existing)
    except Exception as e:  # the run's outputs are written; the report is extra
        print(f"sfact: warning: the HTML report was not written ({type(e).__name__}: {e}).", file=sys.stderr)
        return
    for p in paths:
        print(f"Report: {p} ({p.stat().st_size / 1e3:.0f} kB)")


def _html_report(args: argparse.Namespace) -> int:
    from .pipeline import ConfigError, collect_configs
    from .pipeline._html_report import ReportInputError, write_reports

    try:
        configs = collect_configs(args.config, args.config_name)
        paths = write_reports(configs)
    except (ConfigError, ReportInputError) as e:
        return _error(e)
    for p in paths:
        print(f"Report: {p} ({p.stat().st_size / 1e3:.0f} kB)")
    return 0


def _report(results, summaries, elapsed: float, *, ran: bool) -> int:
    """The end of a run: the errors in full, the summary files; the exit status.

    When jobs ran, the runner's display has printed the final table, the one summary line
    (``N jobs in ...: ...``) and the logs of failed jobs; when none ran (every output exists),
    the summary line is printed here.
    """
    if not ran:
        counts: dict[str, int] = {}
        for r in results:
            counts[r.status] = counts.get(r.status, 0) + 1
        parts = [f"{counts[s]} {s}" for s in ("done", "skipped", "failed", "cancelled") if counts.get(s)]
        print(f"Finished in {elapsed:.1f} s: {', '.join(parts) or 'no jobs'}.")
    failed = [r for r in results if r.status == "failed"]
    cancelled = [r for r in results if r.status == "cancelled"]
    if failed:
        print("Failed:")
        for r in failed:
            print(f"  {r.name}: {r.error}")
    if cancelled:
        print("Cancelled (a job they depend on did not finish): " + ", ".join(r.name for r in cancelled))
    for s in summaries:
        print(f"Summary: {s}")
    return 1 if failed or cancelled else 0


def _generate(args: argparse.Namespace) -> int:
    from .pipeline import ConfigError, write_prior_configs

    try:
        if Path(args.config).is_dir():
            raise ConfigError(
                "`sfact generate` takes one general config file, not a folder.", file=args.config
            )
        paths, notes = write_prior_configs(
            args.config, priors=_priors(args.prior), force=args.force, dry_run=args.dry_run
        )
    except (ConfigError, FileExistsError) as e:
        return _error(e)
    verb = "would write" if args.dry_run else "wrote"
    for p in paths:
        print(f"{verb} {p}")
    for n in notes:
        print(f"note: {n}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sfact`` console script.

    Parameters
    ----------
    argv
        Command-line arguments (``sys.argv[1:]`` when ``None``).

    Returns
    -------
    The exit status: 0 when every job is done or skipped, 1 when a job failed, 2 for usage or
    config errors.

    Examples
    --------
    >>> from sfact._cli import main
    >>> main(["run", "all", "-c", "configs/osmfish/general_test.yaml", "--dry-run"])  # doctest: +SKIP
    0
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # usage errors (2) and --help (0)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    args.command_line = " ".join(["sfact", *argv])
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("sfact: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sfact run ... --dry-run | head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
