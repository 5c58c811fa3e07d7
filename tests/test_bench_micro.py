"""Micro-benchmarks of our own variants at one small shape, for ``harness.compare``.

With pyproject's ``--benchmark-disable`` each runs once (a smoke test). To measure:

    pytest tests/test_bench_micro.py --benchmark-enable --benchmark-json=bench.json \
        --benchmark-save-data          # keeps the raw times (stats.data) the rank test needs
    python -m harness.compare base.json bench.json

A fixed matmul is benchmarked in the same run as the control: compare divides every variant's
time by it, so machine-wide drift between two runs cancels out.
"""

from __future__ import annotations

import pytest
import torch

import variants

B, H, N, D = 1, 4, 256, 32
DTYPE = torch.float32
SHAPE = f"B{B} H{H} n{N} d{D} {str(DTYPE).removeprefix('torch.')}"
GROUP = "attention-micro"
LIBRARY = ("sdpa", "xformers", "flex")  # baselines are not ours to keep fast
OWN = [name for name in variants.available() if not name.startswith(LIBRARY)]


def _inputs(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(B, H, N, D, generator=g, dtype=DTYPE).requires_grad_(requires_grad)
        for _ in range(3)
    ]


def _info(benchmark, **extra):
    benchmark.group = GROUP
    benchmark.extra_info.update(
        shape=SHAPE,
        batch=B,
        heads=H,
        seq_len=N,
        head_dim=D,
        dtype=str(DTYPE),
        device="cpu",
        threads=torch.get_num_threads(),
        **extra,
    )


@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("name", OWN)
def test_micro(benchmark, name, pass_):
    attn = variants.build(name, seq_len=N, num_heads=H, head_dim=D)
    reasons = attn.unsupported(device="cpu", dtype=DTYPE, causal=False, seq_len=N)
    if pass_ == "fwd_bwd":
        reasons += getattr(attn, "backward_unsupported", lambda **_: [])(device="cpu")
    if reasons:
        pytest.skip("; ".join(reasons))
    backward = pass_ == "fwd_bwd"
    flops = attn.flops(batch=B, heads=H, seq_len=N, head_dim=D, causal=False, backward=backward)
    _info(benchmark, variant=name, **{"pass": pass_, "flops": flops})
    q, k, v = _inputs(requires_grad=backward)

    def fwd():
        with torch.no_grad():
            return attn(q, k, v)

    def fwd_bwd():
        for t in (q, k, v):
            t.grad = None
        out = attn(q, k, v)
        out.backward(torch.ones_like(out))
        return out

    out = benchmark(fwd_bwd if backward else fwd)
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_control_matmul(benchmark):
    """The machine's yardstick for this run: a fixed matmul of about the variants' cost."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(512, 512, generator=g, dtype=DTYPE)
    b = torch.randn(512, 512, generator=g, dtype=DTYPE)
    _info(benchmark, control=True, variant="control_matmul", flops=2 * 512**3)
    out = benchmark(torch.matmul, a, b)
    assert out.shape == (512, 512)
