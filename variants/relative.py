"""``relative``: softmax(q k^T / sqrt(d) + b(i, j)) v with a relative-position bias.

``kind="t5"``: a learned scalar per (bucket of j - i, head), T5's bucketing (Raffel et al. 2020):
exact buckets for small distances, logarithmic ones up to ``max_distance``; the bidirectional
form gives past and future their own half of the buckets, the causal form buckets only the past.
``kind="alibi"``: the fixed linear penalty -slope_h * |i - j| of ALiBi (Press et al. 2022).

How it runs (no n x n tensor, and each chunk's scores stay in cache):

- The bias depends on j - i only, so it is one row per head, ``ext`` (heads, n_q + n_k - 1),
  made once per call. With the keys stored in reverse order (j' = n_k - 1 - j) the bias of
  (query i, key j') is ``ext[h, i + j']``: every chunk's (rows x keys) bias is a slice of the
  overlapping view ``ext.unfold(-1, n_k, 1)``, copied straight into the chunk's score buffer
  (no index tensor, no gather), and one baddbmm adds q k^T on top of it.
- Query rows are cut into chunks whose scores fit a cache-sized budget (all heads at once
  while they fit, else a few heads or one), so the copy, the product, the causal mask, the
  in-place softmax and the product with v all run on data that is still in cache.
- Grouped heads: the G query heads of a key/value head are laid row by row, (i, g), so one
  product per key/value head serves them and the bias is still taken per query head.
- Backward is a custom autograd Function in the manner of FlashAttention: the forward keeps
  only q, k, v and the output, the backward recomputes each chunk's probabilities and forms
  the gradients from them (the bias gradient by summing the chunk's score gradients along
  i + j'), so fwd_bwd memory is O(n d) plus one chunk.
- Decoding keeps a KV cache (registry.KVCacheDecoding); each step adds the bias of its distance
  to every cached key (T5's causal buckets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .common import add_bmm, itemsize, softmax_, softmax_scale
from .registry import Common, DenseAttention, KVCacheDecoding, Unsupported, register

KINDS = ("t5", "alibi")
T5_INIT_STD = 0.1  # small: the bias starts as a gentle preference, as a freshly trained T5's
# Score elements per chunk (16 MB in float32): the bias copy, product, mask, softmax and
# product with v run on scores still in cache (L3). On one thread 1 MB chunks were 25% faster,
# but with 2 threads on cores shared with other processes every parallel op waits for a
# descheduled thread, and 16 MB chunks (4x fewer ops) were 2x faster than 4 MB ones.
SCORE_BUDGET = 2**22
MIN_ROWS = 32  # fewer query rows per product and the matmuls lose their efficiency


@dataclass
class RelativeConfig(Common):
    kind: str = "t5"  # "t5": learned bucketed bias; "alibi": fixed linear distance penalty
    num_buckets: int = 32  # t5: buckets of j - i (split between past and future if bidirectional)
    max_distance: int = 128  # t5: distances from here on share the last bucket
    chunk_size: int = 256  # most query rows per chunk (fewer where the scores would leave cache)

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


# --- how one call is cut into chunks ----------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """One call: B batches x KV key/value heads, G query heads each, n_q queries, n_k keys."""

    B: int
    KV: int
    G: int
    n_q: int
    n_k: int
    causal: bool
    rows: int  # query rows per chunk
    kv_per_chunk: int  # key/value heads per chunk (a multiple of KV: whole batches)

    @staticmethod
    def of(q, k, causal: bool, max_rows: int) -> Shape:
        B, H, n_q, _ = q.shape
        KV, n_k = k.shape[1], k.shape[2]
        return Shape(
            B, KV, H // KV, n_q, n_k, causal, *chunking(B * KV, H // KV, n_q, n_k, max_rows)
        )

    def keys_seen(self, start: int, stop: int) -> int:
        """Keys a chunk of rows start .. stop - 1 scores: causal drops the ones after it."""
        return min(self.n_k, stop) if self.causal else self.n_k

    def chunks(self):
        """(first flat (batch, kv) head, heads, batches, kv heads, first row, end row) per
        chunk; heads outer, so consecutive chunks reuse the same keys from cache."""
        B, KV, hb = self.B, self.KV, self.kv_per_chunk
        if hb >= KV:  # whole batches at a time
            nbat = hb // KV
            spans = [
                (b * KV, min(nbat, B - b) * KV, min(nbat, B - b), KV) for b in range(0, B, nbat)
            ]
        else:  # part of one batch's heads
            spans = [
                (b * KV + h, min(hb, KV - h), 1, min(hb, KV - h))
                for b in range(B)
                for h in range(0, KV, hb)
            ]
        for h0, nh, nbat, nkv in spans:
            for s in range(0, self.n_q, self.rows):
                yield h0, nh, nbat, nkv, s, min(s + self.rows, self.n_q)


def chunking(heads: int, G: int, n_q: int, n_k: int, max_rows: int) -> tuple[int, int]:
    """(rows, key/value heads) per chunk: up to ``max_rows`` rows of every head while the
    scores fit SCORE_BUDGET; else fewer heads (whole batches, or part of one), then fewer rows,
    never below MIN_ROWS."""
    rows = min(max_rows, n_q)
    per_head = rows * G * n_k  # score elements of one key/value head's chunk
    if heads * per_head <= SCORE_BUDGET:
        return rows, heads
    fit = max(1, SCORE_BUDGET // per_head)
    if fit == 1:
        rows = min(rows, max(MIN_ROWS, SCORE_BUDGET // (G * n_k)))
    return rows, fit


def grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, n, d) -> (B*kv_heads, n*G, d): row (i, g) is query head kv*G + g at position i, so
    a chunk of positions is a contiguous block of rows for all G heads. A copy when G > 1."""
    B, H, n, d = x.shape
    G = H // kv_heads
    return x.view(B, kv_heads, G, n, d).transpose(2, 3).reshape(B * kv_heads, n * G, d)


def ungrouped(x: torch.Tensor, B: int, H: int) -> torch.Tensor:
    """Inverse of :func:`grouped`: (B*KV, n*G, d) -> (B, H, n, d)."""
    KV = x.shape[0] // B
    G = H // KV
    n, d = x.shape[1] // G, x.shape[2]
    return x.view(B, KV, n, G, d).transpose(2, 3).reshape(B, H, n, d)


def reversed_keys(x: torch.Tensor) -> torch.Tensor:
    """(B, KV, n_k, d) -> (B*KV, n_k, d) with key j at row n_k - 1 - j (see the module doc)."""
    B, KV, n, d = x.shape
    return x.flip(2).reshape(B * KV, n, d)


def chunk_probs(qg, kr, bias, shape: Shape, chunk, buf, scale: float):
    """The chunk's probabilities (heads, rows*G, keys) in ``buf``: its bias copied in, q k^T
    added, future keys hidden (causal), softmax in place. ``bias``: (H, n_q, n_k) view."""
    h0, nh, nbat, nkv, s, e = chunk
    G, c = shape.G, e - s
    n_kc = shape.keys_seen(s, e)
    first = shape.n_k - n_kc  # reversed: the keys a causal chunk sees are the last n_kc rows
    kv0 = h0 % shape.KV
    p = buf[: nh * c * G * n_kc].view(nbat, nkv, c, G, n_kc)
    # bias of query head kv*G + g at row (i, g): (KV, G, c, keys) laid as (KV, c, G, keys)
    heads = bias.view(shape.KV, G, shape.n_q, shape.n_k)[kv0 : kv0 + nkv, :, s:e, first:]
    p.copy_(heads.transpose(1, 2)[None])
    p = p.view(nh, c * G, n_kc)
    add_bmm(
        p, qg[h0 : h0 + nh, s * G : e * G], kr[h0 : h0 + nh, first:].transpose(1, 2), alpha=scale
    )
    if shape.causal:
        hide_future(p.view(nh, c, G, n_kc), s)
    return softmax_(p)


def hide_future(scores, start: int) -> None:
    """Causal, in place on (heads, c, G, keys) scores whose keys are the last ``keys`` in
    reverse order: row a (query start + a) hides column col (key keys - 1 - col) when that key
    is after it. masked_fill, not a -inf bias, so an overflowing q.k gives -inf, never NaN."""
    c, n_kc = scores.shape[1], scores.shape[-1]
    width = min(n_kc, n_kc - 1 - start)  # only the first columns can lie in the future
    if width <= 0:
        return
    rows = torch.arange(c, device=scores.device)[:, None]
    cols = torch.arange(width, device=scores.device)[None, :]
    future = cols < n_kc - 1 - start - rows  # (c, width)
    scores[..., :width].masked_fill_(future[:, None, :], float("-inf"))


def bias_view(ext: torch.Tensor, n_k: int) -> torch.Tensor:
    """(H, n_q + n_k - 1) -> (H, n_q, n_k) overlapping view: [h, i, j'] = ext[h, i + j']."""
    return ext.unfold(-1, n_k, 1)


def forward_chunks(q, k, v, ext, shape: Shape, scale: float):
    """The grouped output (B*KV, n_q*G, dv), chunk by chunk."""
    qg, kr, vr = grouped(q, shape.KV), reversed_keys(k), reversed_keys(v)
    out = qg.new_empty(qg.shape[0], qg.shape[1], vr.shape[-1])
    buf = qg.new_empty(shape.kv_per_chunk * shape.rows * shape.G * shape.n_k)
    bias = bias_view(ext, shape.n_k)
    for chunk in shape.chunks():
        h0, nh, _, _, s, e = chunk
        p = chunk_probs(qg, kr, bias, shape, chunk, buf, scale)
        first = shape.n_k - p.shape[-1]
        torch.bmm(p, vr[h0 : h0 + nh, first:], out=out[h0 : h0 + nh, s * shape.G : e * shape.G])
    return out


def backward_chunks(q, k, v, ext, out, grad_out, shape: Shape, scale: float, bias_grad: bool):
    """Gradients of the grouped q, the reversed k and v and (when asked) ext, recomputing
    each chunk's probabilities: with dS = P * (dO V^T - rowsum(dO * O)), dQ = scale dS K,
    dK = scale dS^T Q, dV = P^T dO and d ext[h, m] = sum of dS over i + j' = m. The grouped
    and reversed copies made here are freed on return, before the caller's layout is made."""
    G = shape.G
    qg, kr, vr = grouped(q, shape.KV), reversed_keys(k), reversed_keys(v)
    og, dog = grouped(out, shape.KV), grouped(grad_out, shape.KV)
    dq, dk, dv = torch.empty_like(qg), torch.zeros_like(kr), torch.zeros_like(vr)
    wide = torch.promote_types(qg.dtype, torch.float32)  # sums of a half type kept in float32
    dext = torch.zeros(ext.shape, dtype=wide, device=ext.device) if bias_grad else None
    buf = qg.new_empty(shape.kv_per_chunk * shape.rows * G * shape.n_k)
    grad_buf = torch.empty_like(buf)
    bias = bias_view(ext, shape.n_k)
    for chunk in shape.chunks():
        h0, nh, nbat, nkv, s, e = chunk
        heads, rows = slice(h0, h0 + nh), slice(s * G, e * G)
        p = chunk_probs(qg, kr, bias, shape, chunk, buf, scale)  # (nh, c*G, n_kc)
        first = shape.n_k - p.shape[-1]
        do = dog[heads, rows]
        add_bmm(dv[heads, first:], p.transpose(1, 2), do)
        ds = grad_buf[: p.numel()].view(p.shape)
        torch.bmm(do, vr[heads, first:].transpose(1, 2), out=ds)
        ds.sub_((do * og[heads, rows]).sum(-1, keepdim=True, dtype=wide)).mul_(p)
        add_bmm(dq[heads, rows], ds, kr[heads, first:], beta=0, alpha=scale)
        add_bmm(dk[heads, first:], ds.transpose(1, 2), qg[heads, rows], alpha=scale)
        if dext is not None:
            add_bias_grad(dext, ds.view(nbat, nkv, e - s, G, -1), h0 % shape.KV, s + first)
    return dq, dk, dv, dext


def add_bias_grad(dext, ds, kv0: int, offset: int) -> None:
    """dext[h, offset + a + col] += sum over batches of ds[.., a, g, col] (h = kv*G + g).

    The sum along a + col is a shear: row a of ds written at column shift a in a zeroed buffer
    (one strided copy), whose rows are then summed."""
    nbat, nkv, c, G, n_kc = ds.shape
    per_head = (ds.sum(0) if nbat > 1 else ds[0]).transpose(1, 2)  # (nkv, G, c, n_kc)
    width = c + n_kc - 1
    sheared = dext.new_zeros(nkv, G, c, width)
    strides = (G * c * width, c * width, width + 1, 1)  # [kv, g, a, col] -> [.., a, a + col]
    sheared.as_strided(per_head.shape, strides).copy_(per_head)
    heads = slice(kv0 * G, (kv0 + nkv) * G)
    dext[heads, offset : offset + width] += sheared.sum(2).view(nkv * G, width)


class RelativeFunction(torch.autograd.Function):
    """Relative-bias attention of (B, H, n_q, d) q and (B, KV, n_k, d) k, v with the bias row
    ``ext`` (H, n_q + n_k - 1) (``ext[h, m]``: bias of j - i = n_k - 1 - m); see the module doc."""

    @staticmethod
    def forward(ctx, q, k, v, ext, causal: bool, max_rows: int):
        shape = Shape.of(q, k, causal, max_rows)
        scale = softmax_scale(q.shape[-1])
        out = ungrouped(forward_chunks(q, k, v, ext, shape, scale), shape.B, q.shape[1])
        ctx.save_for_backward(q, k, v, ext, out)
        ctx.shape, ctx.scale = shape, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, ext, out = ctx.saved_tensors
        dq, dk, dv, dext = backward_chunks(
            q, k, v, ext, out, grad_out, ctx.shape, ctx.scale, ctx.needs_input_grad[3]
        )
        dk, dv = (x.view(k.shape).flip(2) for x in (dk, dv))
        dext = None if dext is None else dext.to(ext.dtype)
        return ungrouped(dq, *q.shape[:2]), dk, dv, dext, None, None


# --- the module -----------------------------------------------------------------------------
@register("relative", config=RelativeConfig)
class Relative(KVCacheDecoding, DenseAttention):
    # FlopCounterMode sees the backward recompute each chunk's q k^T (the price of O(n d)
    # memory): it counts more than the useful work flops() reports.
    counted_equals_analytic = False

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
            # -slope * |i - j|; causal: slope * (j - i), the same on every visible pair. In
            # float32 at least: slope x distance is exact there, not in a half type.
            dist = rel if causal else -rel.abs()
            slopes = self.slopes.float() if self.slopes.itemsize < 4 else self.slopes
            bias = slopes.view(-1, *([1] * rel.dim())) * dist
        return bias if dtype is None else bias.to(dtype)

    def _device(self):
        return self.t5_bias.device if self.cfg.kind == "t5" else self.slopes.device

    def position_bias(self, n_q: int, n_k: int, causal: bool = False) -> torch.Tensor:
        """The full (heads, n_q, n_k) bias the variant adds to the scaled scores (for tests)."""
        return self.bias_of(relative_positions(0, n_q, n_k, self._device()), causal)

    def bias_row(self, n_q: int, n_k: int, causal: bool, dtype) -> torch.Tensor:
        """(heads, n_q + n_k - 1) in ``dtype``: entry m is the bias of j - i = n_k - 1 - m,
        the order in which the reversed keys read it (see the module doc)."""
        rel = torch.arange(n_k - 1, -n_q, -1, device=self._device())
        return self.bias_of(rel, causal, dtype).contiguous()

    # --- the call ---------------------------------------------------------------------------
    def check_heads(self, q):
        if q.shape[1] != self.cfg.num_heads:
            raise Unsupported(
                f"{self.name}: built for num_heads={self.cfg.num_heads} (its bias has one entry "
                f"per head) but called with {q.shape[1]} heads; build it with "
                f"num_heads={q.shape[1]}"
            )

    def attend(self, q, k, v, causal):
        self.check_heads(q)
        ext = self.bias_row(q.shape[-2], k.shape[-2], causal, q.dtype)
        return RelativeFunction.apply(q, k, v, ext, causal, self.cfg.chunk_size)

    # --- decoding: a KV cache, the bias by distance ------------------------------------------
    def step(self, q_t, keys, values):
        """The new token, the last of the keys' sequence, against every key it holds: the bias
        of its distance to each (T5's causal buckets)."""
        self.check_heads(q_t)
        t = keys.shape[-2] - 1  # the new token's position
        B, H, _, d = q_t.shape
        KV = keys.shape[1]
        rel = torch.arange(-t, 1, device=q_t.device)  # j - t for keys j = 0 .. t
        bias = self.bias_of(rel, causal=True, dtype=q_t.dtype).view(KV, H // KV, t + 1)
        scores = torch.matmul(q_t.reshape(B, KV, H // KV, d), keys.transpose(-1, -2))
        scores = scores.mul_(softmax_scale(d)).add_(bias)  # (B, KV, G, t + 1)
        return (softmax_(scores) @ values).view(B, H, 1, -1)

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
        """Forward: the reversed k and v, the grouped q and output (copies only when grouped),
        one chunk's score buffer and the bias row. Backward, above the output: the reversed k
        and v, grouped q, output and output gradient, the gradients (grouped dq, reversed dk,
        dv), two chunk buffers and, for t5, the sheared chunk that sums the bias gradient;
        then, at its end, the gradients in the caller's layout."""
        size, kv = itemsize(dtype), kv_heads or heads
        G, n = heads // kv, seq_len
        rows, per_chunk = chunking(batch * kv, G, n, n, self.cfg.chunk_size)
        q_bytes = batch * heads * n * head_dim * size
        kv_bytes = batch * kv * n * head_dim * size
        grouped_q = q_bytes if G > 1 else 0  # a grouped copy of one (B, H, n, d) tensor
        chunk = per_chunk * rows * G * n * size
        ext = heads * (2 * n - 1) * size
        forward = 2 * kv_bytes + grouped_q + q_bytes + ext + max(chunk, grouped_q)
        if not backward:
            return forward
        wide = max(size, 4)
        bias_grad = 0
        if self.cfg.kind == "t5":  # the sheared chunk, the batches' sum, the float32 gradient
            heads_per_batch = min(per_chunk, kv) * G
            sheared = heads_per_batch * rows * (rows + n - 1) * wide
            summed = heads_per_batch * rows * n * size if per_chunk > kv else 0
            bias_grad = sheared + summed + heads * (2 * n - 1) * wide
        loop = 4 * kv_bytes + 3 * grouped_q + q_bytes + 2 * chunk + bias_grad
        end = 4 * kv_bytes + q_bytes + grouped_q
        return max(forward, q_bytes + ext + max(loop, end))
