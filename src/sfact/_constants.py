"""sfact's vocabulary in one place: names of priors, modes, kernels, allocations, devices.

Torch-free and import-free (only the standard library), so every layer — ``pp``, ``tl``,
``pl``, ``models``, ``pipeline``, ``_core`` — can import it without cycles or cost.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "ALLOCATIONS",
    "ELBO_MODES",
    "GP_PRIORS",
    "KERNELS",
    "LOADINGS_MODES",
    "NEIGHBOR_METHODS",
    "NEIGHBOR_SELECTIONS",
    "PRIOR_NAMES",
    "Allocation",
    "ElboMode",
    "KernelName",
    "LoadingsMode",
    "PriorName",
    "check_choice",
    "check_device",
    "is_gpu",
    "is_multigroup",
    "prior_family",
]

PriorName = Literal["pnmf", "svgp", "mggp_svgp", "lcgp", "mggp_lcgp"]
ElboMode = Literal["lower-bound", "expanded", "simple"]
LoadingsMode = Literal["multiplicative", "projected"]
KernelName = Literal["matern32", "rbf"]
Allocation = Literal["proportional", "equal", "derived"]

#: Every prior, in the order the docs and the pipeline list them.
PRIOR_NAMES: tuple[str, ...] = ("pnmf", "svgp", "mggp_svgp", "lcgp", "mggp_lcgp")
#: The Gaussian-process (spatial) priors.
GP_PRIORS: tuple[str, ...] = ("svgp", "mggp_svgp", "lcgp", "mggp_lcgp")
ELBO_MODES: tuple[str, ...] = ("lower-bound", "expanded", "simple")
LOADINGS_MODES: tuple[str, ...] = ("multiplicative", "projected")
KERNELS: tuple[str, ...] = ("matern32", "rbf")
ALLOCATIONS: tuple[str, ...] = ("proportional", "equal", "derived")
#: How the LCGP priors search for neighbours, and which ones they keep.
NEIGHBOR_METHODS: tuple[str, ...] = ("auto", "exact", "pynndescent")
NEIGHBOR_SELECTIONS: tuple[str, ...] = ("auto", "spatial", "correlation")


def is_multigroup(prior: str) -> bool:
    """Whether ``prior`` uses the multi-group kernel (``mggp_*``)."""
    return prior.startswith("mggp_")


def prior_family(prior: str) -> str:
    """``"pnmf"``, ``"svgp"`` or ``"lcgp"``: the prior without its multi-group prefix."""
    return prior.removeprefix("mggp_")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise :class:`ValueError` naming the argument when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, received {value!r}.")


def check_device(value: object) -> None:
    """Raise :class:`ValueError` unless ``value`` is ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    A syntax check only (no torch); :func:`sfact._utils.resolve_device` also checks that CUDA
    is there when asked for.
    """
    ok = isinstance(value, str) and (
        value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())
    )
    if not ok:
        raise ValueError(f"`device` must be 'auto', 'cpu', 'cuda' or 'cuda:N', received {value!r}.")


def is_gpu(device: str | None) -> bool:
    """Whether a (resolved or requested) device string names a GPU."""
    return bool(device) and str(device).startswith("cuda")
