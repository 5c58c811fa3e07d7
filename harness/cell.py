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
    clear_grads,
    count_flops,
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
        head_dim=spec["head_dim"],
    )
    return attn.to(device=spec["device"], dtype=DTYPES[spec["dtype"]])


def make_inputs(spec: dict, requires_grad: bool):
    """Seeded q, k, v of shape (batch, heads, seq_len, head_dim); drawn on the CPU so every
    device sees the same numbers."""
    g = torch.Generator().manual_seed(spec.get("seed", 0))
    shape = (spec["batch"], spec["heads"], spec["seq_len"], spec["head_dim"])
    dtype, device = DTYPES[spec["dtype"]], spec["device"]
    return [
        torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
        for _ in range(3)
    ]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_cell(spec: dict) -> dict:
    """Warm up (compile_s apart), one probe call for peak memory and counted FLOPs, then time."""
    device = spec["device"]
    attn = build(spec)
    backward = spec["pass"] == "fwd_bwd"
    q, k, v = make_inputs(spec, requires_grad=backward)
    grad = torch.randn_like(q) if backward else None
    step = (
        forward_backward_step(attn, q, k, v, spec["causal"], grad)
        if backward
        else forward_step(attn, q, k, v, spec["causal"])
    )
    meter = peak_meter(device)
    # Where the high-water mark cannot be reset, this is a fresh process: the warm-up is the only
    # call whose peak can be seen.
    first_is_probe = not getattr(meter, "resettable", True)
    result: dict = {"status": "ok"}

    if first_is_probe:
        meter.start()
    start = time.perf_counter()
    step()  # warm-up; for a compiled variant this call compiles
    _sync(device)
    first_s = time.perf_counter() - start
    if first_is_probe:
        result["peak_mem_mb"] = meter.stop() / 2**20
    if attn.compiled:
        result["compile_s"] = getattr(attn, "compile_s", None) or first_s

    clear_grads(attn, q, k, v)  # the warm-up's gradients are not part of the probe's baseline
    counted = None
    if not first_is_probe:
        meter.start()
    if attn.compiled:  # FlopCounterMode cannot see inside a compiled graph
        step()
    else:
        counted = count_flops(step)
    if not first_is_probe:
        result["peak_mem_mb"] = meter.stop() / 2**20
    result["counted_flops"] = counted

    samples = time_fn(
        slowed(step, spec.get("slowdown", 1.0), device),
        threads=spec["threads"],
        min_run_time=spec["min_run_time"],
        min_blocks=spec["min_blocks"],
    )
    result.update(summarize(samples))
    return result


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
