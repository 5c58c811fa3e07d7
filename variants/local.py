"""``local``: exact sliding-window attention.

Query i sees key j iff ``abs(i - j) <= window`` (causal: ``0 <= i - j <= window``). The sequence
is cut into blocks of ``b`` positions; a query block can only see the ``r = ceil(window / b)``
key blocks on each side of it (causal: before it), so every query block is scored against one
slab of ``(2r + 1) b`` keys (causal ``(r + 1) b``), gathered for all blocks at once with one
``unfold``. The band and the padding are masked exactly inside the slab. Time and memory grow as
``n * window``; no n x n tensor is ever made.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .common import itemsize, pad_to_multiple, softmax_, softmax_flops, softmax_scale
from .registry import Attention, Common, Unsupported, register

# Smallest block: tiny windows would otherwise give tiny matmuls whose per-call overhead
# dominates; a 32-wide block keeps the slab's matmuls efficient at a small masking waste.
MIN_BLOCK = 32


@dataclass
class LocalConfig(Common):
    window: int = 128  # radius: query i sees keys j with |i - j| <= window (causal: i - j)

    def __post_init__(self):
        if self.window < 0:
            raise ValueError(f"local: window must be >= 0, got {self.window}")


def block_size(window: int, seq_len: int) -> int:
    """A quarter of the window, so a slab is 9 blocks (causal 5) of which about a tenth is
    masked away; measured faster on CPU than half- or whole-window blocks (less masked work
    for matmuls still large enough). One block if the sequence is short."""
    return min(max(window // 4, MIN_BLOCK), seq_len)


def band_pairs(seq_len: int, window: int, causal: bool) -> int:
    """Visible (query, key) pairs of the band: n on the diagonal plus (n - t) at each offset t."""
    m = min(window, seq_len - 1)
    off_diagonal = m * seq_len - m * (m + 1) // 2  # sum over t = 1..m of (n - t)
    return seq_len + off_diagonal * (1 if causal else 2)


@functools.lru_cache(maxsize=16)
def hidden_mask(n: int, b: int, left: int, right: int, window: int, causal: bool, device):
    """(nb, b, span) bool: True where query row t of block I must NOT see key column c of its slab.

    Block I's slab starts at key position (I - left) * b, so the band test depends only on the
    offset i - j. Key positions before 0 or from n on are padding (or, in the flattened layout
    of :func:`local_attention`, another head's keys) and are hidden. Padded query rows (from n
    on) hide nothing, so no row is all -inf (a NaN that backward would spread); they are dropped.
    """
    nb = -(-n // b)
    span = (left + 1 + right) * b
    blocks = torch.arange(nb, device=device)[:, None, None]
    q_pos = blocks * b + torch.arange(b, device=device)[None, :, None]  # (nb, b, 1)
    k_pos = (blocks - left) * b + torch.arange(span, device=device)[None, None, :]  # (nb, 1, span)
    offset = q_pos - k_pos
    lower = 0 if causal else -window
    visible = (offset >= lower) & (offset <= window) & (k_pos >= 0) & (k_pos < n)
    return ~visible & (q_pos < n)


@functools.lru_cache(maxsize=16)
def hidden_bias(n, b, left, right, window, causal, device, dtype) -> torch.Tensor:
    """:func:`hidden_mask` as an additive (nb, b, span) bias: -inf where hidden, else 0."""
    hidden = hidden_mask(n, b, left, right, window, causal, device)
    return torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill_(hidden, -math.inf)


def band_scores(q, k_slabs, heads: int, geometry: tuple):
    """(T, b, span) scaled scores of every query block against its slab, hidden pairs at -inf.

    ``q``: (T, b, d) unscaled query blocks of ``heads`` (batch, head) rows, ``k_slabs``:
    (T, d, span), ``geometry``: (n, b, left, right, window, causal), the masks' cache key."""
    T, b, d = q.shape
    span = k_slabs.shape[-1]
    grid = (heads, T // heads, b, span)  # (B*H, nb, b, span)
    if torch.is_grad_enabled() and (q.requires_grad or k_slabs.requires_grad):
        # autograd refuses out= below; an out-of-place fill also spares backward a CopySlices
        scores = torch.bmm(q * softmax_scale(d), k_slabs).view(grid)
        return scores.masked_fill(hidden_mask(*geometry, q.device), -math.inf).view(T, b, span)
    # One pass over the scores instead of two: copy the -inf bias in, accumulate q k^T on it.
    scores = q.new_empty(T, b, span)
    scores.view(grid).copy_(hidden_bias(*geometry, q.device, q.dtype))
    return torch.baddbmm(scores, q, k_slabs, alpha=softmax_scale(d), out=scores)


def slabs(x: torch.Tensor, b: int, left: int, right: int) -> torch.Tensor:
    """(T*b, d) rows of T blocks -> (T, d, span) view: block t's rows t-left .. t+right.

    An overlapping unfold view: bmm reads it in place (no copy of the slabs is made)."""
    d = x.shape[-1]
    x = torch.cat([x.new_zeros(left * b, d), x, x.new_zeros(right * b, d)])  # (T*b + pads, d)
    return x.unfold(0, (left + 1 + right) * b, b)  # (T, d, span)


def local_attention(q, k, v, window: int, causal: bool, block: int | None = None):
    """Exact sliding-window softmax attention on (B, H, n, d) tensors; see the module doc."""
    B, H, n, d = q.shape
    b = block or block_size(window, n)
    nb = -(-n // b)
    left = min(-(-window // b), nb - 1)  # key blocks a query block reaches back
    right = 0 if causal else left
    T = B * H * nb  # blocks of all (batch, head) rows laid end to end
    # Flattening lets a slab run into the neighbouring head's keys, but only at key positions
    # outside 0..n-1, which the mask hides anyway: one unfold serves every head.
    q, _ = pad_to_multiple(q, b)
    k, _ = pad_to_multiple(k, b)
    v, _ = pad_to_multiple(v, b)
    k_slabs = slabs(k.reshape(T * b, d), b, left, right)  # (T, d, span)
    geometry = (n, b, left, right, window, causal)
    scores = band_scores(q.reshape(T, b, d), k_slabs, B * H, geometry)
    probs = softmax_(scores)  # (T, b, span)
    v_slabs = slabs(v.reshape(T * b, d), b, left, right).transpose(1, 2)  # (T, span, d)
    out = torch.bmm(probs, v_slabs)  # (T, b, d)
    return out.view(B, H, nb * b, d)[:, :, :n]


@register("local", config=LocalConfig)
class Local(Attention):
    def attend(self, q, k, v, causal):
        if q.shape[-2] != k.shape[-2]:
            raise Unsupported(
                f"{self.name}: the window is defined on one sequence; q has {q.shape[-2]} "
                f"positions and k {k.shape[-2]} (use full for cross-attention)"
            )
        return local_attention(q, k, v, self.cfg.window, causal)

    def flops(
        self, *, batch, heads, seq_len, head_dim, causal=False, backward=False, kv_heads=None
    ):
        pairs = band_pairs(seq_len, self.cfg.window, causal)
        return softmax_flops(
            batch=batch, heads=heads, pairs=pairs, head_dim=head_dim, backward=backward
        )

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
        """Forward without autograd: the scores of every slab (softmax runs in place on them),
        the zero-framed k and v, the output, and the cached mask and -inf bias."""
        b = block_size(self.cfg.window, seq_len)
        nb = math.ceil(seq_len / b)
        left = min(math.ceil(self.cfg.window / b), nb - 1)
        span = (left + 1 + (0 if causal else left)) * b
        rows = batch * heads * nb * b  # padded query rows
        size = itemsize(dtype)
        scores = rows * span * size
        copies = 3 * rows * head_dim * size  # k and v (framed), the output
        return scores + copies + nb * b * span * (1 + size)
