"""``import sfact`` stays cheap: heavy dependencies load only inside the functions that need them."""

from __future__ import annotations

import subprocess
import sys

HEAVY = {"torch", "squidpy", "seaborn", "pynndescent", "sklearn", "numba"}


def _imported_modules() -> set[str]:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import sfact"],
        capture_output=True,
        text=True,
        check=True,
    )
    names = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name and name != "imported package":  # skip the header line
                names.add(name)
    return names


def test_import_is_cheap():
    modules = _imported_modules()
    assert "sfact" in modules  # the parse works
    top_level = {name.split(".")[0] for name in modules}
    loaded = sorted(HEAVY & top_level)
    assert not loaded, f"`import sfact` imports {loaded}; import them inside the functions that need them."
