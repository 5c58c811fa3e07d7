"""Small pure helpers shared by the variants (maths on plain tensors, no modules)."""

from __future__ import annotations

from dataclasses import dataclass

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


# The one backward convention of every variant's flops(): the backward of a product computes the
# gradients of both its operands, two products of the same size, so backward = 2 x forward.
# Recomputation (checkpointing, FlashAttention's backward) is work done again, not useful work,
# and is not counted (FlashAttention's benchmarks count it: their backward is 2.5 x forward).
BACKWARD_FACTOR = 2


def with_backward(fwd: int, backward: bool) -> int:
    """Forward FLOPs, or forward plus backward under BACKWARD_FACTOR."""
    return int(fwd * (1 + BACKWARD_FACTOR)) if backward else int(fwd)


def softmax_flops(*, batch, heads, pairs, head_dim, backward=False, v_dim=None) -> int:
    """FLOPs of softmax attention over ``pairs`` visible (query, key) pairs per head:
    q k^T and p v are 2 * pairs * d each (the softmax itself is not counted)."""
    v_dim = head_dim if v_dim is None else v_dim
    return with_backward(2 * batch * heads * pairs * (head_dim + v_dim), backward)


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


def add_bmm(acc, a, b, *, beta=1.0, alpha=1.0) -> None:
    """acc = beta acc + alpha (a @ b), in place (acc may be a view). Through baddbmm's out=
    overload: FlopCounterMode counts it, not the in-place baddbmm_ (beta=0: acc is not read)."""
    torch.baddbmm(acc, a, b, beta=beta, alpha=alpha, out=acc)


def ceiling(hidden: torch.Tensor, dtype) -> torch.Tensor:
    """A bool mask as a float cap: -inf where hidden, +inf elsewhere. ``scores.clamp_max_(cap)``
    hides exactly what ``masked_fill_(hidden, -inf)`` does, for every score (an overflowed +inf
    too, where a -inf bias would give NaN), and is about 5x faster on CPU."""
    cap = torch.full(hidden.shape, float("inf"), dtype=dtype, device=hidden.device)
    return cap.masked_fill_(hidden, float("-inf"))


def softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, in place when autograd does not need the scores: a fresh
    output as large as the scores costs page faults and about a fifth of the call."""
    if scores.requires_grad:
        return scores.softmax(-1)
    return torch.softmax(scores, -1, out=scores)


# --- grouped heads ----------------------------------------------------------------------------
def group_queries(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, n, d) -> (B, kv_heads, G * n, d), a view: the G = H / kv_heads query heads that
    share a key/value head laid end to end, so one (G n x d) @ (d x n_k) product per key/value
    head serves them all and k, v are never copied per query head."""
    B, H, n, d = q.shape
    return q.reshape(B, kv_heads, (H // kv_heads) * n, d)


def ungroup(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of :func:`group_queries`: (B, kv_heads, G * n, d) -> (B, heads, n, d)."""
    B, _, gn, d = x.shape
    return x.reshape(B, heads, gn * x.shape[1] // heads, d)


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, kv_heads, n, d) -> (B, heads, n, d) with each key/value head repeated for its
    group: a copy, for mechanisms that cannot share one key/value head across queries."""
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


# --- the KV cache -----------------------------------------------------------------------------
@dataclass(frozen=True)
class KVCache:
    """Keys and values of the first ``length`` positions, in buffers of ``capacity`` slots
    (B, kv_heads, capacity, d). :func:`append` writes the new token at slot ``length`` and
    returns a cache one longer over the same buffers: the cache it was given still sees its own
    ``length`` tokens, unchanged, so one step can be repeated from it."""

    k: torch.Tensor
    v: torch.Tensor
    length: int

    @property
    def keys(self) -> torch.Tensor:
        return self.k[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor:
        return self.v[:, :, : self.length]

    def nbytes(self) -> int:
        """Bytes of the tokens held (not of spare capacity)."""
        return 2 * self.keys.numel() * self.k.element_size()


def start_cache(k: torch.Tensor, v: torch.Tensor, spare: int = 1) -> KVCache:
    """A cache holding the prompt's k, v (B, kv_heads, n, d) with room for ``spare`` more."""
    B, H, n, d = k.shape
    kb, vb = k.new_empty(B, H, n + spare, d), v.new_empty(B, H, n + spare, v.shape[-1])
    kb[:, :, :n], vb[:, :, :n] = k, v
    return KVCache(kb, vb, n)


def append(cache: KVCache, k_t: torch.Tensor, v_t: torch.Tensor) -> KVCache:
    """The cache with one more token (k_t, v_t: (B, kv_heads, 1, d)); the buffers double when
    full (amortised O(1) per token, as a server's growing cache)."""
    k, v, n = cache.k, cache.v, cache.length
    if n == k.shape[2]:
        k = torch.cat([k, torch.empty_like(k)], dim=2)
        v = torch.cat([v, torch.empty_like(v)], dim=2)
    k[:, :, n : n + 1] = k_t
    v[:, :, n : n + 1] = v_t
    return KVCache(k, v, n + 1)
