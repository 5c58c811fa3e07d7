"""``linformer``: keys and values projected along the sequence, n -> k (Wang et al. 2020).

softmax(q (E k)^T / sqrt(d)) (F v) with E, F of shape (k, n): each query scores k projected keys,
so time and memory are O(n k) instead of O(n^2). The projections are learned parameters sized by
the ``seq_len`` the module is built for; a shorter call uses their leading columns, a longer one
cannot be run without rebuilding.

Sharing (the paper's section 4): ``headwise`` one E and one F for all heads; ``kv`` one matrix
used as both E and F for all heads; ``none`` an E and an F per head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .common import itemsize, softmax_flops, softmax_scale
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
    """softmax(q (E k)^T / sqrt(d)) (F v); E, F: (heads or 1, k, n) with n = the call's length.

    Queries go in blocks whose (rows x k) scores stay in cache (SCORE_BLOCK elements): the whole
    (n x k) scores of a long sequence would not, and each pass over them would then run at
    memory speed, so time would grow faster than n."""
    k_proj = project(E, k).transpose(-1, -2)  # (B, H, d, k)
    v_proj = project(F, v)  # (B, H, k, dv)
    B, H, n, d = q.shape
    rows = max(1, SCORE_BLOCK // (B * H * k_proj.shape[-1]))
    # Scale q (n x d), not the scores (n x k): one pass over the smaller tensor.
    q = q * softmax_scale(d)
    return torch.cat([(qb @ k_proj).softmax(-1) @ v_proj for qb in q.split(rows, dim=-2)], -2)


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
        heads = cfg.num_heads if cfg.share == "none" else 1
        self.E = nn.Parameter(init_projection(heads, cfg.proj_len, cfg.seq_len, gen))
        # kv sharing: one matrix serves as both E and F (F is then the same Parameter).
        self.F = (
            self.E
            if cfg.share == "kv"
            else nn.Parameter(init_projection(heads, cfg.proj_len, cfg.seq_len, gen))
        )

    def projections(self):
        """(E, F), each (heads or 1, proj_len, seq_len); the same tensor twice for share='kv'."""
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
        return reasons

    def attend(self, q, k, v, causal):
        heads = self.E.shape[0]
        if heads != 1 and heads != q.shape[1]:
            raise Unsupported(
                f"linformer: share='none' holds projections for {heads} heads, called with "
                f"{q.shape[1]}; rebuild with num_heads={q.shape[1]}"
            )
        n = q.shape[-2]
        # A shorter call uses the leading n columns: (heads or 1, k, n).
        E, F = (p[..., :n].to(device=q.device, dtype=q.dtype) for p in (self.E, self.F))
        return linformer_attention(q, k, v, E, F)

    def flops(
        self, *, batch, heads, seq_len, head_dim, causal=False, backward=False, kv_heads=None
    ):
        kp = self.cfg.proj_len
        # E k and F v: 2 * k * n * d each; their backward (grads of k, v and E, F) is 2x.
        proj = 2 * 2 * batch * heads * kp * seq_len * head_dim
        attn = softmax_flops(
            batch=batch, heads=heads, pairs=seq_len * kp, head_dim=head_dim, backward=backward
        )
        return proj * 3 + attn if backward else proj + attn

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
        kp = self.cfg.proj_len
        projected = 2 * batch * heads * kp * head_dim  # E k and F v
        rows = min(seq_len, max(1, SCORE_BLOCK // (batch * heads * kp)))
        scores = 2 * batch * heads * rows * kp  # one block's scores and softmax
        out = batch * heads * seq_len * head_dim
        return (projected + scores + out) * size
