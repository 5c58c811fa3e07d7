"""``full``: softmax(q k^T / sqrt(d)) v, the reference every other variant is measured against.

``chunk_size=None`` is the textbook computation (the n x n scores are materialised);
``chunk_size=c`` computes the same result block by block with an online softmax
(Milakov & Gimelshein 2018; the forward of FlashAttention), so the forward never holds more
than a (c x c) block of scores per head: memory O(n * d + c^2), not O(n^2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import itemsize, softmax_scale
from .registry import Common, DenseAttention, register


@dataclass
class FullConfig(Common):
    chunk_size: int | None = None  # None: materialise n x n scores; int: online softmax in blocks

    def __post_init__(self):
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(
                f"full: chunk_size must be a positive int or None, got {self.chunk_size}"
            )


def dense_attention(q, k, v, causal: bool):
    """The textbook form; causal is top-left aligned (query i sees keys j <= i)."""
    scores = (q @ k.transpose(-1, -2)) * softmax_scale(q.shape[-1])  # (B, H, n_q, n_k)
    if causal:
        n_q, n_k = scores.shape[-2:]
        future = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(-1) @ v


def chunked_attention(q, k, v, causal: bool, chunk: int):
    """Exact attention in (chunk x chunk) blocks with a running max and normaliser per row."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    scale = softmax_scale(q.shape[-1])
    outs = []
    for qs in range(0, n_q, chunk):
        qc = q[..., qs : qs + chunk, :] * scale  # (B, H, cq, d)
        cq = qc.shape[-2]
        row_max = qc.new_full((*qc.shape[:-1], 1), float("-inf"))
        row_sum = qc.new_zeros((*qc.shape[:-1], 1))
        acc = qc.new_zeros((*qc.shape[:-1], v.shape[-1]))
        k_end = min(n_k, qs + cq) if causal else n_k  # causal: later key blocks are all future
        for ks in range(0, k_end, chunk):
            s = qc @ k[..., ks : ks + chunk, :].transpose(-1, -2)  # (B, H, cq, ck)
            if causal and ks + s.shape[-1] - 1 > qs:  # the block straddles the diagonal
                qi = torch.arange(qs, qs + cq, device=q.device)[:, None]
                kj = torch.arange(ks, ks + s.shape[-1], device=q.device)[None, :]
                s = s.masked_fill(kj > qi, float("-inf"))
            new_max = torch.maximum(row_max, s.amax(-1, keepdim=True))
            p = torch.exp(s - new_max)
            rescale = torch.exp(row_max - new_max)
            row_sum = row_sum * rescale + p.sum(-1, keepdim=True)
            acc = acc * rescale + p @ v[..., ks : ks + chunk, :]
            row_max = new_max
        outs.append(acc / row_sum)
    return torch.cat(outs, dim=-2)


@register("full", config=FullConfig)
class Full(DenseAttention):
    def attend(self, q, k, v, causal):
        if self.cfg.chunk_size is None:
            return dense_attention(q, k, v, causal)
        return chunked_attention(q, k, v, causal, self.cfg.chunk_size)

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
        size = itemsize(dtype)
        out = batch * heads * seq_len * head_dim * size
        if self.cfg.chunk_size is None:  # the scores and the softmax: two n x n per head
            return 2 * batch * heads * seq_len * seq_len * size + out
        c = min(self.cfg.chunk_size, seq_len)  # a few (c x c) blocks and the running state
        return 3 * batch * heads * c * c * size + 3 * out
