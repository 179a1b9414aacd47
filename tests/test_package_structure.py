"""The package's shape, checked: API conventions, layer boundaries, no import cycles.

In the spirit of scanpy's ``tests/test_package_structure.py``.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import sfact

SRC = Path(sfact.__file__).resolve().parent
REPO = SRC.parents[1]
PUBLIC_MODULES = ("pp", "tl", "pl", "get", "datasets")


def _public_functions():
    for modname in PUBLIC_MODULES:
        mod = getattr(sfact, modname)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if callable(obj) and not inspect.isclass(obj):
                yield f"sfact.{modname}.{name}", obj


def _public_methods():
    from sfact.models import SpatialFactorization

    for name, obj in vars(SpatialFactorization).items():
        if name.startswith("_"):
            continue
        func = obj.__func__ if isinstance(obj, classmethod | staticmethod) else obj
        if inspect.isfunction(func):
            yield f"SpatialFactorization.{name}", func


def _n_positional(func) -> int:
    params = inspect.signature(func).parameters.values()
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


@pytest.mark.parametrize(
    ("name", "func"), list(_public_functions()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_public_functions_take_at_most_three_positional_arguments(name, func):
    assert _n_positional(func) <= 3, (
        f"{name} takes more than 3 positional arguments: make the rest keyword-only."
    )


@pytest.mark.parametrize(
    ("name", "func"), list(_public_methods()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_public_methods_take_at_most_three_positional_arguments(name, func):
    # `self`/`cls` plus at most 3
    assert _n_positional(func) <= 4, (
        f"{name} takes more than 3 positional arguments: make the rest keyword-only."
    )


# a model's private state is read only by the model package and the torch core (and their
# white-box tests, which live in tests/models and tests/core)
_PRIVATE_MODEL_ACCESS = re.compile(r"\._setup\b|\._size_factors\b|\._check_vars\b|\.module\.prior\.")
_ALLOWED = (SRC / "models", SRC / "_core", REPO / "tests" / "models", REPO / "tests" / "core")


def _python_files_outside_model_layers():
    roots = [SRC, REPO / "benchmarks", REPO / "tests", REPO / "docs"]
    for root in roots:
        if not root.exists():
            continue
        for path in root.rglob("*.py"):
            if any(path.is_relative_to(a) for a in _ALLOWED) or path == Path(__file__).resolve():
                continue
            yield path


def test_no_private_model_access_outside_models_and_core():
    offenders = []
    for path in _python_files_outside_model_layers():
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _PRIVATE_MODEL_ACCESS.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
    assert not offenders, "private model attributes used outside sfact.models/_core:\n" + "\n".join(offenders)


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join(parts), is_pkg


def _import_graph() -> dict[str, set[str]]:
    """Module -> the sfact modules it imports anywhere (lazy, function-level imports included;
    imports under ``if TYPE_CHECKING:`` excluded, they never run)."""
    modules = {_module_name(p)[0]: p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        _, is_pkg = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for sub in node.body:
                    typing_only.update(id(n) for n in ast.walk(sub))
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("sfact"):
                    continue
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    deps.add(candidate if candidate in modules else target)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = _import_graph()
    assert "sfact.models" in graph and graph["sfact"]  # the parse found the package
    cycles = _cycles(graph)
    assert not cycles, "import cycles among sfact modules (lazy imports included): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


# ---------------------------------------------------------------------------- keyword convention
# As in scanpy: functions that write into `adata` name the slots with `key_added`; functions that
# only read a fit name it with `key`. The lists are explicit, so a new public function must be
# classified here; `test_every_tl_and_pl_function_is_classified` fails until it is.
_WRITERS = {
    "sfact.tl.fit",
    "sfact.tl.analyze",
    "sfact.tl.group_loadings",
    "sfact.tl.gene_enrichment",
    "sfact.tl.groupwise_factors",
    "sfact.tl.select_model",
}
_READERS_PREFIXES = ("sfact.pl.", "sfact.get.")  # every plot and getter reads a fit
_READERS = {"sfact.tl.morans_i"}
# neither: take arrays or models and return values, never reading or writing a fit by key
_NEITHER = {
    "sfact.tl.baseline_deviance",
    "sfact.tl.heldout_deviance",
    "sfact.tl.heldout_split",
    "sfact.tl.knn_deviance",
}


def _keyword_functions():
    return [(n, f) for n, f in _public_functions() if n.startswith(("sfact.tl.", "sfact.pl.", "sfact.get."))]


def _role(name: str) -> str | None:
    if name in _WRITERS:
        return "writer"
    if name in _READERS or name.startswith(_READERS_PREFIXES):
        return "reader"
    if name in _NEITHER:
        return "neither"
    return None


def test_every_tl_and_pl_function_is_classified():
    names = {n for n, _ in _keyword_functions()}
    unclassified = sorted(n for n in names if _role(n) is None)
    assert not unclassified, f"classify {unclassified} in _WRITERS, _READERS or _NEITHER"
    stale = sorted((_WRITERS | _READERS | _NEITHER) - names)
    assert not stale, f"{stale} are no public functions any more: remove them from the lists"


@pytest.mark.parametrize(
    ("name", "func"), _keyword_functions(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_writers_take_key_added_and_readers_key(name, func):
    params = inspect.signature(func).parameters  # follows __wrapped__: deprecated names hidden
    role = _role(name)
    if role == "writer":
        assert "key_added" in params, f"{name} writes into adata: it must take `key_added`"
        assert "key" not in params, f"{name} writes into adata: `key` is for readers, use `key_added`"
        assert params["key_added"].kind is inspect.Parameter.KEYWORD_ONLY
    elif role == "reader":
        assert "key" in params, f"{name} reads a fit: it must take `key`"
        assert "key_added" not in params, f"{name} only reads: `key_added` is for writers, use `key`"
        assert params["key"].kind is inspect.Parameter.KEYWORD_ONLY
    else:
        assert "key" not in params and "key_added" not in params, f"{name}: classify it as writer or reader"


def test_the_convention_check_sees_a_violation():
    def writes(adata, *, key="sfact"):  # a writer with the reader's keyword
        return None

    params = inspect.signature(writes).parameters
    assert "key" in params and "key_added" not in params  # what the test above refuses for writers

    from sfact.tl._compat import renamed_kwarg

    @renamed_kwarg("key", "key_added")
    def renamed(adata, *, key_added="sfact"):
        return key_added

    assert list(inspect.signature(renamed).parameters) == ["adata", "key_added"]  # the old name is hidden
    with pytest.warns(FutureWarning, match="`key=` .* is renamed `key_added=`"):
        assert renamed(None, key="mine") == "mine"
