"""Sphinx configuration of the sfact documentation.

Build (from the repository root)::

    make docs        # fresh .venv-docs with the `docs` extra, then the nitpicky -W build below
    sphinx-build -W -n --keep-going -b html docs docs/_build/html

Intersphinx links to Python, NumPy, pandas, AnnData, ... need the network at build time, so
they are on only on Read the Docs (``READTHEDOCS=True``) or with ``SFACT_DOCS_INTERSPHINX=1``.
Without them, references to third-party types cannot resolve; ``nitpick_ignore_regex`` below
lists those packages (and only those: a broken reference to sfact's own API always fails the
build).
"""

from __future__ import annotations

import os
import sys
import warnings
from datetime import date
from pathlib import Path

# sphinx-autodoc-typehints calls an API Sphinx 10 removes; the message says nothing about our docs
warnings.filterwarnings("ignore", message=".*set_application.*", category=DeprecationWarning)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "_ext"))  # local extensions
# the package itself is installed (`pip install -e ".[docs]"`); fall back to the source tree
try:
    import sfact
except ImportError:  # pragma: no cover - only without an installed sfact
    sys.path.insert(0, str(ROOT / "src"))
    import sfact

# -- project -------------------------------------------------------------------------------------
project = "sfact"
author = "sfact developers"
copyright = f"{date.today().year}, {author}"
version = release = sfact.__version__

ON_RTD = os.environ.get("READTHEDOCS", "").lower() == "true"
USE_INTERSPHINX = ON_RTD or os.environ.get("SFACT_DOCS_INTERSPHINX", "") not in ("", "0")

# -- general -------------------------------------------------------------------------------------
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_autodoc_typehints",  # after napoleon
    "sphinx_copybutton",
    "sfact_docs",  # docs/_ext/sfact_docs.py: CLI and config reference pages from the code
]
if USE_INTERSPHINX:
    extensions.append("sphinx.ext.intersphinx")

templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "generated/includes",  # written by sfact_docs, included by cli.md
    "tutorials/_outputs",  # files the tutorial notebooks write
    "**.ipynb_checkpoints",
    "Thumbs.db",
    ".DS_Store",
]
# ".rst" first: autosummary writes its stubs (docs/generated/) with the first suffix
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = root_doc = "index"
default_role = "literal"  # `x` in docstrings is code, as in the markdown pages
nitpicky = True
pygments_style = "default"

# -- MyST / myst-nb ------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist", "attrs_inline"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # tutorial notebooks are committed with their outputs
nb_merge_streams = True

# -- autodoc / autosummary / napoleon ------------------------------------------------------------
autosummary_generate = True  # stubs go to docs/generated/ (git-ignored, rewritten every build)
autosummary_imported_members = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"  # types live in the signatures (STYLE.md 17)
autodoc_preserve_defaults = True
autoclass_content = "class"

napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False
napoleon_use_param = True
napoleon_use_ivar = True  # `Attributes` sections as fields: no duplicate attribute objects
napoleon_preprocess_types = False
# sfact's `Returns` sections are prose plus a definition list of the AnnData slots written
# (scanpy style), not `name : type` entries: render them as written.
napoleon_custom_sections = ["Returns"]
# escape a trailing underscore in field names (``history_``), which rST reads as a link
strip_signature_backslash = True

typehints_document_rtype = True
typehints_use_rtype = False
typehints_defaults = None
always_use_bars_union = True
typehints_fully_qualified = False
simplify_optional_unions = True

# -- references ----------------------------------------------------------------------------------
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable", None),
    "scipy": ("https://docs.scipy.org/doc/scipy", None),
    "pandas": ("https://pandas.pydata.org/docs", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable", None),
    "squidpy": ("https://squidpy.readthedocs.io/en/stable", None),
    "matplotlib": ("https://matplotlib.org/stable", None),
    "torch": ("https://docs.pytorch.org/docs/stable", None),
}

# Third-party names that cannot resolve without intersphinx (and that intersphinx inventories
# may lack). Never add sfact's own names here: a broken sfact reference must fail the build.
_THIRD_PARTY = (
    "anndata",
    "numpy",
    "np",
    "pandas",
    "pd",
    "scipy",
    "sp",
    "torch",
    "matplotlib",
    "mpl",
    "plt",
    "scanpy",
    "sc",
    "squidpy",
    "sq",
    "seaborn",
    "sklearn",
    "pynndescent",
    "dask",
    "distributed",
    "rich",
    "tqdm",
    "yaml",
    "pathlib",
    "os",
    "collections",
    "collections\\.abc",
    "typing",
    "types",
    "argparse",
    "concurrent",
    "concurrent\\.futures",
    "multiprocessing",
    "subprocess",
    "logging",
    "datetime",
    "io",
    "builtins",
)
_BARE = (
    # names as they appear in annotations when they come from third-party or the stdlib
    "AnnData",
    "ArrayLike",
    "NDArray",
    "DataFrame",
    "Series",
    "Index",
    "Categorical",
    "Figure",
    "Axes",
    "Colormap",
    "Normalize",
    "Tensor",
    "Module",
    "Generator",
    "RandomState",
    "spmatrix",
    "sparray",
    "csr_matrix",
    "csr_array",
    "Path",
    "PathLike",
    "Callable",
    "Iterable",
    "Iterator",
    "Mapping",
    "MutableMapping",
    "Sequence",
    "Hashable",
    "Literal",
    "Any",
    "TextIO",
    "Namespace",
    "ArgumentParser",
    "Client",
    "Future",
    "Console",
)
nitpick_ignore_regex = [
    *[(r"py:.*", rf"{p}(\..*)?") for p in _THIRD_PARTY],
    *[(r"py:.*", rf"{n}(\[.*\])?") for n in _BARE],
    # Python builtins and literal values as they appear in type descriptions
    (r"py:.*", r"(int|float|str|bool|bytes|dict|list|tuple|set|frozenset|object|type|None|complex|slice)"),
    (r"py:.*", r"(Ellipsis|NoneType|True|False|\.\.\.)"),
    # numpy-style shape / array-like phrases in type descriptions
    (r"py:.*", r"array[-_ ]like"),
]

# -- HTML ----------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"sfact {release}"
html_static_path: list[str] = []
_repo = os.environ.get("SFACT_DOCS_REPO_URL") or os.environ.get("READTHEDOCS_GIT_CLONE_URL", "")
_repo = _repo.removesuffix(".git")
if _repo.startswith("git@github.com:"):
    _repo = "https://github.com/" + _repo.removeprefix("git@github.com:")
html_theme_options: dict = {
    "path_to_docs": "docs",
    "repository_branch": os.environ.get("READTHEDOCS_GIT_IDENTIFIER", "main") if ON_RTD else "main",
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
if _repo.startswith("http"):
    html_theme_options.update(
        repository_url=_repo, use_repository_button=True, use_edit_page_button=True, use_issues_button=True
    )
html_context = {"default_mode": "light"}

# -- copybutton ----------------------------------------------------------------------------------
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True


# -- dataclass fields ----------------------------------------------------------------------------
# The prior options (``PNMFConfig``, ...) and ``LoaderInfo`` are dataclasses: their fields are
# the constructor's parameters. They are described in the class docstring's ``Attributes``
# section (numpydoc) or by attribute docstrings; render them once, as the class's
# ``Parameters`` (with the types from the annotations and the defaults in the signature), and
# leave them out of the attribute tables of the class template (``dataclass_fields`` below).
def _numpydoc_section(lines: list[str], title: str) -> tuple[int, int] | None:
    """Line range ``[start, end)`` of a numpydoc section, its header and underline included."""
    for i in range(len(lines) - 1):
        if lines[i].strip() == title and set(lines[i + 1].strip()) == {"-"}:
            end = i + 2
            while end < len(lines):
                nxt = lines[end + 1].strip() if end + 1 < len(lines) else ""
                if lines[end].strip() and not lines[end][0].isspace() and nxt and set(nxt) == {"-"}:
                    break
                end += 1
            return i, end
    return None


def _section_entries(lines: list[str]) -> dict[str, list[str]]:
    """``{name: description lines}`` of a ``Parameters``-like section body."""
    out: dict[str, list[str]] = {}
    names: list[str] = []
    for line in lines:
        if line.strip() and not line[0].isspace():
            names = [n.strip() for n in line.split(" : ")[0].split(",") if n.strip()]
            for n in names:
                out[n] = []
        elif names:
            for n in names:
                out[n].append(line)
    return {k: [ln.strip() for ln in v if ln.strip()] for k, v in out.items()}


def _dataclass_fields() -> dict[str, list[str]]:
    """``{dotted name: field names}`` of the dataclasses the API pages show (for the templates)."""
    import dataclasses
    import importlib

    out: dict[str, list[str]] = {}
    for mod_name in (
        "sfact.pp",
        "sfact.tl",
        "sfact.pl",
        "sfact.get",
        "sfact.models",
        "sfact.datasets",
        "sfact.models._config",
        "sfact._settings",
    ):
        mod = importlib.import_module(mod_name)
        for name in getattr(mod, "__all__", None) or dir(mod):
            obj = getattr(mod, name, None)
            if isinstance(obj, type) and dataclasses.is_dataclass(obj):
                out[f"{mod_name}.{name}"] = [f.name for f in dataclasses.fields(obj)]
    return out


def _dataclass_parameters(app, what, name, obj, options, lines):
    import dataclasses

    from sphinx.pycode import ModuleAnalyzer

    if what != "class" or not dataclasses.is_dataclass(obj):
        return
    fields = [f.name for f in dataclasses.fields(obj)]
    docs: dict[str, list[str]] = {}
    span = _numpydoc_section(lines, "Attributes")
    if span is not None:
        docs = _section_entries(lines[span[0] + 2 : span[1]])
        if not set(docs) <= set(fields):
            return  # not (only) the fields: leave the docstring as it is
        del lines[span[0] : span[1]]
    try:
        attr_docs = ModuleAnalyzer.for_module(obj.__module__).find_attr_docs()
    except Exception:  # pragma: no cover - source not available
        attr_docs = {}
    section = ["Parameters", "----------"]
    for f in fields:
        desc = docs.get(f) or [ln.strip() for ln in attr_docs.get((obj.__qualname__, f), []) if ln.strip()]
        section += [f, *(f"    {ln}" for ln in desc)]
    section.append("")
    at = next((i for i, ln in enumerate(lines) if ln.strip() == "Examples"), len(lines))
    lines[at:at] = section


autosummary_context = {"dataclass_fields": _dataclass_fields()}


def setup(app):
    # before napoleon (priority 500) turns the numpydoc sections into fields
    app.connect("autodoc-process-docstring", _dataclass_parameters, priority=400)
    # sphinx-autodoc-typehints puts a ":" under every numpydoc "Returns" header so napoleon
    # reads no type from it; with "Returns" rendered as written (above) the ":" would show.
    from sphinx_autodoc_typehints.patches import napoleon_numpy_docstring_return_type_processor as colon

    for listener in list(app.events.listeners.get("autodoc-process-docstring", [])):
        if listener.handler is colon:
            app.disconnect(listener.id)
