"""The variant contract beyond the call (docs/variants-api.md), for every registered variant:
grouped heads, decoding, precision and cost models. Each test enumerates the registry, so a new
variant is checked the moment it registers; a variant that cannot run a case must say so through
``unsupported()`` / ``decode_unsupported()``, which is itself checked against the call.

References are independent: grouped heads against the same module on repeated key/value heads,
decoding against the variant's own causal forward (itself oracle-tested in float64 in the family
test files), half precision against float64 on the same inputs and parameters, memory models
against the measured peak of live tensor bytes, FLOPs against FlopCounterMode.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import variants
from harness.measure import tensor_peak_bytes
from variants.common import expand_kv

ALL = variants.available()
OWN = [n for n in ALL if not variants.build(n, seq_len=64).baseline]
HALF = {
    torch.float16: torch.finfo(torch.float16).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
}
# Exact variants whose memory model must hold within a few percent (the rest: 20%).
DENSE = {"full", "sdpa_math"}


def make(name: str, seq_len: int, num_heads: int, head_dim: int, **extra):
    """A small instance for a CPU call (flex twins run eagerly: compiling takes ~30 s)."""
    opts = dict(seq_len=seq_len, num_heads=num_heads, head_dim=head_dim, **extra)
    if "compile" in variants.option_names(name):
        opts["compile"] = False
    return variants.build(name, **opts)


def inputs(batch, heads, kv_heads, n, d, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(batch, kv_heads, n, d, generator=g, dtype=torch.float64) for _ in "kv")
    return [t.to(dtype).requires_grad_(grad) for t in (q, k, v)]


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


# --- grouped heads ---------------------------------------------------------------------------
def test_kv_heads_that_do_not_divide_are_refused():
    with pytest.raises(ValueError, match="kv_heads"):
        variants.build("full", num_heads=6, kv_heads=4)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_heads_equal_repeated_key_value_heads(name, causal):
    H, KV, n, d = 4, 2, 48, 8
    attn = make(name, n, H, d, kv_heads=KV)
    reasons = attn.unsupported(device="cpu", dtype=torch.float64, causal=causal, kv_heads=KV)
    q, k, v = inputs(2, H, KV, n, d)
    if reasons:
        with pytest.raises(variants.Unsupported):
            attn(q, k, v, causal=causal)
        return
    grouped = attn(q, k, v, causal=causal)
    repeated = attn(q, expand_kv(k, H), expand_kv(v, H), causal=causal)
    assert grouped.shape == q.shape
    assert rel(grouped, repeated) < 1e-10


# --- decoding --------------------------------------------------------------------------------
def decodes(attn, dtype=torch.float64) -> bool:
    return not attn.decode_unsupported(device="cpu", dtype=dtype)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_prefill_then_decode_equals_the_causal_forward(name, kv_heads):
    """Row by row, prefill of the first m tokens then decode of the rest one at a time gives
    the causal forward of the whole sequence (several m, grouped heads too)."""
    H, n, d = 4, 40, 8
    attn = make(name, n, H, d, kv_heads=kv_heads)
    q, k, v = inputs(2, H, kv_heads, n, d, seed=1)
    if not decodes(attn) or attn.unsupported(causal=True, dtype=q.dtype, kv_heads=kv_heads):
        with pytest.raises(variants.Unsupported):
            attn.prefill(q[:, :, :4], k[:, :, :4], v[:, :, :4])
        return
    whole = attn(q, k, v, causal=True)
    for m in (1, 7, 33):
        out, cache = attn.prefill(q[:, :, :m], k[:, :, :m], v[:, :, :m])
        rows = [out]
        for t in range(m, n):
            step, cache = attn.decode(
                q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], cache
            )
            rows.append(step)
        assert rel(torch.cat(rows, dim=2), whole) < 1e-10, f"prefill of {m} tokens"


@pytest.mark.parametrize("name", ALL)
def test_a_decode_step_can_be_repeated_from_the_same_cache(name):
    """The harness times one step again and again from one cache: the step must not change
    what that cache holds."""
    H, n, d = 2, 24, 8
    attn = make(name, n, H, d)
    if not decodes(attn):
        return
    q, k, v = inputs(1, H, H, n + 1, d, seed=2)
    _, cache = attn.prefill(q[:, :, :n], k[:, :, :n], v[:, :, :n])
    step = lambda: attn.decode(q[:, :, n:], k[:, :, n:], v[:, :, n:], cache)[0]
    first, second = step(), step()
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", ALL)
def test_a_state_built_without_output_decodes_the_same(name):
    """prefill(output=False) is how the harness sets up long contexts cheaply: its state must
    be the state, and the step from it the same step."""
    H, n, d = 4, 30, 8
    attn = make(name, n, H, d, kv_heads=2)
    if not decodes(attn):
        return
    q, k, v = inputs(1, H, 2, n + 1, d, seed=5)
    out, cache = attn.prefill(q[:, :, :n], k[:, :, :n], v[:, :, :n])
    none, bare = attn.prefill(q[:, :, :n], k[:, :, :n], v[:, :, :n], output=False)
    assert out is not None and none is None
    step = lambda c: attn.decode(q[:, :, n:], k[:, :, n:], v[:, :, n:], c)[0]
    assert torch.equal(step(cache), step(bare))
    assert attn.cache_bytes(cache) == attn.cache_bytes(bare)


@pytest.mark.parametrize("name", ALL)
def test_cache_bytes_match_the_cache_model(name):
    H, KV, d = 4, 2, 8
    attn = make(name, 256, H, d, kv_heads=KV)
    if not decodes(attn):
        return
    for n in (40, 200):
        q, k, v = inputs(1, H, KV, n, d)
        _, cache = attn.prefill(q, k, v)
        model = attn.cache_model(batch=1, seq_len=n, head_dim=d, kv_heads=KV, dtype=q.dtype)
        assert model is not None, f"{name} decodes: give cache_model()"
        assert attn.cache_bytes(cache) == model


# --- precision -------------------------------------------------------------------------------
PRECISION_CASES = [(512, False), (512, True), (4096, False)]


@pytest.mark.parametrize("name", OWN)
@pytest.mark.parametrize("dtype", list(HALF), ids=str)
@pytest.mark.parametrize("n,causal", PRECISION_CASES)
def test_half_precision_stays_close_to_float64(name, dtype, n, causal):
    """The output and the gradients in float16 / bfloat16 against float64 on the same (rounded)
    inputs and the same parameters: within a few times the dtype's resolution, or the variant
    declares the dtype unsupported."""
    H, d = 2, 32
    attn = make(name, n, H, d)
    q, k, v = inputs(1, H, H, n, d, dtype=dtype, seed=3)
    if attn.unsupported(device="cpu", dtype=dtype, causal=causal, seq_len=n):
        with pytest.raises(variants.Unsupported):
            attn(q, k, v, causal=causal)
        return
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    for t in (q, k, v):
        t.requires_grad_(True)
    wide = attn.double()
    ref = wide(q64, k64, v64, causal=causal)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref.backward(g)
    narrow = attn.to(dtype)
    out = narrow(q, k, v, causal=causal)
    out.backward(g.to(dtype))
    eps = HALF[dtype]
    assert torch.isfinite(out).all()
    assert rel(out, ref) < 4 * eps, f"output error {rel(out, ref):.2e} (eps {eps:.1e})"
    for t, t64 in ((q, q64), (k, k64), (v, v64)):
        if t64.grad is not None and t64.grad.norm() > 0:  # reformer never reads k
            assert rel(t.grad, t64.grad) < 16 * eps, f"gradient error {rel(t.grad, t64.grad):.2e}"


# --- cost models -----------------------------------------------------------------------------
MEMORY_CASES = [(1, 2, 1024, 32, False), (2, 4, 512, 64, True), (1, 2, 2048, 32, False)]


def measured_peak(attn, shape, backward: bool, kv_heads=None) -> int:
    B, H, n, d, causal = shape
    q, k, v = inputs(B, H, kv_heads or H, n, d, dtype=torch.float32, grad=backward)
    if not backward:
        with torch.no_grad():
            return tensor_peak_bytes(lambda: attn(q, k, v, causal=causal))
    grad = torch.randn_like(q)
    return tensor_peak_bytes(lambda: attn(q, k, v, causal=causal).backward(grad))


@pytest.mark.parametrize("name", OWN + ["sdpa_math"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize(
    "shape", MEMORY_CASES, ids=lambda s: "B{}H{}n{}d{}{}".format(*s[:4], "c" * s[4])
)
def test_memory_model_matches_the_measured_tensor_peak(name, backward, shape):
    B, H, n, d, causal = shape
    attn = make(name, n, H, d)
    if attn.unsupported(device="cpu", dtype=torch.float32, causal=causal, seq_len=n):
        return
    model = attn.memory_model(
        batch=B, heads=H, seq_len=n, head_dim=d, causal=causal, backward=backward
    )
    assert model is not None, f"{name} has no memory model"
    peak = measured_peak(attn, shape, backward)
    tolerance = 0.03 if name in DENSE else 0.20
    assert abs(model - peak) <= tolerance * peak, (
        f"modelled {model / 2**20:.2f} MB, measured {peak / 2**20:.2f} MB"
    )


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
def test_counted_flops_equal_the_analytic_count_where_the_counter_sees_the_work(name, backward):
    """Non-causal, so that an exact variant computes exactly its useful pairs: FlopCounterMode's
    count equals flops() for every variant whose work is all matmuls it can see (a fused CPU
    kernel counts 0; approximations that compute more than they keep count more)."""
    B, H, n, d = 1, 2, 256, 32
    attn = make(name, n, H, d)
    if attn.unsupported(device="cpu", dtype=torch.float32, seq_len=n) or (
        backward and attn.backward_unsupported(device="cpu")
    ):
        return
    q, k, v = inputs(B, H, H, n, d, dtype=torch.float32, grad=backward)
    if backward:
        grad = torch.randn_like(q)
        seen = counted(lambda: attn(q, k, v).backward(grad))
    else:
        with torch.no_grad():
            seen = counted(lambda: attn(q, k, v))
    analytic = attn.flops(batch=B, heads=H, seq_len=n, head_dim=d, backward=backward)
    if seen == 0:
        return  # a fused kernel the counter cannot see into
    assert seen >= analytic, "the counter saw less work than flops() claims is useful"
    if getattr(attn, "counted_equals_analytic", True):
        assert seen == analytic
