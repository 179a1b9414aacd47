"""The job runner (``sfact.pipeline._runner`` and its worker, state, display and backend modules).

The job functions live in ``sfact.pipeline._testing_jobs``: spawned processes and Dask workers
import a job's function by module path, and with ``--import-mode=importlib`` this test module
is not importable by name there, while the installed package is.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from rich.console import Console

from sfact.pipeline import _backends, _display, _state, _worker
from sfact.pipeline._jobs import Job
from sfact.pipeline._runner import run_jobs
from sfact.pipeline._testing_jobs import crash, write_stamp


def _job(root: Path, name: str, task: str, deps=(), *, use_gpu=None, fn=write_stamp, **kwargs) -> Job:
    slug = name.replace("/", "_")
    if fn is write_stamp:
        kwargs = {"path": str(root / "out" / f"{slug}.json"), "text": name, **kwargs}
    return Job(
        name=name,
        task=task,
        fn=fn,
        kwargs=kwargs,
        log_path=root / "logs" / f"{slug}.log",
        depends_on=tuple(deps),
        use_gpu=task in ("train", "analyze") if use_gpu is None else use_gpu,
        dataset="ds",
        max_epoch=kwargs.get("epochs") or None,
    )


def _plan(root: Path, *, crash_job: bool = False) -> list[Job]:
    """preprocess -> {a/train, b/train (fails)} -> {a/analyze, b/analyze -> b/figures}; c skips."""
    (root / "out").mkdir(parents=True, exist_ok=True)
    (root / "out" / "ds_c_train.json").write_text("{}")  # c/train finds its output: skipped
    jobs = [
        _job(root, "ds/preprocess", "preprocess", sleep=0.1),
        _job(root, "ds/a/train", "train", ["ds/preprocess"], epochs=20, sleep=1.5),
        _job(root, "ds/b/train", "train", ["ds/preprocess"], sleep=0.5, fail=True),
        _job(root, "ds/c/train", "train", ["ds/preprocess"], skip_if_exists=True),
        _job(root, "ds/a/analyze", "analyze", ["ds/a/train"]),
        _job(root, "ds/b/analyze", "analyze", ["ds/b/train"]),
        _job(root, "ds/b/figures", "figures", ["ds/b/analyze"]),
        _job(root, "ds/c/analyze", "analyze", ["ds/c/train"]),
    ]
    if crash_job:
        jobs.append(_job(root, "ds/crash", "figures", ["ds/preprocess"], fn=crash))
    return jobs


EXPECTED = {
    "ds/preprocess": "done",
    "ds/a/train": "done",
    "ds/b/train": "failed",
    "ds/c/train": "skipped",
    "ds/a/analyze": "done",
    "ds/b/analyze": "cancelled",
    "ds/b/figures": "cancelled",
    "ds/c/analyze": "done",
}


def _plain_console() -> Console:
    return Console(file=io.StringIO(), force_terminal=False, width=250)


def _stamp(root: Path, name: str) -> dict:
    return json.loads((root / "out" / f"{name.replace('/', '_')}.json").read_text())


def _check_plan_results(root: Path, results) -> None:
    """What every executor must produce for :func:`_plan`."""
    by_name = {r.name: r for r in results}
    assert [r.name for r in results][: len(EXPECTED)] == list(EXPECTED)  # plan order
    assert {name: by_name[name].status for name in EXPECTED} == EXPECTED
    failed = by_name["ds/b/train"]
    assert failed.error == "ValueError: failed on purpose (ds_b_train.json)"
    assert failed.log_path == root / "logs" / "ds_b_train.log"
    assert by_name["ds/b/analyze"].error == "dependency ds/b/train failed"
    assert by_name["ds/b/figures"].error == "dependency ds/b/analyze cancelled"
    assert by_name["ds/c/train"].output == {"skipped": True, "path": str(root / "out" / "ds_c_train.json")}
    assert by_name["ds/a/analyze"].output == {
        "path": str(root / "out" / "ds_a_analyze.json"),
        "text": "ds/a/analyze",
    }
    assert by_name["ds/a/train"].elapsed_s >= 1.4
    assert all(r.device == "cpu" for r in results if r.status != "cancelled")
    # dependencies: each job started after its dependency ended
    pre, a_train, a_an = (_stamp(root, n) for n in ("ds/preprocess", "ds/a/train", "ds/a/analyze"))
    assert pre["end"] <= a_train["start"] <= a_train["end"] <= a_an["start"]
    assert pre["end"] <= _stamp(root, "ds/c/analyze")["start"]
    for name in ("ds/b/train", "ds/b/analyze", "ds/b/figures"):
        assert not (root / "out" / f"{name.replace('/', '_')}.json").exists()
    assert not (root / "logs" / "ds_b_analyze.log").exists()  # cancelled jobs never start
    # logs: header, the job's prints, stderr and logging, the traceback, the footer
    log = (root / "logs" / "ds_b_train.log").read_text()
    assert "ds/b/train  (train)  device cpu" in log.splitlines()[0]
    assert "job writing ds_b_train.json on cpu" in log
    assert "WARNING sfact.testing: logged from the job" in log
    assert "about to fail" in log
    assert "Traceback (most recent call last)" in log and 'raise ValueError(f"failed on purpose' in log
    assert re.fullmatch(
        r"===== failed after \d+\.\ds \(.*\): ValueError: failed on purpose .* =====", log.splitlines()[-1]
    )
    assert "===== done after" in (root / "logs" / "ds_a_train.log").read_text()
    assert "===== skipped after" in (root / "logs" / "ds_c_train.log").read_text()


def _ran_in_parallel(out: str, first: str, second: str) -> bool:
    """Whether, in the plain lines, both jobs started before either of them ended."""
    lines = out.splitlines()

    def at(name: str, what: str) -> int:
        return next(i for i, ln in enumerate(lines) if f"] {name} " in ln and what in ln)

    starts = [at(first, "started"), at(second, "started")]
    ends = [at(first, "done in"), at(second, "FAILED after")]
    return max(starts) < min(ends)


def _final_table(text: str) -> dict[str, list[str]]:
    """Rows of the final plain table, by job name."""
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[1] in ("preprocess", "train", "analyze", "figures"):
            rows[parts[0]] = parts
    return rows


# ---------------------------------------------------------------------------------------------
# plan checks, placement, formatting (no worker processes)
# ---------------------------------------------------------------------------------------------


def test_invalid_plans_raise_before_running(tmp_path):
    a = _job(tmp_path, "a", "preprocess")
    with pytest.raises(ValueError, match=r"'a/train' depends on unknown job\(s\) 'nope'"):
        run_jobs([a, _job(tmp_path, "a/train", "train", ["nope"])], executor="serial")
    cycle = [
        a,
        _job(tmp_path, "x", "train", ["a", "z"]),
        _job(tmp_path, "y", "analyze", ["x"]),
        _job(tmp_path, "z", "figures", ["y"]),
    ]
    with pytest.raises(ValueError, match=r"cycle: x -> z -> y -> x"):
        run_jobs(cycle, executor="serial")
    with pytest.raises(ValueError, match="unique; repeated: a"):
        run_jobs([a, a], executor="serial")
    with pytest.raises(ValueError, match="`executor` must be"):
        run_jobs([a], executor="threads")
    bad = Job(name="l", task="train", fn=lambda **kw: {}, kwargs={}, log_path=tmp_path / "l.log")
    with pytest.raises(TypeError, match="'l' cannot be sent to a worker"):
        run_jobs([a, bad], executor="local")
    assert not (tmp_path / "logs").exists()  # nothing ran


def test_missing_dask_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ImportError, match=r'pip install "sfact\[dask\]"'):
        run_jobs([_job(tmp_path, "a", "preprocess")], executor="dask", console=_plain_console())


def test_slot_pool_places_gpu_jobs_on_gpus_first(tmp_path):
    pool = _backends.SlotPool(["cuda:0", "cuda:1", "cpu"])
    gpu_jobs = [_job(tmp_path, f"t{i}", "train") for i in range(4)]
    cpu_job = _job(tmp_path, "f", "figures")
    assert [pool.acquire(j) for j in gpu_jobs[:2]] == [0, 1]
    assert pool.acquire(gpu_jobs[2]) == 2  # GPUs busy: the CPU slot
    assert pool.acquire(gpu_jobs[3]) is None
    assert pool.acquire(cpu_job) is None  # never on a GPU slot
    pool.release("t0")
    assert pool.acquire(cpu_job) is None
    assert pool.acquire(gpu_jobs[3]) == 0
    pool.release("t2")
    assert pool.acquire(cpu_job) == 2
    serial = _backends.SerialPool(["cuda:0", "cpu"])
    assert serial.acquire(gpu_jobs[0]) == 0
    assert serial.acquire(cpu_job) is None  # one at a time
    serial.release("t0")
    assert serial.acquire(cpu_job) == 1


def test_devices_always_include_a_cpu_slot(tmp_path):
    jobs = [_job(tmp_path, "p", "preprocess"), _job(tmp_path, "t", "train", ["p"])]
    results = run_jobs(jobs, executor="serial", devices=["cuda:7"], console=_plain_console())
    # serial runs use_gpu jobs on the first GPU slot; write_stamp does not touch the device
    assert [(r.status, r.device) for r in results] == [("done", "cpu"), ("done", "cuda:7")]


def test_auto_devices_one_slot_per_gpu_plus_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _backends.worker_devices() == ["cuda:0", "cuda:1", "cpu"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert _backends.worker_devices() == ["cpu"]
    assert _backends.worker_devices(["cuda:1"]) == ["cuda:1", "cpu"]  # a CPU slot is added
    assert _backends.worker_devices(["cpu", "cuda", "cpu"]) == ["cpu", "cuda", "cpu"]


def test_formatting_and_remaining_time(tmp_path):
    assert _display.fmt_seconds(None) == ""
    assert _display.fmt_seconds(42.06) == "42.1s"
    assert _display.fmt_seconds(723) == "12m03s"
    assert _display.fmt_seconds(3 * 3600 + 120) == "3h02m"
    assert _display.fmt_elbo(-3.45123) == "-3.4512"
    assert _display.fmt_elbo(-1.5e7) == "-1.5000e+07"
    assert _worker.one_line(ValueError("two\n  lines")) == "ValueError: two lines"
    row = _state.Row(_job(tmp_path, "t", "train", epochs=1000), 0, status="running", worker_t0=100.0)
    assert row.remaining() is None
    tracker = _state.Tracker([row.job])
    tracker.rows[0] = row
    tracker._progress(row, {"epoch": 10, "time": 110.0, "elbo": -2.0})  # 1 s per epoch from start
    assert row.remaining() == pytest.approx(990.0)
    tracker._progress(row, {"epoch": 110, "time": 120.0})  # then 0.1 s per epoch
    assert row.remaining() == pytest.approx(89.0)
    assert _display.fmt_epoch(row) == "110/1000"


# ---------------------------------------------------------------------------------------------
# serial executor (in this process): the shared scheduling logic, logs and display
# ---------------------------------------------------------------------------------------------


def test_serial_runs_the_plan(tmp_path, monkeypatch):
    monkeypatch.setattr(_display, "_PLAIN_PROGRESS_INTERVAL", 0.0)
    console = _plain_console()
    results = run_jobs(_plan(tmp_path), executor="serial", console=console)
    _check_plan_results(tmp_path, results)
    out = console.file.getvalue()
    assert "\x1b[" not in out  # no colours off a terminal
    lines = out.splitlines()
    assert any("ds/a/train" in ln and ln.rstrip().endswith("started") for ln in lines)
    progress = [ln for ln in lines if "ds/a/train" in ln and "epoch" in ln]
    assert progress and "epoch 20/20  elbo -0.0476" in progress[-1]
    assert any(
        "ds/b/train" in ln
        and "FAILED after " in ln
        and ": ValueError: failed on purpose" in ln
        and "ds_b_train.log" in ln
        for ln in lines
    )
    assert any("ds/b/figures" in ln and "cancelled: dependency ds/b/analyze cancelled" in ln for ln in lines)
    table = _final_table(out)
    assert table["ds/a/train"][:6] == ["ds/a/train", "train", "cpu", "done", "20/20", "-0.0476"]
    assert table["ds/b/train"][3] == "failed" and "ValueError:" in table["ds/b/train"]
    assert table["ds/c/train"][3] == "skipped"
    assert "8 jobs in" in out and "4 done, 1 skipped, 1 failed, 2 cancelled" in out
    assert f"log of ds/b/train: {tmp_path / 'logs' / 'ds_b_train.log'}" in out


def test_serial_prefers_stage_order(tmp_path):
    jobs = [
        _job(tmp_path, "f", "figures"),
        _job(tmp_path, "an", "analyze"),
        _job(tmp_path, "t2", "train"),
        _job(tmp_path, "t1", "train"),
        _job(tmp_path, "p", "preprocess"),
    ]
    run_jobs(jobs, executor="serial", console=_plain_console())
    starts = {name: _stamp(tmp_path, name)["start"] for name in ("f", "an", "t2", "t1", "p")}
    assert sorted(starts, key=starts.get) == ["p", "t2", "t1", "an", "f"]


def test_serial_routes_scanpy_logging_to_the_job_log(tmp_path):
    import scanpy as sc

    before = sc.settings.logfile
    job = _job(tmp_path, "p", "preprocess", scanpy_message="through scanpy")
    (result,) = run_jobs([job], executor="serial", console=_plain_console())
    assert result.status == "done"
    assert "WARNING: through scanpy" in job.log_path.read_text()
    assert sc.settings.logfile is before  # put back


def test_live_table_renders(tmp_path):
    console = Console(file=io.StringIO(), force_terminal=True, width=150, color_system="truecolor")
    jobs = [_job(tmp_path, "p", "preprocess"), _job(tmp_path, "t", "train", ["p"], epochs=5, sleep=0.6)]
    results = run_jobs(jobs, executor="serial", console=console)  # live: console is a terminal
    assert [r.status for r in results] == ["done", "done"]
    out = console.file.getvalue()
    assert "\x1b[" in out  # coloured
    for column in ("job", "task", "device", "status", "epoch", "ELBO", "elapsed", "remaining"):
        assert column in out
    assert "5/5" in out and "-0.1667" in out
    assert "started" not in out  # no plain lines in live mode
    assert "2 jobs in" in out


def test_plain_mode_on_a_terminal_stays_plain(tmp_path):
    """``live=False`` (``--plain``) on a terminal-like console (e.g. Jupyter with FORCE_COLOR):
    progress lines and a final table without colour codes, never cut to the console width."""
    console = Console(file=io.StringIO(), force_terminal=True, width=40, color_system="truecolor")
    long = "a_rather_long_data_set_name/preprocess"
    results = run_jobs([_job(tmp_path, long, "preprocess")], executor="serial", live=False, console=console)
    assert [r.status for r in results] == ["done"]
    out = console.file.getvalue()
    assert "\x1b[" not in out
    assert "started" in out  # plain progress lines
    assert any(long in line and "done" in line for line in out.splitlines())  # the table row, whole


# ---------------------------------------------------------------------------------------------
# local worker processes and Dask
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The plan run once by the local executor (two CPU slots), with a crashing worker."""
    root = tmp_path_factory.mktemp("local")
    console = _plain_console()
    t0 = time.monotonic()
    results = run_jobs(_plan(root, crash_job=True), devices=["cpu", "cpu"], live=False, console=console)
    return root, results, console.file.getvalue(), time.monotonic() - t0


@pytest.mark.slow
def test_local_executor(local_run):
    root, results, out, _ = local_run
    _check_plan_results(root, results)
    crashed = results[-1]
    assert crashed.name == "ds/crash" and crashed.status == "failed"
    assert crashed.error == "worker process exited with code 3 before reporting a result"
    assert "crashing" in (root / "logs" / "ds_crash.log").read_text()  # fd-level output is logged too
    # each job in its own process
    a, pre = _stamp(root, "ds/a/train"), _stamp(root, "ds/preprocess")
    assert a["pid"] != pre["pid"] != os.getpid()
    assert _ran_in_parallel(out, "ds/a/train", "ds/b/train")  # two CPU slots
    table = _final_table(out)
    assert table["ds/a/train"][:6] == ["ds/a/train", "train", "cpu", "done", "20/20", "-0.0476"]
    assert "9 jobs in" in out and "2 failed" in out


@pytest.mark.slow
def test_dask_local_cluster_matches_local(tmp_path, local_run):
    local_root, local_results, _, _ = local_run
    console = _plain_console()
    results = run_jobs(_plan(tmp_path), executor="dask", devices=["cpu", "cpu"], console=console)
    _check_plan_results(tmp_path, results)
    assert _ran_in_parallel(console.file.getvalue(), "ds/a/train", "ds/b/train")
    n = len(EXPECTED)
    assert [(r.name, r.status, r.device, r.error) for r in results] == [
        (r.name, r.status, r.device, r.error) for r in local_results[:n]
    ]
    assert [r.output for r in results] == [
        json.loads(json.dumps(r.output).replace(str(local_root), str(tmp_path))) for r in local_results[:n]
    ]
    for name, status in EXPECTED.items():
        if status == "done":
            ours, theirs = _stamp(tmp_path, name), _stamp(local_root, name)
            assert (ours["text"], ours["device"]) == (theirs["text"], theirs["device"])
    assert _final_table(console.file.getvalue())["ds/a/train"][4:6] == ["20/20", "-0.0476"]


@pytest.mark.slow
def test_dask_external_scheduler_with_gpu_resources(tmp_path):
    from distributed import LocalCluster

    # a cluster that advertises a GPU: use_gpu jobs ask for it, and run on the CPU (no CUDA here)
    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None, resources={"GPU": 1}
    ) as cluster:
        jobs = [
            _job(tmp_path, "p", "preprocess"),
            _job(tmp_path, "t", "train", ["p"], epochs=3, sleep=0.3),
            _job(tmp_path, "bad", "train", ["p"], fail=True),
            _job(tmp_path, "an", "analyze", ["bad"]),
        ]
        results = run_jobs(
            jobs, executor="dask", scheduler=cluster.scheduler_address, console=_plain_console()
        )
    assert [r.status for r in results] == ["done", "done", "failed", "cancelled"]
    assert results[1].device == "cpu"
    assert "Traceback" in (tmp_path / "logs" / "bad.log").read_text()


@pytest.mark.slow
def test_ctrl_c_cancels_and_prints_the_final_table(tmp_path):
    log = tmp_path / "logs" / "long.log"
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from sfact.pipeline._jobs import Job
        from sfact.pipeline._runner import run_jobs
        from sfact.pipeline._testing_jobs import write_stamp
        root = Path({str(tmp_path)!r})
        jobs = [
            Job(name="long", task="train", fn=write_stamp, kwargs={{"path": str(root / "long.json"),
                "epochs": 100, "sleep": 60}}, log_path=root / "logs" / "long.log"),
            Job(name="after", task="analyze", fn=write_stamp, kwargs={{"path": str(root / "after.json")}},
                log_path=root / "logs" / "after.log", depends_on=("long",)),
        ]
        try:
            run_jobs(jobs, live=False)
        except KeyboardInterrupt as exc:
            print("interrupted:", [(r.name, r.status, r.error) for r in exc.results])
            raise SystemExit(130)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not (log.exists() and "job writing" in log.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None, "the job did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert "interrupted: [('long', 'cancelled', 'interrupted'), ('after', 'cancelled', 'interrupted')]" in out
    table = _final_table(out)
    assert table["long"][3] == "cancelled"
    assert "===== cancelled after" in log.read_text()  # the worker wrote its footer on SIGTERM
    assert not (tmp_path / "after.json").exists()
