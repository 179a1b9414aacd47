"""Does TF32 change held-out accuracy? FP32 against TF32 emulated on the CPU, side by side.

No GPU is needed: TF32 is emulated by rounding both inputs of a product to 10 explicit mantissa
bits (round to nearest even) and multiplying in FP32 (``sfact._core.precision.round_to_tf32``),
which is what tensor cores compute up to the order of the FP32 accumulation. Three columns per
fit, everything else equal (same data, split, seed, settings):

``FP32``
    ``prior_kwargs["matmul_precision"] = "highest"`` (the default).
``TF32 at the SVGP sites``
    ``matmul_precision="tf32-emulated"``: the products that ``matmul_precision="high"`` runs on
    TF32 tensor cores on CUDA (``L_zz⁻¹K_zx`` with the variational mean and covariance, and their
    gradients), emulated. The ``lcgp`` prior has no such product: its columns equal FP32 by
    construction and are not refitted.
``TF32 at the SVGP sites, truncated``
    the same with the dropped bits cut off (round toward zero) instead of rounded, in case the
    hardware truncates: a bias of half a TF32 unit on average instead of none.
``TF32 everywhere``
    every dense float32 matrix product of the process emulated at TF32, forward and backward (a
    ``TorchDispatchMode`` rounding the inputs of ``mm``, ``bmm``, ``addmm``, ``baddbmm`` and of the
    matrix product inside ``torch.cdist``), i.e. what ``torch.backends.cuda.matmul.allow_tf32 =
    True`` does on a GPU, except inside the triangular solves and Cholesky factorizations. It is
    the setting whose real-GPU cost ``benchmarks/tf32_check.py`` measured on an H200, so it checks
    the emulation against hardware.

Protocol of ``bench_spatial.py``: ``sfact.pp.prepare``, 5% of the cells held out with
``sfact.tl.heldout_split(fraction=0.05, random_state=0)`` (``numpy.random.default_rng(0)``), L = 10,
``random_state=0``, library defaults (``tol=1e-4``) capped at ``--max-iter`` iterations; the metric
is ``sfact.tl.heldout_deviance`` (mean Poisson deviance per held-out entry); ``rel. diff`` =
(TF32 − FP32) / FP32. Every fit runs in its own process with one torch thread, ``--jobs`` at a time.

    .venv/bin/python benchmarks/bench_precision.py --jobs 2             # ~30 min on 2 shared cores
    .venv/bin/python benchmarks/bench_precision.py --cases osmfish:svgp --max-iter 100
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

N_FACTORS = 10
SEED = 0
HELDOUT_FRACTION = 0.05
DATA = {
    "osmfish": ("osmFISH", "osmfish", "ClusterName"),
    "prostate": ("prostate", "visium_prostate", "list_ID"),
}
# prior label -> (prior, prior_kwargs); "svgp" runs the CPU defaults (diagonal S, M = 1000),
# "svgp-full" the full S of the GPU default, with fewer inducing points so it runs on a CPU
PRIORS = {
    "svgp": ("svgp", {}),
    "svgp-full": ("svgp", {"diagonal_only": False, "num_inducing": 300}),
    "mggp_svgp": ("mggp_svgp", {}),
    "lcgp": ("lcgp", {}),
}
CASES = (
    "osmfish:svgp",
    "osmfish:svgp-full",
    "osmfish:mggp_svgp",
    "osmfish:lcgp",
    "prostate:svgp",
    "prostate:svgp-full",
    "prostate:mggp_svgp",
    "prostate:lcgp",
)
# "sites-rz": the SVGP sites with the inputs truncated (rounded toward zero) instead of rounded to
# nearest, as tensor cores that drop the 13 bits would
MODES = ("fp32", "sites", "sites-rz", "everywhere")
# not run by default: TF32 only in the matrix product inside torch.cdist (the kernel's distances)
EXTRA_MODES = ("distances",)


# ============================================================================ TF32 everywhere
def truncate_to_tf32(x):
    """Like ``round_to_tf32`` but toward zero: the 13 dropped bits are cut off."""
    import torch

    if x.dtype != torch.float32:
        raise TypeError(f"`truncate_to_tf32` takes a float32 tensor, received {x.dtype}.")
    r = x.view(torch.int32) & -(1 << 13)
    return torch.where(torch.isnan(x), x, r.view(torch.float32))


def tf32_everywhere(only_distances: bool = False):
    """A ``TorchDispatchMode`` that emulates TF32 in every dense float32 matrix product.

    The inputs of ``mm``/``bmm`` (both), ``addmm``/``baddbmm`` (the two multiplied ones) are
    rounded to TF32; ``torch.cdist``'s matrix-product path (``_euclidean_dist``, taken for more
    than 25 points) is recomputed as torch computes it, ``‖x‖² + ‖y‖² − 2xᵀy`` from a product of
    rounded ``[−2x, ‖x‖², 1]`` and ``[y, 1, ‖y‖²]``. Dispatch-level, so the gradient products of
    the backward pass are rounded too. Sparse products pass unchanged (cuSPARSE has no TF32).
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from sfact._core.precision import round_to_tf32

    aten = torch.ops.aten

    def rnd(t):
        if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.layout == torch.strided:
            return round_to_tf32(t)
        return t

    def euclidean(x1, x2):
        x1n = x1.pow(2).sum(-1, keepdim=True)
        x2n = x2.pow(2).sum(-1, keepdim=True)
        a = torch.cat([x1.mul(-2), x1n, torch.ones_like(x1n)], -1)
        b = torch.cat([x2, torch.ones_like(x2n), x2n], -1)
        return torch.matmul(rnd(a), rnd(b).mT).clamp_min_(0).sqrt_()

    class TF32Everywhere(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            packet = getattr(func, "overloadpacket", None)
            if only_distances and packet is not aten._euclidean_dist:
                return func(*args, **kwargs)
            if packet in (aten.mm, aten.bmm):
                args = (rnd(args[0]), rnd(args[1]), *args[2:])
            elif packet in (aten.addmm, aten.baddbmm):
                args = (args[0], rnd(args[1]), rnd(args[2]), *args[3:])
            elif packet is aten._euclidean_dist and args[0].dtype == torch.float32:
                return euclidean(args[0], args[1])
            return func(*args, **kwargs)

    return TF32Everywhere()


# ============================================================================ one fit (child)
def fit(data: str, label: str, mode: str, max_iter: int) -> dict:
    """One fit in this process (one torch thread); held-out deviance, iterations and time."""
    import contextlib
    import warnings

    import torch

    import sfact

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # capped fits need not converge
    _, loader, group_key = DATA[data]
    adata = getattr(sfact.datasets, loader)()
    sfact.pp.prepare(adata, group_key=group_key, min_group_size=1)
    train, test = sfact.tl.heldout_split(adata, fraction=HELDOUT_FRACTION, random_state=SEED)
    prior, pkw = PRIORS[label]
    pkw = dict(pkw)
    if "svgp" in prior:
        pkw["matmul_precision"] = "tf32-emulated" if mode.startswith("sites") else "highest"
    if mode == "sites-rz":
        import sfact._core.precision as precision

        precision.round_to_tf32 = truncate_to_tf32  # this process only
    scope = contextlib.nullcontext()
    if mode in ("everywhere", "distances"):
        scope = tf32_everywhere(only_distances=mode == "distances")
    t0 = time.perf_counter()
    with scope:
        model = sfact.models.SpatialFactorization(
            train,
            prior=prior,
            n_factors=N_FACTORS,
            group_key=group_key if prior.startswith("mggp") else None,
            prior_kwargs=pkw or None,
            device="cpu",
            random_state=SEED,
        )
        model.train(max_iter=max_iter, progress_bar=False)
        fit_s = time.perf_counter() - t0
        dev = float(sfact.tl.heldout_deviance(model, test))
    info = model.gp_info()
    return {
        "data": data,
        "prior": label,
        "mode": mode,
        "heldout": dev,
        "iters": len(model.history),
        "converged": bool(model.converged),
        "fit_s": fit_s,
        "settings": (
            f"K={info['n_neighbors']}" if info.get("n_neighbors") else f"M={info.get('num_inducing')}"
        )
        + (", diagonal" if info.get("diagonal_only") else ", full"),
    }


def _fit_star(job):
    return fit(*job)


# ============================================================================ table
def table(results: list[dict], cases: list[str]) -> str:
    by = {(r["data"], r["prior"], r["mode"]): r for r in results}
    present = {r["mode"] for r in results}
    modes = [m for m in ("sites", "sites-rz", "everywhere", "distances") if m in present]
    heads = {
        "sites": "TF32 at the SVGP sites",
        "sites-rz": "TF32 at the SVGP sites, truncated",
        "everywhere": "TF32 everywhere",
        "distances": "TF32 in cdist only",
    }
    lines = [
        "| data | prior | settings | FP32 held-out | "
        + " | ".join(f"{heads[m]} | rel. diff" for m in modes)
        + f" | iters FP32 / {' / '.join(modes)} |",
        "|---|---|---|---:|" + "---:|---:|" * len(modes) + "---|",
    ]
    for case in cases:
        data, label = case.split(":")
        base = by.get((data, label, "fp32"))
        if base is None:
            continue
        cells = [DATA[data][0], label, base["settings"], f"{base['heldout']:.4f}"]
        iters = [f"{base['iters']}{'' if base['converged'] else '*'}"]
        for mode in modes:
            r = by.get((data, label, mode))
            if r is None and mode.startswith("sites") and PRIORS[label][0].endswith("lcgp"):
                cells += ["= FP32 (no such product)", "0"]
                iters.append("-")
                continue
            if r is None:
                cells += ["", ""]
                iters.append("")
                continue
            rel = 100 * (r["heldout"] - base["heldout"]) / base["heldout"]
            cells += [f"{r['heldout']:.4f}", f"{rel:+.3f}%"]
            iters.append(f"{r['iters']}{'' if r['converged'] else '*'}")
        cells.append(" / ".join(iters))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="*", default=list(CASES), help="data:prior, e.g. osmfish:svgp")
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES + EXTRA_MODES)
    p.add_argument("--max-iter", type=int, default=300)
    p.add_argument("--jobs", type=int, default=1, help="fits at a time (one thread each)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args()
    for case in args.cases:
        data, _, label = case.partition(":")
        if data not in DATA or label not in PRIORS:
            p.error(f"unknown case {case!r}: data in {list(DATA)}, priors in {list(PRIORS)}")
    jobs = []
    for case in args.cases:
        data, label = case.split(":")
        for mode in args.modes:
            if mode.startswith("sites") and PRIORS[label][0].endswith("lcgp"):
                continue  # no product at reduced precision: identical to FP32
            jobs.append((data, label, mode, args.max_iter))
    t0 = time.perf_counter()
    results = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for r in pool.map(_fit_star, jobs):
            results.append(r)
            print(
                f"  {r['data']} {r['prior']} {r['mode']}: held-out {r['heldout']:.5f}, {r['iters']} iters, "
                f"{r['fit_s']:.0f} s",
                flush=True,
            )
    print()
    print(table(results, args.cases))
    print(
        f"\n{platform.processor() or platform.machine()}, {args.jobs} job(s) of one thread, "
        f"--max-iter {args.max_iter} (* = stopped at the cap), {time.perf_counter() - t0:.0f} s"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
