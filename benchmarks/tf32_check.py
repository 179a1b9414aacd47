"""Does TF32 change held-out accuracy? The four spatial priors, FP32 vs TF32 matmuls, side by side.

The held-out protocol of ``bench_spatial.py`` (5% of cells held out with ``default_rng(0)``,
L = 10, default settings of the device) on osmFISH and the Visium prostate pair; each fit twice
on the same device, with ``torch.backends.cuda.matmul.allow_tf32`` off and on (and, for the SVGP
priors, ``matmul_precision="highest"`` and ``"high"``: the SVGP kernel and solves stay FP32 in both
since that option exists, see "Reduced precision" in the performance docs). Prints one markdown
table. On a CPU TF32 does nothing (the two columns must then agree exactly).

    python benchmarks/tf32_check.py --device cuda
"""

from __future__ import annotations

import argparse
import time
import warnings

PRIORS = ("svgp", "mggp_svgp", "lcgp", "mggp_lcgp")
DATA = {"osmFISH": ("osmfish", "ClusterName"), "prostate": ("visium_prostate", "list_ID")}


def _fit(train, test, prior, group_key, device, tf32, max_iter):
    import torch

    import sfact

    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    kw = {"group_key": group_key} if prior.startswith("mggp") else {}
    if "svgp" in prior:
        kw["prior_kwargs"] = {"matmul_precision": "high" if tf32 else "highest"}
    t0 = time.perf_counter()
    model = sfact.models.SpatialFactorization(
        train, prior=prior, n_factors=10, device=device, random_state=0, **kw
    )
    model.train(max_iter=max_iter, progress_bar=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    fit_s = time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dev = sfact.tl.heldout_deviance(model, test)
    return dev, fit_s, len(model.history)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--data", nargs="*", default=list(DATA))
    p.add_argument("--priors", nargs="*", default=list(PRIORS))
    args = p.parse_args()
    import sfact

    print("| data | prior | FP32 held-out | TF32 held-out | rel. diff | FP32 s / iters | TF32 s / iters |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label in args.data:
        loader, group_key = DATA[label]
        adata = getattr(sfact.datasets, loader)()
        sfact.pp.prepare(adata, group_key=group_key, min_group_size=1)
        train, test = sfact.tl.heldout_split(adata, fraction=0.05, random_state=0)
        for prior in args.priors:
            d32, s32, n32 = _fit(train, test, prior, group_key, args.device, False, args.max_iter)
            dtf, stf, ntf = _fit(train, test, prior, group_key, args.device, True, args.max_iter)
            print(
                f"| {label} | {prior} | {d32:.4f} | {dtf:.4f} | {(dtf - d32) / d32:+.3%} | "
                f"{s32:.1f} / {n32} | {stf:.1f} / {ntf} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
