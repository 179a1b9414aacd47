"""Reliability of the ``sfact`` command line (issue 15): unusable output folders and devices are
refused when planning, a killed runner leaves no process behind, and what killed jobs leave
behind is cleared by the next run."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sfact._cli import main
from sfact.pipeline import Config, make_plan, print_plan
from sfact.pipeline._backends import SerialPool, SlotPool
from sfact.pipeline._jobs import Job
from sfact.pipeline._layout import remove_stale_temporaries
from sfact.pipeline._runner import run_jobs
from sfact.pipeline._stage_utils import _device
from sfact.pipeline._testing_jobs import write_stamp

TINY = """\
name: tiny
dataset: {loader: osmfish, subsample: 300}
model: {n_factors: 2, prior: pnmf}
training: {max_iter: 3, min_iter: 1}
analysis: {n_neighs: 6}
figures: {kinds: [factors], dpi: 30}
output_dir: OUT
"""
LINUX_PROC = sys.platform.startswith("linux") and Path("/proc/self/stat").exists()


def _config(tmp_path: Path, output_dir: str | Path = "out", **replace: str) -> Path:
    text = TINY.replace("OUT", str(output_dir))
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def _sfact(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _last_pid() -> int:
    """The PID of a process that has ended (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _no_cuda(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def _gpus(monkeypatch, n: int) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


# ---------------------------------------------------------------------------------------------
# output folders
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dry_run", [False, True])
def test_output_dir_below_a_file_is_one_line_and_exit_2_when_planning(tmp_path, capsys, dry_run):
    (tmp_path / "afile").write_text("not a folder")
    cfg = _config(tmp_path, tmp_path / "afile" / "out")
    rc, out, err = _sfact(capsys, "run", "all", "-c", cfg, "--plain", *(["--dry-run"] if dry_run else []))
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("sfact: error: ")
    assert str(cfg) in err and "`output_dir`" in err and "afile is not a folder" in err
    assert "choose a folder you can write to" in err
    assert "Traceback" not in err + out and "Plan:" not in out  # nothing planned was printed or run
    assert (tmp_path / "afile").read_text() == "not a folder"


@pytest.mark.skipif(not LINUX_PROC, reason="needs Linux /proc")
def test_output_dir_below_proc_is_refused_when_planning(tmp_path, capsys):
    cfg = _config(tmp_path, "/proc/sfact_cannot_be_here/out")
    rc, out, err = _sfact(capsys, "run", "all", "-c", cfg, "--plain")
    assert rc == 2
    assert err.count("\n") == 1 and "`output_dir`" in err and "/proc/sfact_cannot_be_here/out" in err
    assert "cannot" in err and "Traceback" not in err and "Plan:" not in out


def test_the_output_folder_is_made_when_planning(tmp_path, capsys):
    cfg = _config(tmp_path, tmp_path / "new" / "deeper")
    rc, _, _ = _sfact(capsys, "preprocess", "-c", cfg, "--dry-run")
    assert rc == 0 and not (tmp_path / "new").exists()  # a dry run writes nothing
    from sfact.pipeline import collect_configs
    from sfact.pipeline._plan import check_plan

    plan = make_plan(collect_configs([cfg]), ["preprocess"])
    check_plan(plan, devices=["cpu"])
    assert (tmp_path / "new" / "deeper" / "logs").is_dir()


# ---------------------------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dry_run", [False, True])
def test_training_device_cuda_without_cuda_is_refused_when_planning(tmp_path, capsys, monkeypatch, dry_run):
    _no_cuda(monkeypatch)
    cfg = _config(tmp_path, **{"min_iter: 1}": "min_iter: 1, device: cuda}"})
    rc, out, err = _sfact(capsys, "run", "all", "-c", cfg, "--plain", *(["--dry-run"] if dry_run else []))
    assert rc == 2
    assert err.count("\n") == 1 and str(cfg) in err and "`training.device`" in err
    assert "CUDA is not available" in err and "`training.device: auto`" in err
    assert "Plan:" not in out and not (tmp_path / "out").exists()  # refused before anything is written


def test_devices_with_a_gpu_that_is_not_there_fail_when_planning(tmp_path, capsys, monkeypatch):
    cfg = _config(tmp_path)
    _no_cuda(monkeypatch)
    rc, out, err = _sfact(capsys, "run", "all", "-c", cfg, "--devices", "cuda:0", "--plain")
    assert rc == 2 and err.count("\n") == 1
    assert "`--devices`: cuda:0" in err and "CUDA is not available" in err and "--devices cpu" in err
    assert "Plan:" not in out and not (tmp_path / "out").exists()  # no job started
    _gpus(monkeypatch, 2)
    rc, _, err = _sfact(capsys, "train", "-c", cfg, "--devices", "cuda:1,cuda:3", "--dry-run")
    assert rc == 2 and "cuda:3 asked for, but only 2 GPU(s) are visible" in err and "cuda:1," not in err
    rc, out, _ = _sfact(capsys, "train", "-c", cfg, "--devices", "cuda:1", "--dry-run")
    assert rc == 0 and "Dry run" in out


def test_training_device_cuda_with_cpu_only_devices_is_refused(tmp_path, capsys, monkeypatch):
    _gpus(monkeypatch, 1)
    cfg = _config(tmp_path, **{"min_iter: 1}": "min_iter: 1, device: 'cuda:0'}"})
    rc, _, err = _sfact(capsys, "train", "-c", cfg, "--devices", "cpu", "--dry-run")
    assert rc == 2 and "`training.device`: is 'cuda:0', but --devices gives no GPU" in err
    assert "add a GPU to --devices" in err


def test_training_device_cuda_is_honoured_never_the_cpu(monkeypatch):
    cfg = Config.from_dict({"dataset": {"loader": "osmfish"}, "training": {"device": "cuda"}})
    cfg.source = "tiny.yaml"
    # the runner gave the job the CPU: an error naming the key and the fix, not a CPU fit
    with pytest.raises(
        RuntimeError, match=r"`training.device` is 'cuda' in tiny.yaml, but this job was given 'cpu'"
    ):
        _device("cpu", cfg)
    _no_cuda(monkeypatch)
    with pytest.raises(RuntimeError, match=r"CUDA is not available: set `training.device: auto`"):
        _device(None, cfg)
    _gpus(monkeypatch, 2)
    assert _device("cuda:1", cfg) == "cuda:1"  # the runner picks which GPU
    assert _device(None, cfg) == "cuda"
    # model selection runs its fits on the CPU it is given
    assert _device("cpu", cfg, honour_gpu=False) == "cpu"
    auto = Config.from_dict({"dataset": {"loader": "osmfish"}})
    assert _device("cpu", auto) == "cpu"


def test_gpu_jobs_of_a_cuda_config_wait_for_a_gpu_slot(tmp_path):
    cfg = Config.from_dict(
        {"name": "ds", "dataset": {"loader": "osmfish"}, "model": {"prior": "pnmf"},
         "training": {"device": "cuda"}, "output_dir": str(tmp_path / "out")}
    )  # fmt: skip
    plan = make_plan([cfg], ["all"])
    needs = {job.task: job.needs_gpu for job in plan.jobs}
    assert needs == {"preprocess": False, "train": True, "analyze": True, "figures": False}
    buf = io.StringIO()
    print_plan(plan, file=buf)
    assert re.search(r"run +ds/pnmf/train +after preprocess  gpu  max_iter", buf.getvalue())
    train = next(job for job in plan.jobs if job.task == "train")
    pool = SlotPool(["cuda:0", "cpu"])
    assert pool.acquire(train) == 0
    assert pool.acquire(train) is None  # the CPU slot is free, but never taken by a GPU job
    assert SerialPool(["cpu", "cuda:0"]).acquire(train) == 1
    job = Job(
        name="gpu", task="train", fn=write_stamp, kwargs={"path": str(tmp_path / "s.json")},
        log_path=tmp_path / "gpu.log", use_gpu=True, needs_gpu=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match="must run on a GPU, but no device slot is one"):
        run_jobs([job], executor="serial", devices=["cpu"])
    assert not (tmp_path / "s.json").exists()


# ---------------------------------------------------------------------------------------------
# what killed jobs leave behind
# ---------------------------------------------------------------------------------------------
def _plant(folder: Path, name: str, pid: int, *, is_dir: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{name}-{pid}"
    if is_dir:
        path.mkdir()
        (path / "part.bin").write_bytes(b"half written")
    else:
        path.write_bytes(b"half written")
    return path


def test_the_next_run_removes_what_killed_jobs_left(tmp_path, capsys):
    cfg = _config(tmp_path)
    rc, _, _ = _sfact(capsys, "run", "all", "-c", cfg, "--executor", "serial", "--plain")
    assert rc == 0
    out = tmp_path / "out"
    dead, alive = _last_pid(), os.getpid()
    # as a --force rerun killed (SIGKILL, OOM) while writing would leave them
    stale = [
        _plant(out, "prepared.h5ad.tmp", dead, is_dir=False),
        _plant(out, "run_summary.json.tmp", dead, is_dir=False),
        _plant(out / "pnmf", "model.tmp", dead, is_dir=True),
        _plant(out / "pnmf", "results.tmp", dead, is_dir=True),
        _plant(out / "pnmf", "figures.tmp", dead, is_dir=True),
        _plant(out / "pnmf", "figures.old", dead, is_dir=True),  # figures/ is there: removed
    ]
    running = _plant(out / "pnmf", "model.tmp", alive, is_dir=True)  # a process still writing
    rc, stdout, _ = _sfact(capsys, "run", "all", "-c", cfg, "--plain")
    assert rc == 0 and "Nothing to run" in stdout  # every job skipped, the leftovers removed anyway
    assert [p for p in stale if p.exists()] == []
    assert running.is_dir() and (out / "pnmf" / "figures" / "factors.png").exists()


def test_a_job_clears_its_stale_siblings_when_it_starts(tmp_path, capsys):
    cfg = _config(tmp_path)
    dead = _last_pid()
    stale = _plant(tmp_path / "out", "prepared.h5ad.tmp", dead, is_dir=False)
    from sfact.pipeline import stages

    stages.preprocess(config=Config.from_dict({**_load(cfg), "output_dir": str(tmp_path / "out")}).to_dict())
    out = capsys.readouterr().out
    assert not stale.exists() and (tmp_path / "out" / "prepared.h5ad").exists()
    assert f"removed {stale} (left by a run that was killed)" in out


def _load(cfg: Path) -> dict:
    import yaml

    return yaml.safe_load(cfg.read_text())


def test_a_folder_moved_aside_by_a_killed_swap_is_moved_back(tmp_path):
    dead = _last_pid()
    old = _plant(tmp_path, "model.old", dead, is_dir=True)  # killed between the two renames
    half = _plant(tmp_path, "model.tmp", dead, is_dir=True)
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([old, half])
    assert (tmp_path / "model" / "part.bin").read_bytes() == b"half written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.skipif(not LINUX_PROC, reason="needs Linux /proc for process start times")
def test_a_reused_pid_does_not_keep_a_stale_sibling(tmp_path):
    mine = _plant(tmp_path, "results.tmp", os.getpid(), is_dir=True)
    os.utime(mine, (time.time() - 10 * 86400,) * 2)  # written long before this process started
    other = _plant(tmp_path, "other.tmp", os.getpid(), is_dir=False)  # just written: kept
    unrelated = tmp_path / ".hidden.tmp-file"
    unrelated.write_text("not ours")
    assert remove_stale_temporaries(tmp_path) == [mine]
    assert other.exists() and unrelated.exists()


# ---------------------------------------------------------------------------------------------
# killing the runner
# ---------------------------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    """Child PIDs of every process (from /proc)."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _descendants(pid: int) -> set[tuple[int, str]]:
    """(PID, start time) of every descendant of ``pid``."""
    kids, out, todo = _children(), set(), [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            start = _start_time(child)
            if start is not None:
                out.add((child, start))
                todo.append(child)
    return out


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running(procs: set[tuple[int, str]]) -> list[int]:
    """Those of ``procs`` still running (not ended, not a zombie, not a new process with the PID)."""
    alive = []
    for pid, start in procs:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[19] == start and fields[0] != "Z":
            alive.append(pid)
    return alive


@pytest.mark.skipif(not LINUX_PROC, reason="finds the runner's processes through Linux /proc")
def test_killing_the_runner_leaves_no_process_behind(tmp_path, capsys):
    cfg = _config(tmp_path, **{"max_iter: 3, min_iter: 1": "max_iter: 1000000, min_iter: 1000000"})
    assert _sfact(capsys, "preprocess", "-c", cfg, "--executor", "serial", "--plain")[0] == 0
    log = tmp_path / "out" / "logs" / "pnmf.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sfact", "train", "-c", str(cfg), "--plain"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    procs: set[tuple[int, str]] = set()
    try:
        deadline = time.monotonic() + 90
        while not (log.exists() and "(train)  device cpu" in log.read_text()):  # the job runs
            assert time.monotonic() < deadline and proc.poll() is None, "training did not start"
            procs |= _descendants(proc.pid)
            time.sleep(0.2)
        procs |= _descendants(proc.pid)
        # the resource tracker, the manager and the worker
        assert len(_running(procs)) >= 3, procs
        proc.send_signal(signal.SIGKILL)  # the runner alone
        proc.wait(10)
        deadline = time.monotonic() + 20
        while _running(procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _running(procs) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _running(procs):  # a failed test leaves no orphans either
            os.kill(pid, signal.SIGKILL)
    # the worker ended its job with a log footer and left no temporary output. (Whether the footer
    # says "cancelled" depends on where in the job the signal lands: inside a library call it can
    # surface as another exception, so only the footer itself is required here.)
    text = log.read_text()
    footers = [line for line in text.splitlines()[1:] if line.startswith("===== ")]
    assert footers, text
    assert list((tmp_path / "out").rglob(".*.tmp-*")) == []
