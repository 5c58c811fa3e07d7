"""``full`` against an independent float64 computation; every baseline against ``full``.

Beyond the registry-wide contract (tests/test_contract.py): the chunked ``full`` (its custom
backward, its memory, its grouped heads), the decoding of ``full`` and of the flex twins against
their own twins, xformers' grouped layout against its documented semantics (its kernels are
CUDA-only), and SDPA's handling of a backend that refuses the inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from oracles import causal_mask, qkv, relative_error, softmax_attention
from torch.nn.attention import SDPBackend
from torch.utils.flop_counter import FlopCounterMode

import variants
from harness.measure import tensor_peak_bytes
from variants import sdpa as sdpa_module
from variants.common import expand_kv
from variants.full import chunks
from variants.xformers_attn import xformers_call

BASELINES = [n for n in variants.available() if n.startswith(("sdpa", "xformers"))] + ["flex_full"]


def grouped_qkv(batch=2, heads=4, kv_heads=2, n=33, n_k=None, d=8, seed=0, grad=False):
    """float64 q (B, heads, n, d) and k, v (B, kv_heads, n_k, d)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, d, generator=g, dtype=torch.float64)
    k, v = (
        torch.randn(batch, kv_heads, n_k or n, d, generator=g, dtype=torch.float64) for _ in "kv"
    )
    return [t.requires_grad_(grad) for t in (q, k, v)]


def oracle(q, k, v, causal):
    """The float64 oracle on key/value heads repeated to every query head."""
    heads, n_q, n_k = q.shape[1], q.shape[-2], k.shape[-2]
    mask = causal_mask(n_q, n_k) if causal else None
    return softmax_attention(q, expand_kv(k, heads), expand_kv(v, heads), mask=mask)


def grads_of(fn, tensors, grad_out):
    for t in tensors:
        t.grad = None
    fn().backward(grad_out)
    return [t.grad.clone() for t in tensors]


# --- full: forward ---------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [None, 7, 16, 64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len", [1, 33, 64])
def test_full_matches_dense_oracle(chunk_size, causal, seq_len):
    q, k, v = qkv(seq_len=seq_len)
    attn = variants.build("full", chunk_size=chunk_size)
    ref = softmax_attention(q, k, v, mask=causal_mask(seq_len) if causal else None)
    torch.testing.assert_close(attn(q, k, v, causal=causal), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 10])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_q,n_k", [(17, 45), (45, 17)])
def test_full_cross_attention_lengths(chunk_size, causal, n_q, n_k):
    """Top-left causal with more keys than queries and fewer: the chunks' visible keys."""
    q, _, _ = qkv(seq_len=n_q)
    _, k, v = qkv(seq_len=n_k, seed=1)
    out = variants.build("full", chunk_size=chunk_size)(q, k, v, causal=causal)
    ref = softmax_attention(q, k, v, mask=causal_mask(n_q, n_k) if causal else None)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 7, 64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_full_grouped_heads_match_the_oracle_on_repeated_heads(chunk_size, causal, kv_heads):
    """Forward and the gradients of q, k, v (k and v at kv_heads: the repeated heads' sums)."""
    q, k, v = grouped_qkv(kv_heads=kv_heads, grad=True)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    attn = variants.build("full", chunk_size=chunk_size, num_heads=4, kv_heads=kv_heads)
    out = attn(q, k, v, causal=causal)
    torch.testing.assert_close(out, oracle(q, k, v, causal), rtol=1e-10, atol=1e-12)
    mine = grads_of(lambda: attn(q, k, v, causal=causal), (q, k, v), g)
    ref = grads_of(lambda: oracle(q, k, v, causal), (q, k, v), g)
    for a, b in zip(mine, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_full_grouped_heads_do_not_copy_keys_and_values():
    """The dense path's peak has no k, v repeated per query head: the same bytes at 1 and at
    8 key/value heads apart from dk, dv themselves (forward: exactly the same)."""
    peaks = {}
    for kv in (8, 1):
        q, k, v = grouped_qkv(batch=1, heads=8, kv_heads=kv, n=256, d=32)
        attn = variants.build("full", num_heads=8, kv_heads=kv)
        with torch.no_grad():
            peaks[kv] = tensor_peak_bytes(lambda: attn(q, k, v))  # noqa: B023
    assert peaks[1] == peaks[8]


# --- full: the chunked backward --------------------------------------------------------------
@pytest.mark.parametrize("chunk", [5, 16, 40])
@pytest.mark.parametrize("causal", [False, True])
def test_full_chunked_gradients_match_the_oracle(chunk, causal):
    q, k, v = qkv(seq_len=40, requires_grad=True)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    attn = variants.build("full", chunk_size=chunk)
    mine = grads_of(lambda: attn(q, k, v, causal=causal), (q, k, v), g)
    mask = causal_mask(40) if causal else None
    ref = grads_of(lambda: softmax_attention(q, k, v, mask=mask), (q, k, v), g)
    for a, b in zip(mine, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_full_chunked_gradients_for_cross_lengths():
    q, _, _ = qkv(seq_len=45, requires_grad=True)
    _, k, v = qkv(seq_len=17, seed=1, requires_grad=True)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    attn = variants.build("full", chunk_size=8)
    mine = grads_of(lambda: attn(q, k, v, causal=True), (q, k, v), g)
    mask = causal_mask(45, 17)
    ref = grads_of(lambda: softmax_attention(q, k, v, mask=mask), (q, k, v), g)
    for a, b in zip(mine, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_full_chunks_skip_the_causal_future_in_few_iterations():
    """One iteration per query chunk (not per pair of chunks); causal chunks stop at their
    last row, so the work is the visible pairs plus the diagonal blocks."""
    parts = list(chunks(1000, 1000, 128, causal=True))
    assert len(parts) == math.ceil(1000 / 128)
    assert [n_vis for _, _, n_vis in parts] == [min(1000, s + 128) for s in range(0, 1000, 128)]
    assert all(n_vis == 1000 for _, _, n_vis in chunks(1000, 1000, 128, causal=False))


def test_full_chunked_counts_the_recomputed_scores_beyond_the_useful_work():
    """FlopCounterMode sees the forward's products exactly; backward also recomputes q k^T,
    which flops() does not count as useful work."""
    B, H, n, d = 1, 2, 96, 16
    attn = variants.build("full", chunk_size=32)
    q, k, v = (t.float() for t in qkv(batch=B, heads=H, seq_len=n, head_dim=d))
    with torch.no_grad(), FlopCounterMode(display=False) as fwd:
        attn(q, k, v)
    assert fwd.get_total_flops() == attn.flops(batch=B, heads=H, seq_len=n, head_dim=d)
    for t in (q, k, v):
        t.requires_grad_(True)
    with FlopCounterMode(display=False) as both:
        attn(q, k, v).backward(torch.randn_like(q))
    useful = attn.flops(batch=B, heads=H, seq_len=n, head_dim=d, backward=True)
    assert both.get_total_flops() == useful + 2 * B * H * n * n * d
    assert not attn.counted_equals_analytic
    assert variants.build("full").counted_equals_analytic


# --- full: memory ----------------------------------------------------------------------------
MEMORY_SHAPES = [  # (B, H, KV, n, d, causal, chunk)
    (1, 2, 2, 1024, 32, False, 64),
    (2, 4, 4, 512, 64, True, 64),
    (1, 4, 2, 512, 32, True, 100),
    (1, 4, 1, 768, 32, False, 128),
]


def measured(attn, B, H, KV, n, d, causal, backward, dtype=torch.float32) -> int:
    q, k, v = (t.to(dtype) for t in grouped_qkv(B, H, KV, n, d=d))
    if not backward:
        with torch.no_grad():
            return tensor_peak_bytes(lambda: attn(q, k, v, causal=causal))
    for t in (q, k, v):
        t.requires_grad_(True)
    g = torch.randn_like(q)
    return tensor_peak_bytes(lambda: attn(q, k, v, causal=causal).backward(g))


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", MEMORY_SHAPES, ids=lambda s: "B{}H{}KV{}n{}d{}c{}_{}".format(*s))
@pytest.mark.parametrize("chunked", [False, True], ids=["dense", "chunked"])
def test_full_memory_model_matches_the_tensor_peak(shape, backward, chunked):
    """Grouped heads and odd chunk sizes included (the contract test runs the dense default)."""
    B, H, KV, n, d, causal, chunk = shape
    attn = variants.build("full", num_heads=H, kv_heads=KV, chunk_size=chunk if chunked else None)
    model = attn.memory_model(
        batch=B, heads=H, seq_len=n, head_dim=d, causal=causal, backward=backward, kv_heads=KV
    )
    peak = measured(attn, B, H, KV, n, d, causal, backward)
    assert abs(model - peak) <= 0.03 * peak, f"modelled {model / 2**20:.3f} MB, {peak / 2**20:.3f}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_full_chunked_memory_model_in_half_precision(dtype):
    """Half precision is computed in float32 (k, v converted once, float32 tiles)."""
    attn = variants.build("full", num_heads=4, kv_heads=2, chunk_size=64)
    for backward in (False, True):
        model = attn.memory_model(
            batch=1, heads=4, seq_len=512, head_dim=32, causal=True, dtype=dtype,
            backward=backward, kv_heads=2,
        )  # fmt: skip
        peak = measured(attn, 1, 4, 2, 512, 32, True, backward, dtype=dtype)
        assert abs(model - peak) <= 0.05 * peak


def test_full_chunked_fwd_bwd_takes_a_fraction_of_the_dense_memory():
    """O(n * chunk) in backward too: a quarter of the dense path's peak at most (at n = 1024
    already; about a twentieth at n = 4096, B1 H8 d64, chunk 128)."""
    peaks = {}
    for chunk in (None, 128):
        attn = variants.build("full", num_heads=2, chunk_size=chunk)
        peaks[chunk] = measured(attn, 1, 2, 2, 1024, 32, False, backward=True)
    assert peaks[128] <= peaks[None] / 4


# --- full: precision -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_full_chunked_in_half_precision_stays_close_to_float64(dtype, causal):
    """As tests/test_contract.py does for the dense default: output within 4 eps, gradients
    within 16 eps of float64 on the same rounded inputs."""
    q, k, v = (t.to(dtype) for t in grouped_qkv(batch=1, heads=2, kv_heads=2, n=1024, d=32))
    attn = variants.build("full", num_heads=2, chunk_size=128)
    wide = [t.double().requires_grad_(True) for t in (q, k, v)]
    narrow = [t.requires_grad_(True) for t in (q, k, v)]
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = attn(*wide, causal=causal)
    ref.backward(g)
    out = attn(*narrow, causal=causal)
    out.backward(g.to(dtype))
    eps = torch.finfo(dtype).eps
    assert relative_error(out, ref) < 4 * eps
    for a, b in zip(narrow, wide, strict=True):
        assert relative_error(a.grad, b.grad) < 16 * eps


# --- decoding --------------------------------------------------------------------------------
def decode_all(attn, q, k, v, m):
    """Prefill the first m tokens, then decode the rest one by one: (B, H, n, d)."""
    out, cache = attn.prefill(q[:, :, :m], k[:, :, :m], v[:, :, :m])
    rows = [out]
    for t in range(m, q.shape[-2]):
        step, cache = attn.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], cache)
        rows.append(step)
    return torch.cat(rows, dim=2)


@pytest.mark.parametrize("chunk_size", [None, 8])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_full_decode_equals_the_causal_oracle(chunk_size, kv_heads):
    q, k, v = grouped_qkv(kv_heads=kv_heads, n=30)
    attn = variants.build("full", num_heads=4, kv_heads=kv_heads, chunk_size=chunk_size)
    for m in (1, 13):
        torch.testing.assert_close(decode_all(attn, q, k, v, m), oracle(q, k, v, True))


def test_full_cache_holds_every_token_at_kv_heads():
    attn = variants.build("full", num_heads=4, kv_heads=2)
    q, k, v = grouped_qkv(kv_heads=2, n=30)
    _, cache = attn.prefill(q, k, v)
    assert attn.cache_bytes(cache) == 2 * 2 * 2 * 30 * 8 * 8  # k and v, B 2, KV 2, n 30, d 8
    assert attn.cache_model(batch=2, seq_len=30, head_dim=8, kv_heads=2, dtype=q.dtype) == (
        attn.cache_bytes(cache)
    )


FLEX_TWINS = [
    ("flex_full", {}),
    ("flex_local", {"window": 5}),
    ("flex_relative", {"kind": "t5", "num_buckets": 8, "max_distance": 12}),
    ("flex_relative", {"kind": "alibi"}),
]


@pytest.mark.parametrize("name,opts", FLEX_TWINS, ids=lambda x: str(x))
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_flex_decode_equals_its_twins_causal_forward(name, opts, kv_heads):
    """The shifted mask / score_mod of a decode step reproduce the twin's causal rows: the
    window and the distances of the whole sequence, not of the one-token query."""
    H, n, d = 4, 30, 8
    flex = variants.build(name, compile=False, num_heads=H, kv_heads=kv_heads, head_dim=d, **opts)
    flex = flex.double()
    twin = flex.inner  # the twin itself, sharing its parameters
    q, k, v = grouped_qkv(heads=H, kv_heads=kv_heads, n=n, d=d, seed=2)
    with torch.no_grad():
        whole = twin(q, expand_kv(k, H), expand_kv(v, H), causal=True)
        for m in (1, 11):
            assert relative_error(decode_all(flex, q, k, v, m), whole) < 1e-12


def test_flex_decodes_what_its_twin_decodes_unless_it_sees_by_distance():
    """A twin whose pattern depends on the length (sparse's layouts) decides for its flex
    baseline; full, local and relative see by distance only and decode through flex."""
    for name in ("flex_full", "flex_local", "flex_relative"):
        assert not variants.build(name, compile=False).decode_unsupported()
    flex = variants.build("flex_sparse", compile=False)
    assert bool(flex.decode_unsupported()) == bool(flex.inner.decode_unsupported())


@pytest.mark.parametrize("name", ["sdpa", "sdpa_math", "sdpa_flash"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_sdpa_decode_equals_the_causal_oracle(name, kv_heads):
    q, k, v = grouped_qkv(kv_heads=kv_heads, n=30)
    attn = variants.build(name, num_heads=4, kv_heads=kv_heads)
    assert relative_error(decode_all(attn, q, k, v, 9), oracle(q, k, v, True)) < 1e-12


# --- baselines -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_baseline_agrees_with_full(name, causal, dtype):
    opts = {"compile": False} if "compile" in variants.option_names(name) else {}
    attn = variants.build(name, **opts)
    reasons = attn.unsupported(device="cpu", dtype=dtype, causal=causal, seq_len=50)
    if reasons:
        pytest.skip("; ".join(reasons))
    q, k, v = qkv(seq_len=50, dtype=dtype)
    ref = variants.build("full")(q, k, v, causal=causal)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert relative_error(attn(q, k, v, causal=causal), ref) < tol


@pytest.mark.parametrize("name", ["sdpa", "sdpa_math", "sdpa_flash"])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_groups_heads_on_cpu(name, causal):
    """enable_gqa: CPU's math and flash kernels both group heads."""
    attn = variants.build(name, num_heads=4, kv_heads=1)
    assert not attn.unsupported(device="cpu", dtype=torch.float64, causal=causal, kv_heads=1)
    q, k, v = grouped_qkv(kv_heads=1)
    assert relative_error(attn(q, k, v, causal=causal), oracle(q, k, v, causal)) < 1e-12


def test_xformers_on_cpu_says_why():
    attn = variants.build("xformers")
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(variants.Unsupported, match="CUDA"):
        attn(q, q, q)
    assert isinstance(variants.Unsupported("x"), NotImplementedError)


class DocumentedXFormers:
    """memory_efficient_attention as xformers documents it (its 'equivalent pytorch code',
    per group for 5-d inputs), refusing what it documents it refuses: inputs that are not
    all BMHK or all BMGHK with equal shapes (no broadcasting) or whose last stride is not 1."""

    @staticmethod
    def LowerTriangularMask():  # noqa: N802 (xformers' name)
        return "causal"

    def memory_efficient_attention(self, q, k, v, attn_bias=None):
        assert q.dim() == k.dim() == v.dim() in (4, 5) and q.shape == k.shape == v.shape
        assert all(t.stride(-1) == 1 for t in (q, k, v))
        flat = [t.flatten(2, -2) if t.dim() == 5 else t for t in (q, k, v)]  # (B, M, heads, K)
        q4, k4, v4 = (t.transpose(1, 2) for t in flat)
        mask = causal_mask(q4.shape[2], k4.shape[2]) if attn_bias == "causal" else None
        return softmax_attention(q4, k4, v4, mask=mask).transpose(1, 2).reshape(q.shape)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("causal", [False, True])
def test_xformers_grouped_layout_follows_its_documented_semantics(kv_heads, causal):
    """xformers runs on CUDA only; here its call is checked against what its documentation
    says it computes: (B, M, G, H, K) with k, v expanded over H (a view, not a copy)."""
    q, k, v = grouped_qkv(kv_heads=kv_heads)
    out = xformers_call(DocumentedXFormers(), q, k, v, causal)
    assert relative_error(out, oracle(q, k, v, causal)) < 1e-12


def test_xformers_grouped_backward_is_unsupported():
    """xformers documents its grouped layout as forward-only."""
    attn = variants.build("xformers", num_heads=4, kv_heads=2)
    attn._ops = lambda: DocumentedXFormers()
    q, k, v = grouped_qkv(kv_heads=2, grad=True)
    with pytest.raises(variants.Unsupported, match="forward"):
        attn.attend(q, k, v, causal=False)
    with torch.no_grad():
        assert attn.attend(q, k, v, causal=False).shape == q.shape


@pytest.mark.parametrize("name", ["sdpa_efficient", "sdpa_cudnn"])
def test_cuda_only_sdpa_backends_are_unsupported_on_cpu(name):
    attn = variants.build(name)
    assert attn.unsupported(device="cpu", dtype=torch.float32)
    with pytest.raises(variants.Unsupported):
        attn(*qkv(seq_len=8, dtype=torch.float32))


# --- sdpa: a backend's refusal is Unsupported, never an error -------------------------------
@pytest.mark.parametrize(
    "message",
    [
        "No available kernel.  Aborting execution.",  # torch 2.13 on CPU, two spaces
        "No viable backend for scaled_dot_product_attention was found.",
        "Flash attention kernel not used because: ...",
        "FlashAttention only supports Ampere GPUs or newer: not supported here",
    ],
)
def test_sdpa_recognises_every_form_of_refusal(message, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(sdpa_module.F, "scaled_dot_product_attention", refuse)
    attn = variants.build("sdpa_flash")
    q, k, v = qkv(seq_len=8, dtype=torch.float32)
    with pytest.raises(variants.Unsupported, match="FLASH_ATTENTION kernel refused"):
        attn.attend(q, k, v, causal=False)


def test_sdpa_raises_real_errors_as_errors(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("std::bad_alloc while computing")

    monkeypatch.setattr(sdpa_module.F, "scaled_dot_product_attention", fail)
    q, k, v = qkv(seq_len=8, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="bad_alloc") as caught:
        variants.build("sdpa_flash").attend(q, k, v, causal=False)
    assert not isinstance(caught.value, variants.Unsupported)


def test_sdpa_refusal_by_the_real_kernel_says_why():
    """The CPU flash kernel refuses heads that do not divide (torch says only 'No available
    kernel'); the reason comes from the warnings PyTorch emits while it dispatches."""
    q = torch.randn(1, 4, 16, 8)
    k = torch.randn(1, 3, 16, 8)
    with pytest.raises(variants.Unsupported, match="heads"):
        sdpa_module.sdpa_call(SDPBackend.FLASH_ATTENTION, q, k, k, is_causal=False, name="x")
    assert sdpa_module.is_refusal(RuntimeError("No available kernel.  Aborting execution."))
    assert not sdpa_module.is_refusal(RuntimeError("Expected query, key to have the same dtype"))


def test_sdpa_memory_models_follow_the_thread_count():
    """The CPU flash kernel's per-thread tiles are in its model (at the call's threads)."""
    attn = variants.build("sdpa_flash")
    q, k, v = (t.float() for t in qkv(batch=1, heads=2, seq_len=1024, head_dim=32))
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            with torch.no_grad():
                peak = tensor_peak_bytes(lambda: attn(q, k, v))
            model = attn.memory_model(batch=1, heads=2, seq_len=1024, head_dim=32)
            assert model == peak
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_compiled_flex_full_matches_full_and_records_compile_time():
    attn = variants.build("flex_full")
    q, k, v = qkv(batch=1, heads=2, seq_len=128, head_dim=16, dtype=torch.float32)
    for causal in (False, True):
        out = attn(q, k, v, causal=causal)
        assert relative_error(out, variants.build("full")(q, k, v, causal=causal)) < 1e-5
    assert attn.compile_s is not None and attn.compile_s > 0


@pytest.mark.slow
def test_compiled_flex_local_decode_step_matches_its_twin():
    """The compiled kernel takes the one-token query with its shifted window mask (a step
    compiles once per context length: the harness times one step again and again)."""
    H, n, d = 2, 200, 16
    attn = variants.build("flex_local", num_heads=H, head_dim=d, window=32)
    q, k, v = (t.float() for t in grouped_qkv(batch=1, heads=H, kv_heads=H, n=n + 1, d=d))
    with torch.no_grad():
        _, cache = attn.prefill(q[:, :, :n], k[:, :, :n], v[:, :, :n])
        step, _ = attn.decode(q[:, :, n:], k[:, :, n:], v[:, :, n:], cache)
        whole = attn.inner(q, k, v, causal=True)
    assert relative_error(step, whole[:, :, n:]) < 1e-5
