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
