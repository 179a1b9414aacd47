"""Docstrings of the public API: summary, Parameters, Returns (every slot written), Examples.

"Public" is everything in ``__all__`` of ``sfact.pp``, ``tl``, ``pl``, ``get``, ``models`` and
``datasets``, the public methods and properties of the exported classes, the prior config
dataclasses (``prior_kwargs``) and ``sfact.settings``. The docstrings are numpydoc; a small
section parser below reads them (numpydoc itself is not a dependency).

The functions that write into an AnnData must list every slot they write in ``Returns``;
``WRITES`` below says which, and :func:`test_documented_slots_are_the_written_ones` checks that
list against what the functions really write on a tiny fit, so neither can drift.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import re
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

import sfact

MODULES = ("pp", "tl", "pl", "get", "models", "datasets")
# not in any ``__all__`` but public through ``prior_kwargs``
EXTRA_CLASSES = (
    "sfact.models._config.PNMFConfig",
    "sfact.models._config.SVGPConfig",
    "sfact.models._config.LCGPConfig",
)

# ---------------------------------------------------------------------------------------------
# slots written into AnnData, as the Returns section spells them (after normalization: no
# backticks, single quotes, no leading ``adata``). ``{key}`` is ``key_added`` (or ``key``),
# ``{group}`` a group name.
FIT_SLOTS = (
    ".obsm['X_{key}']",
    ".obsm['X_{key}_scales']",
    ".varm['{key}_loadings']",
    ".obs['{key}_deviance']",
    ".var['{key}_deviance']",
    ".uns['{key}']",
    ".varm['{key}_loadings_{group}']",
)
GROUP_LOADINGS_SLOTS = (".varm['{key}_loadings_{group}']", ".uns['{key}']['group_loadings']")
WRITES: dict[str, tuple[str, ...]] = {
    "sfact.pp.prepare": (".obsm[scaled_key]", ".obs[group_key]", ".uns['sfact_prepare']"),
    "sfact.tl.fit": FIT_SLOTS,
    "sfact.tl.analyze": FIT_SLOTS,
    "sfact.tl.group_loadings": GROUP_LOADINGS_SLOTS,
    "sfact.tl.gene_enrichment": (".uns['{key}']['enrichment']", *GROUP_LOADINGS_SLOTS),
    "sfact.tl.groupwise_factors": (".obsm['X_{key}_groupwise']", ".uns['{key}']['groupwise_groups']"),
}


# ---------------------------------------------------------------------------------------------
# a small numpydoc parser
@dataclass
class Doc:
    summary: str
    sections: dict[str, str] = field(default_factory=dict)

    def names(self, *sections: str) -> list[str]:
        """Entry names of ``Parameters``-like sections (``a, b : type`` gives ``a`` and ``b``)."""
        out = []
        for sec in sections:
            for line in self.sections.get(sec, "").splitlines():
                if not line.strip() or line[0].isspace():
                    continue
                head = line.split(" : ")[0].strip()
                out += [n.strip() for n in head.split(",") if n.strip()]
        return out


_UNDERLINE = re.compile(r"^\s*-{3,}\s*$")


def parse(doc: str | None) -> Doc:
    text = inspect.cleandoc(doc or "")
    lines = text.splitlines()
    summary = []
    for line in lines:
        if not line.strip():
            break
        summary.append(line.strip())
    sections: dict[str, list[str]] = {}
    current = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if i + 1 < len(lines) and line.strip() and _UNDERLINE.match(lines[i + 1]):
            if len(lines[i + 1].strip()) == len(line.strip()):
                current = line.strip()
                sections[current] = []
                i += 2
                continue
        if current is not None:
            sections[current].append(line)
        i += 1
    return Doc(" ".join(summary), {k: textwrap.dedent("\n".join(v)).strip("\n") for k, v in sections.items()})


def normalize(text: str) -> str:
    """Returns text for slot lookup: no backticks, single quotes, ``adata.obsm`` -> ``.obsm``."""
    text = text.replace("`", "").replace('"', "'")
    return re.sub(r"\badata(?=\.(obsm|varm|obsp|uns|obs|var|layers|X)\b)", "", text)


# ---------------------------------------------------------------------------------------------
# what is public
@dataclass
class Item:
    name: str  # dotted name, e.g. ``sfact.tl.fit`` or ``sfact.models.SpatialFactorization.train``
    kind: str  # function, method, property, class, dataclass, exception, settings
    obj: Any
    owner: Any = None


def _public_items() -> Iterator[Item]:
    import importlib

    for mod_name in MODULES:
        mod = getattr(sfact, mod_name)
        for name in mod.__all__:
            obj = getattr(mod, name)
            dotted = f"sfact.{mod_name}.{name}"
            if inspect.isclass(obj):
                yield from _class_items(dotted, obj)
            elif callable(obj):
                yield Item(dotted, "function", obj)
            # data (e.g. the ``LOADERS`` dict) has no docstring of its own
    for path in EXTRA_CLASSES:
        mod_path, name = path.rsplit(".", 1)
        yield from _class_items(path, getattr(importlib.import_module(mod_path), name))
    yield Item("sfact.settings", "settings", type(sfact.settings))
    yield from _members("sfact.settings", type(sfact.settings))


def _class_items(dotted: str, cls: type) -> Iterator[Item]:
    if issubclass(cls, BaseException):
        yield Item(dotted, "exception", cls)
        return
    yield Item(dotted, "dataclass" if dataclasses.is_dataclass(cls) else "class", cls)
    yield from _members(dotted, cls)


def _members(dotted: str, cls: type) -> Iterator[Item]:
    # the class's own members and those of its sfact base classes (mixins)
    own: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if klass is cls or klass.__module__.startswith("sfact."):
            own.update(vars(klass))
    for name, attr in own.items():
        if name.startswith("_"):
            continue
        if isinstance(attr, property):
            yield Item(f"{dotted}.{name}", "property", attr, cls)
        elif isinstance(attr, classmethod | staticmethod):
            yield Item(f"{dotted}.{name}", "method", getattr(cls, name), cls)
        elif inspect.isfunction(attr):
            yield Item(f"{dotted}.{name}", "method", attr, cls)


ITEMS = list(_public_items())


# ---------------------------------------------------------------------------------------------
# the checks
def _signature_names(fn: Callable) -> list[str]:
    out = []
    for i, p in enumerate(inspect.signature(fn).parameters.values()):
        if i == 0 and p.name in ("self", "cls"):
            continue
        if p.kind is p.VAR_POSITIONAL:
            out.append(f"*{p.name}")
        elif p.kind is p.VAR_KEYWORD:
            out.append(f"**{p.name}")
        else:
            out.append(p.name)
    return out


def _check_parameters(
    doc: Doc, expected: list[str], problems: list[str], section: str = "Parameters"
) -> None:
    if not expected:
        if section in doc.sections and doc.names(section):
            problems.append(f"'{section}' lists {doc.names(section)} but the signature has no parameters")
        return
    if section not in doc.sections:
        problems.append(f"no '{section}' section (expected {expected})")
        return
    documented = doc.names(section)
    missing = [n for n in expected if n not in documented]
    extra = [n for n in documented if n not in expected]
    if missing:
        problems.append(f"parameters not documented: {missing}")
    if extra:
        problems.append(f"documented but not in the signature: {extra}")
    if not missing and not extra and documented != expected:
        problems.append(f"parameters documented out of order: {documented}, signature order {expected}")


def _returns_none(fn: Callable) -> bool:
    ann = inspect.signature(fn).return_annotation
    return ann is None or ann == "None"


def _check_function(item: Item, problems: list[str]) -> None:
    fn = item.obj
    doc = parse(fn.__doc__)
    _check_parameters(doc, _signature_names(fn), problems)
    ret = doc.sections.get("Returns") or doc.sections.get("Yields")
    if _returns_none(fn):
        if ret is not None:
            problems.append("'Returns' section on a function annotated to return None")
    elif not ret:
        problems.append("no 'Returns' section")
    else:
        params = inspect.signature(fn).parameters
        norm = normalize(ret)
        if "copy" in params and not ("copy" in norm and "None" in norm):
            problems.append("'Returns' must say it returns None, or a copy when copy=True")
        if "return_fig" in params and not ("figure" in norm.lower() and "None" in norm):
            problems.append("'Returns' must say it returns the Figure with return_fig=True, else None")
        for slot in WRITES.get(item.name, ()):
            if slot not in norm:
                problems.append(f"'Returns' does not list the slot {slot}")
    _check_examples(doc, problems)


def _check_examples(doc: Doc, problems: list[str]) -> None:
    if ">>>" not in doc.sections.get("Examples", ""):
        problems.append("no 'Examples' section with a '>>>' line")


def _check_class(item: Item, problems: list[str]) -> None:
    cls = item.obj
    doc = parse(cls.__doc__)
    if item.kind == "dataclass":
        fields = [f.name for f in dataclasses.fields(cls)]
        documented = set(doc.names("Parameters", "Attributes")) | _attribute_docstrings(cls)
        missing = [f for f in fields if f not in documented]
        if missing:
            problems.append(
                f"fields not documented (Parameters, Attributes or attribute docstrings): {missing}"
            )
    elif item.kind == "class":
        _check_parameters(doc, _signature_names(cls.__init__), problems)
    elif item.kind == "settings":
        public = [k for k in vars(sfact.settings) if not k.startswith("_")]
        public += [k for k, v in vars(cls).items() if isinstance(v, property)]
        missing = [k for k in public if k not in doc.names("Attributes")]
        if missing:
            problems.append(f"settings not documented under 'Attributes': {missing}")
    _check_examples(doc, problems)


def _attribute_docstrings(cls: type) -> set[str]:
    """Fields followed by a string literal in the class body (Sphinx's attribute docstrings)."""
    import ast

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    out = set()
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            out.add(node.target.id)
    return out


@pytest.mark.parametrize("item", ITEMS, ids=[i.name for i in ITEMS])
def test_docstring(item: Item):
    problems: list[str] = []
    obj = item.obj.fget if item.kind == "property" else item.obj
    doc = parse(getattr(obj, "__doc__", None) if item.kind != "class" else item.obj.__doc__)
    if not doc.summary:
        problems.append("no summary line")
    elif not doc.summary.rstrip().endswith((".", ":")):
        problems.append(f"summary does not end with a period: {doc.summary!r}")
    if item.kind in ("function", "method"):
        _check_function(item, problems)
    elif item.kind in ("class", "dataclass", "settings", "exception"):
        _check_class(item, problems)
    assert not problems, f"{item.name}:\n  - " + "\n  - ".join(problems)


def test_collects_the_public_api():
    names = {i.name for i in ITEMS}
    assert {
        "sfact.pp.prepare",
        "sfact.tl.fit",
        "sfact.pl.factors",
        "sfact.get.factors_df",
        "sfact.datasets.osmfish",
        "sfact.models.SpatialFactorization",
        "sfact.models.SpatialFactorization.train",
        "sfact.models.SpatialFactorization.load",
        "sfact.models.SpatialFactorization.history",
        "sfact.models.TrainingError",
        "sfact.datasets.LoaderInfo",
        "sfact.models._config.SVGPConfig",
        "sfact.settings",
        "sfact.settings.device",
    } <= names
    assert set(WRITES) <= names


# ---------------------------------------------------------------------------------------------
# the documented slots against the written ones
def _snapshot(adata) -> dict[str, Any]:
    snap: dict[str, Any] = {}
    for attr in ("obsm", "varm"):
        for k, v in getattr(adata, attr).items():
            snap[f".{attr}['{k}']"] = v
    for attr in ("obs", "var"):
        for k in getattr(adata, attr).columns:
            snap[f".{attr}['{k}']"] = getattr(adata, attr)[k].to_numpy().copy()
    for k, v in adata.uns.items():
        snap[f".uns['{k}']"] = v
        if isinstance(v, dict):
            for k2, v2 in v.items():
                snap[f".uns['{k}']['{k2}']"] = v2
    return snap


def _written(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    out = set()
    for k, v in after.items():
        if k not in before:
            out.add(k)
        elif (
            isinstance(v, np.ndarray)
            and isinstance(before[k], np.ndarray)
            and k.startswith((".obs[", ".var["))
        ):
            if v.shape != before[k].shape or not np.array_equal(v.astype(str), before[k].astype(str)):
                out.add(k)
        elif v is not before[k] and not k.startswith((".obs[", ".var[")):
            out.add(k)
    # a nested entry is covered by its parent when the parent itself was replaced
    return {k for k in out if not any(k != p and k.startswith(p) and p in out for p in out)}


def _documented_patterns(name: str, subs: dict[str, str]) -> list[re.Pattern]:
    pats = []
    for slot in WRITES[name]:
        pat = re.escape(slot)
        for src, dst in subs.items():
            pat = pat.replace(re.escape(src), dst)
        pats.append(re.compile(pat + "$"))
    return pats


# written with values equal to the old ones here, so the snapshot cannot see them
NOT_DETECTED = {("sfact.pp.prepare", ".obs[group_key]")}


@pytest.mark.slow
def test_documented_slots_are_the_written_ones():
    """Run every AnnData-writing function on tiny data; each slot it writes must be in WRITES."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        adata = sfact.datasets.simulate(n_obs=120, n_vars=15, n_factors=2, n_groups=2, random_state=0)
        subs = {"{key}": "sfact", "{group}": "[^']+", "scaled_key": "'spatial_sfact'", "group_key": "'group'"}
        calls: list[tuple[str, Callable[[], Any]]] = [
            ("sfact.pp.prepare", lambda: sfact.pp.prepare(adata, group_key="group")),
            (
                "sfact.tl.fit",
                lambda: sfact.tl.fit(
                    adata, prior="mggp_svgp", n_factors=2, max_iter=5, prior_kwargs={"num_inducing": 20}
                ),
            ),
        ]
        seen: dict[str, set[str]] = {}
        for name, call in calls:
            before = _snapshot(adata)
            call()
            seen[name] = _written(before, _snapshot(adata))
        model = sfact.models.SpatialFactorization(
            adata, prior="mggp_svgp", n_factors=2, prior_kwargs={"num_inducing": 20}
        ).train(max_iter=7, progress_bar=False)  # not the fit's: analyze must change every slot
        for name, call in [
            ("sfact.tl.analyze", lambda: sfact.tl.analyze(adata, model, group_key="group")),
            ("sfact.tl.groupwise_factors", lambda: sfact.tl.groupwise_factors(adata, model)),
            ("sfact.tl.group_loadings", lambda: sfact.tl.group_loadings(adata, group_key="group")),
            ("sfact.tl.gene_enrichment", lambda: sfact.tl.gene_enrichment(adata, group_key="group")),
        ]:
            before = _snapshot(adata)
            call()
            seen[name] = _written(before, _snapshot(adata))
        # gene_enrichment runs group_loadings itself when there are none: drop them first
        info = adata.uns["sfact"].pop("group_loadings")
        for k in info["varm_keys"]:
            del adata.varm[str(k)]
        before = _snapshot(adata)
        sfact.tl.gene_enrichment(adata, group_key="group")
        seen["sfact.tl.gene_enrichment"] |= _written(before, _snapshot(adata))
    finally:
        torch.set_num_threads(threads)
    problems = []
    for name, slots in seen.items():
        pats = _documented_patterns(name, subs)
        assert slots, f"{name} wrote nothing?"
        undocumented = sorted(s for s in slots if not any(p.match(s) for p in pats))
        if undocumented:
            problems.append(f"{name} writes {undocumented}, not in WRITES (nor, so, in its Returns)")
        unseen = [
            slot
            for slot, p in zip(WRITES[name], pats, strict=True)
            if not any(p.match(s) for s in slots) and (name, slot) not in NOT_DETECTED
        ]
        if unseen:
            problems.append(f"{name}: WRITES lists {unseen}, which this run did not write")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# the examples themselves: every ``>>>`` line not marked ``# doctest: +SKIP`` runs and must print
# what the docstring says
def _modules() -> list[str]:
    import pkgutil

    names = ["sfact"]
    for info in pkgutil.walk_packages(sfact.__path__, prefix="sfact."):
        if info.name.split(".")[-1] in ("__main__", "conftest"):
            continue
        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("module", _modules())
def test_docstring_examples_run(module):
    import doctest
    import importlib

    mod = importlib.import_module(module)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    problems: list[str] = []
    for test in finder.find(mod, module):  # globals: a copy of the module's
        runner.run(test, out=problems.append)
    assert runner.failures == 0, "".join(problems)


# ---------------------------------------------------------------------------------------------
# the shared docstring fragments of ``sfact.pl``
def test_pl_docstrings_are_filled():
    """Every plot's docstring has its fragments filled in: no whole-line ``{name}`` is left."""
    for name in sfact.pl.__all__:
        doc = getattr(sfact.pl, name).__doc__
        left = [line.strip() for line in doc.splitlines() if re.fullmatch(r"\s*\{\w+\}\s*", line)]
        assert not left, f"sfact.pl.{name}: unfilled {left}"
        assert "The fit's ``key_added``." in doc or name in ("inducing_points", "model_selection")


def test_fill_doc_indents_and_leaves_other_braces():
    from sfact.pl._docs import fill_doc

    doc = "Summary.\n\n    Parameters\n    ----------\n    {key}\n    x\n        In ``uns['{key}']``.\n"
    out = fill_doc(doc, {"key": "key\n    The key."})
    assert (
        out
        == "Summary.\n\n    Parameters\n    ----------\n    key\n        The key.\n    x\n        In ``uns['{key}']``.\n"
    )
    with pytest.raises(KeyError, match="nope"):
        fill_doc("    {nope}\n", {})
