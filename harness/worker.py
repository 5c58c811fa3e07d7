"""The measuring worker: a persistent spawned process that runs one cell at a time.

Cells run outside the sweep's own process so that (1) the CPU high-water mark belongs to the
cell (reset per cell), (2) a cell over its time limit can be killed, and (3) a crash (a segfault
in a kernel, the kernel's OOM killer) costs one row, not the sweep. A killed or dead worker is
replaced by a fresh one on the next cell.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing as mp
import os
import signal
from multiprocessing.connection import wait

from . import allocator

START_TIMEOUT_S = 300  # importing torch and the variants on a busy 2-core machine


class WorkerError(RuntimeError):
    """The worker could not be started."""


# --- the child --------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """If the sweep is killed, the worker must not live on and hold the CPU (Linux only)."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_main(conn, threads: int) -> None:
    # Own process group: Ctrl-C in the terminal reaches the sweep, which stops the worker in
    # order, and a kill of the group also ends compile helpers the worker started.
    os.setpgrp()
    _die_with_parent()
    import torch

    from . import cell  # noqa: F401  (imports the variants before the first cell)
    from .measure import RssPeak, count_flops

    torch.set_num_threads(threads)
    # FlopCounterMode's first use loads ~70 MB of lazy imports: not a cell's peak memory.
    count_flops(lambda: torch.ones(4, 4) @ torch.ones(4, 4))
    gc.freeze()  # the imports' objects never die: keep them out of each cell's gc.collect()
    hello = {"ready": True, "resettable": RssPeak().resettable, "allocator": allocator.in_use()}
    conn.send(hello)
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the sweep is gone
            return
        if job is None:
            return
        conn.send(_handle(job))


# What a worker can be asked to do: job["kind"] -> "module:function" taking the job dict.
JOBS = {
    "speed": "harness.cell:measure_cell",
    "matmul_peak": "harness.worker:_matmul_peak",
    "train_step": "harness.train_step:measure_step",
    "task": "harness.tasks.run:train_job",
    "patterns": "harness.patterns:patterns_job",
}


def _handle(job: dict) -> dict:
    import importlib

    from . import cell

    try:
        _use_device(job.get("device", "cpu"))
        _ensure_registered(job)
        module, function = JOBS[job.get("kind", "speed")].split(":")
        return getattr(importlib.import_module(module), function)(job)
    except Exception as e:
        return cell.failure(e)
    finally:
        gc.collect()
        _empty_cuda_cache()
        allocator.release()  # the next cell starts without this one's cached pages


def _use_device(device: str) -> None:
    """``cuda:N``: make N the current device, so that the Timer's synchronisation and every
    allocation without an explicit device go to the GPU being measured."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))


def _matmul_peak(job: dict) -> dict:
    from .measure import DTYPES, matmul_peak_gflops

    out = {}
    for name in job["dtypes"]:
        out[name] = matmul_peak_gflops(
            job["device"], DTYPES[name], job["threads"], size=job.get("size")
        )
    return {"status": "ok", "gflops": out}


def _ensure_registered(job: dict) -> None:
    """A variant registered outside `variants/` (a plugin, a test) is not in a fresh process's
    registry: the job carries its classes, pickled by reference, and we register them here."""
    import variants

    origin = job.get("origin")
    if origin and job["variant"] not in variants.available():
        cls, config = origin
        variants.register(job["variant"], config=config)(cls)


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _environment(env: dict):
    """``os.environ`` updated with ``env`` inside the block, restored after it."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- the parent's handle ----------------------------------------------------------------------
class Worker:
    """Runs jobs in a spawned process; starts it lazily and replaces it after a kill or crash."""

    def __init__(self, threads: int, device: str = "cpu", malloc: str | None = "cached"):
        self.threads = threads
        self.device = device
        self.env = allocator.worker_env(malloc) if device == "cpu" else {}
        self.allocator = malloc or "cached"  # what the started worker reports it runs on
        self.ctx = mp.get_context("spawn")  # CUDA cannot be forked; spawn is the same everywhere
        self.proc = None
        self.conn = None
        self.resettable = True

    def _start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=worker_main, args=(child, self.threads), daemon=False)
        with _environment(self.env):  # a spawned child starts with the parent's environment
            self.proc.start()
        child.close()
        self.conn = parent
        if not wait([parent, self.proc.sentinel], START_TIMEOUT_S) or not parent.poll():
            code = self.proc.exitcode
            self.kill()
            raise WorkerError(f"the measuring worker did not start (exit code {code})")
        hello = parent.recv()
        self.resettable, self.allocator = hello["resettable"], hello["allocator"]

    def run(self, job: dict, timeout_s: float) -> dict:
        """The worker's answer, or a `timeout` / `error` / `oom` result if it gave none."""
        if self.proc is None:
            self._start()
        self.conn.send(job)
        ready = wait([self.conn, self.proc.sentinel], timeout_s)
        if self.conn in ready:
            try:
                result = self.conn.recv()
            except EOFError:  # died right after the cell started sending
                return self._died()
            if not self.resettable and self.device == "cpu":  # ru_maxrss never goes down:
                self.stop()  # one CPU cell per process (CUDA memory is the allocator's)
            return result
        if ready:  # only the sentinel: the process ended without answering
            return self._died()
        self.kill()
        return {
            "status": "timeout",
            "reason": f"over the cell time limit of {timeout_s:g} s; worker killed and replaced",
        }

    def _died(self) -> dict:
        self.proc.join(5)
        code = self.proc.exitcode
        self.kill()
        if code == -signal.SIGKILL:  # we did not send it: the kernel's OOM killer, most likely
            return {
                "status": "oom",
                "reason": "the worker was killed by SIGKILL (most likely the kernel's OOM "
                "killer); replaced",
            }
        how = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
        return {"status": "error", "reason": f"the worker process died ({how}); replaced"}

    def kill(self) -> None:
        """Kill the worker's process group (it and any compile helpers it started)."""
        if self.proc is not None and self.proc.pid:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):  # died before it made its group
                self.proc.kill()
            self.proc.join(10)
        self._forget()

    def stop(self) -> None:
        """Ask the worker to finish; kill it if it does not."""
        if self.proc is None:
            return
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.kill()
        self._forget()

    def _forget(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None
