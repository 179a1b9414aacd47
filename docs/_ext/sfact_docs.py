"""Sphinx extension: the command-line and config reference, generated from the code.

At ``builder-inited`` it writes the MyST markdown files that ``cli.md`` and ``own_data.md`` include:

* ``generated/includes/cli_commands.md``: every ``sfact`` command with its usage and a table
  of its arguments and options, read from the argparse parser (:func:`sfact._cli.build_parser`);
* ``generated/includes/config_reference.md``: every section and key of a pipeline config with
  its type, default and meaning, read from the dataclasses of :mod:`sfact.pipeline` (types and
  defaults) and their docstrings, falling back to the docstrings of the functions the section
  is passed to (:func:`sfact.pp.prepare`, :class:`sfact.models.SpatialFactorization`, its
  ``train`` method);
* ``generated/includes/readers.md``: the technologies :func:`sfact.datasets.read` knows
  (:data:`sfact.datasets.READERS`).

A key without any description is a build warning (so ``-W`` fails): the reference cannot
silently fall out of step with the code. Files are rewritten only when their text changes, so
incremental builds stay incremental.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

from sphinx.util import logging

logger = logging.getLogger(__name__)

INCLUDES = Path("generated") / "includes"

# ------------------------------------------------------------------------------------ text utils
_CODE_SPAN = re.compile(r"(``.+?``|`[^`]+`)")
_ROLE = re.compile(r":(?:py:)?(func|class|meth|attr|data|mod|obj|exc|ref|doc|math):`([^`]+)`")


def _escape_md(text: str) -> str:
    """Escape markdown specials outside code spans (``|`` also inside, for table cells)."""
    out = []
    for i, part in enumerate(_CODE_SPAN.split(text)):
        if i % 2:  # a code span
            out.append(part.replace("|", "\\|"))
        else:
            out.append(re.sub(r"([\\*_<>\[\]|#])", r"\\\1", part))
    return "".join(out)


def _rst_to_md(text: str, resolve) -> str:
    """One paragraph of numpydoc/rST inline markup as MyST (roles, literals), for a table cell."""
    text = " ".join(text.split())
    roles: list[str] = []

    def role(m: re.Match) -> str:
        name, target = m.group(1), m.group(2)
        full = resolve(target)
        if full.lstrip("~").startswith("sfact.pipeline."):
            # sfact.pipeline has no API page (this reference is its documentation): write the
            # name instead of a link
            roles.append(_pipeline_literal(full.lstrip("~")))
        else:
            roles.append(f"{{{'py:' + name if name not in ('ref', 'doc', 'math') else name}}}`{full}`")
        return f"\x00{len(roles) - 1}\x00"

    text = _ROLE.sub(role, text)
    text = re.sub(r"``(.+?)``", r"`\1`", text)
    text = _escape_md(text)
    return re.sub(r"\x00(\d+)\x00", lambda m: roles[int(m.group(1))], text)


def _pipeline_literal(dotted: str) -> str:
    """``sfact.pipeline.NAME`` as code (the config types spell out the values of its constants)."""
    return f"`{dotted.rpartition('.')[2]}`"


def _sections(doc: str | None) -> dict[str, dict[str, str]]:
    """``{section: {name: description}}`` of the numpydoc sections with ``name`` entries."""
    text = inspect.cleandoc(doc or "")
    lines = text.splitlines()
    out: dict[str, dict[str, str]] = {}
    current: str | None = None
    entry: list[str] | None = None
    names: list[str] = []

    def flush():
        if current is not None and names:
            desc = textwrap.dedent("\n".join(entry or [])).strip()
            for n in names:
                out[current][n] = desc

    i = 0
    while i < len(lines):
        line = lines[i]
        if i + 1 < len(lines) and line.strip() and re.fullmatch(r"\s*-{3,}\s*", lines[i + 1]):
            flush()
            current, names, entry = line.strip(), [], []
            out[current] = {}
            i += 2
            continue
        if current is not None:
            if line and not line[0].isspace():
                flush()
                head = line.split(" : ")[0]
                names = [n.strip() for n in head.split(",") if n.strip()]
                entry = []
            elif entry is not None:
                entry.append(line)
        i += 1
    flush()
    return out


# ---------------------------------------------------------------------------------------- the CLI
def _subparsers(parser: argparse.ArgumentParser) -> tuple[dict[str, argparse.ArgumentParser], dict[str, str]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return dict(action.choices), helps
    return {}, {}


def _usage(parser: argparse.ArgumentParser) -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "90"
    try:
        return parser.format_usage().strip()
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def _action_rows(parser: argparse.ArgumentParser) -> list[tuple[str, str, str]]:
    rows = []
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        if a.option_strings:
            flags = ", ".join(f"`{s}`" for s in a.option_strings)
            if a.nargs != 0:
                if a.metavar is None and a.choices is not None:
                    metavar = "{" + ",".join(map(str, a.choices)) + "}"
                else:
                    metavar = a.metavar or a.dest.upper()
                flags += f" `{metavar}`"
        else:
            flags = f"`{a.metavar or a.dest}`" + (" ..." if a.nargs in ("+", "*") else "")
        notes = []
        if a.choices is not None and a.metavar is not None:
            notes.append("one of " + ", ".join(f"`{c}`" for c in a.choices))
        if a.required and a.option_strings:
            notes.append("required")
        if isinstance(a, argparse._AppendAction):
            notes.append("repeatable")
        default = a.default
        if isinstance(default, bool) or default is None or default == argparse.SUPPRESS:
            default_text = ""
        else:
            default_text = f"`{default}`"
        help_ = (a.help or "").replace("%(default)s", str(default))
        if default_text:  # the default has its own column
            help_ = re.sub(rf"\s*\(default: {re.escape(str(default))}\)", "", help_)
        if "repeatable" in help_:
            notes = [n for n in notes if n != "repeatable"]
        desc = _escape_md(help_)
        if notes:
            desc = f"{desc} ({'; '.join(notes)})" if desc else "; ".join(notes).capitalize()
        rows.append((flags, default_text, desc))
    return rows


def cli_markdown() -> str:
    """The command reference: every subcommand of ``sfact`` with its options."""
    from sfact._cli import build_parser

    parser = build_parser()
    subs, helps = _subparsers(parser)
    out = [
        "<!-- generated by docs/_ext/sfact_docs.py from sfact._cli.build_parser(); do not edit -->",
        "",
        "```text",
        _usage(parser),
        "```",
        "",
        "| command | what it does |",
        "| --- | --- |",
    ]
    for name, _ in subs.items():
        out.append(f"| [`sfact {name}`](#cli-{name}) | {_escape_md(helps.get(name, ''))} |")
    out.append("")
    for name, sub in subs.items():
        out += [f"(cli-{name})=", f"### `sfact {name}`", ""]
        desc = sub.description or helps.get(name, "")
        if desc:
            desc = desc.strip()
            desc = desc[0].upper() + desc[1:] + ("" if desc.endswith(".") else ".")
            out += [_escape_md(desc), ""]
        out += ["```text", _usage(sub), "```", ""]
        out += ["| argument / option | default | meaning |", "| --- | --- | --- |"]
        for flags, default, desc in _action_rows(sub):
            out.append(f"| {flags} | {default} | {desc} |")
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------------- the config
def _type_text(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is Any:
        return "any"
    if origin is typing.Literal:
        return " / ".join(f"`{v}`" for v in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        parts = [_type_text(a) for a in args if a is not type(None)]
        if type(None) in args:
            parts.append("`null`")
        return " or ".join(parts)
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_text(arg)}"
    if origin is dict or tp is dict:
        return "mapping"
    if tp is type(None):
        return "`null`"
    return {float: "number", int: "integer", bool: "boolean", str: "string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _yaml_value(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, dict) and not value:
        return "`{}`"
    if isinstance(value, list | tuple) and not value:
        return "`[]`"
    return f"`{value}`"


def _resolver(*prefixes: str):
    """Qualify a cross-reference target by the first prefix under which it exists."""
    import importlib

    def exists(dotted: str) -> bool:
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            try:
                for p in parts[i:]:
                    obj = getattr(obj, p)
            except AttributeError:
                return False
            return True
        return False

    def resolve(target: str) -> str:
        tilde = target.startswith("~")
        t = target.lstrip("~")
        if "<" in t or (exists(t) and t.startswith("sfact")):
            return target
        for p in prefixes:
            if exists(f"{p}.{t}"):
                return f"{'~' if tilde else ''}{p}.{t}"
        return target

    return resolve


def _section_rows(cls: type, fallbacks: list[Any], resolve) -> list[tuple[str, str, str, str]]:
    hints = typing.get_type_hints(cls)
    docs: dict[str, str] = {}
    for source in [cls, *fallbacks]:
        secs = _sections(source.__doc__)
        for sec in ("Attributes", "Parameters"):
            for k, v in secs.get(sec, {}).items():
                docs.setdefault(k, v)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        desc = docs.get(f.name)
        if not desc:
            logger.warning(
                "sfact_docs: config key %s.%s has no description (add it to the docstring of %s)",
                cls.__name__,
                f.name,
                cls.__qualname__,
                type="sfact_docs",
            )
            desc = ""
        rows.append(
            (f"`{f.name}`", _type_text(hints[f.name]), _yaml_value(default), _rst_to_md(desc, resolve))
        )
    return rows


def config_markdown() -> str:
    """The config reference: every section and key with type, default and meaning."""
    import sfact.pipeline as pl
    from sfact.models import SpatialFactorization
    from sfact.pipeline import _config as cfgmod
    from sfact.pp import prepare
    from sfact.tl import select_model

    resolve = _resolver("sfact.pipeline", "sfact.models.SpatialFactorization", "sfact")
    sections = [
        ("dataset", pl.DatasetConfig, []),
        ("preprocessing", pl.PreprocessingConfig, [prepare]),
        ("model", pl.ModelConfig, [SpatialFactorization]),
        ("training", pl.TrainingConfig, [SpatialFactorization.train]),
        ("analysis", pl.AnalysisConfig, []),
        ("figures", pl.FiguresConfig, []),
        ("selection", pl.SelectionConfig, [select_model]),
    ]
    assert [s for s, *_ in sections] == list(cfgmod._SECTIONS), "sections out of step with the code"
    out = [
        "<!-- generated by docs/_ext/sfact_docs.py from sfact.pipeline's config dataclasses; do not edit -->",
        "",
        "Top-level keys:",
        "",
        "| key | type | default | meaning |",
        "| --- | --- | --- | --- |",
        "| `name` | string | the loader's name, or the `.h5ad` file's stem | Name of the data set in job "
        "names and outputs (letters, digits and `_.+-`). |",
        "| `base` | string | | Another config file (relative to this one) to start from; this file "
        "overrides it key by key. |",
        "| `dataset` | section | (required) | Where the counts come from: `loader` or `path`. |",
        "| `preprocessing`, `model`, `training`, `analysis`, `figures`, `selection` | section | | See below; "
        "every key "
        "is optional. |",
        "| `output_dir` | string | `outputs/<name>` | Folder of the outputs, relative to the config "
        "file's folder. |",
        "",
    ]
    for name, cls, fallbacks in sections:
        out += [f"({'config-' + name})=", f"### `{name}`", ""]
        summary = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0]
        out += [_rst_to_md(summary, resolve), ""]
        out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for key, tp, default, desc in _section_rows(cls, fallbacks, resolve):
            out.append(f"| {key} | {tp} | {default} | {desc} |")
        out.append("")
    return "\n".join(out)


# -------------------------------------------------------------------------------------- readers
def readers_markdown() -> str:
    """The table of :data:`sfact.datasets.READERS`: technology, spatialdata-io reader, files, defaults."""
    from sfact.datasets import READERS

    out = [
        "| technology | what is read | recognized by | spatialdata-io reader and sfact's defaults |",
        "| --- | --- | --- | --- |",
    ]
    for name, info in READERS.items():
        markers = ", ".join(f"`{m}`" for m in info.markers)
        defaults = ", ".join(f"`{k}={v!r}`" for k, v in info.defaults.items())
        call = f"`spatialdata_io.{info.function}`" + (f" with {defaults}" if defaults else "")
        out.append(f"| `{name}` | {info.description} | {markers} | {call} |")
    return "\n".join(out)


# --------------------------------------------------------------------------------------- sphinx
def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _generate(app) -> None:
    root = Path(app.srcdir) / INCLUDES
    _write(root / "cli_commands.md", cli_markdown() + "\n")
    _write(root / "config_reference.md", config_markdown() + "\n")
    _write(root / "readers.md", readers_markdown() + "\n")


def setup(app):
    """Register the generator."""
    app.connect("builder-inited", _generate)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
