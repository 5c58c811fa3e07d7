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

Grouped heads (kv_heads < num_heads): the key features and the summaries are built once per
key/value head and read by the G query heads of its group (never copied per query head).

Decoding: the running sums are the whole state, per key/value head the (m x dv + 1) sum of
phi(k_j) [v_j, 1]^T (favor: weighted exp(m_j - top) by the running maximum ``top`` of the key
log-weights, rescaled as it grows, exactly as the chunked causal form carries it): constant in n.

Precision: half-precision inputs are computed in float32 (features, states, normaliser) and the
output rounded once. In float16 the normaliser phi(q) . sum phi(k) (about 86 n for elu, d = 64)
passes 65504 from n ~ 760 (the output silently became 0), and its square, which the division's
backward forms, from n ~ 3, so scaling the sums cannot keep the gradients finite; a running sum
kept in half precision would also stop growing once its increments fall below half an ulp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import group_queries, itemsize, pad_to_multiple, ungroup, with_backward
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


def compute_dtype(dtype) -> torch.dtype:
    """The dtype the features, states and normaliser are computed in: float32 at least (see
    the module doc, Precision)."""
    return torch.promote_types(dtype, torch.float32)


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
    """log phi(x) = w_r . x' - |x'|^2 / 2 with x' = x d^-1/4 (see the module doc): (.., n, m).

    d^-1/4 scales w (m x d) and the squared norm (n x 1), not a copy of x (n x d); the norm is
    subtracted in place (a product's output is not kept for its backward)."""
    scale = x.shape[-1] ** -0.25
    logits = x @ (w * scale).T
    return logits.sub_(x.square().sum(-1, keepdim=True) * (0.5 * scale * scale))


def favor_query_features(q, w):
    """Each query row is stabilised by its own maximum (a per-row constant that cancels)."""
    a = favor_logits(q, w)  # (B, H, n, m)
    return a.sub_(a.detach().amax(-1, keepdim=True)).exp_()


def favor_key_features(k, w, causal: bool):
    """Key features and, for causal, each key's log-weight m_j: phi(k_j) = exp(m_j) * fk_j.

    Non-causal: one maximum over all keys of the (batch, head); returns (fk, None)."""
    b = favor_logits(k, w)  # (B, KV, n, m)
    if not causal:
        return b.sub_(b.detach().amax((-2, -1), keepdim=True)).exp_(), None
    own_max = b.detach().amax(-1, keepdim=True)  # (B, KV, n, 1): this key's maximum only
    return b.sub_(own_max).exp_(), own_max[..., 0]


# --- the two forms ----------------------------------------------------------------------------
def with_ones(v):
    """v with a column of ones: one product then gives numerators and denominators together."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # (B, KV, n, dv + 1)


def normalise(acc, eps: float):
    """acc (.., dv + 1) holds numerator and denominator: their ratio (.., dv)."""
    return acc[..., :-1] / (acc[..., -1:] + eps)


def key_summary(fk, v):
    """Non-causal: the (m x dv + 1) summary fk^T [v, 1] of each key/value head, from fk (B, KV,
    n_k, m) and v (B, KV, n_k, dv), built once and read by the G query heads of its group."""
    return fk.transpose(-1, -2) @ with_ones(v)  # (B, KV, m, dv + 1)


def read_out(fq, state, eps: float):
    """fq (B, H, n, m) against its key/value head's summary (B, KV, m, dv + 1): (B, H, n, dv)."""
    heads = fq.shape[1]
    acc = group_queries(fq, state.shape[1]) @ state  # (B, KV, G n, dv + 1)
    del fq  # without autograd the features are dead: free them before the division's output
    return normalise(ungroup(acc, heads), eps)


def causal_linear_attention(fq, fk, v, eps: float, chunk: int, k_logw=None):
    """Causal, chunked: out_i from keys j <= i only. fq (B, H, n, m), fk (B, KV, n, m),
    v (B, KV, n, dv); ``k_logw`` (B, KV, n): optional per-key log-weights (FAVOR's key
    stabilisers), so that phi(k_j) = exp(k_logw_j) * fk_j."""
    B, H, n, _ = fq.shape
    c = min(chunk, n)
    keys, v1 = (key_chunks(t, c) for t in (fk, with_ones(v)))  # (B*KV*C, c, .)
    queries = query_chunks(fq, fk.shape[1], c)  # (B*KV*C, G*c, m)
    if k_logw is None:
        acc = _plain_chunks(queries, keys, v1, fk.shape[0] * fk.shape[1])
    else:
        acc = _rescaled_chunks(queries, keys, v1, k_logw.flatten(0, 1), c)
    return normalise(unchunk(acc, B, H, c, n), eps)


def key_chunks(x, c: int):
    """(B, KV, n, .) zero-padded (zero keys add 0) -> (B*KV*C, c, .): one batch dim of chunks,
    so every product is a plain bmm on contiguous data."""
    x = pad_to_multiple(x, c)[0]
    return x.reshape(-1, c, x.shape[-1])


def query_chunks(fq, kv_heads: int, c: int):
    """(B, H, n, m) -> (B*KV*C, G*c, m): a chunk of the G query heads of one key/value head laid
    end to end, so that they share the chunk's keys and state (a copy only when G > 1)."""
    fq = pad_to_multiple(fq, c)[0]
    B, H, N, m = fq.shape
    groups = H // kv_heads
    return fq.view(B, kv_heads, groups, N // c, c, m).transpose(2, 3).reshape(-1, groups * c, m)


def unchunk(acc, B: int, H: int, c: int, n: int):
    """Inverse of :func:`query_chunks` on the accumulator: (B*KV*C, G*c, e) -> (B, H, n, e), a
    view when G = 1."""
    groups = acc.shape[1] // c
    kv_heads = H // groups
    chunks = acc.shape[0] // (B * kv_heads)
    acc = acc.view(B, kv_heads, chunks, groups, c, -1).transpose(2, 3)
    return acc.reshape(B, H, chunks * c, -1)[:, :, :n]


def lower_triangle(groups: int, c: int, like):
    """(G*c, c) of ones on and below each (c x c) block's diagonal: keys j <= i of the own chunk."""
    return like.new_ones(c, c).tril_().repeat(groups, 1)


def _plain_chunks(queries, keys, v1, bkv: int):
    """The unweighted causal form: queries (B*KV*C, G*c, m), keys (B*KV*C, c, m), v1 (B*KV*C,
    c, dv + 1) -> the accumulator (B*KV*C, G*c, dv + 1). Temporaries are not named, so that
    without autograd each is freed as soon as it is used."""
    (c, m), e = keys.shape[1:], v1.shape[-1]
    # Each chunk's summary (m x dv + 1), then the sums of the chunks before each.
    states = exclusive_cumsum((keys.transpose(-1, -2) @ v1).view(bkv, -1, m, e)).view(-1, m, e)
    mask = lower_triangle(queries.shape[1] // c, c, queries)
    acc = (queries @ keys.transpose(-1, -2)).mul_(mask) @ v1  # keys j <= i of the own chunk
    # + what the earlier chunks hold (out of place: FlopCounterMode does not see baddbmm_)
    return torch.baddbmm(acc, queries, states)


def exclusive_cumsum(x):
    """Along dim 1, the sum of the entries before each: computed from earlier chunks only (no
    subtraction of the chunk itself, so a state cannot depend, even by rounding, on its own
    chunk's keys)."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1).cumsum_(1)


def _rescaled_chunks(queries, keys, v1, k_logw, c):
    """The causal chunked form with per-key log-weights, normalised by prefix maxima.
    queries (B*KV*C, G*c, m), keys and v1 (B*KV*C, c, .); k_logw (B*KV, n). The weights depend
    on keys and positions only: computed once per key/value head, shared by its G queries."""
    BKV, G, (m, e) = k_logw.shape[0], queries.shape[1] // c, (keys.shape[-1], v1.shape[-1])
    logw = pad_to_multiple(k_logw, c, dim=-1)[0].view(BKV, -1, c)  # (BKV, C, c); padding: 0
    chunk_max = logw.amax(-1)  # (BKV, C): G_c
    lowest = torch.finfo(logw.dtype).min  # a finite "minus infinity": no inf - inf
    before = torch.cat([logw.new_full((BKV, 1), lowest), chunk_max[:, :-1]], 1).cummax(1)[0]
    row_max = torch.maximum(before[..., None], logw.cummax(-1)[0])  # M_i over j <= i: (BKV,C,c)
    acc = _weighted_in_chunk(queries, keys, v1, logw, row_max)
    # Earlier chunks: their summaries, chunk c' weighted exp(m_j - G_c'), carried forward.
    key_weight = torch.exp(logw - chunk_max[..., None]).view(-1, c, 1)
    local = keys.transpose(-1, -2) @ (v1 * key_weight)  # (B*KV*C, m, e): unnamed below
    states = _carry_states(local.view(BKV, -1, m, e), chunk_max, before).view(-1, m, e)
    rescale = torch.exp(before[..., None] - row_max).view(-1, 1, c, 1)  # exp(P_c - M_i) <= 1
    rescale = rescale.expand(-1, G, c, 1).reshape(-1, G * c, 1)  # per row of each query head
    return acc.add_((queries @ states).mul_(rescale))


def _weighted_in_chunk(queries, keys, v1, logw, row_max):
    """Inside each chunk: query i sums keys j <= i weighted exp(m_j - M_i) <= 1 (later keys:
    clamped, then 0). The (c x c) weights are per key/value head, broadcast over its G query
    heads. -> (B*KV*C, G*c, dv + 1)"""
    c = keys.shape[1]
    w = (logw[..., None, :] - row_max[..., :, None]).clamp_max_(0.0).exp_().tril_()
    scores = (queries @ keys.transpose(-1, -2)).view(-1, queries.shape[1] // c, c, c)
    return (scores * w.view(-1, 1, c, c)).view(-1, queries.shape[1], c) @ v1


def _carry_states(local, chunk_max, before):
    """S_c = sum_{c' < c} exp(G_c' - P_c) L_c' with P_c = max_{c' < c} G_c' (``before``):
    (BKV, C, m, dv + 1), S_0 = 0. Carried chunk by chunk: rescaling the running state as the
    maximum grows keeps every factor <= 1 without a global maximum (which would read the
    future). Tiny (m x dv) work per chunk; ``local`` is unbound once, so that its gradient is
    one stack (a select per chunk would allocate a zero gradient of all of it, per chunk)."""
    decay = torch.exp(before[:, :-1] - before[:, 1:])[..., None, None]  # (BKV, C - 1, 1, 1)
    gain = torch.exp(chunk_max[:, :-1] - before[:, 1:])[..., None, None]
    states = [torch.zeros_like(local[:, 0])]
    for chunk, dc, gc in zip(local.unbind(1)[:-1], decay.unbind(1), gain.unbind(1), strict=True):
        states.append(states[-1] * dc + chunk * gc)
    return torch.stack(states, dim=1)


# --- decoding ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunningSums:
    """The decoding state after a prefix: per key/value head sum_j a_j phi(k_j) [v_j, 1]^T,
    (B, KV, m, dv + 1), with a_j = 1, or for favor a_j = exp(m_j - top) and ``top`` (B, KV, 1, 1)
    the largest key log-weight so far. :meth:`add` returns new sums and leaves these as they
    are, so one step can be repeated from them."""

    state: torch.Tensor
    top: torch.Tensor | None = None

    def add(self, fk, v, k_logw) -> RunningSums:
        """One more key: fk (B, KV, 1, m), v (B, KV, 1, dv), k_logw (B, KV, 1) or None."""
        v1 = with_ones(v)
        if self.top is None:
            return RunningSums(self.state + fk.transpose(-1, -2) @ v1)
        top = torch.maximum(self.top, k_logw[..., None])  # the maximum over keys j <= t
        fk = fk * torch.exp(k_logw[..., None] - top)
        return RunningSums(self.state * torch.exp(self.top - top) + fk.transpose(-1, -2) @ v1, top)

    def nbytes(self) -> int:
        held = [self.state] + ([] if self.top is None else [self.top])
        return sum(t.numel() * t.element_size() for t in held)


def running_sums(fk, v, k_logw) -> RunningSums:
    """The state of a whole prompt: fk (B, KV, n, m), v (B, KV, n, dv), k_logw (B, KV, n)."""
    if k_logw is None:
        return RunningSums(key_summary(fk, v))
    top = k_logw.amax(-1, keepdim=True)  # (B, KV, 1)
    return RunningSums(key_summary(fk * torch.exp(k_logw - top)[..., None], v), top[..., None])


# --- the module -------------------------------------------------------------------------------
@register("linear", config=LinearConfig)
class Linear(Attention):
    # counted_equals_analytic stays True: non-causal computes exactly its useful work. Causal
    # also computes each chunk's hidden half, the padding and two unread products (flops()).

    def __init__(self, cfg: LinearConfig):
        super().__init__(cfg)
        if cfg.feature_map == "favor":
            gen = torch.Generator().manual_seed(cfg.seed)
            features = orthogonal_features(cfg.num_features, cfg.head_dim, gen)  # (m, d)
            self.register_buffer("features", features)

    def num_features(self, head_dim: int) -> int:
        return self.cfg.num_features if self.cfg.feature_map == "favor" else head_dim

    # --- features, in the compute dtype (float32 at least) -------------------------------------
    def _favor_w(self, x):
        if x.shape[-1] != self.cfg.head_dim:
            raise Unsupported(
                f"linear: favor features were drawn for head_dim {self.cfg.head_dim}, called "
                f"with {x.shape[-1]}; rebuild with head_dim={x.shape[-1]}"
            )
        return self.features.to(device=x.device, dtype=x.dtype)  # (m, d)

    def query_features(self, q):
        """phi(q): (B, H, n, m)."""
        if self.cfg.feature_map == "favor":
            return favor_query_features(q, self._favor_w(q))
        return elu_features(q) if self.cfg.feature_map == "elu" else F.relu(q)

    def key_features(self, k, causal: bool):
        """phi(k) (B, KV, n, m), and for causal favor the keys' log-weights (B, KV, n)."""
        if self.cfg.feature_map == "favor":
            return favor_key_features(k, self._favor_w(k), causal)
        return self.query_features(k), None

    # --- the call -----------------------------------------------------------------------------
    def attend(self, q, k, v, causal):
        if causal and k.shape[-2] != q.shape[-2]:
            raise Unsupported(
                f"linear: causal needs keys aligned with queries; q has {q.shape[-2]} positions "
                f"and k {k.shape[-2]}"
            )
        wide = compute_dtype(q.dtype)
        fk, k_logw = self.key_features(k.to(wide), causal)
        if not causal:  # the key features are dead once summarised
            state = key_summary(fk, v.to(wide))
            del fk
            return read_out(self.query_features(q.to(wide)), state, self.cfg.eps).to(q.dtype)
        return self._causal(q, fk, v.to(wide), k_logw)

    def _causal(self, q, fk, v, k_logw):
        """The chunked causal form from the key side (fk, v, k_logw in the compute dtype)."""
        fq = self.query_features(q.to(fk.dtype))
        out = causal_linear_attention(fq, fk, v, self.cfg.eps, self.cfg.chunk_size, k_logw)
        return out.to(q.dtype)

    # --- decoding -----------------------------------------------------------------------------
    def prefill(self, q, k, v, *, output: bool = True):
        reasons = self.decode_unsupported(device=q.device, dtype=q.dtype)
        if reasons:
            raise Unsupported(f"{self.name}: " + "; ".join(reasons))
        wide = compute_dtype(q.dtype)
        fk, k_logw = self.key_features(k.to(wide), causal=True)
        v = v.to(wide)
        out = self._causal(q, fk, v, k_logw) if output else None
        return out, running_sums(fk, v, k_logw)

    def decode(self, q_t, k_t, v_t, cache: RunningSums):
        wide = cache.state.dtype
        fk, k_logw = self.key_features(k_t.to(wide), causal=True)  # (B, KV, 1, m)
        cache = cache.add(fk, v_t.to(wide), k_logw)
        fq = group_queries(self.query_features(q_t.to(wide)), k_t.shape[1])  # (B, KV, G, m)
        acc = ungroup(fq @ cache.state, q_t.shape[1])  # (B, H, 1, dv + 1)
        return normalise(acc, self.cfg.eps).to(q_t.dtype), cache

    def cache_bytes(self, cache: RunningSums) -> int:
        return cache.nbytes()

    def cache_model(self, *, batch, seq_len, head_dim, kv_heads, dtype=torch.float32):
        """The running sums (m x dv + 1 per key/value head; favor: and the running maximum), in
        the compute dtype, whatever seq_len."""
        per_head = self.num_features(head_dim) * (head_dim + 1)
        per_head += 1 if self.cfg.feature_map == "favor" else 0
        return batch * kv_heads * per_head * itemsize(compute_dtype(dtype))

    def decode_flops(self, *, batch, heads, seq_len, head_dim, kv_heads=None):
        """The new key added to its head's sums, the new query read out of them, and for favor
        the features of both: constant in seq_len."""
        kv, m, e = kv_heads or heads, self.num_features(head_dim), head_dim + 1
        proj = 2 * batch * (heads + kv) * head_dim * m if self.cfg.feature_map == "favor" else 0
        return proj + 2 * batch * (kv + heads) * m * e

    # --- cost models --------------------------------------------------------------------------
    def flops(
        self, *, batch, heads, seq_len, head_dim, causal=False, backward=False, kv_heads=None
    ):
        """Useful products, 2 per multiply-add. What is built from keys alone (the key features,
        the summaries) is counted once per key/value head (kv_heads), since one summary serves
        its group; what queries read, per query head.

        Non-causal: fk^T [v, 1] per key/value head and fq @ that summary per query head (and
        favor's feature projections): exactly what runs. Causal, the chunked form restricted to
        real positions: the (query, key) pairs j <= i inside each chunk (scores and their
        product with [v, 1]), the summaries of the chunks some later chunk reads (all but the
        last) and the read-outs of the queries that have earlier chunks (all but the first). The
        call also computes the hidden half of each chunk's scores, the padding, the last chunk's
        summary and the first chunk's read-out of a zero state: computed, not useful.
        Backward: BACKWARD_FACTOR x every product, but favor's projections only 1x (their
        random features are constants: only x's gradient)."""
        kv, m, e = kv_heads or heads, self.num_features(head_dim), head_dim + 1
        n, fm = seq_len, self.cfg.feature_map
        proj = 2 * batch * (heads + kv) * n * head_dim * m if fm == "favor" else 0
        if not causal:
            core = 2 * batch * (kv + heads) * n * m * e
        else:
            c = min(self.cfg.chunk_size, n)
            last = n - (math.ceil(n / c) - 1) * c  # rows of the last chunk
            pairs = (n - last) * (c + 1) // 2 + last * (last + 1) // 2
            core = 2 * batch * heads * pairs * (m + e)
            core += 2 * batch * m * e * (kv * (n - last) + heads * (n - c))
        return with_backward(core, backward) + proj * (2 if backward else 1)

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
        """The largest of a few moments of the call, each the sum of the tensors live then (in
        elements of the compute dtype: see the *_moments functions below), as measured in live
        tensor bytes (tests/test_contract.py; n = 1024 .. 8192 by hand, within 1%)."""
        wide = compute_dtype(dtype)
        chunk = min(self.cfg.chunk_size, seq_len) if causal else None
        t = _Sizes(batch, heads, kv_heads or heads, seq_len, head_dim, self.num_features(head_dim))
        t.cast = head_dim if wide != dtype else 0  # half: the float32 copies of the inputs
        favor = self.cfg.feature_map == "favor"
        if chunk is None:
            moments = _plain_moments(t, backward, favor)
        else:
            moments = (_favor_causal_moments if favor else _causal_moments)(t, chunk, backward)
        return max(moments) * itemsize(wide)


class _Sizes:
    """Element counts for the memory model: Q and K rows of the query and key/value heads,
    m features, d channels, e = d + 1 columns of [v, 1]; :meth:`chunks` for the causal form."""

    def __init__(self, batch, heads, kv, n, d, m):
        self.batch, self.heads, self.kv, self.n, self.d, self.m = batch, heads, kv, n, d, m
        self.Q, self.K, self.e = batch * heads * n, batch * kv * n, d + 1
        self.cast = 0

    def chunks(self, c: int):
        """QN, KN: rows padded to whole chunks; the per-chunk states; the copies of the features
        as chunks (padding, or the G query heads laid end to end) and of the accumulator (G > 1)
        as their sum, all in elements."""
        N = math.ceil(self.n / c) * c
        QN, KN = self.batch * self.heads * N, self.batch * self.kv * N
        states = self.batch * self.kv * (N // c) * self.m * self.e  # one (m x e) per chunk
        grouped = self.heads != self.kv
        q_copy = QN * self.m if (N != self.n or grouped) else 0
        k_copy = KN * self.m if N != self.n else 0
        base = self.Q * self.m + q_copy + self.K * self.m + k_copy + KN * self.e
        return QN, KN, states, base + self.K * self.cast, QN * self.e if grouped else 0


def _plain_moments(t: _Sizes, backward: bool, favor: bool):
    """Non-causal. Forward: the key phase (fk, [v, 1]) and the query phase (fq and the
    accumulator, then the accumulator, the output and its denominator). Backward: the saved
    features, [v, 1], accumulator and output, plus the division's gradient temporaries or the
    query features' gradients (favor's exp adds one)."""
    Q, K, m, e, d = t.Q, t.K, t.m, t.e, t.d
    if not backward:
        key = K * (m + e + 1 + t.cast)
        query = Q * (e + max(m, d + 1)) + t.batch * t.kv * m * e  # + the summaries
        return key, query
    saved = Q * (m + e + 1 + d) + K * (m + e) + (Q + K) * t.cast
    return saved + 4 * Q * d, saved - Q * (e + 1) + Q * (2 * m if favor else m + d)


def _causal_moments(t: _Sizes, c: int, backward: bool):
    """Causal elu/relu. Forward: the in-chunk product (features, chunks, states, scores and the
    accumulator), then the division. Backward: what the products save, plus the division's
    gradient temporaries."""
    Q, K, m, e, d = t.Q, t.K, t.m, t.e, t.d
    QN, KN, states, base, acc_copy = t.chunks(c)
    if not backward:
        return base + states + QN * (c + e), base + QN * e + acc_copy + Q * (d + 1)
    saved = QN * (m + c + e) + KN * (m + e) + states + Q * (d + 1) + (Q + K) * t.cast
    return (saved + 4 * Q * d,)


def _favor_causal_moments(t: _Sizes, c: int, backward: bool):
    """Causal favor: as the plain causal form, with the (c x c) weights and the weighted scores
    in the chunks, and the carried states (their list, then the stack) across them."""
    Q, K, m, e, d = t.Q, t.K, t.m, t.e, t.d
    QN, KN, states, base, acc_copy = t.chunks(c)
    if not backward:
        in_chunk = base + KN * c + QN * (2 * c + e)
        return in_chunk, base + QN * e + 3 * states, base + QN * e + acc_copy + Q * (d + 1)
    saved = QN * (m + 2 * c + e + 1) + KN * (m + 2 * e + c) + states + Q * (d + 1)
    saved += (Q + K) * t.cast
    # Later: the features (exp keeps them), the output, the products' gradients (of the query
    # and key chunks twice each, of [v, 1] in the place of [v, 1]) and the carried states'.
    grads = base + Q * d + 2 * (QN + KN) * m + states
    return saved + 4 * Q * d, grads
