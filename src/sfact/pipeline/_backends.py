"""Where and how jobs run: device slots, and the serial, local-process and Dask backends.

A pool hands out slots (one running job per device); a backend starts a job on a slot and
reports, when asked (:meth:`wait`), which jobs finished with what outcome. The scheduling loop
that uses them is :func:`._runner.run_jobs`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue as queue_mod
import signal
import threading
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._constants import is_gpu
from ._jobs import STAGES
from ._worker import available_cpus, dask_entry, die_with_parent, execute_job, local_entry, one_line

if TYPE_CHECKING:
    from ._display import Display
    from ._jobs import Job
    from ._state import Row, Tracker

#: seconds a terminated local worker gets to write its log footer before it is killed
_TERMINATE_GRACE_S = 5.0


def worker_devices(devices: Sequence[str] | None = None) -> list[str]:
    """The device slots of the workers: one running job each.

    Parameters
    ----------
    devices
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (repeat ``"cpu"`` for several CPU jobs). ``None``:
        one slot per visible CUDA GPU plus one ``"cpu"`` slot.

    Returns
    -------
    The slots, with a ``"cpu"`` slot added when there is none.
    """
    if devices is None:
        import torch

        return [f"cuda:{i}" for i in range(torch.cuda.device_count())] + ["cpu"]
    devices = [str(d) for d in devices]
    return devices if "cpu" in devices else [*devices, "cpu"]


class SlotPool:
    """Fixed slots (``"cuda:0"``, ..., ``"cpu"``): one running job per slot."""

    def __init__(self, devices: list[str]) -> None:
        self.devices = devices
        self.busy: dict[int, str] = {}  # slot index -> job name

    def acquire(self, job: Job) -> int | None:
        free = [i for i in range(len(self.devices)) if i not in self.busy]
        gpus = [i for i in free if is_gpu(self.devices[i])]
        cpus = [i for i in free if not is_gpu(self.devices[i])]
        choice = gpus if job.needs_gpu else (gpus or cpus) if job.use_gpu else cpus
        if not choice:
            return None
        self.busy[choice[0]] = job.name
        return choice[0]

    def release(self, name: str) -> None:
        for i, busy in list(self.busy.items()):
            if busy == name:
                del self.busy[i]


class SerialPool(SlotPool):
    """One job at a time: on the first GPU when it may use one, else on the CPU."""

    def acquire(self, job: Job) -> int | None:
        if self.busy:
            return None
        gpus = [i for i, d in enumerate(self.devices) if is_gpu(d)]
        cpus = [i for i, d in enumerate(self.devices) if not is_gpu(d)]
        i = gpus[0] if job.needs_gpu else (gpus or cpus)[0] if job.use_gpu else cpus[0]
        self.busy[i] = job.name
        return i


class OpenPool:
    """No limit: the cluster's scheduler decides where and when (device chosen on the worker)."""

    def __init__(self) -> None:
        self.devices: list[str] = []

    def acquire(self, job: Job) -> int | None:
        return -1

    def release(self, name: str) -> None:
        pass


class SerialBackend:
    """Runs each job in this process, when it is submitted."""

    def __init__(self, tracker: Tracker, display: Display) -> None:
        self.tracker = tracker
        self.display = display
        self.done: list[tuple[Row, dict]] = []

    def submit(self, row: Row, device: str | None, slot: int) -> None:
        def emit(event: dict) -> None:
            self.tracker.handle(event)
            self.display.tick()

        outcome = execute_job(row.job, device or "cpu", emit)
        self.done.append((row, outcome))

    def wait(self, timeout: float) -> list[tuple[Row, dict]]:
        done, self.done = self.done, []
        return done

    def interrupt(self) -> None:
        pass

    def close(self) -> None:
        pass


class LocalBackend:
    """One spawned process per running job; events through a manager queue.

    The workers and the manager process end when this process does, even when it is killed
    (:func:`._worker.die_with_parent`).
    """

    def __init__(self, tracker: Tracker, n_slots: int) -> None:
        import multiprocessing as mp
        from multiprocessing.managers import SyncManager

        self.tracker = tracker
        self.ctx = mp.get_context("spawn")
        self.manager = SyncManager(ctx=self.ctx)
        self.manager.start(initializer=die_with_parent)
        self.events = self.manager.Queue()
        self.procs: dict[str, Any] = {}
        self.outcomes: dict[str, dict] = {}
        self.terminated: set[str] = set()
        self.threads = max(1, available_cpus() // max(1, n_slots))

    def submit(self, row: Row, device: str | None, slot: int) -> None:
        job = row.job
        proc = self.ctx.Process(
            target=local_entry,
            args=(pickle.dumps(job), job.name, str(job.log_path), device or "cpu", self.events, self.threads),
            name=f"sfact-{job.name}",
            daemon=False,
        )
        # The child starts with SIGINT ignored (inherited through exec), so that a Ctrl-C while
        # it boots prints no traceback: the parent handles Ctrl-C and terminates children. It
        # also starts with the thread limits in its environment, before numpy/torch load (a
        # limit the user set is kept).
        env = {"OMP_WAIT_POLICY": "PASSIVE"}
        env.update(
            dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"), str(self.threads))
        )
        env = {k: v for k, v in env.items() if k not in os.environ}
        ignore = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if ignore else None
        os.environ.update(env)
        try:
            proc.start()
        finally:
            for k in env:
                os.environ.pop(k, None)
            if ignore:
                signal.signal(signal.SIGINT, old)
        self.procs[job.name] = proc

    def _drain(self) -> None:
        while True:
            try:
                event = self.events.get_nowait()
            except queue_mod.Empty:
                return
            if event.get("kind") == "outcome":
                self.outcomes[event["job"]] = event["outcome"]
            else:
                self.tracker.handle(event)

    def wait(self, timeout: float) -> list[tuple[Row, dict]]:
        from multiprocessing.connection import wait

        if self.procs:
            wait([p.sentinel for p in self.procs.values()], timeout=timeout)
        else:
            time.sleep(timeout)
        exited = [name for name, p in self.procs.items() if p.exitcode is not None]
        self._drain()  # after the exit check: what an exited process sent is in the queue now
        finished = []
        for name in exited:
            proc = self.procs.pop(name)
            proc.join()
            outcome = self.outcomes.pop(name, None)
            if outcome is None:
                code = proc.exitcode
                why = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
                outcome = {"status": "failed", "error": f"worker process {why} before reporting a result"}
            finished.append((self.tracker.by_name[name], outcome))
        return finished

    def interrupt(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        deadline = time.monotonic() + _TERMINATE_GRACE_S
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        self.procs.clear()

    def close(self) -> None:
        self.interrupt()
        self.manager.shutdown()


def _import_distributed():
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(
            'The Dask executor needs `dask.distributed`; install it with `pip install "sfact[dask]"`.'
        ) from exc
    return distributed


class DaskBackend:
    """Jobs as tasks on a ``dask.distributed`` cluster; progress as Dask events."""

    def __init__(self, tracker: Tracker, scheduler: str | None, devices: list[str]) -> None:
        # `devices`: the slots of our own LocalCluster (unused with a scheduler address)
        distributed = _import_distributed()
        self.tracker = tracker
        self.events: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
        self.futures: dict[str, Any] = {}
        self.cluster = None
        if scheduler is None:
            self.cluster = distributed.LocalCluster(
                n_workers=len(devices), threads_per_worker=1, processes=True, dashboard_address=None
            )
            self.client = distributed.Client(self.cluster)
            self.client.wait_for_workers(len(devices))
            workers = self.client.scheduler_info(n_workers=-1)["workers"]
            by_name = {info["name"]: address for address, info in workers.items()}
            self.slot_workers = [by_name[i] for i in range(len(devices))]
            self.per_host, _ = self._workers_per_host()
        else:
            self.client = distributed.Client(scheduler)
            self.slot_workers = []
        self.topic = f"sfact-runner-{uuid.uuid4().hex}"
        self.client.subscribe_topic(self.topic, self._on_event)

    def _on_event(self, event) -> None:  # on the client's event loop thread
        self.events.put(event[1])

    def _workers_per_host(self) -> tuple[dict[str, int], bool]:
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        per_host: dict[str, int] = {}
        for info in workers.values():
            per_host[info["host"]] = per_host.get(info["host"], 0) + 1
        has_gpu = any((info.get("resources") or {}).get("GPU", 0) > 0 for info in workers.values())
        return per_host, has_gpu

    def submit(self, row: Row, device: str | None, slot: int) -> None:
        job = row.job
        key = f"sfact-{job.name}-{uuid.uuid4().hex[:8]}"
        if self.cluster is not None:  # our own LocalCluster: one worker per slot, like "local"
            future = self.client.submit(
                dask_entry,
                pickle.dumps(job),
                self.topic,
                device,
                False,
                self.per_host,
                key=key,
                pure=False,
                workers=[self.slot_workers[slot]],
                allow_other_workers=False,
            )
        else:
            per_host, has_gpu = self._workers_per_host()
            gpu = job.use_gpu and has_gpu
            stage, index = row.priority()
            future = self.client.submit(
                dask_entry,
                pickle.dumps(job),
                self.topic,
                None,
                gpu,
                per_host,
                key=key,
                pure=False,
                resources={"GPU": 1} if gpu else None,
                priority=(len(STAGES) - stage) * 1_000_000 - index,
            )
        self.futures[job.name] = future

    def wait(self, timeout: float) -> list[tuple[Row, dict]]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.tracker.handle(self.events.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue_mod.Empty:
                break
        finished = []
        for name, future in list(self.futures.items()):
            if not future.done():
                continue
            del self.futures[name]
            if future.status == "finished":
                outcome = future.result()
            elif future.status == "cancelled":
                outcome = {"status": "cancelled", "error": "cancelled on the cluster"}
            else:
                exc = future.exception()
                outcome = {"status": "failed", "error": f"on the cluster: {one_line(exc)}"}
            finished.append((self.tracker.by_name[name], outcome))
        return finished

    def interrupt(self) -> None:
        # Dask cannot stop a task that runs; our own LocalCluster's workers die when it closes
        if self.futures:
            self.client.cancel(list(self.futures.values()))
        self.futures.clear()

    def close(self) -> None:
        self.interrupt()
        with contextlib.suppress(Exception):
            self.client.unsubscribe_topic(self.topic)
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()
