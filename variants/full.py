"""``full``: softmax(q k^T / sqrt(d)) v, the reference every other variant is measured against.

``chunk_size=None`` is the textbook computation (the n x n scores are materialised).
``chunk_size=c`` computes the same result at most c query rows at a time, each block of rows
against every key it sees in one batched product (causal: the keys wholly in its future are
skipped), so a row's softmax is whole and needs no running rescale. Blocks are sized so their
tile of scores stays in cache (TILE_BUDGET: several heads per product at short n, fewer rows
than c at long n), so memory is O(n * c) at most. Its backward is FlashAttention's (Dao et al.
2022): a custom autograd function saves only q, k, v, the output and each row's log-sum-exp and
recomputes each block's scores, so forward and backward both take O(n * c), not O(n^2).

Grouped heads (``kv_heads`` < ``num_heads``): the query heads that share a key/value head are
laid end to end (variants.common.group_queries), one product per key/value head serves them
all, and k, v are never copied per query head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import (
    group_queries,
    itemsize,
    softmax_,
    softmax_scale,
    ungroup,
)
from .registry import Common, DenseAttention, KVCacheDecoding, register


@dataclass
class FullConfig(Common):
    chunk_size: int | None = None  # None: materialise n x n scores; int: query rows per chunk

    def __post_init__(self):
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(
                f"full: chunk_size must be a positive int or None, got {self.chunk_size}"
            )


# --- the textbook form ------------------------------------------------------------------------
def future_mask(n_q: int, n_k: int, device) -> torch.Tensor:
    """(n_q, n_k) bool, True where key j is in the future of query i (j > i): top-left causal."""
    return torch.arange(n_k, device=device) > torch.arange(n_q, device=device)[:, None]


def hide_future(scores: torch.Tensor, n_q: int) -> torch.Tensor:
    """-inf on the future keys of ``scores`` (B, KV, G * n_q, n_k), G query heads per key/value
    head; in place unless autograd needs the scores (an in-place write to a view would make
    backward copy the whole n x n gradient twice)."""
    B, kv, rows, n_k = scores.shape
    grouped = scores.view(B, kv, rows // n_q, n_q, n_k)  # (B, KV, G, n_q, n_k)
    future = future_mask(n_q, n_k, scores.device)
    if scores.requires_grad:
        return grouped.masked_fill(future, float("-inf")).view(scores.shape)
    grouped.masked_fill_(future, float("-inf"))
    return scores


def dense_attention(q, k, v, causal: bool):
    """The textbook form; causal is top-left aligned (query i sees keys j <= i). The scale is
    applied to q (n x d), not to the n x n scores."""
    heads, kv_heads, n_q = q.shape[1], k.shape[1], q.shape[-2]
    grouped = group_queries(q * softmax_scale(q.shape[-1]), kv_heads)  # (B, KV, G n_q, d)
    scores = grouped @ k.transpose(-1, -2)  # (B, KV, G n_q, n_k)
    del grouped  # unless autograd keeps it: the output takes its place
    if causal:
        scores = hide_future(scores, n_q)
    return ungroup(softmax_(scores) @ v, heads)


def dense_memory(batch, heads, seq_len, head_dim, causal, dtype, backward, kv_heads) -> int:
    """Peak bytes of :func:`dense_attention` above its inputs, as the profiler counts them.

    Forward without autograd: the n x n scores (the softmax runs in place) beside the larger of
    the scaled q or the output (n x d, one after the other) and the causal mask (n x n bools).
    Forward and backward: the peak is inside the softmax's backward: its saved output, the
    incoming gradient dP and the result dS (three n x n), beside the saved mask, the scaled q,
    the output and dV.
    """
    size = itemsize(dtype)
    nd = batch * heads * seq_len * head_dim * size  # q, the output or dq
    kv_nd = batch * (kv_heads or heads) * seq_len * head_dim * size  # dk or dv
    n2 = batch * heads * seq_len * seq_len * size
    mask = seq_len * seq_len if causal else 0
    if not backward:
        return n2 + max(nd, mask)
    return 2 * nd + kv_nd + 3 * n2 + mask


# --- the chunked form -------------------------------------------------------------------------
# Score elements per product (4 MB in float32). All heads' (rows x n) tiles in one product spill
# the 2 MB-per-core L2 of the CPU this project runs on and ran 1.4-2x slower than sdpa; tiles of
# 2^20 elements (at n = 8192: 128 rows of one head) came within 1.1x of it (B1 H8 d64, float32,
# one thread, CPU time, interleaved): 2^19 and 2^21 were 5-10% slower, 2^22 18%.
TILE_BUDGET = 2**20
MIN_ROWS = 64  # fewer query rows per product and the products lose their efficiency


def tiling(units: int, groups: int, n_q: int, n_k: int, chunk: int) -> tuple[int, int]:
    """(units, rows) per product. A unit is one (batch, key/value head) pair with its
    ``groups`` query heads; as many of them as keep the (rows x n_k) tiles within TILE_BUDGET
    share one product, and where one unit's tile alone is larger it takes fewer rows (not below
    MIN_ROWS, nor above ``chunk``)."""
    rows = min(chunk, n_q)
    per_unit = groups * rows * n_k
    if per_unit > TILE_BUDGET:
        return 1, min(rows, max(MIN_ROWS, TILE_BUDGET // (groups * n_k)))
    return min(units, TILE_BUDGET // per_unit), rows


def chunks(n_q: int, n_k: int, chunk: int, causal: bool):
    """(first row, rows, visible keys) of each query chunk. Causal: a chunk sees the keys up to
    its last row; the key blocks after that are all in its future and are never computed."""
    for first in range(0, n_q, chunk):
        rows = min(chunk, n_q - first)
        yield first, rows, min(n_k, first + rows) if causal else n_k


def blocks(q, k, chunk: int, causal: bool):
    """(units, first row, rows, visible keys) of every product: unit slices outermost, so one
    group's keys and values stay in cache while its query chunks pass."""
    units, groups = q.shape[0] * k.shape[1], q.shape[1] // k.shape[1]
    per, rows = tiling(units, groups, q.shape[-2], k.shape[-2], chunk)
    for u in range(0, units, per):
        for first, r, n_vis in chunks(q.shape[-2], k.shape[-2], rows, causal):
            yield slice(u, min(u + per, units)), first, r, n_vis


def by_unit(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, n, e) -> (B * KV, G, n, e): the query heads of each key/value head together."""
    return x.unflatten(1, (kv_heads, -1)).flatten(0, 1)


def _tile(q_rows, k_t, first, n_vis, causal, shift=None):
    """Scores (u, G rows, n_vis) of the block's scaled query rows (u, G, rows, d) against keys
    0..n_vis of k_t (u, d, n_k), minus ``shift`` (u, G rows, 1) if given; -inf where causal
    hides a key (only the block's diagonal holds such keys)."""
    u, groups, rows, _ = q_rows.shape
    lhs, rhs = q_rows.flatten(1, 2), k_t[:, :, :n_vis]
    s = lhs @ rhs if shift is None else torch.baddbmm(shift.neg(), lhs, rhs)
    if causal and first < n_vis:
        diagonal = s.view(u, groups, rows, n_vis)[..., first:]  # (u, G, rows, n_vis - first)
        diagonal.masked_fill_(future_mask(rows, n_vis - first, s.device), float("-inf"))
    return s


def transposed_keys(k: torch.Tensor, work) -> torch.Tensor:
    """k (B, KV, n, d) as (B KV, d, n), contiguous: the score products read it about 15% faster
    than a transposed view (MKL, fp32, one thread), for one n x d copy per call."""
    return k.flatten(0, 1).transpose(1, 2).to(work).contiguous()


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc[:, :m] += a @ b in place, no (m x e) temporary: acc (u, n, e), a (u, m, r),
    b (u, r, e). Through out= rather than baddbmm_, which FlopCounterMode does not count."""
    rows = acc[:, : a.shape[1]]
    torch.baddbmm(rows, a, b, out=rows)


def _work_dtype(dtype):
    """Half precision is computed in float32 (scores, log-sum-exp, accumulators), as the fused
    kernels do; float32 and float64 in themselves."""
    return torch.promote_types(dtype, torch.float32)


def chunked_forward(q, k, v, causal: bool, chunk: int, with_lse: bool):
    """Exact attention a block of query rows at a time: (out, lse or None). Each block's rows
    of scores are whole, so one in-place softmax serves them (no running rescale); ``lse``
    (B, H, n, 1) is each row's log-sum-exp, all that backward needs to rebuild them."""
    kv, scale, work = k.shape[1], softmax_scale(q.shape[-1]), _work_dtype(q.dtype)
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse = q.new_empty(*q.shape[:-1], 1, dtype=work) if with_lse else None
    qs, outs, lses = (by_unit(t, kv) if t is not None else None for t in (q, out, lse))
    vs = v.flatten(0, 1).to(work)  # (B KV, n_k, e)
    k_t = transposed_keys(k, work)
    for units, first, rows, n_vis in blocks(q, k, chunk, causal):
        q_rows = qs[units, :, first : first + rows].to(work) * scale  # (u, G, rows, d)
        s = _tile(q_rows, k_t[units], first, n_vis, causal)
        top = s.amax(-1, keepdim=True) if with_lse else None  # (u, G rows, 1)
        s = torch.softmax(s, -1, out=s)  # in place: one tile per block
        o_rows = s @ vs[units, :n_vis]  # (u, G rows, e)
        outs[units, :, first : first + rows] = o_rows.view(*q_rows.shape[:-1], -1)
        if with_lse:  # the largest probability is exp(top - lse)
            lse_rows = top.sub_(s.amax(-1, keepdim=True).log_())
            lses[units, :, first : first + rows] = lse_rows.view(*q_rows.shape[:-1], 1)
        del s, o_rows  # freed before the next block's are made, never beside them
    return out, lse


def chunked_backward(q, k, v, out, lse, d_out, causal: bool, chunk: int):
    """FlashAttention's backward a block at a time: each block's probabilities are rebuilt
    from its scores and log-sum-exp, dS = P * (dP - rowsum(dO * O)), and dK, dV are summed over
    the blocks that see each key. Returns (dq, dk, dv)."""
    kv, scale, work = k.shape[1], softmax_scale(q.shape[-1]), _work_dtype(q.dtype)
    delta = (d_out.to(work) * out.to(work)).sum(-1, keepdim=True)  # (B, H, n, 1)
    dq = q.new_empty(q.shape)  # contiguous: by_unit must give a view of it to write through
    qs, dqs, dos, lses, deltas = (by_unit(t, kv) for t in (q, dq, d_out, lse, delta))
    ks, vs = (t.flatten(0, 1).to(work) for t in (k, v))  # (B KV, n_k, e)
    k_t = transposed_keys(k, work)
    dks, dvs = torch.zeros_like(ks), torch.zeros_like(vs)  # accumulated in the working dtype
    for units, first, rows, n_vis in blocks(q, k, chunk, causal):
        span = slice(first, first + rows)
        q_rows = qs[units, :, span].to(work) * scale  # (u, G, rows, d)
        do_rows = dos[units, :, span].to(work).flatten(1, 2)  # (u, G rows, e)
        p = _tile(q_rows, k_t[units], first, n_vis, causal, lses[units, :, span].flatten(1, 2))
        p = p.exp_()  # (u, G rows, n_vis): the forward's probabilities
        _accumulate(dvs[units], p.transpose(1, 2), do_rows)
        shift = deltas[units, :, span].flatten(1, 2).neg()
        ds = torch.baddbmm(shift, do_rows, vs[units, :n_vis].transpose(1, 2)).mul_(p)
        del p
        dq_rows = (ds @ ks[units, :n_vis]).mul_(scale)  # (u, G rows, d)
        dqs[units, :, span] = dq_rows.view(q_rows.shape)
        _accumulate(dks[units], ds.transpose(1, 2), q_rows.flatten(1, 2))
        del ds, dq_rows
    dk, dv = (t.view(k.shape).to(k.dtype) for t in (dks, dvs))
    return dq, dk, dv


class ChunkedAttention(torch.autograd.Function):
    """Saves q, k, v, the output and the log-sum-exp; backward recomputes every tile."""

    @staticmethod
    def forward(ctx, q, k, v, causal, chunk):
        out, lse = chunked_forward(q, k, v, causal, chunk, with_lse=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.chunk = causal, chunk
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        grads = chunked_backward(*ctx.saved_tensors, d_out, ctx.causal, ctx.chunk)
        return (*grads, None, None)


def chunked_attention(q, k, v, causal: bool, chunk: int):
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return ChunkedAttention.apply(q, k, v, causal, chunk)
    return chunked_forward(q, k, v, causal, chunk, with_lse=False)[0]


def chunked_memory(batch, heads, seq_len, head_dim, causal, dtype, backward, kv_heads, chunk):
    """Peak bytes of :func:`chunked_attention` above its inputs, as the profiler counts them.

    Forward: the output, k transposed, the largest block's tile of scores (its units' rows x
    visible keys), its scaled query rows and their product with v (the diagonal mask, causal,
    is smaller).
    Forward and backward: the output, what is saved for backward (the log-sum-exp; q, k, v are
    inputs), rowsum(dO * O), the three gradients, and inside the largest block two tiles (P
    and dS) beside its query rows (and dO's rows, where grouping makes them a copy). Half
    precision runs in float32: k, v are converted once and the tiles are float32.
    """
    kv_heads = kv_heads or heads
    groups, size, work = heads // kv_heads, itemsize(dtype), itemsize(_work_dtype(dtype))
    units, rows = tiling(batch * kv_heads, groups, seq_len, seq_len, chunk)
    units = min(units, batch * kv_heads)
    widest = max(r * n_vis for _, r, n_vis in chunks(seq_len, seq_len, rows, causal))
    tile = units * groups * widest * work
    q_rows = units * groups * rows * head_dim * work
    nd = batch * heads * seq_len * head_dim * size  # the output or dq
    kv_nd = batch * kv_heads * seq_len * head_dim  # elements of dk or dv
    k_t = kv_nd * work
    converted = kv_nd * work if work != size else 0  # v (and backward k) in float32
    rowwise = batch * heads * seq_len * work  # lse or delta
    if not backward:
        return nd + k_t + converted + tile + 2 * q_rows
    copied = q_rows if groups > 1 or work != size else 0  # dO's rows, when not a view
    grads = nd + 2 * kv_nd * work
    return nd + k_t + 2 * converted + 2 * rowwise + grads + 2 * tile + q_rows + copied


# --- decoding ---------------------------------------------------------------------------------
# --- the variant ------------------------------------------------------------------------------
@register("full", config=FullConfig)
class Full(KVCacheDecoding, DenseAttention):
    @property
    def counted_equals_analytic(self) -> bool:
        """The chunked backward recomputes each chunk's q k^T: work, but not useful work."""
        return self.cfg.chunk_size is None

    def attend(self, q, k, v, causal):
        if self.cfg.chunk_size is None:
            return dense_attention(q, k, v, causal)
        return chunked_attention(q, k, v, causal, self.cfg.chunk_size)

    def step(self, q_t, keys, values):
        return dense_attention(q_t, keys, values, causal=False)  # one row: O(n) either way

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
        shape = (batch, heads, seq_len, head_dim, causal, dtype, backward, kv_heads)
        if self.cfg.chunk_size is None:
            return dense_memory(*shape)
        return chunked_memory(*shape, self.cfg.chunk_size)
