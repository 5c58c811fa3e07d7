"""Small pure helpers shared by the variants (maths on plain tensors, no modules)."""

from __future__ import annotations

import torch


def softmax_scale(head_dim: int) -> float:
    return head_dim**-0.5


def pad_to_multiple(x: torch.Tensor, multiple: int, dim: int = -2) -> tuple[torch.Tensor, int]:
    """Zero-pad ``x`` along ``dim`` to a multiple of ``multiple``; returns (padded, pad)."""
    n = x.shape[dim]
    pad = (-n) % multiple
    if pad == 0:
        return x, 0
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim), pad


def causal_pairs(n_q: int, n_k: int | None = None) -> int:
    """Visible (query, key) pairs under the top-left causal mask (key j <= query i)."""
    n_k = n_q if n_k is None else n_k
    return sum(min(i + 1, n_k) for i in range(n_q)) if n_q != n_k else n_q * (n_q + 1) // 2


def softmax_flops(
    *, batch, heads, pairs, head_dim, backward=False, v_dim=None, bwd_factor=2.5
) -> int:
    """FLOPs of softmax attention over ``pairs`` visible (query, key) pairs per head:
    q k^T and p v are 2 * pairs * d each; backward counts ``bwd_factor`` x forward."""
    v_dim = head_dim if v_dim is None else v_dim
    fwd = 2 * batch * heads * pairs * (head_dim + v_dim)
    return int(fwd * (1 + bwd_factor)) if backward else int(fwd)


def dense_pairs(seq_len: int, causal: bool) -> int:
    return causal_pairs(seq_len) if causal else seq_len * seq_len


def dense_flops(*, batch, heads, seq_len, head_dim, causal=False, backward=False) -> int:
    """FLOPs of softmax attention over every (causally) visible pair: what ``full`` computes,
    and so the useful work of any exact dense variant."""
    pairs = dense_pairs(seq_len, causal)
    return softmax_flops(
        batch=batch, heads=heads, pairs=pairs, head_dim=head_dim, backward=backward
    )


def itemsize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, in place when autograd does not need the scores: a fresh
    output as large as the scores costs page faults and about a fifth of the call."""
    if scores.requires_grad:
        return scores.softmax(-1)
    return torch.softmax(scores, -1, out=scores)
