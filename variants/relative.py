"""``relative``: softmax(q k^T / sqrt(d) + b(i, j)) v with a relative-position bias.

``kind="t5"``: a learned scalar per (bucket of j - i, head), T5's bucketing (Raffel et al. 2020):
exact buckets for small distances, logarithmic ones up to ``max_distance``; the bidirectional
form gives past and future their own half of the buckets, the causal form buckets only the past.
``kind="alibi"``: the fixed linear penalty -slope_h * |i - j| of ALiBi (Press et al. 2022).

The bias is made per query chunk on the fly from a table indexed by j - i, so the forward holds
(chunk x n) scores, never n x n. Under autograd each chunk is checkpointed (recomputed in
backward), so the saved state also grows as n * chunk instead of n^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .common import itemsize, softmax_, softmax_scale
from .registry import Common, DenseAttention, register

KINDS = ("t5", "alibi")
T5_INIT_STD = 0.1  # small: the bias starts as a gentle preference, as a freshly trained T5's


@dataclass
class RelativeConfig(Common):
    kind: str = "t5"  # "t5": learned bucketed bias; "alibi": fixed linear distance penalty
    num_buckets: int = 32  # t5: buckets of j - i (split between past and future if bidirectional)
    max_distance: int = 128  # t5: distances from here on share the last bucket
    chunk_size: int = 256  # query rows per chunk: the forward holds (chunk x n) scores per head

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"relative: kind must be one of {KINDS}, got {self.kind!r}")
        if self.chunk_size < 1:
            raise ValueError(f"relative: chunk_size must be >= 1, got {self.chunk_size}")
        if self.kind == "t5" and not (self.num_buckets >= 4 and self.max_distance > 0):
            raise ValueError("relative: t5 needs num_buckets >= 4 and max_distance > 0")


# --- the maths, on plain tensors --------------------------------------------------------------
def t5_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets=32, max_distance=128):
    """T5's bucket of a relative position ``rel = j - i`` (key minus query), from its definition.

    Bidirectional: half the buckets for the future (rel > 0), half for the rest. Causal: only the
    past, a future position falls into bucket 0. Within a half, distances below half its buckets
    are exact; the rest are spaced logarithmically up to ``max_distance`` and then saturate.
    """
    if bidirectional:
        num_buckets //= 2
        offset = (rel > 0).long() * num_buckets
        dist = rel.abs()
    else:
        offset = torch.zeros_like(rel)
        dist = (-rel).clamp_min(0)
    max_exact = num_buckets // 2
    # log of dist / max_exact over log of max_distance / max_exact, spread over the log buckets;
    # clamp_min(1) only keeps log() finite for the small distances that take the exact branch.
    log_ratio = torch.log(dist.clamp_min(1).double() / max_exact) / math.log(
        max_distance / max_exact
    )
    log_bucket = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    log_bucket = log_bucket.clamp_max(num_buckets - 1)
    return offset + torch.where(dist < max_exact, dist, log_bucket)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's head slopes: 2^(-8/h), its square, ... for h a power of two; otherwise the slopes
    of the largest power of two below h, then every other slope of twice that many heads."""

    def geometric(h):
        start = 2.0 ** (-8.0 / h)
        return [start ** (i + 1) for i in range(h)]

    if num_heads & (num_heads - 1) == 0:
        return torch.tensor(geometric(num_heads), dtype=torch.float64)
    lower = 2 ** math.floor(math.log2(num_heads))
    extra = geometric(2 * lower)[0::2][: num_heads - lower]
    return torch.tensor(geometric(lower) + extra, dtype=torch.float64)


def relative_positions(q_start: int, n_q: int, n_k: int, device) -> torch.Tensor:
    """(n_q, n_k) long: j - i for queries q_start .. q_start + n_q - 1 and keys 0 .. n_k - 1."""
    i = torch.arange(q_start, q_start + n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    return j - i


# --- the module -----------------------------------------------------------------------------
@register("relative", config=RelativeConfig)
class Relative(DenseAttention):
    def __init__(self, cfg: RelativeConfig):
        super().__init__(cfg)
        if cfg.kind == "t5":
            g = torch.Generator().manual_seed(cfg.seed)
            init = torch.randn(cfg.num_buckets, cfg.num_heads, generator=g) * T5_INIT_STD
            self.t5_bias = nn.Parameter(init)  # (num_buckets, heads)
        else:
            self.register_buffer("slopes", alibi_slopes(cfg.num_heads))  # (heads,) float64

    # --- the bias ---------------------------------------------------------------------------
    def bias_of(self, rel: torch.Tensor, causal: bool, dtype=None) -> torch.Tensor:
        """The (heads, *rel.shape) bias for relative positions ``rel`` (j - i)."""
        if self.cfg.kind == "t5":
            cfg = self.cfg
            buckets = t5_bucket(rel, not causal, cfg.num_buckets, cfg.max_distance)
            bias = self.t5_bias[buckets]  # (*rel.shape, heads)
            bias = bias.permute(-1, *range(rel.dim()))
        else:
            # -slope * |i - j|; causal: slope * (j - i), the same on every visible pair
            dist = rel if causal else -rel.abs()
            bias = self.slopes.view(-1, *([1] * rel.dim())) * dist
        return bias if dtype is None else bias.to(dtype)

    def position_bias(self, n_q: int, n_k: int, causal: bool = False) -> torch.Tensor:
        """The full (heads, n_q, n_k) bias the variant adds to the scaled scores (for tests)."""
        device = self.t5_bias.device if self.cfg.kind == "t5" else self.slopes.device
        return self.bias_of(relative_positions(0, n_q, n_k, device), causal)

    def bias_table(self, n_q: int, n_k: int, causal: bool, dtype) -> torch.Tensor:
        """(heads, n_q + n_k - 1) in ``dtype``: entry r is the bias of j - i = r - (n_q - 1).
        Made once per call; each chunk indexes it (the bucket logs are not recomputed)."""
        device = self.t5_bias.device if self.cfg.kind == "t5" else self.slopes.device
        rel = torch.arange(-(n_q - 1), n_k, device=device)
        return self.bias_of(rel, causal, dtype)

    # --- the call ---------------------------------------------------------------------------
    def check_heads(self, q):
        if q.shape[1] != self.cfg.num_heads:
            raise ValueError(
                f"relative: built for num_heads={self.cfg.num_heads} (its bias has one entry "
                f"per head) but called with {q.shape[1]} heads; build it with "
                f"num_heads={q.shape[1]}"
            )

    def attend(self, q, k, v, causal):
        self.check_heads(q)
        n_q, n_k = q.shape[-2], k.shape[-2]
        table = self.bias_table(n_q, n_k, causal, q.dtype)  # (H, n_q + n_k - 1)
        c = self.cfg.chunk_size
        saving = torch.is_grad_enabled() and (
            table.requires_grad or any(t.requires_grad for t in (q, k, v))
        )
        outs = []
        for start in range(0, n_q, c):
            args = (q[:, :, start : start + c], k, v, table, start, n_q - 1, causal)
            if saving:  # keep only the inputs; backward recomputes the chunk's scores
                outs.append(checkpoint(chunk_attention, *args, use_reentrant=False))
            else:
                outs.append(chunk_attention(*args))
        return torch.cat(outs, dim=-2)

    # --- cost models ------------------------------------------------------------------------
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
        """Forward without autograd: one chunk's scores (bias, mask and softmax are applied in
        place), its gathered bias and index, the bias table, and the chunks' outputs and cat."""
        size = itemsize(dtype)
        block = min(self.cfg.chunk_size, seq_len) * seq_len  # (chunk x keys) per head
        chunk = batch * heads * block * size + heads * block * size + 2 * block * 8
        out = 2 * batch * heads * seq_len * head_dim * size
        return chunk + out + heads * 2 * seq_len * size


def chunk_attention(q, k, v, table, start: int, offset: int, causal: bool):
    """Rows start .. start + c - 1 of softmax(q k^T * scale + bias) v, for (B, H, c, d) ``q``;
    ``table[:, r]`` is the bias of j - i = r - offset (see :meth:`Relative.bias_table`)."""
    c, n_k = q.shape[-2], k.shape[-2]
    if causal:  # keys past the chunk's last query are all in the future
        n_k = min(n_k, start + c)
        k, v = k[:, :, :n_k], v[:, :, :n_k]
    rel = relative_positions(start, c, n_k, q.device)  # (c, n_k)
    scores = torch.matmul(q * softmax_scale(q.shape[-1]), k.transpose(-1, -2))  # (B, H, c, n_k)
    scores = scores.add_(table[:, rel + offset])  # the (H, c, n_k) bias, made for this chunk only
    if causal:
        scores = scores.masked_fill_(rel > 0, float("-inf"))  # a query always sees itself
    return softmax_(scores) @ v
