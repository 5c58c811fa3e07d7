"""``linformer``: keys and values projected along the sequence, n -> k (Wang et al. 2020).

softmax(q (E k)^T / sqrt(d)) (F v) with E, F of shape (k, n): each query scores k projected keys,
so time and memory are O(n k) instead of O(n^2). The projections are learned parameters sized by
the ``seq_len`` the module is built for; a shorter call uses their leading columns, a longer one
cannot be run without rebuilding.

Sharing (the paper's section 4): ``headwise`` one E and one F for all heads; ``kv`` one matrix
used as both E and F for all heads; ``none`` an E and an F per head (per key/value head: with
grouped heads each key/value head is projected once, by its own E and F, and read by the query
heads of its group). Self-attention only: keys and values as long as the queries. No causal
mode and no decoding: E k mixes every position, future ones included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .common import (
    group_queries,
    itemsize,
    softmax_,
    softmax_flops,
    softmax_scale,
    ungroup,
    with_backward,
)
from .registry import Attention, Common, Unsupported, register

SHARES = ("headwise", "kv", "none")
SCORE_BLOCK = 2**20  # score elements per block of queries (4 MB in float32: in L2/L3 cache)


@dataclass
class LinformerConfig(Common):
    proj_len: int = 256  # k: the length keys and values are projected to (one of the paper's)
    share: str = "headwise"  # "headwise": E, F shared by heads; "kv": E = F; "none": per head

    def __post_init__(self):
        if self.proj_len < 1:
            raise ValueError(f"linformer: proj_len must be a positive int, got {self.proj_len}")
        if self.share not in SHARES:
            raise ValueError(f"linformer: share must be one of {SHARES}, got {self.share!r}")


def init_projection(heads: int, proj_len: int, seq_len: int, gen: torch.Generator):
    """N(0, 1/k) entries, as the paper initialises E and F: (heads, k, n)."""
    return torch.randn(heads, proj_len, seq_len, generator=gen) * proj_len**-0.5


def project(P, x):
    """P x along the sequence: P (heads or 1, k, n), x (B, H, n, d) -> (B, H, k, d).

    einsum lets a shared P become one (k x n) @ (n x B*H*d) product, where a broadcasting
    matmul would first copy P once per batch and head."""
    if P.shape[0] == 1:
        return torch.einsum("kn,bhnd->bhkd", P[0], x)
    return torch.einsum("hkn,bhnd->bhkd", P, x)


def linformer_attention(q, k, v, E, F):
    """softmax(q (E k)^T / sqrt(d)) (F v); q (B, H, n, d), k and v (B, KV, n, d), E and F (KV or
    1, k, n) with n = the call's length. Each key/value head is projected once and read by the
    G = H / KV query heads of its group, laid end to end (B, KV, G n, d): no copies per head.

    Queries go in blocks whose (rows x k) scores stay in cache (SCORE_BLOCK elements): the whole
    (n x k) scores of a long sequence would not, and each pass over them would then run at
    memory speed, so time would grow faster than n."""
    B, H, n, d = q.shape
    # The softmax scale goes on the (k x d) projected keys: the smallest tensor it can.
    k_proj = (project(E, k) * softmax_scale(d)).transpose(-1, -2)  # (B, KV, d, k)
    v_proj = project(F, v)  # (B, KV, k, dv)
    grouped = group_queries(q, k.shape[1])  # (B, KV, G n, d), a view
    rows = max(1, SCORE_BLOCK // (B * k.shape[1] * k_proj.shape[-1]))
    blocks = grouped.split(rows, dim=-2)
    if not any(t.requires_grad for t in (q, k_proj, v_proj)):
        # Without autograd each block's output goes straight into the result, so the blocks
        # are never all held (as they are until a cat).
        out = q.new_empty(*grouped.shape[:-1], v_proj.shape[-1])
        for start, qb in zip(range(0, grouped.shape[-2], rows), blocks, strict=True):
            out[..., start : start + qb.shape[-2], :] = softmax_(qb @ k_proj) @ v_proj
    else:  # a cat: its backward hands each block its slice (in-place writes would copy it)
        out = torch.cat([(qb @ k_proj).softmax(-1) @ v_proj for qb in blocks], -2)
    return ungroup(out, H)


@register("linformer", config=LinformerConfig)
class Linformer(Attention):
    def __init__(self, cfg: LinformerConfig):
        super().__init__(cfg)
        if cfg.seq_len is None:
            raise ValueError(
                "linformer needs seq_len: its projections are (proj_len x seq_len); "
                "build it with seq_len=<the longest sequence you will call it with>"
            )
        gen = torch.Generator().manual_seed(cfg.seed)
        # share='none': a projection per key/value head (each compresses its own keys), which
        # the G query heads of its group read.
        heads = (cfg.kv_heads or cfg.num_heads) if cfg.share == "none" else 1
        self.E = nn.Parameter(init_projection(heads, cfg.proj_len, cfg.seq_len, gen))
        # kv sharing: one matrix serves as both E and F (F is then the same Parameter).
        self.F = (
            self.E
            if cfg.share == "kv"
            else nn.Parameter(init_projection(heads, cfg.proj_len, cfg.seq_len, gen))
        )

    def projections(self):
        """(E, F), each (kv_heads or 1, proj_len, seq_len); the same tensor twice for share='kv'."""
        return self.E, self.F

    def unsupported(
        self, *, device="cpu", dtype=torch.float32, causal=False, seq_len=None, kv_heads=None
    ):
        reasons = super().unsupported(
            device=device, dtype=dtype, causal=causal, seq_len=seq_len, kv_heads=kv_heads
        )
        if causal:
            reasons.append(
                "no causal mode: the projection E k mixes all positions, future ones included"
            )
        if seq_len is not None and seq_len > self.cfg.seq_len:
            reasons.append(
                f"seq_len {seq_len} exceeds the {self.cfg.seq_len} the projections were built "
                f"for; rebuild with seq_len>={seq_len}"
            )
        heads = self.E.shape[0]
        if kv_heads is not None and heads != 1 and kv_heads != heads:
            reasons.append(
                f"share='none' holds projections for {heads} key/value heads, called with "
                f"{kv_heads}; rebuild with kv_heads={kv_heads}"
            )
        return reasons

    def attend(self, q, k, v, causal):
        n = q.shape[-2]
        if k.shape[-2] != n:
            raise Unsupported(
                f"linformer: self-attention over one sequence: E and F are cut to the call's "
                f"length, so keys must be as long as queries; q has {n} positions and k "
                f"{k.shape[-2]} (use full for cross-attention)"
            )
        # A shorter call uses the leading n columns: (heads or 1, k, n).
        E, F = (p[..., :n].to(device=q.device, dtype=q.dtype) for p in (self.E, self.F))
        return linformer_attention(q, k, v, E, F)

    def decode_unsupported(self, *, device="cpu", dtype=torch.float32):
        return [
            "no autoregressive form: the projection E k mixes all positions, so every output "
            "changes as later tokens arrive (there is no causal prefix to continue)"
        ]

    def flops(
        self, *, batch, heads, seq_len, head_dim, causal=False, backward=False, kv_heads=None
    ):
        """E k and F v once per key/value head (2 k n d each), then softmax attention of every
        query head over the k projected pairs; backward: BACKWARD_FACTOR x both (the
        projections' gradients reach k, v and E, F)."""
        kp, kv = self.cfg.proj_len, kv_heads or heads
        proj = with_backward(2 * 2 * batch * kv * kp * seq_len * head_dim, backward)
        attn = softmax_flops(
            batch=batch, heads=heads, pairs=seq_len * kp, head_dim=head_dim, backward=backward
        )
        return proj + attn

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
        """Forward: the output, one block's scores (softmax in place) and output, the projected
        keys and values. With autograd, the largest of: the end of the forward (every block's
        softmax, kept for backward, the copies of k and v the projections' einsum keeps, the
        blocks' outputs and their cat), the start of the backward (a block's softmax and score
        gradients and F v's instead of the blocks' outputs) and its end (the gradients of q, k,
        v, E and F). The projections are built in float32: another dtype adds their copies."""
        kp, kv, n, d = self.cfg.proj_len, kv_heads or heads, seq_len, head_dim
        rows = min(heads // kv * n, max(1, SCORE_BLOCK // (batch * kv * kp)))
        params = len({id(self.E), id(self.F)}) * self.E.numel()  # E and F, or one for "kv"
        casts = 0 if dtype == torch.float32 else params * n // self.cfg.seq_len
        out = batch * heads * n * d
        projected = 2 * batch * kv * kp * d  # E k (scaled) and F v
        block = batch * kv * rows * kp  # one block of scores
        if not backward:
            return (out + projected + block + batch * kv * rows * d + casts) * itemsize(dtype)
        kept = batch * heads * n * kp + 2 * batch * kv * n * d + projected + casts
        start = max(2 * out, out + 2 * block + batch * kv * kp * d)
        end = 2 * out + 2 * batch * kv * n * d + params  # q, k, v, E, F gradients; the output
        return max(kept + start, end) * itemsize(dtype)
