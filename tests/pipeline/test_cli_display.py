"""What the command line shows: ``--version``, the live table at 80 and 120 columns, one summary,
and the remaining time estimated from the convergence criterion (``sfact.pipeline._eta``)."""

from __future__ import annotations

import io
import math
import re
import time
from pathlib import Path

import pytest
from rich.console import Console

import sfact
from sfact._cli import main
from sfact.pipeline import _display, _eta
from sfact.pipeline._jobs import Job
from sfact.pipeline._state import Tracker

TINY = """\
name: tiny
dataset: {loader: osmfish, subsample: 300}
preprocessing: {min_group_size: 10}
model: {n_factors: 2, prior: pnmf}
training: {max_iter: 3, min_iter: 1}
output_dir: out
"""
#: the summary line of a run: the runner's (``4 jobs in 9.6s: 4 done``) or the CLI's when nothing ran
SUMMARY = re.compile(r"^(\d+ jobs? in \S+: |Finished in )", re.MULTILINE)
TRAINING = {"training": {"tol": 1e-4, "min_iter": 20}}


def _job(name: str, task: str, *, training: bool = True) -> Job:
    return Job(
        name=name,
        task=task,
        fn=print,
        kwargs={"config": TRAINING} if training else {},
        log_path=Path("logs") / f"{name.replace('/', '_')}.log",
        dataset=name.split("/")[0],
        max_epoch=1000 if task == "train" else None,
    )


def _elbo(k: float) -> float:
    """A training-like ELBO per entry: fast at first, then a slower, power-like tail."""
    return -3 - 1.5 * math.exp(-k / 30) - 0.3 / (1 + k / 25)


def _true_stop(tol: float, *, min_iter: int = 20) -> int:
    """Where the real convergence check of ``sfact._core.train`` stops on :func:`_elbo`."""
    from sfact._core.train import TrainConfig, relative_change

    window, history = TrainConfig().window, []
    for k in range(1, 100_000):
        history.append(_elbo(k))
        if k >= min_iter and relative_change(history, window) < tol:
            return k
    raise AssertionError("never converges")


def _trace(last: int, *, every: int = 9, spe: float = 0.05) -> list[tuple[float, int, float]]:
    """Reported points: every ``every`` epochs (the callback reports a few times a second) and the last."""
    ks = [*range(1, last, every), last]
    return [(spe * k, k, _elbo(k)) for k in ks]


def _tracker(datasets=("osmfish",)) -> Tracker:
    """A run in the middle: per data set preprocess done, mggp_svgp training, the rest pending,
    failed or cancelled; with a message, an error and a reason."""
    jobs = []
    for ds in datasets:
        jobs += [
            _job(f"{ds}/preprocess", "preprocess"),
            _job(f"{ds}/mggp_svgp/train", "train"),
            _job(f"{ds}/mggp_svgp/analyze", "analyze"),
            _job(f"{ds}/mggp_lcgp/train", "train"),
            _job(f"{ds}/mggp_lcgp/analyze", "analyze"),
        ]
    tracker = Tracker(jobs)
    now = time.monotonic()
    for i in range(len(datasets)):
        pre, train, _analyze, failed, cancelled = tracker.rows[5 * i : 5 * i + 5]
        pre.status, pre.device, pre.started_at, pre.elapsed_s = "done", "cpu", now - 20, 12.34
        train.status, train.device, train.started_at, train.worker_t0 = "running", "cuda:0", now - 62.4, 0.0
        tracker._progress(train, {"epoch": 0, "max_epoch": 1000, "message": "training", "time": 0.0})
        for t, k, e in _trace(120):
            tracker._progress(train, {"epoch": k, "elbo": e, "time": t})
        failed.status, failed.device, failed.elapsed_s = "failed", "cpu", 3.5
        failed.error = "ValueError: boom"
        cancelled.status, cancelled.error = "cancelled", "dependency failed"
    return tracker


def _render(tracker: Tracker, width: int) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=True)
    console.print(_display._StatusTable(tracker))
    return console.file.getvalue()


# ---------------------------------------------------------------------------------------------
# sfact --version
# ---------------------------------------------------------------------------------------------


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"sfact {sfact.__version__}"


# ---------------------------------------------------------------------------------------------
# the live table
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [120, 80])
@pytest.mark.parametrize("datasets", [("osmfish",), ("osmfish", "slideseq_v2")])
def test_table_stays_readable(width, datasets):
    tracker = _tracker(datasets)
    out = _render(tracker, width)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= width
    assert "…" not in out  # nothing cut
    train = tracker.rows[1]
    remaining = _display.fmt_remaining(train.remaining_estimate())
    assert remaining.startswith("~")
    elbo = _display.fmt_elbo(train.elbo)
    assert elbo == "-3.0792"
    for value in ("done", "running", "failed", "cancelled", "pending", "120/1000", elbo, "12.3s", "3.5s"):
        assert re.search(rf"(^|\s){re.escape(value)}", out), value
    assert re.search(rf"\s1m0[23]s\s+{re.escape(remaining)}(\s|$)", out, re.MULTILINE)  # elapsed, left
    # the message, the error and the reason are shown too
    for info in ("training", "ValueError: boom", "dependency failed"):
        assert info in out
    # the data set is named once, above its rows, not in every row
    rows = [line for line in lines if re.search(r"\s(done|running|pending)(\s|$)", line)]
    assert len(rows) == 3 * len(datasets)
    assert not [row for row in rows if "/preprocess" in row or "osmfish/" in row]
    assert [line.strip() for line in lines if line.strip() in datasets] == list(datasets)


def test_table_keeps_every_column_when_there_is_room():
    out = _render(_tracker(), 200)
    header = next(line for line in out.splitlines() if "status" in line)
    assert header.split() == [
        "job", "task", "device", "status", "epoch", "ELBO", "elapsed", "remaining", "info",
    ]  # fmt: skip
    assert "osmfish/mggp_svgp/train" in out


def test_narrow_console_gets_one_block_per_job():
    tracker = _tracker()
    out = _render(tracker, 44)
    assert max(len(line) for line in out.splitlines()) <= 44
    assert "…" not in out
    assert "osmfish/mggp_svgp/train" in out and "running  cuda:0" in out
    assert "epoch 120/1000" in out and "ELBO -3.0792" in out
    assert f"{_display.fmt_remaining(tracker.rows[1].remaining_estimate())} left" in out


def test_a_long_error_is_cut_in_the_info_only():
    tracker = _tracker()
    tracker.rows[3].error = "ValueError: " + "a very long explanation " * 10
    out = _render(tracker, 80)
    cut = [line for line in out.splitlines() if "…" in line]
    assert cut and all("very long explanation" in line for line in cut)
    assert re.search(r"mggp_lcgp/train\s+cpu\s+failed\s+3\.5s", out)


# ---------------------------------------------------------------------------------------------
# one summary
# ---------------------------------------------------------------------------------------------


def test_summary_is_printed_once(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    assert main(["run", "preprocess", "-c", str(cfg), "--executor", "serial"]) == 0
    out = capsys.readouterr().out
    assert len(SUMMARY.findall(out)) == 1, out
    assert "1 jobs in" in out and "Summary: " in out
    # nothing to run: the one summary line is the command line's
    assert main(["run", "preprocess", "-c", str(cfg), "--executor", "serial"]) == 0
    out = capsys.readouterr().out
    assert SUMMARY.findall(out) == ["Finished in "], out
    assert "1 skipped" in out


# ---------------------------------------------------------------------------------------------
# the remaining time, from the convergence criterion
# ---------------------------------------------------------------------------------------------


def test_window_is_the_criterions():
    from sfact._core.train import TrainConfig

    assert TrainConfig().window == _eta.WINDOW


@pytest.mark.parametrize("fraction", [0.5, 0.7, 0.9])
def test_estimate_follows_the_convergence_criterion(fraction):
    tol, spe, max_epoch = 1e-4, 0.05, 3000
    stop = _true_stop(tol)
    epoch = int(stop * fraction)
    est = _eta.estimate_remaining(
        _trace(epoch), epoch=epoch, max_epoch=max_epoch, seconds_per_epoch=spe, tol=tol, min_iter=20
    )
    truth = (stop - epoch) * spe
    assert not est.bound
    assert truth / 2 <= est.seconds <= truth * 2
    assert est.seconds < 0.1 * (max_epoch - epoch) * spe  # not the time to max_iter


def test_estimate_without_a_prediction_is_the_bound_to_max_iter():
    spe = 0.1
    kwargs = {"epoch": 100, "max_epoch": 1000, "seconds_per_epoch": spe}
    to_max = 900 * spe
    # a job without a criterion (not a pipeline train job)
    assert _eta.estimate_remaining(_trace(100), **kwargs) == (pytest.approx(to_max), True)
    # tol=0 never converges: the time to max_iter is the estimate
    assert _eta.estimate_remaining(_trace(100), **kwargs, tol=0.0) == (pytest.approx(to_max), False)
    # an ELBO that keeps changing as fast (no convergence in sight)
    linear = [(spe * k, k, -3.0 - 0.01 * k) for k in range(1, 101, 5)]
    assert _eta.estimate_remaining(linear, **kwargs, tol=1e-4) == (pytest.approx(to_max), True)
    # too early to tell
    early = _trace(12, every=2)
    assert _eta.estimate_remaining(early, **{**kwargs, "epoch": 12}, tol=1e-4).bound
    # converging after max_iter
    slow = _eta.estimate_remaining(_trace(100), **{**kwargs, "max_epoch": 150}, tol=1e-6)
    assert slow == (pytest.approx(50 * spe), True)
    # no speed yet, or no max_iter
    assert _eta.estimate_remaining(_trace(100), **{**kwargs, "seconds_per_epoch": None}, tol=1e-4) is None
    assert _eta.estimate_remaining(_trace(100), **{**kwargs, "max_epoch": None}, tol=1e-4) is None
    assert _display.fmt_remaining(_eta.Remaining(126.0, bound=True)) == "<2m06s"
    assert _display.fmt_remaining(_eta.Remaining(4.0, bound=False)) == "~4.0s"


def test_no_estimate_once_training_has_ended():
    """After the epochs (ordering the factors, saving the model) nothing is counted to max_iter."""
    tracker = _tracker()
    train = tracker.rows[1]
    assert train.remaining_estimate() is not None
    tracker._progress(train, {"epoch": 120, "max_epoch": 1000, "elbo": -3.5, "message": "saving the model"})
    assert train.remaining_estimate() is None and train.remaining() is None
    assert "saving the model" in _render(tracker, 80)


def test_criterion_comes_from_the_train_jobs_config():
    assert _eta.criterion(_job("d/svgp/train", "train")) == (1e-4, 20)
    assert _eta.criterion(_job("d/svgp/analyze", "analyze")) is None
    assert _eta.criterion(_job("d/svgp/train", "train", training=False)) is None


def test_trace_is_thinned_not_unbounded():
    trace: list = []
    for k in range(1, 5001):
        _eta.add_point(trace, (k * 0.1, k, _elbo(k)), cap=100)
    assert len(trace) <= 100 and trace[-1][1] == 5000
    assert [p[1] for p in trace] == sorted(p[1] for p in trace)
