"""Held-out accuracy and speed of sfact's priors and MOFA-FLEX's NSF preset on real spatial data.

Run from the repository root::

    .venv/bin/python benchmarks/bench_spatial.py                  # full run (~30 min on 2 cores)
    .venv/bin/python benchmarks/bench_spatial.py --quick          # smoke run
    .venv/bin/python benchmarks/bench_spatial.py --skip-mofaflex  # sfact rows and references only

One protocol for every row: ``sfact.pp.prepare(adata, group_key=GROUP, min_group_size=1)``, then
``sfact.tl.heldout_split(adata, fraction=0.05, random_state=0)``; L = 10 factors; the metric is the
mean Poisson deviance per entry of the held-out cells, whose rates are predicted from their
coordinates (and group) with their own total counts as size factors.

Every fit runs in a fresh subprocess (this script re-invoked with ``--one METHOD DATASET``). The
MOFA-FLEX child runs under the separate benchmark environment ``.venv-bench`` (see
``benchmarks/README.md``), so the main environment never imports ``mofaflex``. The parent prints
a markdown table and writes it to ``benchmarks/results/`` as ``.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "results"
DEFAULT_BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
N_FACTORS = 10
SEED = 0
HELDOUT_FRACTION = 0.05
KNN_FACTORS = 10  # neighbours averaged for the pnmf held-out factors
KNN_COMPOSITION = 20  # neighbours averaged by the composition-smoothing reference
KNN_SHRINK = 0.01  # weight of the global gene share mixed into the kNN composition
LAM_FLOOR = 1e-10  # floor of predicted rates in the dense deviance (relu rates can be exactly 0)
CHILD_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "TQDM_DISABLE": "1"}

DATASETS = {
    "osmfish": {"label": "osmFISH", "loader": "osmfish", "group_key": "ClusterName"},
    "prostate": {"label": "Visium prostate", "loader": "visium_prostate", "group_key": "list_ID"},
}
SFACT_PRIORS = ("pnmf", "svgp", "mggp_svgp")
METHODS = ("baseline", "knn", *SFACT_PRIORS, "mofaflex")
LABELS = {
    "baseline": "baseline (cell total x gene share)",
    "knn": f"kNN-{KNN_COMPOSITION} composition smoothing",
    "pnmf": f"sfact pnmf (kNN-{KNN_FACTORS} of training factors)",
    "svgp": "sfact svgp",
    "mggp_svgp": "sfact mggp_svgp",
    "mofaflex": "MOFA-FLEX 0.1.2 NSF preset",
}
# default caps: sfact iterations (library default 1000) and MOFA-FLEX epochs / seconds of training
FULL_CAPS = {"max_iter": 1000, "mofaflex_max_epochs": 10_000, "mofaflex_budget_s": 720.0}
QUICK_CAPS = {"max_iter": 60, "mofaflex_max_epochs": 5, "mofaflex_budget_s": 120.0}

# numbers of the project docs, same protocol (held-out deviance per entry)
PEER = {
    "osmfish": "NSF 5.66 (146 s on 2 CPU cores), MOFA-FLEX NSF preset 6.63 (28 min), reference svgp 10.2, "
    "baseline 8.01",
    "prostate": "NSF 0.627, MOFA-FLEX 1.07, reference svgp 0.91, baseline 0.88",
}


# ---------------------------------------------------------------------------- shared helpers
def load_split(dataset: str):
    """Load ``dataset``, prepare it (all cells kept) and split it; returns ``(adata, train, test)``."""
    import sfact

    spec = DATASETS[dataset]
    adata = getattr(sfact.datasets, spec["loader"])()
    sfact.pp.prepare(adata, group_key=spec["group_key"], min_group_size=1)
    train, test = sfact.tl.heldout_split(adata, fraction=HELDOUT_FRACTION, random_state=SEED)
    return adata, train, test


def counts_csr(adata):
    import numpy as np
    import scipy.sparse as sp

    X = adata.X
    return sp.csr_matrix(X, dtype=np.float64) if sp.issparse(X) else sp.csr_matrix(np.asarray(X, np.float64))


def totals(Y):
    import numpy as np

    return np.asarray(Y.sum(axis=1)).ravel().astype(np.float64)


def deviance_sparse(Y, E, W, s) -> float:
    """Mean Poisson deviance per entry of ``Y`` against ``s_n Σ_l W_dl E_nl`` (sfact's helper)."""
    import numpy as np

    from sfact.tl._analysis import poisson_deviance_sparse

    per_cell, _ = poisson_deviance_sparse(
        Y, np.asarray(E, np.float64), np.asarray(W, np.float64), np.asarray(s, np.float64)
    )
    return float(per_cell.sum() / (Y.shape[0] * Y.shape[1]))


def deviance_dense(Y, lam) -> tuple[float, int]:
    """Mean Poisson deviance per entry of ``Y`` against dense rates ``lam`` (floored at LAM_FLOOR).

    Also returns how many entries with ``y > 0`` had a rate below the floor.
    """
    import numpy as np

    Yd = Y.toarray() if hasattr(Y, "toarray") else np.asarray(Y, np.float64)
    lam = np.asarray(lam, np.float64)
    n_floored = int(((lam < LAM_FLOOR) & (Yd > 0)).sum())
    lam = np.maximum(lam, LAM_FLOOR)
    pos = Yd > 0
    term = np.zeros_like(Yd)
    term[pos] = Yd[pos] * np.log(Yd[pos] / lam[pos])
    term -= Yd - lam
    return float(2.0 * term.sum() / Yd.size), n_floored


def composition_times_total(rates, total):
    """Each row of ``rates`` normalized to sum 1, times the cell's total count."""
    import numpy as np

    rates = np.asarray(rates, np.float64)
    rs = rates.sum(axis=1, keepdims=True)
    D = rates.shape[1]
    comp = np.where(rs > 0, rates / np.where(rs > 0, rs, 1.0), 1.0 / D)
    return comp * total[:, None]


def mean_morans_i(factors, coords) -> float:
    import numpy as np

    import sfact

    return float(np.nanmean(sfact.tl.morans_i(np.asarray(factors, np.float64), coords)["I"].to_numpy()))


def parse_kwargs(text: str | None, prior: str, *, spatial_only: bool) -> dict:
    """Options for ``prior`` from a JSON object: keyed by prior name, or flat.

    A flat object applies to every sfact prior, except with ``spatial_only`` (the prior options),
    where it applies to the GP priors only (``pnmf`` has different options).
    """
    if not text:
        return {}
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, received {text!r}")
    if any(k in SFACT_PRIORS for k in obj):
        return dict(obj.get(prior) or {})
    if spatial_only and prior == "pnmf":
        return {}
    return dict(obj)


# ---------------------------------------------------------------------------- references (parent)
def run_references(dataset: str, methods: list[str]) -> list[dict]:
    """Baseline and kNN composition smoothing: no fitting, computed in the parent."""
    import sfact

    t = time.perf_counter()
    adata, train, test = load_split(dataset)
    Ytr, Yte = counts_csr(train), counts_csr(test)
    rows = []
    common = {"dataset": dataset, "n_train": train.n_obs, "n_test": test.n_obs, "n_vars": adata.n_vars}
    if "baseline" in methods:
        dev = float(sfact.tl.baseline_deviance(Ytr, Yte))
        rows.append(
            {
                **common,
                "method_key": "baseline",
                "heldout_dev": dev,
                "heldout_dev_comp": dev,
                "train_dev": float(sfact.tl.baseline_deviance(Ytr, Ytr)),
            }
        )
    if "knn" in methods:
        t0 = time.perf_counter()
        dev = float(sfact.tl.knn_deviance(train, test, n_neighbors=KNN_COMPOSITION, shrink=KNN_SHRINK))
        rows.append(
            {
                **common,
                "method_key": "knn",
                "heldout_dev": dev,
                "heldout_dev_comp": dev,
                "total_s": time.perf_counter() - t0,
            }
        )
    for r in rows:
        r["process_s"] = time.perf_counter() - t
    return rows


# ---------------------------------------------------------------------------- sfact child
def run_sfact(dataset: str, prior: str, max_iter: int, prior_kwargs: dict, train_kwargs: dict) -> dict:
    """Fit one sfact prior on the training cells and evaluate it (meant for a fresh process)."""
    import numpy as np
    import torch
    from scipy.spatial import cKDTree

    import sfact

    adata, train, test = load_split(dataset)
    group_key = DATASETS[dataset]["group_key"]
    Ytr, Yte = counts_csr(train), counts_csr(test)
    tkw = {"max_iter": max_iter, "progress_bar": False, **train_kwargs}
    rec = {
        "dataset": dataset,
        "method_key": prior,
        "n_train": train.n_obs,
        "n_test": test.n_obs,
        "n_vars": adata.n_vars,
        "prior_kwargs": prior_kwargs,
        "train_kwargs": {k: v for k, v in tkw.items() if k != "progress_bar"},
        "max_iter": int(tkw["max_iter"]),
        "torch_threads": torch.get_num_threads(),
    }
    t = time.perf_counter()
    model = sfact.models.SpatialFactorization(
        train,
        prior=prior,
        n_factors=N_FACTORS,
        size_factors="total",
        group_key=group_key if prior == "mggp_svgp" else None,
        prior_kwargs=prior_kwargs or None,
        random_state=SEED,
    )
    model.train(**tkw)
    rec["total_s"] = time.perf_counter() - t
    times = np.asarray(model.history["time"], np.float64)
    rec.update(
        n_iter=len(times),
        converged=bool(model.converged),
        s_per_iter=float(np.diff(times).mean()) if len(times) > 1 else float("nan"),
        iters_s=float(times[-1]) if len(times) else 0.0,
        device=str(model.device),
        prior_setup=model.setup.prior_kwargs,
    )
    rec["init_s"] = rec["total_s"] - rec["iters_s"]

    W = model.get_loadings()
    mu, var = model.get_log_factors()
    s_tr = model.size_factors(train, Ytr)
    rec["train_dev"] = deviance_sparse(Ytr, np.exp(mu + 0.5 * var), W, s_tr)
    rec["morans_i"] = mean_morans_i(model.get_factors(), train.obsm["spatial"])

    tot_te = totals(Yte)
    if prior == "pnmf":
        # not spatial: held-out log-factors = mean over the nearest training cells
        tree = cKDTree(np.asarray(train.obsm["spatial"], np.float64))
        _, nn = tree.query(np.asarray(test.obsm["spatial"], np.float64), k=KNN_FACTORS)
        mu_te, var_te = mu[nn].mean(axis=1), var[nn].mean(axis=1)
        s_te = tot_te / model.setup.size_factor_reference
        E_te = np.exp(mu_te + 0.5 * var_te)
        rec["heldout_dev"] = deviance_sparse(Yte, E_te, W, s_te)
        # for reference only: sfact's own held-out path for pnmf fits the factors to the held-out
        # counts (loadings fixed), which is not a prediction from coordinates
        rec["heldout_dev_transform"] = float(sfact.tl.heldout_deviance(model, test))
    else:
        rec["heldout_dev"] = float(sfact.tl.heldout_deviance(model, test))
        mu_te, var_te = model.get_log_factors(test)
        s_te = model.size_factors(test, Yte)
        E_te = np.exp(mu_te + 0.5 * var_te)
        rec["heldout_dev_check"] = deviance_sparse(Yte, E_te, W, s_te)
    rates = E_te @ W.T
    rec["heldout_dev_comp"], rec["n_rates_floored"] = deviance_dense(
        Yte, composition_times_total(rates, tot_te)
    )
    return rec


# ---------------------------------------------------------------------------- MOFA-FLEX child
def run_mofaflex(dataset: str, max_epochs: int, budget_s: float | None) -> dict:
    """Fit MOFA-FLEX's NSF preset on the training cells and evaluate it (run under .venv-bench).

    Rates as in its NSF preset (``nonnegative_factors=True``, ``nonnegative_weights=True``,
    NegativeBinomial likelihood): ``mean_nd = relu(Σ_l relu(z_nl) relu(w_ld)) · m_n``, where
    ``m_n`` is the cell's mean count over the model's genes (its "sample mean", total / D). For held-out
    cells ``z`` is the GP's predictive mean at their coordinates (``z ~ N(f, 1 - outputscale)`` in
    the model, so ``E[z | f] = f``), from ``MOFAFLEX.get_gps(x=...)``.
    """
    import copy
    import warnings

    import numpy as np
    import torch

    warnings.filterwarnings("ignore")
    import mofaflex
    import pyro
    import pyro.infer
    from mofaflex._core import mofaflex as mf_core

    adata, train, test = load_split(dataset)
    Ytr, Yte = counts_csr(train), counts_csr(test)
    rec = {
        "dataset": dataset,
        "method_key": "mofaflex",
        "n_train": train.n_obs,
        "n_test": test.n_obs,
        "n_vars": adata.n_vars,
        "mofaflex_version": mofaflex.__version__,
        "pyro_version": pyro.__version__,
        "torch_version_bench": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "max_iter": int(max_epochs),
        "budget_s": budget_s,
    }
    try:
        import gpytorch

        rec["gpytorch_version"] = gpytorch.__version__
    except ImportError:
        pass

    # per-epoch time stamps: full batch, so one SVI step per epoch
    stamps: list[float] = []
    orig_step = pyro.infer.SVI.step

    def timed_step(self, *args, **kwargs):
        out = orig_step(self, *args, **kwargs)
        stamps.append(time.perf_counter())
        return out

    pyro.infer.SVI.step = timed_step

    # wall-clock cap of the training loop: an early stopper that also stops when the budget is spent
    stop_info = {"converged": False, "budget_hit": False}
    base_stopper = mf_core.EarlyStopper

    class BudgetStopper(base_stopper):
        def step(self, metrics):
            if super().step(metrics):
                stop_info["converged"] = True
                return True
            if budget_s is not None and stamps and stamps[-1] - t_fit >= budget_s:
                stop_info["budget_hit"] = True
                return True
            return False

    mf_core.EarlyStopper = BudgetStopper

    model_opts, train_preset, smooth_opts = copy.deepcopy(mofaflex.presets.NSF)
    rec["preset"] = {"model": repr(model_opts), "training": repr(train_preset), "smooth": repr(smooth_opts)}
    model_opts.n_factors = N_FACTORS
    model_opts.weight_prior = "Horseshoe"  # the preset says "HorseShoe", which is not a registered prior
    train_opts = mofaflex.TrainingOptions(
        lr=train_preset.lr, device="cpu", max_epochs=int(max_epochs), seed=SEED, save_path=False
    )
    data_opts = mofaflex.DataOptions(
        covariates_obsm_key="spatial_sfact", plot_data_overview=False, subset_var=None
    )
    rec["options"] = {"model": repr(model_opts), "training": repr(train_opts), "smooth": repr(smooth_opts)}

    group, view = "group_1", "rna"
    t_fit = time.perf_counter()
    model = mofaflex.MOFAFLEX({group: {view: train}}, data_opts, model_opts, train_opts, smooth_opts)
    rec["total_s"] = time.perf_counter() - t_fit
    n_epochs = len(model.training_loss)
    steps = np.diff(np.asarray([t_fit, *stamps]))
    rec.update(
        n_iter=n_epochs,
        converged=bool(stop_info["converged"]),
        budget_hit=bool(stop_info["budget_hit"]),
        s_per_iter=float(np.diff(stamps).mean()) if len(stamps) > 1 else float("nan"),
        first_epoch_s=float(steps[0]) if len(steps) else float("nan"),
        iters_s=float(stamps[-1] - t_fit) if stamps else 0.0,
        final_loss=float(model.training_loss[-1]) if n_epochs else float("nan"),
        loss_every_10_epochs=[float(v) for v in np.asarray(model.training_loss)[::10]],
        device=str(train_opts.device),
    )
    rec["post_s"] = rec["total_s"] - rec["iters_s"]

    genes = [str(g) for g in model.feature_names[view]]
    rec["n_genes_model"] = len(genes)
    col = {g: i for i, g in enumerate(genes)}
    gene_idx = np.array([col.get(str(g), -1) for g in adata.var_names])
    W = np.zeros((adata.n_vars, N_FACTORS))  # (D, L); genes the model dropped (constant) get 0
    Wm = np.asarray(model.get_weights(return_type="numpy")[view], np.float64).T  # relu'd means
    W[gene_idx >= 0] = Wm[gene_idx[gene_idx >= 0]]
    Z_tr = np.asarray(model.get_factors(return_type="numpy")[group], np.float64)  # relu'd means
    x_te = np.asarray(test.obsm["spatial_sfact"], np.float32)
    F_te = np.asarray(model.get_gps(return_type="numpy", x={group: x_te})[group], np.float64)
    Z_te = np.maximum(F_te, 0.0)

    D_model = len(genes)
    sm = np.asarray(model._preprocessor_state["sample_means"][group][view], np.float64)
    tot_tr, tot_te = totals(Ytr), totals(Yte)
    rec["sample_means_match_total_over_D"] = bool(np.allclose(sm, tot_tr / D_model, rtol=1e-4))

    rate_tr = np.maximum(Z_tr @ W.T, 0.0) * (tot_tr / D_model)[:, None]
    rate_te = np.maximum(Z_te @ W.T, 0.0) * (tot_te / D_model)[:, None]
    rec["train_dev"], rec["n_rates_floored_train"] = deviance_dense(Ytr, rate_tr)
    rec["heldout_dev"], rec["n_rates_floored"] = deviance_dense(Yte, rate_te)
    rec["heldout_dev_comp"], _ = deviance_dense(Yte, composition_times_total(rate_te, tot_te))
    rec["train_dev_comp"], _ = deviance_dense(Ytr, composition_times_total(rate_tr, tot_tr))
    try:  # second variant: posterior-mean rates E[relu(z)] E[relu(w)] under the mean-field posterior
        rec.update(_mofaflex_posterior_mean_devs(model, pyro, view, gene_idx, x_te, group, Ytr, Yte, D_model))
    except Exception as e:  # informational only; depends on pyro parameter names
        rec["postmean_error"] = f"{type(e).__name__}: {e}"
    rec["n_zero_factors_train"] = int((Z_tr.max(axis=0) <= 0).sum())
    rec["n_zero_factors_heldout"] = int((Z_te.max(axis=0) <= 0).sum())
    rec["morans_i"] = mean_morans_i(Z_tr, train.obsm["spatial"])
    rec["gp_lengthscale"] = np.asarray(model.gp_lengthscale).ravel().tolist()
    rec["gp_outputscale"] = np.asarray(model.gp_scale).ravel().tolist()
    return rec


def _relu_mean(m, s):
    """E[max(X, 0)] for X ~ N(m, s²)."""
    import numpy as np
    from scipy.stats import norm

    s = np.maximum(s, 1e-12)
    return m * norm.cdf(m / s) + s * norm.pdf(m / s)


def _mofaflex_posterior_mean_devs(model, pyro, view, gene_idx, x_te, group, Ytr, Yte, D_model) -> dict:
    """Deviances with posterior-mean rates instead of the plug-in relu(posterior mean).

    Weights and training factors: their mean-field Normal posteriors (pyro parameter store; the
    package only returns relu'd means). Held-out factors: ``z ~ N(f, 1 - outputscale)`` with ``f`` the
    GP predictive, so ``z ~ N(E f, Var f + 1 - outputscale)``.
    """
    import numpy as np

    ps = pyro.get_param_store()
    wl = ps[f"_weights.0._locs.{view}"].detach().cpu().double().numpy().squeeze().T  # (D_model, L)
    ws = ps[f"_weights.0._scales.{view}"].detach().cpu().double().numpy().squeeze().T
    zl = ps["_factors.0._loc"].detach().cpu().double().numpy().squeeze(-1).T  # (N, L)
    zs = ps["_factors.0._scale"].detach().cpu().double().numpy().squeeze(-1).T
    EW = np.zeros((len(gene_idx), wl.shape[1]))
    EW[gene_idx >= 0] = _relu_mean(wl, ws)[gene_idx[gene_idx >= 0]]
    f_mean = np.asarray(model.get_gps(return_type="numpy", x={group: x_te})[group], np.float64)
    f_std = np.asarray(model.get_gps(return_type="numpy", moment="std", x={group: x_te})[group], np.float64)
    noise = 1.0 - np.asarray(model.gp_scale, np.float64).ravel()
    EZ_te = _relu_mean(f_mean, np.sqrt(f_std**2 + noise[None, :]))
    EZ_tr = _relu_mean(zl, zs)
    tot_tr, tot_te = totals(Ytr), totals(Yte)
    rate_tr = EZ_tr @ EW.T * (tot_tr / D_model)[:, None]
    rate_te = EZ_te @ EW.T * (tot_te / D_model)[:, None]
    return {
        "train_dev_postmean": deviance_dense(Ytr, rate_tr)[0],
        "heldout_dev_postmean": deviance_dense(Yte, rate_te)[0],
        "heldout_dev_comp_postmean": deviance_dense(Yte, composition_times_total(rate_te, tot_te))[0],
    }


# ---------------------------------------------------------------------------- parent
def machine_info() -> dict:
    import numpy as np
    import torch

    import sfact

    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "load_avg_1_5_15": load,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu" if not torch.cuda.is_available() else f"cuda ({torch.cuda.get_device_name(0)})",
        "sfact_device_setting": sfact.settings.device,
        "numpy": np.__version__,
        "sfact": sfact.__version__,
        "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")},
    }


def spawn(python: str, method: str, dataset: str, opts: dict, timeout: float | None, log_path: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            python,
            str(Path(__file__).resolve()),
            "--one",
            method,
            dataset,
            "--json-out",
            str(out),
            "--child-opts",
            json.dumps(opts),
        ]
        env = os.environ.copy()
        env.update(CHILD_ENV)
        t = time.perf_counter()
        try:
            with open(log_path, "w") as log:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s", "process_s": time.perf_counter() - t}
        except OSError as e:
            return {"error": f"could not start {python}: {e}", "process_s": time.perf_counter() - t}
        wall = time.perf_counter() - t
        if proc.returncode != 0 or not out.exists():
            lines = [ln for ln in log_path.read_text(errors="replace").strip().splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"exit code {proc.returncode}"
            return {"error": reason, "error_tail": "\n".join(lines[-20:]), "process_s": wall}
        rec = json.loads(out.read_text())
        rec["process_s"] = wall
        return rec


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


COLUMNS = [
    ("data", "data", ""),
    ("method", "method", ""),
    ("heldout_dev", "held-out dev/entry", ".4f"),
    ("heldout_dev_comp", "held-out dev, comp x total", ".4f"),
    ("train_dev", "train dev/entry", ".4f"),
    ("morans_i", "mean Moran's I", ".3f"),
    ("s_per_iter", "s/iter", ".3f"),
    ("n_iter", "iters", "d"),
    ("converged", "conv", ""),
    ("total_s", "fit s", ".1f"),
]


def format_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |"]
    lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|")
    for r in rows:
        if "error" in r:
            cells = [r.get("data", ""), r.get("method", ""), f"failed: {r['error']}"] + [""] * (
                len(COLUMNS) - 3
            )
        else:
            cells = [_fmt(r.get(k), f) for k, _, f in COLUMNS]
            if r.get("method_key") == "mofaflex" and r.get("budget_hit"):
                cells[8] = "no (time cap)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def footnotes(rows: list[dict], datasets: list[str]) -> str:
    notes = [
        "Protocol: `sfact.pp.prepare(adata, group_key=GROUP, min_group_size=1)`, then "
        f"`sfact.tl.heldout_split(adata, fraction={HELDOUT_FRACTION}, random_state={SEED})`; "
        f"L = {N_FACTORS}; every model sees the same training cells.",
        "held-out dev/entry: 2 Σ[y log(y/λ) − (y − λ)] / (n_test·D) with λ predicted for the held-out cells "
        "from their coordinates (mggp_svgp: and group). sfact svgp/mggp_svgp: `sfact.tl.heldout_deviance` "
        "(size factor = own total / training median total). sfact pnmf: held-out log-factor means and "
        f"variances = means over the {KNN_FACTORS} nearest training cells (cKDTree on obsm['spatial']), "
        "model loadings, size factor = own total / training median total. MOFA-FLEX: its NSF-preset mean "
        "λ = relu(Σ_l relu(f_nl) relu(w_dl)) · total_n / D, f = GP predictive mean at the held-out "
        "coordinates (`get_gps(x=...)`), w = posterior means of the weights.",
        "held-out dev, comp x total: the same predicted rates with each held-out row renormalized to a "
        "composition and multiplied by the cell's total count (the same for every row; the baseline and "
        "kNN rows are already of that form).",
        f"kNN-{KNN_COMPOSITION}: mean count composition of the {KNN_COMPOSITION} nearest training cells, "
        f"mixed (1 − {KNN_SHRINK}) : {KNN_SHRINK} with the global gene share, times own total; no model "
        "(sfact.tl.knn_deviance).",
        "train dev/entry: over the training cells with the model's own rates (sfact: s_n Σ_l W_dl "
        "exp(μ_nl + σ²_nl/2)). mean Moran's I: squidpy Moran's I (6-NN graph) of the training-cell "
        "factors (sfact: exp(μ); MOFA-FLEX: relu'd posterior means), averaged over factors.",
        "s/iter: mean of the differences of the per-iteration time stamps (sfact: `model.history['time']`; "
        "MOFA-FLEX: one full-batch SVI step = one epoch). fit s: wall time of construction + training "
        "(sfact includes its KL-NMF initialization; MOFA-FLEX includes its post-fit factor sorting).",
    ]
    for r in rows:
        if r.get("method_key") == "mofaflex" and "error" not in r:
            notes.append(
                f"MOFA-FLEX on {r['data']}: {r['n_iter']} epochs (cap {r['max_iter']} epochs / "
                f"{r.get('budget_s')} s of training), "
                + (
                    "stopped by its own early stopper"
                    if r.get("converged")
                    else "stopped by the time cap"
                    if r.get("budget_hit")
                    else "stopped by the epoch cap"
                )
                + f"; factors all-zero after relu: {r.get('n_zero_factors_train')} of {N_FACTORS} (training), "
                f"{r.get('n_zero_factors_heldout')} (held-out); held-out entries with y > 0 and λ < "
                f"{LAM_FLOOR:g} (floored): {r.get('n_rates_floored')}. With posterior-mean rates "
                "E[relu(z)]·E[relu(w)] (mean-field posteriors; held-out z ~ N(GP mean, GP var + 1 − outputscale)) "
                f"instead of relu(posterior mean): held-out {_fmt(r.get('heldout_dev_postmean'), '.4f')}, "
                f"comp x total {_fmt(r.get('heldout_dev_comp_postmean'), '.4f')}, "
                f"train {_fmt(r.get('train_dev_postmean'), '.4f')}."
            )
    peer = [f"{DATASETS[d]['label']}: {PEER[d]}" for d in datasets if d in PEER]
    if peer:
        notes.append("Published/peer numbers (project docs, same protocol): " + "; ".join(peer) + ".")
    return "\n".join(f"{i + 1}. {n}" for i, n in enumerate(notes))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: few iterations and epochs")
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, from {list(DATASETS)}")
    p.add_argument("--priors", default=",".join(SFACT_PRIORS), help=f"sfact priors, from {SFACT_PRIORS}")
    p.add_argument("--max-iter", type=int, default=None, help="sfact iteration cap (default 1000; 60 quick)")
    p.add_argument("--skip-mofaflex", action="store_true", help="leave out the MOFA-FLEX row")
    p.add_argument("--skip-references", action="store_true", help="leave out the baseline and kNN rows")
    p.add_argument(
        "--mofaflex-max-epochs", type=int, default=None, help="MOFA-FLEX epoch cap (default 10000; 5 quick)"
    )
    p.add_argument(
        "--mofaflex-budget",
        type=float,
        default=None,
        help="seconds of MOFA-FLEX training before it is stopped (default 720; 120 quick; 0 = none)",
    )
    p.add_argument(
        "--prior-kwargs",
        default=None,
        help='JSON: {"svgp": {...}, "mggp_svgp": {...}, "pnmf": {...}} or a flat object for svgp and mggp_svgp',
    )
    p.add_argument(
        "--train-kwargs",
        default=None,
        help="JSON for model.train(): keyed by prior like --prior-kwargs, or a flat object for all priors",
    )
    p.add_argument(
        "--bench-python", default=str(DEFAULT_BENCH_PYTHON), help="python of the MOFA-FLEX environment"
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per child process")
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="results folder (default benchmarks/results)"
    )
    p.add_argument("--tag", default=None, help="file stem (default spatial_full / spatial_quick)")
    p.add_argument("--one", nargs=2, metavar=("METHOD", "DATASET"), help=argparse.SUPPRESS)
    p.add_argument("--json-out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-opts", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one is not None:  # child mode
        method, dataset = args.one
        opts = json.loads(args.child_opts)
        if method == "mofaflex":
            rec = run_mofaflex(dataset, opts["max_epochs"], opts.get("budget_s"))
        elif method in SFACT_PRIORS:
            rec = run_sfact(dataset, method, opts["max_iter"], opts["prior_kwargs"], opts["train_kwargs"])
        else:
            p.error(f"--one: unknown method {method!r}")
        text = json.dumps(rec, indent=1, default=str)
        if args.json_out is not None:
            args.json_out.write_text(text)
        else:
            print(text)
        return 0

    os.environ.update(CHILD_ENV)
    caps = dict(QUICK_CAPS if args.quick else FULL_CAPS)
    if args.max_iter is not None:
        caps["max_iter"] = args.max_iter
    if args.mofaflex_max_epochs is not None:
        caps["mofaflex_max_epochs"] = args.mofaflex_max_epochs
    if args.mofaflex_budget is not None:
        caps["mofaflex_budget_s"] = args.mofaflex_budget if args.mofaflex_budget > 0 else None
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    priors = [q.strip() for q in args.priors.split(",") if q.strip()]
    bad = [d for d in datasets if d not in DATASETS] + [q for q in priors if q not in SFACT_PRIORS]
    if bad:
        p.error(f"unknown data set(s)/prior(s) {bad}; data sets: {list(DATASETS)}, priors: {SFACT_PRIORS}")
    for text in (args.prior_kwargs, args.train_kwargs):
        if text:
            json.loads(text)  # fail early on bad JSON
    tag = args.tag or ("spatial_quick" if args.quick else "spatial_full")
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = args.out / f"{tag}_logs"
    log_dir.mkdir(exist_ok=True)

    info = machine_info()
    info["caps"] = caps
    header = ["# sfact spatial benchmark", ""]
    header += [f"- {k}: {v}" for k, v in info.items()]
    print("\n".join(header), flush=True)
    print(flush=True)

    rows: list[dict] = []
    t_all = time.perf_counter()

    def stamp() -> str:
        return f"[{time.perf_counter() - t_all:7.1f} s]"

    for dataset in datasets:
        label = DATASETS[dataset]["label"]
        if not args.skip_references:
            print(f"{stamp()} references on {dataset} ...", flush=True)
            for rec in run_references(dataset, ["baseline", "knn"]):
                rec["data"], rec["method"] = label, LABELS[rec["method_key"]]
                rows.append(rec)
                print(f"    {rec['method']}: held-out {rec['heldout_dev']:.4f}", flush=True)
        for prior in priors:
            opts = {
                "max_iter": caps["max_iter"],
                "prior_kwargs": parse_kwargs(args.prior_kwargs, prior, spatial_only=True),
                "train_kwargs": parse_kwargs(args.train_kwargs, prior, spatial_only=False),
            }
            print(f"{stamp()} sfact {prior} on {dataset} {opts} ...", flush=True)
            rec = spawn(
                sys.executable, prior, dataset, opts, args.timeout, log_dir / f"{prior}_{dataset}.log"
            )
            rec.update(data=label, method=LABELS[prior], method_key=prior)
            rows.append(rec)
            _report(rec)
        if not args.skip_mofaflex:
            opts = {"max_epochs": caps["mofaflex_max_epochs"], "budget_s": caps["mofaflex_budget_s"]}
            print(f"{stamp()} MOFA-FLEX on {dataset} {opts} ...", flush=True)
            if not Path(args.bench_python).exists():
                rec = {
                    "error": f"{args.bench_python} not found (create .venv-bench, see benchmarks/README.md)"
                }
            else:
                rec = spawn(
                    args.bench_python,
                    "mofaflex",
                    dataset,
                    opts,
                    args.timeout,
                    log_dir / f"mofaflex_{dataset}.log",
                )
            rec.update(data=label, method=LABELS["mofaflex"], method_key="mofaflex")
            rows.append(rec)
            _report(rec)
    total = time.perf_counter() - t_all
    try:
        load_end = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load_end = None

    table = format_table(rows)
    notes = footnotes(rows, datasets)
    print()
    print(table)
    print()
    print(notes)
    print()
    print(f"total benchmark time {total:.1f} s; load average at the end (1, 5, 15 min): {load_end}")

    md = "\n".join(
        [
            *header,
            "",
            table,
            "",
            notes,
            "",
            f"Total benchmark time {total:.1f} s; load average at the end: {load_end}.",
            "",
        ]
    )
    md_path, json_path = args.out / f"{tag}.md", args.out / f"{tag}.json"
    md_path.write_text(md)
    payload = {
        "machine": info,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "total_s": total,
        "load_avg_end": load_end,
        "rows": rows,
        "table": table,
        "notes": notes,
    }
    json_path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {md_path} and {json_path}")
    return 1 if any("error" in r for r in rows) else 0


def _report(rec: dict) -> None:
    if "error" in rec:
        print(f"    FAILED: {rec['error']}", flush=True)
    else:
        print(
            f"    held-out {rec['heldout_dev']:.4f} (comp x total {rec['heldout_dev_comp']:.4f}), "
            f"train {rec.get('train_dev', float('nan')):.4f}, {rec['n_iter']} iterations, "
            f"converged={rec['converged']}, fit {rec['total_s']:.1f} s (process {rec['process_s']:.1f} s)",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
