"""One-shot GPU check of sfact: GPU tests, scale runs and GPU-vs-CPU accuracy, as one markdown table.

Meant for a rented GPU machine with a strict time budget: the whole run is capped (``--total-budget``,
default 400 s) and every section runs in its own subprocess under its own hard time cap (plus soft
caps inside it), so one failing or slow section never loses the others. Sections:

``tests``     ``pytest -m gpu -q`` on the test files that carry the ``gpu`` marker.
``slideseq``  Slide-seq-sized ``mggp_svgp`` (N=42,000 x D=17,000, ~2% non-zero, 14 groups, M=3000,
              L=10, batches of 7,000 cells, the device defaults: full S on a GPU) in FP32
              (``prior_kwargs["matmul_precision"] = "highest"``), then with the defaults (``"auto"``:
              TF32 for the SVGP products on CUDA; the kernel and solves stay FP32).
``million``   ``svgp`` on 10^6 simulated cells x 500 genes (~10 M non-zeros) until convergence or a cap.
``lcgp``      ``lcgp`` with K=50 neighbours on 3*10^5 simulated cells.
``real``      osmFISH and Visium prostate, the four spatial priors, on the GPU and on the CPU, with the
              held-out protocol of ``bench_spatial.py``.
``tf32``      CUDA only: held-out deviance of osmFISH ``svgp`` (GPU defaults, same seed and iteration
              cap) with ``matmul_precision`` "highest" (FP32) and "high" (real TF32 for the SVGP
              products), relative to FP32 (``--tf32-modes`` adds "tf32-emulated", TF32 emulated
              in FP32, to check the emulation of ``benchmarks/bench_precision.py`` against hardware).

Run from the repository root::

    python benchmarks/gpu_check.py --out results_dir            # on the GPU machine
    python benchmarks/gpu_check.py --small --device cpu         # ~50x smaller smoke run on a CPU

The table is printed at the end (each row also as soon as its section ends) and written to
``OUT/gpu_check.md`` and ``OUT/gpu_check.json`` after every section; the sections' own output goes
to ``OUT/gpu_check.log``. See ``benchmarks/gpu_check_device.md`` for the device command.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECTIONS = ("tests", "slideseq", "million", "lcgp", "real", "tf32")
LABELS = {name: f"{i + 1} {name}" for i, name in enumerate(SECTIONS)}
# hard wall-clock caps (s) per section, child start-up included; the sum stays under 8 minutes
BUDGETS = {"tests": 35.0, "slideseq": 65.0, "million": 70.0, "lcgp": 85.0, "real": 145.0, "tf32": 75.0}
SMALL_BUDGETS = {"tests": 40.0, "slideseq": 30.0, "million": 30.0, "lcgp": 30.0, "real": 75.0, "tf32": 20.0}
TOTAL_BUDGET = 475.0
SOFT = 0.85  # a section plans its work to end by this fraction of its hard cap
N_FACTORS = 10
SEED = 0

# sizes: (full run, --small); --small shrinks every size ~50x so the script runs on a CPU
SIZES = {
    # Slide-seqV2-sized case of benchmarks/bench_scale.py
    "slideseq": (
        {
            "n_obs": 42_000,
            "n_vars": 17_000,
            "n_groups": 14,
            "density": 0.02,
            "num_inducing": 3000,
            "batch_size": 7000,
            "iters": 4,
        },
        {
            "n_obs": 1000,
            "n_vars": 400,
            "n_groups": 14,
            "density": 0.02,
            "num_inducing": 100,
            "batch_size": 200,
            "iters": 3,
        },
    ),
    "million": (
        {
            "n_obs": 1_000_000,
            "n_vars": 500,
            "n_groups": 1,
            "density": 0.02,
            "num_inducing": None,
            "batch_size": 50_000,
        },
        {
            "n_obs": 20_000,
            "n_vars": 100,
            "n_groups": 1,
            "density": 0.02,
            "num_inducing": 100,
            "batch_size": 1000,
        },
    ),
    "lcgp": (
        {
            "n_obs": 300_000,
            "n_vars": 500,
            "n_groups": 1,
            "density": 0.02,
            "n_neighbors": 50,
            "batch_size": 50_000,
            "iters": 3,
        },
        {
            "n_obs": 6000,
            "n_vars": 100,
            "n_groups": 1,
            "density": 0.02,
            "n_neighbors": 50,
            "batch_size": 1000,
            "iters": 2,
        },
    ),
    "real": ({"max_iter": 1000}, {"max_iter": 15}),
    # the same iteration cap for every precision, so that the deviances compare
    "tf32": ({"max_iter": 400}, {"max_iter": 15}),
}
TF32_LABELS = {
    "highest": "FP32",
    "high": "TF32 at the SVGP products",
    "tf32-emulated": "TF32 emulated in FP32",
}
REAL_DATASETS = {
    "osmfish": {"label": "osmFISH", "group_key": "ClusterName", "file": "osmfish_codeluppi2018.h5ad"},
    "prostate": {"label": "Visium prostate", "group_key": "list_ID", "file": "visium_prostate_2samples.h5ad"},
}
REAL_PRIORS = ("svgp", "mggp_svgp", "lcgp", "mggp_lcgp")
HELDOUT_FRACTION = 0.05
COLUMNS = [
    ("section", "section"),
    ("case", "case"),
    ("device", "device"),
    ("setup_s", "set-up s"),
    ("s_iter", "s/iter"),
    ("s_step", "s/step"),
    ("iters", "iters"),
    ("peak", "peak mem GiB"),
    ("time_s", "time s"),
    ("result", "result"),
]


# ============================================================================ helpers (both sides)
def _fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return "nan"
        return format(v, spec)
    return str(v)


def _pair(a, b, spec: str = ".3g") -> str:
    return f"{_fmt(a, spec)} / {_fmt(b, spec)}"


def one_line(err: BaseException | str, limit: int = 300) -> str:
    text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def row_line(r: dict) -> str:
    cells = [str(r.get(k, "") if r.get(k) is not None else "").replace("|", "/") for k, _ in COLUMNS]
    return "| " + " | ".join(cells) + " |"


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(h for _, h in COLUMNS) + " |"
    sep = (
        "|" + "|".join("---" if i < 3 or k == "result" else "---:" for i, (k, _) in enumerate(COLUMNS)) + "|"
    )
    return "\n".join([head, sep, *(row_line(r) for r in rows)])


def relative_change(values, window: int = 5) -> float:
    """The training loop's convergence statistic: relative change of the window means, per iteration."""
    if len(values) < 2 * window:
        return float("inf")
    old = sum(values[-2 * window : -window]) / window
    new = sum(values[-window:]) / window
    return abs(new - old) / max(abs(old), 1e-300) / window


# ============================================================================ child side
class Child:
    """State of one section's subprocess: rows written to a JSON file after every change."""

    def __init__(self, args, out_path: Path):
        self.args = args
        self.out_path = out_path
        self.rows: list[dict] = []
        self.t0 = time.perf_counter()
        self.hard = float(args.child_budget)
        self.soft_end = self.t0 + SOFT * self.hard
        import torch

        self.torch = torch
        self.device = args.device
        self.cuda = self.device.startswith("cuda")
        threads = args.threads or _n_cpus()
        torch.set_num_threads(threads)
        self.threads = threads

    def left(self) -> float:
        """Seconds left until the soft end of this section."""
        return self.soft_end - time.perf_counter()

    def hard_left(self) -> float:
        """Seconds left until the parent kills this section."""
        return self.t0 + self.hard - time.perf_counter()

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self.flush()
        return row

    def flush(self) -> None:
        tmp = self.out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rows, default=str))
        os.replace(tmp, self.out_path)

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> str:
        if self.cuda:
            self.torch.cuda.synchronize()
            return f"{self.torch.cuda.max_memory_allocated() / 2**30:.2f}"
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return f"{rss:.2f} (RSS)"


def _n_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def simulate_sparse(
    n_obs, n_vars, *, n_factors=N_FACTORS, n_groups=1, density=0.02, lengthscale=15.0, seed=SEED
):
    """Poisson counts with smooth spatial factors, drawn in O(non-zeros) (not O(N·D)).

    ``λ_nd = s_n Σ_l W_dl exp(F_nl)`` with ``F`` smooth random fields over [0, 100]² (random
    Fourier features of an RBF GP, ``lengthscale``), a per-group offset of each factor, log-normal
    size factors ``s`` and gamma loadings ``W`` scaled so that the expected fraction of non-zero
    entries is ``density``. By Poisson superposition and thinning, cell ``n`` draws
    ``T_nl ~ Poisson(s_n exp(F_nl) Σ_d W_dl)`` counts from factor ``l`` and spreads them over the
    genes with probabilities ``W_dl / Σ_d W_dl``; the result has exactly the Poisson law above.
    ``sfact.datasets.simulate`` draws a dense N x D Poisson matrix instead, too slow at 10^6 cells.
    """
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    N, D, L = int(n_obs), int(n_vars), int(n_factors)
    coords = rng.uniform(0.0, 100.0, size=(N, 2))
    R = 128

    def fields(k: int, ls: float) -> np.ndarray:
        omega = rng.standard_normal((2, R)) / ls
        phase = rng.uniform(0.0, 2.0 * np.pi, size=R)
        amp = rng.standard_normal((R, k)) * np.sqrt(2.0 / R)
        out = np.empty((N, k))
        for a in range(0, N, 100_000):
            b = min(a + 100_000, N)
            out[a:b] = np.cos(coords[a:b] @ omega + phase) @ amp
        return out

    log_f = fields(L, lengthscale)
    if n_groups > 1:
        logits = fields(n_groups, 2.0 * lengthscale) + rng.gumbel(size=(N, n_groups))
        groups = logits.argmax(1)
        log_f += 0.5 * rng.standard_normal((n_groups, L))[groups]
    else:
        groups = np.zeros(N, dtype=np.int64)
    F = np.exp(log_f)
    W = 0.02 * rng.gamma(1.0, 1.0, size=(D, L))
    W[np.arange(D), rng.permutation(np.arange(D) % L)] += rng.gamma(4.0, 0.25, size=D)
    W *= np.exp(rng.normal(0.0, 0.5, size=(D, 1)))
    s = np.exp(rng.normal(-0.045, 0.3, size=N))
    rows = rng.choice(N, size=min(N, 400), replace=False)
    lam = s[rows, None] * (F[rows] @ W.T)
    lo, hi = -30.0, 30.0
    for _ in range(50):  # bisection on log c: mean(1 - exp(-c λ)) = density
        mid = 0.5 * (lo + hi)
        if float(-np.expm1(-np.exp(mid) * lam).mean()) < density:
            lo = mid
        else:
            hi = mid
    W *= np.exp(0.5 * (lo + hi))
    w = W.sum(0)
    T = rng.poisson(s[:, None] * F * w[None, :])  # (N, L) counts per cell and factor
    r_parts, c_parts = [], []
    for k in range(L):
        t = T[:, k]
        r_parts.append(np.repeat(np.arange(N, dtype=np.int32), t))
        c_parts.append(rng.choice(D, size=int(t.sum()), p=W[:, k] / w[k]).astype(np.int32))
    r, c = np.concatenate(r_parts), np.concatenate(c_parts)
    del r_parts, c_parts
    X = sp.csr_matrix((np.ones(r.size, dtype=np.float32), (r, c)), shape=(N, D))
    X.sum_duplicates()
    obs = pd.DataFrame(
        {"group": pd.Categorical.from_codes(groups, categories=[f"g{g}" for g in range(max(n_groups, 1))])},
        index=pd.Index([f"cell_{i}" for i in range(N)]),
    )
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index([f"gene_{j}" for j in range(D)])))
    adata.obsm["spatial"] = coords
    return adata


def _case_text(adata, extra: str = "") -> str:
    N, D = adata.n_obs, adata.n_vars
    return f"{N:,} x {D:,}, {adata.X.nnz / 1e6:.3g} M nnz ({100 * adata.X.nnz / (N * D):.2g}%){extra}"


def _s_kind(model) -> str:
    diag = model.gp_info().get("diagonal_only")
    return "?" if diag is None else "diagonal" if diag else "full"


def _timed_setup(ch: Child, adata, prior: str, **kw):
    """Construct the model and run ``train(max_iter=0)`` (data to the device, inducing points / neighbours,
    KL-NMF initialization, optimizer); returns ``(model, seconds)``."""
    import sfact

    batch_size = kw.pop("batch_size", None)
    ch.sync()
    t = time.perf_counter()
    model = sfact.models.SpatialFactorization(
        adata, prior=prior, n_factors=N_FACTORS, device=ch.device, random_state=SEED, **kw
    )
    model.train(max_iter=0, batch_size=batch_size, progress_bar=False)
    ch.sync()
    return model, time.perf_counter() - t


def _timed_iters(ch: Child, model, *, n_iter: int, batch_size, min_per_iter: float | None = None) -> dict:
    """One warm-up iteration, then up to ``n_iter`` timed ones (fewer when the soft budget is short).

    s/iter is the mean difference of the per-iteration time stamps of the timed call (every
    iteration ends with a host read of its ELBO, so the stamps are synchronized), which leaves out
    the call's own set-up (the random blocks of cells are rebuilt at every ``train`` call).
    """
    ch.sync()
    t = time.perf_counter()
    model.train(max_iter=1, batch_size=batch_size, min_iter=10**9, progress_bar=False)
    ch.sync()
    warm = time.perf_counter() - t
    per = max(warm, min_per_iter or 0.0)
    k = int(max(1, min(n_iter, (ch.left() - 2.0) // max(per * 1.15, 1e-6))))
    if ch.left() < per * 1.2:
        return {"warmup_s": warm, "timed": 0, "s_iter": warm, "note": "warm-up only (budget)"}
    n0 = len(model.history)
    ch.sync()
    t = time.perf_counter()
    model.train(max_iter=k + 1, batch_size=batch_size, min_iter=10**9, progress_bar=False)
    ch.sync()
    wall = time.perf_counter() - t
    stamps = model.history["time"].to_numpy()[n0 - 1 :]
    diffs = [float(b - a) for a, b in itertools.pairwise(stamps[1:])]  # after the call's first
    s_iter = sum(diffs) / len(diffs) if diffs else wall / (k + 1)
    return {"warmup_s": warm, "timed": k + 1, "s_iter": s_iter, "call_s": wall, "diffs": diffs}


def section_slideseq(ch: Child) -> None:
    cfg = dict(SIZES["slideseq"][1 if ch.args.small else 0])
    t = time.perf_counter()
    adata = simulate_sparse(cfg["n_obs"], cfg["n_vars"], n_groups=cfg["n_groups"], density=cfg["density"])
    import sfact

    sfact.pp.prepare(adata, group_key="group")
    sim_s = time.perf_counter() - t
    print(f"slideseq: simulated {_case_text(adata)} in {sim_s:.1f} s", flush=True)
    steps = math.ceil(adata.n_obs / cfg["batch_size"])
    torch = ch.torch
    runs = (
        ("highest", "FP32 (matmul_precision='highest')"),
        ("auto", "defaults (matmul_precision='auto': TF32 for the SVGP products)"),
    )
    for prec, label in runs:
        row = ch.add(
            {
                "section": "2 slideseq",
                "case": f"mggp_svgp {_case_text(adata)}, 14 groups, M={cfg['num_inducing']}, L=10, "
                f"batch {cfg['batch_size']} ({steps} steps/iter), {label}",
                "device": ch.device,
            }
        )
        try:
            if ch.hard_left() < 10:
                raise TimeoutError(f"skipped: {ch.hard_left():.0f} s left before the section's hard cap")
            row["result"] = f"set-up running (data simulated in {sim_s:.1f} s)"
            ch.flush()
            ch.reset_peak()
            model, setup_s = _timed_setup(
                ch,
                adata,
                "mggp_svgp",
                group_key="group",
                prior_kwargs={
                    "num_inducing": cfg["num_inducing"],
                    "diagonal_only": None,
                    "matmul_precision": prec,
                },
                batch_size=cfg["batch_size"],
            )
            row["setup_s"] = _fmt(setup_s)
            ch.flush()
            res = _timed_iters(ch, model, n_iter=cfg["iters"], batch_size=cfg["batch_size"])
            diag = model.gp_info().get("diagonal_only")
            row.update(
                s_iter=_fmt(res["s_iter"]),
                s_step=_fmt(res["s_iter"] / steps),
                iters=f"1+{res['timed']}" if res["timed"] else "1",
                peak=ch.peak(),
                time_s=_fmt(setup_s + res["warmup_s"] + res.get("call_s", 0.0)),
                result=f"{'diagonal' if diag else 'full' if diag is not None else '?'} S; warm-up iter "
                f"{res['warmup_s']:.3g} s; ELBO {model.history['elbo'].iloc[-1]:.5g}"
                + (f"; {res['note']}" if "note" in res else "")
                + (f"; data simulated in {sim_s:.1f} s" if prec == "highest" else "")
                + ("; TF32 has no effect on a CPU" if prec != "highest" and not ch.cuda else ""),
            )
            del model
        except Exception as err:
            row["result"] = f"FAILED: {one_line(err)}"
            traceback.print_exc()
        finally:
            if ch.cuda:
                torch.cuda.empty_cache()
            ch.flush()


def pkw_text(ch: Child, cfg: dict) -> dict:
    pkw = {} if cfg["num_inducing"] is None else {"num_inducing": cfg["num_inducing"]}
    pkw.update(json.loads(ch.args.million_kwargs or "{}"))
    return pkw


def _simulated_case(ch: Child, name: str):
    """The simulated one-group case of section ``name``: (config, prepared AnnData, seconds, steps per pass)."""
    import sfact

    cfg = dict(SIZES[name][1 if ch.args.small else 0])
    t = time.perf_counter()
    adata = simulate_sparse(cfg["n_obs"], cfg["n_vars"], n_groups=1, density=cfg["density"])
    sfact.pp.prepare(adata)
    sim_s = time.perf_counter() - t
    print(f"{name}: simulated {_case_text(adata)} in {sim_s:.1f} s", flush=True)
    return cfg, adata, sim_s, math.ceil(adata.n_obs / cfg["batch_size"])


def section_million(ch: Child) -> None:
    cfg, adata, sim_s, steps = _simulated_case(ch, "million")
    row = ch.add(
        {
            "section": "3 million",
            "case": f"svgp {_case_text(adata)}, L=10, batch {cfg['batch_size']:,} ({steps} steps/iter), "
            f"tol 1e-4, prior_kwargs {json.dumps(pkw_text(ch, cfg))}",
            "device": ch.device,
        }
    )
    row["result"] = f"set-up running (data simulated in {sim_s:.1f} s)"
    ch.flush()
    ch.reset_peak()
    pkw = pkw_text(ch, cfg)
    model, setup_s = _timed_setup(ch, adata, "svgp", batch_size=cfg["batch_size"], prior_kwargs=pkw or None)
    row["setup_s"] = _fmt(setup_s)
    row["result"] = f"set-up done; training (data simulated in {sim_s:.1f} s)"
    ch.flush()
    # train in chunks until converged or out of budget; min_iter=20 over the whole run, as one call
    t_train = time.perf_counter()
    per_iter = None
    while True:
        done = len(model.history)
        left = ch.left()
        if per_iter is None:
            chunk = 1
        else:
            chunk = int(max(0, min(10, (left - 1.0) // max(per_iter * 1.1, 1e-6))))
        if chunk < 1:
            break
        model.train(
            max_iter=chunk, batch_size=cfg["batch_size"], min_iter=max(0, 20 - done), progress_bar=False
        )
        stamps = model.history["time"].to_numpy()
        if len(stamps) >= 2:  # mean per-iteration time after the first (warm-up) iteration
            per_iter = float((stamps[-1] - stamps[0]) / (len(stamps) - 1))
        else:
            per_iter = time.perf_counter() - t_train
        elbo = model.history["elbo"].to_list()
        row.update(
            iters=str(len(elbo)),
            s_iter=_fmt(per_iter),
            s_step=_fmt(per_iter / steps),
            time_s=_fmt(setup_s + time.perf_counter() - t_train),
            peak=ch.peak(),
        )
        if model.converged:
            break
        row["result"] = f"training ... ELBO {elbo[0]:.5g} -> {elbo[-1]:.5g}"
        ch.flush()
    ch.sync()
    train_s = time.perf_counter() - t_train
    elbo = model.history["elbo"].to_list()
    head = f"converged in {train_s:.0f} s" if model.converged else f"not converged in {train_s:.0f} s"
    trend = ", ".join(f"{elbo[i]:.5g}" for i in sorted({0, len(elbo) // 4, len(elbo) // 2, len(elbo) - 1}))
    row.update(
        time_s=_fmt(setup_s + train_s),
        result=f"{head} ({len(elbo)} iters); ELBO/entry {trend}; last rel. change {relative_change(elbo):.2g} "
        f"(tol 1e-4); M={model.gp_info().get('num_inducing')}, {_s_kind(model)} S; data simulated in {sim_s:.1f} s",
    )
    ch.flush()


def section_lcgp(ch: Child) -> None:
    cfg, adata, sim_s, steps = _simulated_case(ch, "lcgp")
    row = ch.add(
        {
            "section": "4 lcgp",
            "case": f"lcgp {_case_text(adata)}, K={cfg['n_neighbors']}, L=10, batch {cfg['batch_size']:,} "
            f"({steps} steps/iter)",
            "device": ch.device,
        }
    )
    row["result"] = f"set-up running (data simulated in {sim_s:.1f} s)"
    ch.flush()
    ch.reset_peak()
    model, setup_s = _timed_setup(
        ch, adata, "lcgp", prior_kwargs={"n_neighbors": cfg["n_neighbors"]}, batch_size=cfg["batch_size"]
    )
    row["setup_s"] = _fmt(setup_s)
    ch.flush()
    res = _timed_iters(ch, model, n_iter=cfg["iters"], batch_size=cfg["batch_size"])
    diag = model.gp_info().get("diagonal_only")
    row.update(
        s_iter=_fmt(res["s_iter"]),
        s_step=_fmt(res["s_iter"] / steps),
        iters=f"1+{res['timed']}" if res["timed"] else "1",
        peak=ch.peak(),
        time_s=_fmt(setup_s + res["warmup_s"] + res.get("call_s", 0.0)),
        result=f"{'diagonal' if diag else 'full' if diag is not None else '?'} posterior; warm-up iter "
        f"{res['warmup_s']:.3g} s; ELBO {model.history['elbo'].iloc[-1]:.5g}"
        + (f"; {res['note']}" if "note" in res else "")
        + f"; data simulated in {sim_s:.1f} s",
    )
    ch.flush()


def load_real(name: str, data_dir: str | None):
    """Load, prepare and split a real data set with the protocol of ``bench_spatial.py``."""
    import sfact

    spec = REAL_DATASETS[name]
    path = Path(data_dir) / spec["file"] if data_dir and name == "prostate" else None
    if path is not None and path.is_file():  # the same file sfact.datasets.visium_prostate() reads
        import anndata as ad

        adata = ad.read_h5ad(path)
        source = f"read from {path}"
    else:
        adata = sfact.datasets.osmfish() if name == "osmfish" else sfact.datasets.visium_prostate()
        source = "bundled with sfact"
    sfact.pp.prepare(adata, group_key=spec["group_key"], min_group_size=1)
    train, test = sfact.tl.heldout_split(adata, fraction=HELDOUT_FRACTION, random_state=SEED)
    return train, test, source


def _fit_real(
    ch: Child,
    train,
    test,
    prior: str,
    group_key: str,
    device: str,
    max_iter: int,
    cap: float,
    extra_kwargs: dict | None = None,
) -> dict:
    """Fit with the library defaults (``tol=1e-4``, ``min_iter=20``) in chunks, until converged,
    ``max_iter`` iterations or ``cap`` seconds; held-out deviance with ``sfact.tl.heldout_deviance``.
    ``extra_kwargs``: more ``prior_kwargs``."""
    import sfact

    torch = ch.torch
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    pkw = None
    if ch.args.real_settings == "cpu":  # the CPU defaults on both devices
        pkw = (
            {"diagonal_only": True}
            if prior.endswith("lcgp")
            else {"num_inducing": 1000, "diagonal_only": True}
        )
    if extra_kwargs:
        pkw = {**(pkw or {}), **extra_kwargs}
    model = sfact.models.SpatialFactorization(
        train,
        prior=prior,
        n_factors=N_FACTORS,
        size_factors="total",
        group_key=group_key if prior.startswith("mggp") else None,
        prior_kwargs=pkw,
        device=device,
        random_state=SEED,
    )
    model.train(max_iter=0, progress_bar=False)
    setup_s = time.perf_counter() - t
    end = t + cap
    while len(model.history) < max_iter:
        done = len(model.history)
        stamps = model.history["time"].to_numpy()
        per = float(stamps[-1] / len(stamps)) if len(stamps) else None
        left = end - time.perf_counter()
        chunk = 5 if per is None else int(min(100, max(1, left // max(per * 1.1, 1e-6))))
        chunk = min(chunk, max_iter - done)
        if done and (per is None or left < per):
            break
        model.train(max_iter=chunk, min_iter=max(0, 20 - done), progress_bar=False)
        if model.converged:
            break
    if cuda:
        torch.cuda.synchronize()
    fit_s = time.perf_counter() - t
    stamps = model.history["time"].to_numpy()
    note = None
    try:
        dev = float(sfact.tl.heldout_deviance(model, test))
    except Exception as err:  # keep the comparison: predict with the trained model moved to the CPU
        if device == "cpu":
            raise
        traceback.print_exc()
        note = f"held-out prediction failed on {device} ({one_line(err, 140)}), predicted on cpu"
        model.to_device("cpu")
        dev = float(sfact.tl.heldout_deviance(model, test))
    info = model.gp_info()
    diag = info.get("diagonal_only")
    return {
        "setup_s": setup_s,
        "fit_s": fit_s,
        "iters": len(stamps),
        "s_iter": float(stamps[-1] / len(stamps)) if len(stamps) else float("nan"),
        "converged": bool(model.converged),
        "heldout": dev,
        "peak": f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if cuda else None,
        "M": info.get("num_inducing"),
        "K": info.get("n_neighbors"),
        "diag": diag,
        "note": note,
    }


def section_real(ch: Child) -> None:
    cfg = SIZES["real"][1 if ch.args.small else 0]
    max_iter = int(ch.args.real_max_iter or cfg["max_iter"])
    devices = [ch.device, "cpu"]
    names = [d for d in ch.args.real_datasets.split(",") if d]
    priors = [p for p in ch.args.real_priors.split(",") if p]
    fits_left = len(names) * len(priors) * len(devices)
    for name in names:
        spec = REAL_DATASETS[name]
        try:
            train, test, source = load_real(name, ch.args.data)
        except Exception as err:
            ch.add({"section": "5 real", "case": spec["label"], "result": f"FAILED loading: {one_line(err)}"})
            traceback.print_exc()
            fits_left -= len(priors) * len(devices)
            continue
        for prior in priors:
            row = ch.add(
                {
                    "section": "5 real",
                    "case": f"{spec['label']} {prior} ({train.n_obs}+{test.n_obs} cells x {train.n_vars}, {source})",
                    "device": " / ".join(devices),
                }
            )
            fits = []
            for device in devices:
                cap = max(1.0, ch.left() / max(fits_left, 1))
                fits_left -= 1
                try:
                    if ch.hard_left() < 8:
                        raise TimeoutError(
                            f"skipped: {ch.hard_left():.0f} s left before the section's hard cap"
                        )
                    fits.append(_fit_real(ch, train, test, prior, spec["group_key"], device, max_iter, cap))
                except Exception as err:
                    fits.append({"error": one_line(err, 160)})
                    traceback.print_exc()
                _real_row(row, fits, max_iter)
                ch.flush()


def _real_row(row: dict, fits: list[dict], max_iter: int) -> None:
    def get(i, k):
        return fits[i].get(k) if i < len(fits) else None

    def settings(f):
        if "error" in f:
            return f"FAILED: {f['error']}"
        s = f"M={f['M']}" if f.get("K") is None else f"K={f['K']}"
        s += ", diagonal" if f.get("diag") else ", full" if f.get("diag") is not None else ""
        s += ", conv" if f["converged"] else f", not conv ({f['iters']} iters)"
        return s + (f", {f['note']}" if f.get("note") else "")

    row["setup_s"] = _pair(get(0, "setup_s"), get(1, "setup_s"))
    row["s_iter"] = _pair(get(0, "s_iter"), get(1, "s_iter"))
    row["iters"] = f"{_fmt(get(0, 'iters'))} / {_fmt(get(1, 'iters'))}"
    row["peak"] = get(0, "peak") or ""
    row["time_s"] = _pair(get(0, "fit_s"), get(1, "fit_s"))
    a, b = get(0, "heldout"), get(1, "heldout")
    rel = f"{100 * (a - b) / b:+.2f}%" if a is not None and b is not None and b else "n/a"
    row["result"] = (
        f"held-out dev {_pair(a, b, '.4f')} (rel. diff {rel}); "
        + " ; ".join(settings(f) for f in fits)
        + f"; cap {max_iter} iters"
    )


def section_tf32(ch: Child) -> None:
    """osmFISH ``svgp`` at each ``matmul_precision`` on the GPU: held-out deviance relative to FP32."""
    max_iter = SIZES["tf32"][1 if ch.args.small else 0]["max_iter"]
    case = f"osmFISH svgp held-out deviance, TF32 vs FP32 (same seed, cap {max_iter} iters)"
    if not ch.cuda:
        ch.add(
            {
                "section": "6 tf32",
                "case": case,
                "device": ch.device,
                "result": "skipped: needs CUDA (real TF32); see benchmarks/bench_precision.py for the CPU emulation",
            }
        )
        return
    train, test, source = load_real("osmfish", ch.args.data)
    modes = [m for m in ch.args.tf32_modes.split(",") if m]
    base = None
    for i, prec in enumerate(modes):
        label = TF32_LABELS[prec]
        row = ch.add(
            {
                "section": "6 tf32",
                "case": f"osmFISH svgp ({train.n_obs}+{test.n_obs} cells, {source}), matmul_precision="
                f"{prec!r}: {label}",
                "device": ch.device,
            }
        )
        try:
            if ch.hard_left() < 8:
                raise TimeoutError(f"skipped: {ch.hard_left():.0f} s left before the section's hard cap")
            cap = max(1.0, ch.left() / (len(modes) - i))
            f = _fit_real(
                ch, train, test, "svgp", "ClusterName", ch.device, max_iter, cap, {"matmul_precision": prec}
            )
        except Exception as err:
            row["result"] = f"FAILED: {one_line(err)}"
            traceback.print_exc()
            ch.flush()
            continue
        if prec == "highest":
            base = f["heldout"]
        rel = f"{100 * (f['heldout'] - base) / base:+.3f}%" if base else "n/a (no FP32 fit)"
        conv = "conv" if f["converged"] else f"not conv ({f['iters']} iters)"
        row.update(
            setup_s=_fmt(f["setup_s"]),
            s_iter=_fmt(f["s_iter"]),
            iters=str(f["iters"]),
            peak=f["peak"] or "",
            time_s=_fmt(f["fit_s"]),
            result=f"held-out dev {f['heldout']:.4f} (rel. diff vs FP32 {rel}); M={f['M']}, "
            f"{'diagonal' if f['diag'] else 'full'} S, {conv}",
        )
        ch.flush()


def warm_up(ch: Child) -> None:
    """Pay the one-time costs (imports, CUDA context and kernels, cuBLAS/cuSOLVER handles) on a tiny
    model, so the first measured set-up does not include them."""
    import sfact

    t = time.perf_counter()
    adata = simulate_sparse(400, 40, n_groups=2, seed=1)
    sfact.pp.prepare(adata, group_key="group")
    for prior, kw in (("mggp_svgp", {"prior_kwargs": {"num_inducing": 30}}), ("lcgp", {})):
        try:
            model = sfact.models.SpatialFactorization(
                adata, prior=prior, n_factors=3, device=ch.device, random_state=SEED, **kw
            )
            model.train(max_iter=2, batch_size=200, progress_bar=False)
            model.get_log_factors(adata[:50])
        except Exception:  # reported by the section itself if it matters there
            traceback.print_exc()
    ch.sync()
    print(f"{ch.args.child}: warm-up on {ch.device} in {time.perf_counter() - t:.1f} s", flush=True)


def child_main(args) -> int:
    out = Path(args.child_out)
    ch = Child(args, out)
    try:
        warm_up(ch)
    except Exception:  # the sections report their own failures
        traceback.print_exc()
    fn = {
        "slideseq": section_slideseq,
        "million": section_million,
        "lcgp": section_lcgp,
        "real": section_real,
        "tf32": section_tf32,
    }
    try:
        fn[args.child](ch)
    except Exception as err:
        traceback.print_exc()
        ch.rows.append(
            {"section": LABELS[args.child], "result": f"FAILED: {one_line(err)}", "device": ch.device}
        )
        ch.flush()
        return 1
    return 0


# ============================================================================ parent side
def machine_info(device: str) -> dict:
    info = {"python": platform.python_version(), "cpus": _n_cpus(), "host": platform.node()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch CUDA"] = torch.version.cuda
        info["cuda available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            p = torch.cuda.get_device_properties(0)
            info["gpu memory GiB"] = round(p.total_memory / 2**30, 1)
            info["compute capability"] = f"{p.major}.{p.minor}"
        info["tf32 matmul default"] = torch.backends.cuda.matmul.allow_tf32
    except Exception as err:
        info["torch"] = f"import failed: {one_line(err)}"
    for mod in ("numpy", "scipy", "pandas", "anndata", "sklearn", "sfact"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as err:
            info[mod] = f"missing ({one_line(err, 80)})"
    try:
        info["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except Exception:
        info["git"] = None
    info["device"] = device
    return info


def run_tests(timeout: float, log, device: str) -> dict:
    """``pytest -m gpu -q`` on the test files that carry the marker (collecting other files would need
    packages the GPU machine lacks, e.g. squidpy)."""
    files = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("test_*.py")
        if re.search(r"pytest\.mark\.gpu\b", p.read_text(errors="replace"))
    )
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        "--continue-on-collection-errors",
    ]
    cmd += files or ["tests"]
    row = {"section": "1 tests", "case": "pytest -m gpu -q " + " ".join(files or ["tests"]), "device": device}
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
        rc = proc.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc = None
    row["time_s"] = _fmt(time.perf_counter() - t)
    log.write("\n==== tests: " + " ".join(cmd) + "\n" + out + "\n")
    log.flush()
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error", "deselected")}
    summary = [
        ln for ln in out.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|errors?)\b", ln)
    ]
    if summary:
        for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", summary[-1]):
            counts["error" if k.startswith("error") else k] += int(n)
    text = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    if counts["error"]:
        text += f", {counts['error']} errors"
    text += f" ({counts['deselected']} deselected)"
    if rc is None:
        text = f"FAILED: timed out after {timeout:.0f} s; " + text
    elif rc not in (0, 5) and not counts["failed"] and not counts["error"]:
        tail = [ln for ln in out.strip().splitlines() if ln.strip()][-1:] or [f"exit {rc}"]
        text += f"; exit {rc}: {one_line(tail[0], 160)}"
    fails = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)
    if fails:
        text += "; " + ", ".join(fails[:4])
    row["result"] = text
    row["counts"] = counts
    return row


def run_child(section: str, args, timeout: float, log) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", section, "--child-out", str(out)]
        cmd += ["--child-budget", str(timeout), "--device", args.device]
        for flag, val in (
            ("--threads", args.threads),
            ("--data", args.data),
            ("--real-datasets", args.real_datasets),
            ("--real-priors", args.real_priors),
            ("--real-max-iter", args.real_max_iter),
            ("--million-kwargs", args.million_kwargs),
            ("--real-settings", args.real_settings),
            ("--tf32-modes", args.tf32_modes),
        ):
            if val:
                cmd += [flag, str(val)]
        if args.small:
            cmd.append("--small")
        log.write(f"\n==== {section}: {' '.join(cmd)}\n")
        log.flush()
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            why = None if rc == 0 else f"exit code {rc}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group
            proc.wait()
            why = f"hard cap: killed after {timeout:.0f} s"
        wall = time.perf_counter() - t
        rows = json.loads(out.read_text()) if out.exists() else []
        for r in rows:
            r.setdefault("section", LABELS[section])
        if why is not None:
            log.write(f"==== {section}: {why}\n")
            if not rows:
                rows = [
                    {
                        "section": LABELS[section],
                        "result": f"FAILED: {why}; see gpu_check.log",
                        "device": args.device,
                    }
                ]
            else:  # the rows written so far stay; the last unfinished one says why it stopped
                last = rows[-1]
                res = str(last.get("result") or "")
                if not res.startswith("FAILED"):
                    last["result"] = f"INCOMPLETE ({why}; see gpu_check.log); " + (res or "partial values")
        for r in rows:
            r["section_wall_s"] = round(wall, 1)
        return rows


def write_outputs(out_dir: Path, info: dict, rows: list[dict], args, started: float, done: bool) -> str:
    header = ["# sfact GPU check", ""] + [f"- {k}: {v}" for k, v in info.items()]
    tbl = table(rows)
    total = time.perf_counter() - started
    foot = [
        "",
        f"Total {total:.0f} s{'' if done else ' (still running)'}; sections {args.sections}; "
        f"{'--small; ' if args.small else ''}budgets {json.dumps(args.budgets)}.",
        "set-up s: model construction + `train(max_iter=0)` (data to the device, inducing points or "
        "neighbours, KL-NMF initialization). s/iter: one pass over all cells, mean of the per-iteration "
        "time stamps after one warm-up iteration. peak mem: `torch.cuda.max_memory_allocated` of that "
        "run (CPU: process RSS high-water mark). Section 5: GPU value / CPU value; "
        + (
            "both devices with the CPU defaults (M=1000, diagonal S / diagonal LCGP posterior)"
            if args.real_settings == "cpu"
            else "each device with its own defaults (GPU: M=3000, full S, full LCGP posterior; CPU: M=1000, "
            "diagonal S and diagonal LCGP posterior)"
        )
        + "; library defaults otherwise (tol 1e-4, min_iter 20, max_iter 1000), each fit also capped by "
        "its share of the section's time; fit time = set-up + training; rel. diff = (GPU − CPU) / CPU of "
        "the held-out deviance (`sfact.tl.heldout_deviance`).",
    ]
    md = "\n".join([*header, "", tbl, *foot, ""])
    (out_dir / "gpu_check.md").write_text(md)
    payload = {
        "machine": info,
        "args": vars(args),
        "total_s": total,
        "done": done,
        "rows": rows,
        "table": tbl,
    }
    (out_dir / "gpu_check.json").write_text(json.dumps(payload, indent=1, default=str))
    return tbl


def parse_budgets(text: str | None, small: bool) -> dict:
    budgets = dict(SMALL_BUDGETS if small else BUDGETS)
    for part in (text or "").split(","):
        if part.strip():
            k, _, v = part.partition("=")
            if k.strip() not in budgets:
                raise SystemExit(f"--budgets: unknown section {k!r}; sections: {list(budgets)}")
            budgets[k.strip()] = float(v)
    return budgets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out", type=Path, default=Path("."), help="folder of gpu_check.md/.json/.log (default .)"
    )
    p.add_argument(
        "--data", default=None, help="folder with visium_prostate_2samples.h5ad (default: the bundled file)"
    )
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {list(SECTIONS)}")
    p.add_argument("--small", action="store_true", help="every size ~50x smaller (CPU smoke run)")
    p.add_argument(
        "--device", default="auto", help="device of the GPU runs: auto (cuda if available), cuda, cpu"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all CPUs)")
    p.add_argument("--budgets", default=None, help="per-section hard caps in s, e.g. 'million=120,real=90'")
    p.add_argument("--total-budget", type=float, default=TOTAL_BUDGET, help="hard cap of the whole run in s")
    p.add_argument("--real-datasets", default=",".join(REAL_DATASETS), help="section 5 data sets")
    p.add_argument("--real-priors", default=",".join(REAL_PRIORS), help="section 5 priors")
    p.add_argument(
        "--real-max-iter", type=int, default=None, help="section 5 iteration cap (default 1000; 15 small)"
    )
    p.add_argument(
        "--real-settings",
        choices=("defaults", "cpu"),
        default="defaults",
        help="section 5: each device's own defaults, or the CPU defaults on both (M=1000, diagonal)",
    )
    p.add_argument(
        "--million-kwargs",
        default=None,
        help="section 3 prior_kwargs as JSON, e.g. '{\"diagonal_only\": true}'",
    )
    p.add_argument(
        "--tf32-modes",
        default="highest,high",
        help="section 6: matmul_precision values, FP32 ('highest') first; add 'tf32-emulated' to "
        "compare the CPU emulation with the hardware",
    )
    p.add_argument("--child", choices=SECTIONS[1:], help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--child-budget", type=float, default=60.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # children and pytest import sfact from this checkout unless it is installed (absolute paths:
    # they may run from another folder)
    paths = [str(Path(q).resolve()) for q in os.environ.get("PYTHONPATH", "").split(os.pathsep) if q]
    if str(ROOT / "src") not in paths:
        paths.append(str(ROOT / "src"))
        sys.path.append(str(ROOT / "src"))
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    if args.device == "auto":
        try:
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        except Exception:
            args.device = "cpu"
    if args.child:
        import warnings

        warnings.simplefilter("ignore")
        return child_main(args)

    started = time.perf_counter()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if args.million_kwargs:
        json.loads(args.million_kwargs)  # fail early on bad JSON
    bad_modes = [m for m in args.tf32_modes.split(",") if m and m not in TF32_LABELS]
    if bad_modes:
        p.error(f"--tf32-modes: unknown {bad_modes}; choose from {list(TF32_LABELS)}")
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {bad}; sections: {list(SECTIONS)}")
    args.budgets = parse_budgets(args.budgets, args.small)
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine_info(args.device)
    print("# sfact GPU check", flush=True)
    for k, v in info.items():
        print(f"- {k}: {v}", flush=True)
    print(flush=True)
    print(table([]), flush=True)
    rows: list[dict] = []
    with open(args.out / "gpu_check.log", "w") as log:
        for section in sections:
            remaining = args.total_budget - (time.perf_counter() - started)
            budget = min(args.budgets[section], remaining)
            if budget < 10:
                new = [
                    {
                        "section": LABELS[section],
                        "result": f"FAILED: skipped, a cap of {budget:.0f} s is too short "
                        f"({remaining:.0f} s left of --total-budget)",
                    }
                ]
            else:
                try:
                    if section == "tests":
                        new = [run_tests(budget, log, args.device)]
                    else:
                        new = run_child(section, args, budget, log)
                except Exception as err:
                    traceback.print_exc()
                    new = [{"section": LABELS[section], "result": f"FAILED: {one_line(err)}"}]
            rows.extend(new)
            for r in new:
                print(row_line(r), flush=True)
            write_outputs(args.out, info, rows, args, started, done=False)
    tbl = write_outputs(args.out, info, rows, args, started, done=True)
    print(flush=True)
    print(tbl, flush=True)
    print(
        f"\ntotal {time.perf_counter() - started:.0f} s; wrote {args.out}/gpu_check.md, .json, .log",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
