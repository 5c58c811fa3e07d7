"""``full`` against an independent float64 computation; every baseline against ``full``."""

from __future__ import annotations

import pytest
import torch
from oracles import causal_mask, qkv, relative_error, softmax_attention

import variants

BASELINES = [n for n in variants.available() if n.startswith(("sdpa", "xformers"))] + ["flex_full"]


@pytest.mark.parametrize("chunk_size", [None, 7, 16, 64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len", [1, 33, 64])
def test_full_matches_dense_oracle(chunk_size, causal, seq_len):
    q, k, v = qkv(seq_len=seq_len)
    attn = variants.build("full", chunk_size=chunk_size)
    ref = softmax_attention(q, k, v, mask=causal_mask(seq_len) if causal else None)
    torch.testing.assert_close(attn(q, k, v, causal=causal), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 10])
def test_full_cross_attention_lengths(chunk_size):
    q, _, _ = qkv(seq_len=17)
    _, k, v = qkv(seq_len=45, seed=1)
    out = variants.build("full", chunk_size=chunk_size)(q, k, v)
    torch.testing.assert_close(out, softmax_attention(q, k, v), rtol=1e-10, atol=1e-12)


def test_full_chunked_gradients_match_dense():
    q, k, v = qkv(seq_len=40, requires_grad=True)
    grads = []
    for chunk in (None, 16):
        for t in (q, k, v):
            t.grad = None
        variants.build("full", chunk_size=chunk)(q, k, v, causal=True).sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_full_rejects_a_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        variants.build("full", chunk_size=0)


def test_full_flops_formula():
    attn = variants.build("full")
    B, H, n, d = 2, 3, 128, 32
    assert attn.flops(batch=B, heads=H, seq_len=n, head_dim=d) == 4 * B * H * n * n * d
    causal = attn.flops(batch=B, heads=H, seq_len=n, head_dim=d, causal=True)
    assert causal == 4 * B * H * d * n * (n + 1) // 2
    assert 0.5 <= causal / (4 * B * H * n * n * d) <= 0.51
    # backward: the gradients of both operands of each product (docs/measurement.md)
    assert attn.flops(batch=B, heads=H, seq_len=n, head_dim=d, backward=True) == (
        3 * 4 * B * H * n * n * d
    )


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


def test_xformers_on_cpu_says_why():
    attn = variants.build("xformers")
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(variants.Unsupported, match="CUDA"):
        attn(q, q, q)
    assert isinstance(variants.Unsupported("x"), NotImplementedError)


@pytest.mark.parametrize("name", ["sdpa_efficient", "sdpa_cudnn"])
def test_cuda_only_sdpa_backends_are_unsupported_on_cpu(name):
    attn = variants.build(name)
    assert attn.unsupported(device="cpu", dtype=torch.float32)
    with pytest.raises(variants.Unsupported):
        attn(*qkv(seq_len=8, dtype=torch.float32))


@pytest.mark.slow
def test_compiled_flex_full_matches_full_and_records_compile_time():
    attn = variants.build("flex_full")
    q, k, v = qkv(batch=1, heads=2, seq_len=128, head_dim=16, dtype=torch.float32)
    for causal in (False, True):
        out = attn(q, k, v, causal=causal)
        assert relative_error(out, variants.build("full")(q, k, v, causal=causal)) < 1e-5
    assert attn.compile_s is not None and attn.compile_s > 0
