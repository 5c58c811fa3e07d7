"""``linear``: kernelised linear attention (Katharopoulos et al. 2020).

out_i = phi(q_i) . sum_j phi(k_j) v_j^T / (phi(q_i) . sum_j phi(k_j) + eps), the softmax kernel
exp(q . k) replaced by a feature map phi, so the keys and values can be summed once into an
(m x dv) summary: O(n m dv) time and O(m dv) state instead of O(n^2).

Feature maps (phi is applied to q and k unscaled):
- ``elu``: elu(x) + 1, the paper's choice; m = head_dim.
- ``relu``: relu(x); m = head_dim. A row whose features are all zero gives 0 (the eps guard).
- ``favor``: Performer's positive orthogonal random features (Choromanski et al. 2021),
  phi(x) = exp(w_r . x - |x|^2 / 2) for m = ``num_features`` rows w_r, drawn from ``seed`` in
  orthogonal blocks. phi(q) . phi(k) estimates exp(q . k); to estimate *softmax* attention (with
  its 1/sqrt(d)) the map scales its input by d^-1/4 before the features, so q and k contribute
  d^-1/4 each. Stabilised as below; stabilisers are constants per row or per (batch, head),
  so they cancel between numerator and denominator, as does the estimator's 1/m, left out
  (eps aside: for favor, eps only guards a zero denominator in the stabilised units).

Causal: a chunked prefix sum. Within a chunk of ``chunk_size`` the (c x c) quadratic form with
the lower-triangular mask; across chunks each chunk's summary phi(K_c)^T V_c, (m x dv), and their
exclusive prefix sum. Time O(n c (m + dv) + n m dv); the states are per chunk, not per position,
so memory is O(n (c + m dv / c)), not the O(n m dv) of a per-position cumulative sum.

Causality and FAVOR's stabiliser: the query features are stabilised by their own row maximum;
the key features by a maximum over keys. Non-causal uses the maximum over all keys (Performer's
choice). Causal may not (a future key would change past outputs, and could underflow them to
0), so each key carries its own maximum m_j as a log-weight and a query i is normalised by
M_i = max of m_j over j <= i: the prefix maxima are carried chunk by chunk, with the running
state rescaled whenever the maximum grows. Every output then depends on keys j <= i only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import itemsize, pad_to_multiple
from .registry import Attention, Common, Unsupported, register

FEATURE_MAPS = ("elu", "relu", "favor")


@dataclass
class LinearConfig(Common):
    feature_map: str = "elu"  # "elu" (elu+1, the paper's), "relu", or "favor" (Performer)
    num_features: int = 256  # favor only: random features m; its error shrinks as m grows
    eps: float = 1e-6  # guards the denominator (relu features can all be zero)
    chunk_size: int = 64  # causal: quadratic form within chunks of this length, states across

    def __post_init__(self):
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"linear: feature_map must be one of {FEATURE_MAPS}, got {self.feature_map!r}"
            )
        if self.num_features < 1 or self.chunk_size < 1:
            raise ValueError("linear: num_features and chunk_size must be positive ints")


# --- feature maps -----------------------------------------------------------------------------
def orthogonal_features(num_features: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """(m, d) rows: orthonormal within blocks of d, each row rescaled to the length of a Gaussian
    vector, so every row is marginally N(0, I) while rows of a block stay orthogonal (Performer's
    ORF, which lowers the estimator's variance)."""
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        g = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
        qmat, r = torch.linalg.qr(g)
        blocks.append((qmat * torch.sign(torch.diagonal(r))).T)  # sign fix: Haar-distributed
    w = torch.cat(blocks)[:num_features]
    lengths = torch.randn(num_features, dim, generator=gen, dtype=torch.float64).norm(dim=1)
    return w * lengths[:, None]


def elu_features(x):
    """elu(x) + 1; the + 1 in place (elu's backward reads its input, not its output)."""
    return F.elu(x).add_(1.0)


def favor_logits(x, w):
    """log phi(x) = w_r . x' - |x'|^2 / 2 with x' = x d^-1/4 (see the module doc): (B, H, n, m)."""
    x = x * x.shape[-1] ** -0.25
    return x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)


def favor_query_features(q, w):
    """Each query row is stabilised by its own maximum (a per-row constant that cancels)."""
    a = favor_logits(q, w)  # (B, H, n, m)
    return torch.exp(a - a.amax(-1, keepdim=True).detach())


def favor_key_features(k, w, causal: bool):
    """Key features and, for causal, each key's log-weight m_j: phi(k_j) = exp(m_j) * fk_j.

    Non-causal: one maximum over all keys of the (batch, head); returns (fk, None)."""
    b = favor_logits(k, w)  # (B, H, n, m)
    if not causal:
        return torch.exp(b - b.amax((-2, -1), keepdim=True).detach()), None
    own_max = b.amax(-1, keepdim=True).detach()  # (B, H, n, 1): this key's maximum only
    return torch.exp(b - own_max), own_max[..., 0]


# --- the two forms ----------------------------------------------------------------------------
def with_ones(v):
    """v with a column of ones: one product then gives numerators and denominators together."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # (B, H, n, dv + 1)


def normalise(acc, eps: float):
    """acc (.., dv + 1) holds numerator and denominator: their ratio (.., dv)."""
    return acc[..., :-1] / (acc[..., -1:] + eps)


def linear_attention(fq, fk, v, eps: float):
    """Non-causal: fq (fk^T v) with the (m x dv) summary, O(n m dv)."""
    state = fk.transpose(-1, -2) @ with_ones(v)  # (B, H, m, dv + 1)
    return normalise(fq @ state, eps)  # (B, H, n, dv)


def causal_linear_attention(fq, fk, v, eps: float, chunk: int, k_logw=None):
    """Causal, chunked: out_i from keys j <= i only. ``k_logw`` (B, H, n): optional per-key
    log-weights (FAVOR's key stabilisers), so that phi(k_j) = exp(k_logw_j) * fk_j."""
    n = fq.shape[-2]
    c = min(chunk, n)
    fq, fk, v1 = (pad_to_multiple(t, c)[0] for t in (fq, fk, with_ones(v)))  # zero keys add 0
    B, H, N, m = fq.shape
    C = N // c
    # One batch dim of chunks, G = B*H*C: every product is a plain bmm on contiguous data.
    fq, fk, v1 = (t.reshape(B * H * C, c, t.shape[-1]) for t in (fq, fk, v1))  # (G, c, .)
    scores = fq @ fk.transpose(-1, -2)  # (G, c, c): the quadratic form inside chunks
    if k_logw is not None:
        acc = _rescaled_chunks(fq, fk, v1, scores, k_logw.reshape(B * H, n), c)
    else:
        acc = scores.tril_() @ v1  # (G, c, dv + 1): keys j <= i of the own chunk
        summaries = (fk.transpose(-1, -2) @ v1).view(B * H, C, m, -1)  # (B*H, C, m, dv + 1)
        states = exclusive_cumsum(summaries).view(B * H * C, m, -1)  # chunks before each
        acc = torch.baddbmm(acc, fq, states)  # + what the earlier chunks hold
    return normalise(acc.view(B, H, N, -1)[:, :, :n], eps)


def exclusive_cumsum(x):
    """Along dim 1, the sum of the entries before each: computed from earlier chunks only (no
    subtraction of the chunk itself, so a state cannot depend, even by rounding, on its own
    chunk's keys)."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1).cumsum(1)


def _rescaled_chunks(fq, fk, v1, scores, k_logw, c):
    """The causal chunked form with per-key log-weights, normalised by prefix maxima.
    fq, fk, v1, scores: (G, c, .) chunks; k_logw (B*H, n)."""
    lowest = torch.finfo(fq.dtype).min  # a finite "minus infinity": no inf - inf
    BH = k_logw.shape[0]
    logw = pad_to_multiple(k_logw, c, dim=-1)[0].view(BH, -1, c)  # (BH, C, c); padding: 0
    chunk_max = logw.amax(-1)  # (BH, C): G_c
    before = torch.cat([logw.new_full((BH, 1), lowest), chunk_max[:, :-1]], 1).cummax(1)[0]
    # M_i: maximum log-weight over keys j <= i, (BH, C, c).
    row_max = torch.maximum(before[..., None], logw.cummax(-1)[0])
    # Inside the chunk: weights exp(m_j - M_i) <= 1 for j <= i (later keys: clamped, then 0).
    w = (logw[..., None, :] - row_max[..., :, None]).clamp_max_(0.0).exp_().tril_()
    acc = (scores * w.view_as(scores)) @ v1  # (G, c, dv + 1)
    # Earlier chunks: their summaries, chunk c' weighted exp(m_j - G_c'), carried forward.
    v1w = torch.exp(logw - chunk_max[..., None]).view(-1, c, 1) * v1
    local = (fk.transpose(-1, -2) @ v1w).view(BH, chunk_max.shape[1], fk.shape[-1], -1)
    states = _carry_states(local, chunk_max, before).view(-1, *local.shape[2:])  # (G, m, .)
    rescale = torch.exp(before[..., None] - row_max).view(-1, c, 1)  # exp(P_c - M_i) <= 1
    return acc + (fq @ states) * rescale


def _carry_states(local, chunk_max, before):
    """S_c = sum_{c' < c} exp(G_c' - P_c) L_c' with P_c = max_{c' < c} G_c' (``before``):
    (BH, C, m, dv + 1), S_0 = 0. Carried chunk by chunk: rescaling the running state as the
    maximum grows keeps every factor <= 1 without a global maximum (which would read the
    future). Tiny (m x dv) work per chunk."""
    states = [torch.zeros_like(local[:, 0])]
    for c in range(1, local.shape[1]):
        decay = torch.exp(before[:, c - 1] - before[:, c])[:, None, None]
        gain = torch.exp(chunk_max[:, c - 1] - before[:, c])[:, None, None]
        states.append(states[-1] * decay + local[:, c - 1] * gain)
    return torch.stack(states, dim=1)


# --- the module -------------------------------------------------------------------------------
@register("linear", config=LinearConfig)
class Linear(Attention):
    def __init__(self, cfg: LinearConfig):
        super().__init__(cfg)
        if cfg.feature_map == "favor":
            gen = torch.Generator().manual_seed(cfg.seed)
            features = orthogonal_features(cfg.num_features, cfg.head_dim, gen)  # (m, d)
            self.register_buffer("features", features)

    def num_features(self, head_dim: int) -> int:
        return self.cfg.num_features if self.cfg.feature_map == "favor" else head_dim

    def attend(self, q, k, v, causal):
        cfg = self.cfg
        k_logw = None
        if cfg.feature_map == "favor":
            if q.shape[-1] != cfg.head_dim:
                raise Unsupported(
                    f"linear: favor features were drawn for head_dim {cfg.head_dim}, called "
                    f"with {q.shape[-1]}; rebuild with head_dim={q.shape[-1]}"
                )
            w = self.features.to(device=q.device, dtype=q.dtype)  # (m, d)
            fq = favor_query_features(q, w)
            fk, k_logw = favor_key_features(k, w, causal)
        else:
            phi = elu_features if cfg.feature_map == "elu" else F.relu
            fq, fk = phi(q), phi(k)  # (B, H, n, d)
        if not causal:
            return linear_attention(fq, fk, v, cfg.eps)
        return causal_linear_attention(fq, fk, v, cfg.eps, cfg.chunk_size, k_logw)

    def flops(
        self, *, batch, heads, seq_len, head_dim, causal=False, backward=False, kv_heads=None
    ):
        """The matmuls as computed: 2 per multiply-add, padding included; backward computes the
        gradients of both operands of each product (2x), of the favor projection only x's."""
        m, dv1, bh = self.num_features(head_dim), head_dim + 1, batch * heads
        proj = 2 * 2 * bh * seq_len * head_dim * m if self.cfg.feature_map == "favor" else 0
        if not causal:
            core = 2 * 2 * bh * seq_len * m * dv1  # fk^T v and fq (that summary)
        else:
            c = min(self.cfg.chunk_size, seq_len)
            padded = -(-seq_len // c) * c
            core = 2 * bh * padded * c * (m + dv1)  # in-chunk scores and scores @ v
            core += 2 * 2 * bh * padded * m * dv1  # chunk summaries and fq @ states
        fwd = proj + core
        return fwd + 2 * core + proj if backward else fwd

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
        m, bh = self.num_features(head_dim), batch * heads
        c = min(self.cfg.chunk_size, seq_len)
        n = -(-seq_len // c) * c if causal else seq_len
        feats = 2 * bh * n * m * (2 if self.cfg.feature_map == "favor" else 1)  # + logits
        vals = 3 * bh * n * (head_dim + 1)  # v with ones, the accumulator, the output
        extra = 0
        if causal:  # in-chunk scores (and favor's weights), chunk summaries and their sums
            extra = 2 * bh * n * c + 2 * bh * (n // c) * m * (head_dim + 1)
        return (feats + vals + extra) * itemsize(dtype)
