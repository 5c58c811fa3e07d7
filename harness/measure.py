"""Small measuring helpers, each a few lines returning numbers (see measurement.md).

They run in whatever process calls them; the sweep calls them inside a worker process so that
the CPU high-water mark belongs to one cell and a crash takes only the worker down.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode

from . import allocator, results

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


# --- time -------------------------------------------------------------------------------------
MAX_BLOCKS = 1000  # samples kept per cell: a row's samples_ms stays a few kB however long it ran


def time_fn(fn: Callable, *, threads: int, min_run_time: float, min_blocks: int) -> list[float]:
    """Seconds per call, one sample per timed block: blocks of a size chosen by the Timer (one
    estimate, which is also a warm-up) until ``min_run_time`` has passed AND ``min_blocks``
    blocks are timed, then at most ``MAX_BLOCKS`` of them (``merge_blocks``). The Timer
    synchronises CUDA itself."""
    return merge_blocks(
        _timed_blocks(fn, threads, min_run_time, min_blocks), max(MAX_BLOCKS, min_blocks)
    )


def merge_blocks(per_call: list[float], cap: int) -> list[float]:
    """At most ``cap`` samples: runs of consecutive blocks (sizes differing by at most one) are
    merged into their mean, which is what one longer block of the same calls would have timed
    (blocks hold equal numbers of calls). A fast cell timed for long would otherwise write tens
    of thousands of samples into one CSV field."""
    if len(per_call) <= cap:
        return per_call
    size, extra = divmod(len(per_call), cap)
    out, start = [], 0
    for i in range(cap):
        end = start + size + (i < extra)
        out.append(sum(per_call[start:end]) / (end - start))
        start = end
    return out


def _timed_blocks(fn: Callable, threads: int, min_run_time: float, min_blocks: int) -> list[float]:
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    # blocked_autorange stops at min_run_time, and topping it up with timeit() would run two
    # warm-up calls per extra block; the loop under both, with our stop rule, runs none.
    loop = getattr(timer, "_threaded_measurement_loop", None)
    if loop is None:  # a torch without that loop: the public API (warm-ups on top-up)
        return _topped_up(timer, min_run_time, min_blocks)
    number = timer._estimate_block_size(min_run_time=0.05)
    times = loop(
        number,
        time_hook=lambda: timer._timeit(number),
        stop_hook=lambda times: len(times) >= min_blocks,
        min_run_time=min_run_time,
    )
    return [t / number for t in times]


def _topped_up(timer, min_run_time: float, min_blocks: int) -> list[float]:
    m = timer.blocked_autorange(min_run_time=min_run_time)
    samples = list(m.times)
    while len(samples) < min_blocks:
        samples.extend(timer.timeit(m.number_per_run).times)
    return samples


def summarize(samples: list[float]) -> dict:
    """Median and IQR in ms, the raw samples, and the noise flag (harness.results)."""
    return results.summarize(samples)


# --- the timed calls --------------------------------------------------------------------------
def forward_step(attn, q, k, v, causal: bool) -> Callable:
    """The `fwd` pass: inference, so autograd records nothing (not even for parameters)."""

    def step():
        with torch.no_grad():
            return attn(q, k, v, causal=causal)

    return step


def forward_backward_step(attn, q, k, v, causal: bool, grad) -> Callable:
    """The `fwd_bwd` pass: forward then backward; gradients set to None first so each call
    allocates them as a training step would (accumulating would add a read-modify-write).
    ``step.clear()`` drops them ahead of a call whose memory is measured, so that freeing the
    last call's gradients is not counted against this one."""

    def clear():
        clear_grads(attn, q, k, v)

    def step():
        clear()
        attn(q, k, v, causal=causal).backward(grad)

    step.clear = clear
    return step


def decode_step(attn, q_t, k_t, v_t, cache) -> Callable:
    """The `decode` pass: one new token against ``cache``, which the step leaves unchanged as
    its holder sees it (variants-api), so every call is the same step at the same context."""

    def step():
        with torch.no_grad():
            return attn.decode(q_t, k_t, v_t, cache)

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


class RssPeak:
    """The process high-water mark above its size when :meth:`start` ran, in bytes: what the
    operating system saw (malloc's caches and fragmentation included), beside the tensor peak.

    Where the kernel lets us reset ``VmHWM`` the mark is per measured call. Elsewhere
    ``ru_maxrss`` never goes down, so a process measures one call, its first, above its current
    RSS: ``resettable`` tells the caller to use a fresh process per cell and to measure the
    warm-up call.
    """

    def __init__(self):
        self.resettable = _reset_hwm()
        self.base_kb = 0

    def _peak_kb(self) -> int:
        if self.resettable:
            return _status_kb("VmHWM") or 0
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux

    def start(self) -> None:
        gc.collect()
        allocator.exact_peak_start()
        if self.resettable:
            _reset_hwm()
        self.base_kb = _status_kb("VmRSS") or 0

    def stop(self) -> int:
        peak = max(0, self._peak_kb() - self.base_kb) * 1024
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
    """The meter of the headline peak: live tensor bytes on either device."""
    return CudaPeak(device) if torch.device(device).type == "cuda" else TensorPeak()


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
