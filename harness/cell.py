"""Measure one cell in this process (the worker calls this; tests may too).

A cell spec is a plain dict: the CELL_KEY fields (``options`` as a dict), plus the timing
settings. The result holds only what was measured; the parent adds the analytic columns.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

import variants

from .measure import (
    DTYPES,
    RssPeak,
    count_flops,
    decode_step,
    forward_backward_step,
    forward_step,
    peak_meter,
    summarize,
    time_fn,
)


def build(spec: dict):
    """The variant module of a cell, built for its shape, on its device and dtype."""
    attn = variants.build(
        spec["variant"],
        **spec["options"],
        seq_len=spec["seq_len"],
        num_heads=spec["heads"],
        kv_heads=spec.get("kv_heads") or spec["heads"],
        head_dim=spec["head_dim"],
    )
    return attn.to(device=spec["device"], dtype=DTYPES[spec["dtype"]])


def make_inputs(spec: dict, requires_grad: bool, extra: int = 0):
    """Seeded q (batch, heads, n, head_dim) and k, v (batch, kv_heads, n, head_dim), n = seq_len
    + ``extra``; drawn on the CPU so every device sees the same numbers."""
    g = torch.Generator().manual_seed(spec.get("seed", 0))
    n, kv = spec["seq_len"] + extra, spec.get("kv_heads") or spec["heads"]
    dtype, device = DTYPES[spec["dtype"]], spec["device"]
    shapes = [(spec["batch"], h, n, spec["head_dim"]) for h in (spec["heads"], kv, kv)]
    return [
        torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
        for s in shapes
    ]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(attn, spec: dict) -> tuple[Callable, dict]:
    """The callable a cell times, and what was learnt setting it up (decode: the cache size).

    fwd: one call without autograd; fwd_bwd: forward and backward with fresh gradients; decode:
    the prompt of seq_len tokens is prefilled (set-up, not timed), then the step is one new
    token against that state. The step returns a new state and leaves the one it was given as
    its holder sees it, so every timed call is the same step at context seq_len."""
    causal = spec["causal"]
    if spec["pass"] == "decode":
        q, k, v = make_inputs(spec, requires_grad=False, extra=1)
        n = spec["seq_len"]
        with torch.no_grad():
            _, cache = attn.prefill(q[:, :, :n], k[:, :, :n], v[:, :, :n], output=False)
        new = [t[:, :, n:].contiguous() for t in (q, k, v)]
        del q, k, v
        return decode_step(attn, *new, cache), {"cache_mb": attn.cache_bytes(cache) / 2**20}
    if spec["pass"] == "fwd_bwd":
        q, k, v = make_inputs(spec, requires_grad=True)
        grad = torch.randn_like(q)
        return forward_backward_step(attn, q, k, v, causal, grad), {}
    q, k, v = make_inputs(spec, requires_grad=False)
    return forward_step(attn, q, k, v, causal), {}


def measure_cell(spec: dict) -> dict:
    """Warm up (compile_s apart), one probe call for the memory peaks, one for counted FLOPs,
    then time."""
    device = spec["device"]
    attn = build(spec)
    step, result = timed_step(attn, spec)
    result["status"] = "ok"
    cpu = torch.device(device).type == "cpu"
    rss = RssPeak() if cpu else None
    # Where the high-water mark cannot be reset, this is a fresh process: the warm-up is the only
    # call whose process peak can be seen.
    first_is_probe = rss is not None and not rss.resettable

    def probe():
        meter = peak_meter(device)
        if rss is not None:
            rss.start()
        meter.start()
        step()
        _sync(device)
        result["peak_mem_mb"] = meter.stop() / 2**20
        if rss is not None:
            result["rss_peak_mb"] = rss.stop() / 2**20

    start = time.perf_counter()
    probe() if first_is_probe else step()  # warm-up; for a compiled variant this call compiles
    _sync(device)
    first_s = time.perf_counter() - start
    if attn.compiled:
        result["compile_s"] = getattr(attn, "compile_s", None) or first_s
    clear = getattr(step, "clear", lambda: None)  # fwd_bwd: the last call's gradients
    if not first_is_probe:
        clear()  # freed before the probe starts: not part of its peak
        probe()
    # FlopCounterMode cannot see inside a compiled graph
    result["counted_flops"] = None if attn.compiled else count_flops(step)
    samples = time_fn(
        slowed(step, spec.get("slowdown", 1.0), device),
        threads=spec["threads"],
        min_run_time=spec["min_run_time"],
        min_blocks=spec["min_blocks"],
    )
    result.update(summarize(samples))
    return result


def origin_of(attn, name: str):
    """The classes a fresh worker needs to register a variant that lives outside `variants/`
    (a plugin, a test); None for our own."""
    if type(attn).__module__.split(".")[0] == "variants":
        return None
    return (type(attn), variants.config_class(name))


def slowed(step, factor: float, device) -> Callable:
    """``step`` followed by a busy wait of (factor - 1) times its duration: a known slowdown,
    injected by ``inject_slowdown`` to show that ``harness.compare`` flags it."""
    if factor == 1.0:
        return step

    def run():
        start = time.perf_counter()
        step()
        _sync(device)
        end = time.perf_counter() + (factor - 1.0) * (time.perf_counter() - start)
        while time.perf_counter() < end:  # busy: holds the core as slower code would
            pass

    return run


def is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def failure(e: BaseException) -> dict:
    """The row fields of a cell that raised: unsupported, oom, or error with the message."""
    if isinstance(e, variants.Unsupported):
        status = "unsupported"
    elif is_oom(e):
        status = "oom"
    else:
        status = "error"
    return {"status": status, "reason": one_line(f"{type(e).__name__}: {e}")}


def one_line(text: str, limit: int = 500) -> str:
    """CSV-friendly reason: no newlines, bounded length."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
