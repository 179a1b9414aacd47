from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MPLBACKEND", "Agg")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One torch thread for the whole suite: the data are tiny, and spinning threads crawl on shared cores."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _close_figures():
    """Every figure a test opened is closed after it (when it imported pyplot at all)."""
    yield
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close("all")


@pytest.fixture(scope="module")
def no_progress_bar():
    """``sfact.settings.progress_bar`` off for a module (``pytestmark = pytest.mark.usefixtures(...)``)."""
    import sfact

    old = sfact.settings.progress_bar
    sfact.settings.progress_bar = False
    yield
    sfact.settings.progress_bar = old


@pytest.fixture(scope="session")
def osmfish_pnmf_fit(tmp_path_factory):
    """osmFISH (cell types as groups) fitted once with pnmf, 4 factors, 30 iterations: (adata, model dir).

    Shared by the analysis and getter tests; take ``adata.copy()`` before changing it.
    """
    import sfact

    adata = sfact.datasets.osmfish()
    sfact.pp.prepare(adata, group_key="ClusterName")
    model_dir = tmp_path_factory.mktemp("osmfish_pnmf") / "model"
    # trained on all cells (no validation cells), so the saved model loads with the whole AnnData
    sfact.tl.fit(
        adata,
        prior="pnmf",
        n_factors=4,
        max_iter=30,
        save_model=model_dir,
        validation_fraction=0,
        progress_bar=False,
    )
    return adata, model_dir


@pytest.fixture(autouse=True)
def _quiet_sfact():
    import sfact

    old = sfact.settings.progress_bar
    sfact.settings.progress_bar = False
    yield
    sfact.settings.progress_bar = old


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
