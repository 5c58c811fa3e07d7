"""Independent float64 computations the variants are checked against.

Written from the definitions (einsum and an explicit softmax), never by calling the code under
test, so a shared bug cannot make a test pass.
"""

from __future__ import annotations

import torch


def qkv(
    batch=2, heads=3, seq_len=50, head_dim=16, dtype=torch.float64, seed=0, requires_grad=False
):
    g = torch.Generator().manual_seed(seed)
    make = lambda: torch.randn(batch, heads, seq_len, head_dim, generator=g, dtype=dtype)
    q, k, v = make(), make(), make()
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def causal_mask(n_q: int, n_k: int | None = None) -> torch.Tensor:
    """(n_q, n_k) bool: query i sees key j iff j <= i."""
    n_k = n_q if n_k is None else n_k
    i = torch.arange(n_q)[:, None]
    j = torch.arange(n_k)[None, :]
    return j <= i


def softmax_attention(q, k, v, mask=None, bias=None, scale=None):
    """softmax(q k^T * scale + bias, masked) v in float64 with an explicit exp/sum softmax.

    ``mask``: bool, broadcastable to (B, H, n_q, n_k), True where a query sees a key.
    ``bias``: float, broadcastable likewise. Rows with no visible key give zeros.
    """
    q, k, v = (t.double() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if bias is not None:
        s = s + bias.double()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True).clamp_min(-1e300)  # all-masked rows: avoid -inf - -inf
    e = torch.exp(s - m)
    w = e / e.sum(-1, keepdim=True).clamp_min(1e-300)
    return torch.einsum("bhij,bhjd->bhid", w, v)


def relative_error(out, ref) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())
