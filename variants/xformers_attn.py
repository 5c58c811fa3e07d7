"""``xformers``: ``xformers.ops.memory_efficient_attention``, causal through its
lower-triangular bias. xformers ships CUDA kernels only: on CPU the variant is Unsupported."""

from __future__ import annotations

import functools

import torch

from .common import itemsize
from .registry import DenseAttention, Unsupported, register


@functools.cache
def _xformers_ops():
    """Import lazily: importing xformers on a machine without its kernels prints warnings."""
    try:
        import xformers.ops as xops
    except Exception as e:  # not installed, or built for another torch
        return None, f"xformers cannot be imported ({type(e).__name__}: {e}); pip install xformers"
    return xops, None


@functools.cache
def _probe(device: str, dtype: torch.dtype, causal: bool) -> list[str]:
    xops, err = _xformers_ops()
    if err:
        return [err]
    q = torch.randn(1, 16, 1, 16, device=device).to(dtype)  # xformers' (B, M, H, K) layout
    try:
        xops.memory_efficient_attention(q, q, q, attn_bias=_bias(xops, causal))
    except NotImplementedError as e:  # xformers explains which operators refused and why
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = "; ".join(ln for ln in lines if "supported" in ln or "built" in ln)[:300]
        return [f"xformers has no kernel for {dtype} on {device}: {why or lines[0]}"]
    return []


def _bias(xops, causal):
    return xops.LowerTriangularMask() if causal else None


@register("xformers")
class XFormers(DenseAttention):
    baseline = True  # a library kernel, not our own implementation

    def unsupported(
        self, *, device="cpu", dtype=torch.float32, causal=False, seq_len=None, kv_heads=None
    ):
        reasons = super().unsupported(
            device=device, dtype=dtype, causal=causal, seq_len=seq_len, kv_heads=kv_heads
        )
        if torch.device(device).type != "cuda":
            return reasons + [
                "xformers' memory_efficient_attention has CUDA kernels only, none for "
                f"{torch.device(device).type}; on CPU compare against sdpa or sdpa_flash"
            ]
        return reasons or _probe(str(device), dtype, causal)

    def attend(self, q, k, v, causal):
        xops, err = _xformers_ops()
        if err:
            raise Unsupported(f"{self.name}: {err}")
        t = lambda x: x.transpose(1, 2)  # (B, H, n, d) -> xformers' (B, n, H, d)
        return t(xops.memory_efficient_attention(t(q), t(k), t(v), attn_bias=_bias(xops, causal)))

    def memory_model(
        self,
        *,
        batch,
        heads,
        seq_len,
        head_dim,
        causal=False,
        dtype=torch.float32,
        backward=False,
        kv_heads=None,
    ):
        return batch * heads * seq_len * head_dim * itemsize(dtype)
