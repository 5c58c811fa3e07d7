"""Small measuring helpers, each a few lines returning numbers (see measurement.md).

They run in whatever process calls them; the sweep calls them inside a worker process so that
the CPU high-water mark belongs to one cell and a crash takes only the worker down.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import sys
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode

from . import allocator

NOISY = 0.10  # IQR / median above this flags a cell `noisy`
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


# --- time -------------------------------------------------------------------------------------
def time_fn(fn: Callable, *, threads: int, min_run_time: float, min_blocks: int) -> list[float]:
    """Seconds per call, one sample per timed block. The Timer synchronises CUDA itself."""
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    samples = list(m.times)
    while len(samples) < min_blocks:  # slow calls give few blocks: top up with same-size blocks
        samples.extend(timer.timeit(m.number_per_run).times)
    return samples


def summarize(samples: list[float]) -> dict:
    """Median and IQR in ms, the raw samples, and the noise flag."""
    ms = [s * 1e3 for s in samples]
    median = statistics.median(ms)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
        iqr = q3 - q1
    else:
        iqr = 0.0
    return {
        "latency_ms": median,
        "latency_iqr_ms": iqr,
        "noisy": bool(median > 0 and iqr / median > NOISY),
        "samples_ms": " ".join(f"{x:.6g}" for x in ms),
    }


# --- the timed calls --------------------------------------------------------------------------
def forward_step(attn, q, k, v, causal: bool) -> Callable:
    """The `fwd` pass: inference, so autograd records nothing (not even for parameters)."""

    def step():
        with torch.no_grad():
            return attn(q, k, v, causal=causal)

    return step


def forward_backward_step(attn, q, k, v, causal: bool, grad) -> Callable:
    """The `fwd_bwd` pass: forward then backward; gradients set to None first so each call
    allocates them as a training step would (accumulating would add a read-modify-write)."""

    def step():
        clear_grads(attn, q, k, v)
        attn(q, k, v, causal=causal).backward(grad)

    return step


def clear_grads(attn, *tensors) -> None:
    for t in tensors:
        t.grad = None
    attn.zero_grad(set_to_none=True)


# --- memory -----------------------------------------------------------------------------------
class TensorPeak:
    """Peak of live tensor bytes on the CPU above what was live when :meth:`start` ran: the
    quantity CUDA's ``max_memory_allocated() - baseline`` gives, independent of the malloc.

    The PyTorch profiler with ``profile_memory=True`` records every allocation and free of
    tensor storage by c10's CPU allocator as a ``[memory]`` event (+bytes, -bytes); the running
    sum of those events in time order is the live memory the call added, and its maximum is the
    peak. Memory a kernel library takes outside c10 (oneDNN scratch) is not tensor memory and
    is not counted; the process high-water mark (:class:`RssPeak`) sees it.
    """

    def __init__(self):
        self.prof = None

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        gc.collect()
        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with _quiet_stderr():  # kineto announces every start and stop on stderr
            self.prof.start()

    def stop(self) -> int:
        with _quiet_stderr():
            self.prof.stop()
        events = [
            e
            for e in self.prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
        ]
        self.prof = None
        return running_peak(sorted(events, key=lambda e: e.start_ns()))


def running_peak(events) -> int:
    """Maximum of the running sum of the events' bytes (allocations +, frees -), from 0."""
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 sent to /dev/null inside the block (C++ logging writes there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def tensor_peak_bytes(fn: Callable) -> int:
    """Peak live tensor bytes that one call of ``fn`` adds on the CPU (see TensorPeak)."""
    meter = TensorPeak()
    meter.start()
    try:
        fn()
    finally:
        peak = meter.stop()
    return peak


def _status_kb(key: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0 where /proc/self/clear_refs is writable)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


class CpuPeak:
    """The process high-water mark above a baseline, in bytes.

    Where the kernel lets us reset ``VmHWM`` the mark is per measured call. Elsewhere
    ``ru_maxrss`` never goes down, so a process measures one call, its first: ``resettable``
    tells the caller to use a fresh process per cell and to measure the warm-up call.
    """

    def __init__(self):
        self.resettable = _reset_hwm()
        self.base_kb = 0

    def _read_kb(self) -> int:
        if self.resettable:
            return _status_kb("VmHWM") or 0
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux

    def start(self) -> None:
        gc.collect()
        allocator.exact_peak_start()
        if self.resettable:
            _reset_hwm()
        self.base_kb = self._read_kb()

    def stop(self) -> int:
        peak = max(0, self._read_kb() - self.base_kb) * 1024
        allocator.exact_peak_stop()
        return peak


class CudaPeak:
    """The CUDA caching allocator's peak above what is allocated when the call starts."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.base = 0

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def stop(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.base


def peak_meter(device):
    return CudaPeak(device) if torch.device(device).type == "cuda" else CpuPeak()


# --- FLOPs ------------------------------------------------------------------------------------
def count_flops(fn: Callable) -> int | None:
    """FlopCounterMode's count of one call; None where it sees no work (fused CPU kernels)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() or None


def gflops_per_s(flops: int | None, latency_ms: float | None) -> float | None:
    if not flops or not latency_ms:
        return None
    return flops / (latency_ms * 1e-3) / 1e9


# --- the machine ------------------------------------------------------------------------------
def matmul_peak_gflops(device, dtype: torch.dtype, threads: int, size: int | None = None) -> float:
    """Achieved GFLOP/s of one large square matmul: the ceiling variants are compared with."""
    size = size or (8192 if torch.device(device).type == "cuda" else 2048)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    samples = time_fn(lambda: a @ b, threads=threads, min_run_time=0.3, min_blocks=3)
    return 2 * size**3 / statistics.median(samples) / 1e9
