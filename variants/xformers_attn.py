"""``xformers``: ``xformers.ops.memory_efficient_attention``, causal through its
lower-triangular bias. xformers ships CUDA kernels only: on CPU the variant is Unsupported.

Grouped heads use xformers' own GQA layout (its docstring, xformers 0.0.35): 5-d tensors
(B, n, G, H, K) with G key/value head groups of H query heads each, k and v expanded along H
without a copy (xformers does not broadcast by itself). xformers supports that layout in the
forward pass only, so a grouped call that needs gradients is Unsupported. Decoding is a query of
length 1 against the KV cache with no bias: the new token sees every cached one and itself.
"""

from __future__ import annotations

import functools

import torch

from .registry import DenseAttention, KVCacheDecoding, Unsupported, register
from .sdpa import fused_memory


@functools.cache
def _xformers_ops():
    """Import lazily: importing xformers on a machine without its kernels prints warnings."""
    try:
        import xformers.ops as xops
    except Exception as e:  # not installed, or built for another torch
        return None, f"xformers cannot be imported ({type(e).__name__}: {e}); pip install xformers"
    return xops, None


def _bias(xops, causal):
    return xops.LowerTriangularMask() if causal else None  # top-left, as ``full``


def xformers_call(xops, q, k, v, causal: bool):
    """memory_efficient_attention on (B, H, n, d) tensors, through xformers' (B, n, H, d)
    layout, or grouped (B, n, KV, G, d) where k, v have KV < H heads: the queries split by
    key/value head, keys and values expanded over the G query heads (a stride-0 view)."""
    kv, groups = k.shape[1], q.shape[1] // k.shape[1]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if groups > 1:
        q = q.unflatten(2, (kv, groups))
        k, v = (t[:, :, :, None].expand(-1, -1, -1, groups, -1) for t in (k, v))
    out = xops.memory_efficient_attention(q, k, v, attn_bias=_bias(xops, causal))
    return (out.flatten(2, 3) if groups > 1 else out).transpose(1, 2)


@functools.cache
def _probe(device: str, dtype: torch.dtype, causal: bool, grouped: bool) -> list[str]:
    xops, err = _xformers_ops()
    if err:
        return [err]
    q = torch.randn(1, 2, 16, 16, device=device).to(dtype)
    k = q[:, :1] if grouped else q  # one key/value head for two query heads
    try:
        xformers_call(xops, q, k, k, causal)
    except (NotImplementedError, ValueError) as e:  # xformers says which operators refused why
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = "; ".join(ln for ln in lines if "supported" in ln or "built" in ln)[:300]
        what = "grouped heads in " if grouped else ""
        return [f"xformers has no kernel for {what}{dtype} on {device}: {why or lines[0]}"]
    return []


@register("xformers")
class XFormers(KVCacheDecoding, DenseAttention):
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
        grouped = kv_heads is not None and kv_heads != self.cfg.num_heads
        return reasons or _probe(str(device), dtype, causal, grouped)

    def attend(self, q, k, v, causal):
        xops = self._ops()
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if needs_grad and k.shape[1] != q.shape[1]:
            raise Unsupported(
                f"{self.name}: xformers runs grouped heads (its BMGHK layout) in the forward "
                "pass only; time fwd, or compare grouped backward against sdpa"
            )
        return xformers_call(xops, q, k, v, causal)

    def step(self, q_t, keys, values):
        return xformers_call(self._ops(), q_t, keys, values, causal=False)

    def _ops(self):
        xops, err = _xformers_ops()
        if err:
            raise Unsupported(f"{self.name}: {err}")
        return xops

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
        """The output and its log-sum-exp (and the gradients): not measured here (CUDA only)."""
        shape = (batch, heads, kv_heads or heads, seq_len, head_dim, dtype)
        return fused_memory(*shape, backward, cpu_buffers=False)
