"""``local``: exact sliding-window attention.

Query i sees key j iff ``abs(i - j) <= window`` (causal: ``0 <= i - j <= window``). The sequence
is cut into blocks of ``b`` positions; a query block can only see the ``r = ceil(window / b)``
key blocks on each side of it (causal: before it), so every query block is scored against one
slab of ``(2r + 1) b`` keys (causal ``(r + 1) b``): an overlapping ``unfold`` view of the keys
themselves (:class:`Slabs`), read in place by the batched matmuls. The band and the padding are
hidden exactly inside the slab. Time and memory grow as ``n * window``; no n x n tensor is made.

- Blocks are computed in chunks whose scores fit a cache-sized budget, so the product, the
  mask, the in-place softmax and the product with v run on scores still in cache. The mask is
  a min with a -inf/+inf cap (:func:`ceiling`): hidden pairs become -inf whatever q.k is (an
  additive -inf bias gives NaN where q.k overflows float16), at a fifth of masked_fill's cost.
- Grouped heads: the G query heads of a key/value head are stacked into one block of G b rows
  against the same slab, so k and v are never copied per query head.
- Backward is a custom autograd Function in the manner of FlashAttention: the forward keeps q,
  k, v and the output, the backward recomputes each chunk's probabilities and adds the slabs'
  key and value gradients back onto the keys they came from, so fwd_bwd memory is O(n d) plus
  one chunk instead of the O(n window) probabilities autograd would keep.
- Decoding keeps a rolling window: the last ``window`` keys and values in a ring of
  ``window + 1`` slots, so the state is bounded by the window at any context length.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .common import add_bmm, ceiling, itemsize, softmax_, softmax_flops, softmax_scale
from .full import dense_attention
from .registry import Attention, Common, Unsupported, register

# Smallest block: tiny windows would otherwise give tiny matmuls whose per-call overhead
# dominates; a 32-wide block keeps the slab's matmuls efficient at a small masking waste.
MIN_BLOCK = 32
# Score elements per chunk (16 MB in float32): the chunk's passes (mask, softmax, the product
# with v) run on scores still in cache (L3) instead of memory. Side by side with flex_local
# at n=8192 (2 threads) 1, 4 and 16 MB chunks ran within 15% of each other on an idle pair of
# cores; with other processes on them every parallel op waits for a descheduled thread, so
# fewer, larger chunks lost least (16 MB: 2x faster than 4 MB there).
SCORE_BUDGET = 2**22


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


# --- kernels the masking family shares (candidates for variants.common) -----------------------
# --- how one call is laid out -----------------------------------------------------------------
@dataclass(frozen=True)
class Band:
    """Blocks of one call: ``heads`` (batch, key/value head) rows of ``nb`` blocks of ``b``
    positions, each block of G query heads scored against a slab of ``span`` keys starting
    ``left`` blocks before it."""

    n: int
    b: int
    nb: int
    left: int
    right: int
    window: int
    causal: bool
    heads: int  # B * kv_heads
    G: int  # query heads per key/value head

    @staticmethod
    def of(q, k, window: int, causal: bool) -> Band:
        heads, G = k.shape[0] * k.shape[1], q.shape[1] // k.shape[1]
        return Band.build(q.shape[-2], window, causal, heads, G)

    @staticmethod
    def build(n: int, window: int, causal: bool, heads: int, G: int) -> Band:
        b = block_size(window, n)
        nb = -(-n // b)
        left = min(-(-window // b), nb - 1)  # key blocks a query block reaches back
        return Band(n, b, nb, left, 0 if causal else left, window, causal, heads, G)

    @property
    def span(self) -> int:
        return (self.left + 1 + self.right) * self.b

    @property
    def blocks(self) -> int:
        return self.heads * self.nb

    @property
    def per_chunk(self) -> int:
        """Blocks per chunk: whole heads while they fit the budget, else part of one head."""
        fit = max(1, SCORE_BUDGET // (self.G * self.b * self.span))
        return fit if fit < self.nb else min(fit // self.nb, self.heads) * self.nb

    def chunks(self):
        """(first flat block, blocks, heads, first block within its head) per chunk."""
        step = self.per_chunk
        if step >= self.nb:
            for t in range(0, self.blocks, step):
                yield t, min(step, self.blocks - t), min(step, self.blocks - t) // self.nb, 0
        else:
            for h in range(self.heads):
                for i in range(0, self.nb, step):
                    yield h * self.nb + i, min(step, self.nb - i), 1, i

    def hidden(self, blocks: torch.Tensor) -> torch.Tensor:
        """(len(blocks), b, span) bool: True where row t of block I must NOT see column c of
        its slab. Out of the band by offset (the same in every block), or a key position
        outside 0..n-1 (padding, or in the flattened layout another head's keys). Padded query
        rows (from n on) hide nothing, so no row is all -inf (a NaN backward would spread)."""
        b, device = self.b, blocks.device
        rows = torch.arange(b, device=device)
        cols = torch.arange(self.span, device=device)
        offset = rows[:, None] - cols[None, :] + self.left * b  # i - j within any block
        lower = 0 if self.causal else -self.window
        off_band = (offset < lower) | (offset > self.window)  # (b, span)
        k_pos = (blocks[:, None] - self.left) * b + cols[None, :]  # (blocks, span)
        outside = (k_pos < 0) | (k_pos >= self.n)
        q_pos = blocks[:, None] * b + rows[None, :]  # (blocks, b)
        hidden = off_band[None] | outside[:, None, :]
        return hidden.logical_and_((q_pos < self.n)[:, :, None])


@functools.lru_cache(maxsize=16)
def band_caps(band: Band, device, dtype) -> list:
    """[(first block, end block, cap)]: the :func:`ceiling` of the blocks within a head.
    Blocks whose slab lies inside the sequence share one (1, b, span) cap; only those at the
    ends (whose slabs reach past 0 or n, or hold padded rows) need their own. Kept per shape:
    a dozen tiny ops, each as dear as a large one when the cores are shared."""
    head = min(band.left, band.nb)  # slabs that start before position 0
    tail = max(head, band.n // band.b - band.right)  # slabs that reach n, or padded rows
    ends = [(0, head), (tail, band.nb)]
    caps = [(lo, hi, torch.arange(lo, hi, device=device)) for lo, hi in ends if lo < hi]
    if head < tail:
        caps.append((head, tail, torch.tensor([head], device=device)))
    return [(lo, hi, ceiling(band.hidden(blocks), dtype)[:, None]) for lo, hi, blocks in caps]


def to_blocks(x: torch.Tensor, band: Band) -> torch.Tensor:
    """(B, H, n, d) -> (B*KV*nb, G*b, d): block I of the G query heads of one key/value head
    stacked, zero rows past n. A view unless grouped or padded."""
    B, H, n, d = x.shape
    G, nb, b = band.G, band.nb, band.b
    if n != nb * b:
        x = torch.cat([x, x.new_zeros(B, H, nb * b - n, d)], dim=2)
    x = x.view(B, H // G, G, nb, b, d)
    if G > 1:
        x = x.transpose(2, 3)
    return x.reshape(band.blocks, G * b, d)


def from_blocks(x: torch.Tensor, band: Band, B: int, H: int) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: (B*KV*nb, G*b, d) -> (B, H, n, d), contiguous."""
    G, nb, b, d = band.G, band.nb, band.b, x.shape[-1]
    x = x.view(B, H // G, nb, G, b, d).transpose(2, 3).reshape(B, H, nb * b, d)
    return x[:, :, : band.n].contiguous()


def framed(x: torch.Tensor, band: Band) -> torch.Tensor:
    """(B, KV, n, d) -> (left*b + B*KV*nb*b + right*b, d): every head's positions end to end,
    zero-padded to whole blocks, with ``left`` zero blocks before and ``right`` after (only
    the frame and the padding are zeroed: a full zero fill would be one more pass)."""
    b, d, lead = band.b, x.shape[-1], band.left * band.b
    out = x.new_empty((band.left + band.blocks + band.right) * b, d)
    out[:lead].zero_()
    out[lead + band.blocks * b :].zero_()
    inner = out[lead : lead + band.blocks * b].view(band.heads, band.nb * b, d)
    inner[:, : band.n] = x.reshape(band.heads, band.n, d)
    inner[:, band.n :].zero_()
    return out


class Slabs:
    """Block t's keys (or values) t-left .. t+right as a (span, d) slab, for every block: an
    overlapping unfold view that bmm reads in place. Flattening lets a slab run into the
    neighbouring head's keys, but only at positions outside 0..n-1, which the caps hide: one
    view serves every head. Whole blocks (n a multiple of b) are read from the input itself,
    only the two ends of the flattened sequence framed with zeros per chunk; otherwise from a
    zero-padded, framed copy."""

    def __init__(self, x: torch.Tensor, band: Band):
        self.band, span, b = band, band.span, band.b
        if band.n == band.nb * b:
            self.flat = x.reshape(band.blocks * b, x.shape[-1])  # a view when x is contiguous
            self.offset = band.left  # the view's slab i is block i + left's
        else:
            self.flat = framed(x, band)
            self.offset = 0
        fits = self.flat.shape[0] >= span  # else every slab is framed per chunk
        self.view = self.flat.unfold(0, span, b) if fits else None  # (slabs, d, span)

    def __call__(self, t: int, nblk: int) -> torch.Tensor:
        """(nblk, span, d) slabs of blocks t .. t + nblk - 1."""
        band, first = self.band, t - self.offset
        if self.view is not None and first >= 0 and first + nblk <= self.view.shape[0]:
            return self.view[first : first + nblk].transpose(1, 2)
        # an end of the sequence, read in place: frame just this chunk's rows with zeros
        b, lo, hi = band.b, t - band.left, t + nblk + band.right  # blocks of rows it reads
        a, z = max(lo, 0), min(hi, band.blocks)
        piece = self.flat.new_empty((hi - lo) * b, self.flat.shape[-1])
        piece[: (a - lo) * b].zero_()  # only the frame is zeroed: one pass less
        piece[(z - lo) * b :].zero_()
        piece[(a - lo) * b : (z - lo) * b] = self.flat[a * b : z * b]
        return piece.unfold(0, band.span, b).transpose(1, 2)


def chunk_probs(qb, k_slabs: Slabs, caps, band: Band, chunk, buf, scale: float):
    """(blocks, G*b, span) probabilities of a chunk, in ``buf``: scaled q k^T, hidden pairs set
    to -inf by the :func:`band_caps` of its blocks, softmax in place."""
    t, nblk, nheads, i = chunk
    G, b, span = band.G, band.b, band.span
    s = buf[: nblk * G * b * span].view(nblk, G * b, span)
    add_bmm(s, qb[t : t + nblk], k_slabs(t, nblk).transpose(1, 2), beta=0, alpha=scale)
    per_head = nblk // nheads
    grid = s.view(nheads, per_head, G, b, span)
    for lo, hi, cap in caps:  # the blocks of each cap that lie in this chunk
        a, z = max(lo, i), min(hi, i + per_head)
        if a < z:
            grid[:, a - i : z - i].clamp_max_(cap if len(cap) == 1 else cap[a - lo : z - lo])
    return softmax_(s)


def band_forward(q, k, v, band: Band):
    """Output blocks (T, G*b, d), chunk by chunk."""
    scale = softmax_scale(q.shape[-1])
    qb = to_blocks(q, band)
    k_slabs, v_slabs = Slabs(k, band), Slabs(v, band)
    caps = band_caps(band, q.device, q.dtype)
    out = qb.new_empty(qb.shape[0], qb.shape[1], v.shape[-1])
    buf = qb.new_empty(band.per_chunk * band.G * band.b * band.span)
    for chunk in band.chunks():
        t, nblk = chunk[:2]
        p = chunk_probs(qb, k_slabs, caps, band, chunk, buf, scale)
        torch.bmm(p, v_slabs(t, nblk), out=out[t : t + nblk])
    return out


def band_backward(q, k, v, out, grad_out, band: Band):
    """Gradients in blocks (dq (T, G*b, d)) and framed (dk, dv), recomputing each chunk's
    probabilities: dS = P * (dO V^T - rowsum(dO * O)), dQ = scale dS K, and the slab gradients
    scale dS^T Q and P^T dO added back onto the framed keys and values they were read from."""
    scale = softmax_scale(q.shape[-1])
    wide = torch.promote_types(q.dtype, torch.float32)  # row sums of a half type in float32
    qb, ob, dob = to_blocks(q, band), to_blocks(out, band), to_blocks(grad_out, band)
    k_slabs, v_slabs = Slabs(k, band), Slabs(v, band)
    caps = band_caps(band, q.device, q.dtype)
    frame_rows = (band.left + band.blocks + band.right) * band.b
    dq = torch.empty_like(qb)
    dk, dv = k.new_zeros(frame_rows, k.shape[-1]), v.new_zeros(frame_rows, v.shape[-1])
    size = band.per_chunk * band.G * band.b * band.span
    buf, grad_buf = qb.new_empty(size), qb.new_empty(size)
    slab_grad = qb.new_empty(band.per_chunk * band.span * q.shape[-1])
    for chunk in band.chunks():
        t, nblk = chunk[:2]
        blocks = slice(t, t + nblk)
        p = chunk_probs(qb, k_slabs, caps, band, chunk, buf, scale)
        do = dob[blocks]
        ds = grad_buf[: p.numel()].view(p.shape)
        torch.bmm(do, v_slabs(t, nblk).transpose(1, 2), out=ds)
        ds.sub_((do * ob[blocks]).sum(-1, keepdim=True, dtype=wide)).mul_(p)
        add_bmm(dq[blocks], ds, k_slabs(t, nblk), beta=0, alpha=scale)
        grad = slab_grad[: nblk * band.span * q.shape[-1]].view(nblk, band.span, -1)
        add_bmm(grad, p.transpose(1, 2), do, beta=0)
        add_slabs(dv, grad, band, t)
        add_bmm(grad, ds.transpose(1, 2), qb[blocks], beta=0, alpha=scale)
        add_slabs(dk, grad, band, t)
    return dq, dk, dv


def add_slabs(frame_grad, slab_grad, band: Band, t: int) -> None:
    """Add the (blocks, span, d) gradients of slabs t, t+1, .. onto the framed rows they
    view: slab t's j-th block of keys is framed block t + j."""
    b = band.b
    nblk, span, d = slab_grad.shape
    dst = frame_grad.view(-1, b, d)
    src = slab_grad.view(nblk, span // b, b, d)
    for j in range(span // b):
        dst[t + j : t + j + nblk] += src[:, j]


def unframed(frame: torch.Tensor, band: Band, shape) -> torch.Tensor:
    """The (B, KV, n, d) positions of a :func:`framed` tensor, contiguous."""
    b, d = band.b, frame.shape[-1]
    inner = frame[band.left * b : (band.left + band.blocks) * b].view(band.heads, -1, d)
    return inner[:, : band.n].reshape(shape)


class BandFunction(torch.autograd.Function):
    """Sliding-window attention of (B, H, n, d) q and (B, KV, n, d) k, v; see the module doc."""

    @staticmethod
    def forward(ctx, q, k, v, window: int, causal: bool):
        band = Band.of(q, k, window, causal)
        out = from_blocks(band_forward(q, k, v, band), band, *q.shape[:2])
        ctx.save_for_backward(q, k, v, out)
        ctx.band = band
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out = ctx.saved_tensors
        band = ctx.band
        dq, dk, dv = band_backward(q, k, v, out, grad_out.contiguous(), band)
        dq = from_blocks(dq, band, *q.shape[:2])
        return dq, unframed(dk, band, k.shape), unframed(dv, band, v.shape), None, None


def local_attention(q, k, v, window: int, causal: bool):
    """Exact sliding-window softmax attention; see the module doc."""
    return BandFunction.apply(q, k, v, window, causal)


# --- decoding: a rolling window -----------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """The last ``window`` keys and values of a sequence of ``length`` tokens, position p in
    slot p % (window + 1) of buffers (B, KV, slots, d). The spare slot is the one the next
    token is written to, so a step leaves every slot its cache uses untouched and can be
    repeated from it. Slots grow (doubling) up to window + 1 while the sequence is shorter."""

    k: torch.Tensor
    v: torch.Tensor
    length: int
    window: int

    def nbytes(self) -> int:
        """Bytes of the tokens held (the spare slot and growth room are not counted)."""
        B, KV, _, d = self.k.shape
        return 2 * B * KV * min(self.length, self.window) * d * self.k.element_size()


def start_window(k, v, window: int) -> Window:
    """The window after a prompt of k, v (B, KV, n, d)."""
    B, KV, n, d = k.shape
    slots = min(window + 1, n + 1)
    kb, vb = k.new_empty(B, KV, slots, d), v.new_empty(B, KV, slots, v.shape[-1])
    held = torch.arange(max(0, n - window), n, device=k.device)
    kb[:, :, held % (window + 1)] = k[:, :, held]
    vb[:, :, held % (window + 1)] = v[:, :, held]
    return Window(kb, vb, n, window)


def push(cache: Window, k_t, v_t) -> tuple[Window, int]:
    """The window with one more token, and how many slots (from 0) it then holds."""
    k, v, t, w = cache.k, cache.v, cache.length, cache.window
    if t == k.shape[2] and t < w + 1:  # still growing: new buffers, the old cache keeps its own
        slots = min(2 * t, w + 1)
        k = torch.cat([k, k.new_empty(*k.shape[:2], slots - t, k.shape[3])], dim=2)
        v = torch.cat([v, v.new_empty(*v.shape[:2], slots - t, v.shape[3])], dim=2)
    slot = t % (w + 1)
    k[:, :, slot : slot + 1] = k_t
    v[:, :, slot : slot + 1] = v_t
    return Window(k, v, t + 1, w), min(t + 1, w + 1)


@register("local", config=LocalConfig)
class Local(Attention):
    # The slabs hold masked pairs (about a tenth): FlopCounterMode counts more than the band.
    counted_equals_analytic = False

    def attend(self, q, k, v, causal):
        if q.shape[-2] != k.shape[-2]:
            raise Unsupported(
                f"{self.name}: the window is defined on one sequence; q has {q.shape[-2]} "
                f"positions and k {k.shape[-2]} (use full for cross-attention)"
            )
        return local_attention(q, k, v, self.cfg.window, causal)

    # --- decoding ---------------------------------------------------------------------------
    def prefill(self, q, k, v, *, output: bool = True):
        out = self(q, k, v, causal=True) if output else None
        return out, start_window(k, v, self.cfg.window)

    def decode(self, q_t, k_t, v_t, cache: Window):
        reasons = self.decode_unsupported(device=q_t.device, dtype=q_t.dtype)
        if reasons:
            raise Unsupported(f"{self.name}: " + "; ".join(reasons))
        cache, held = push(cache, k_t, v_t)
        # every held slot is in the window (order does not matter to the softmax)
        keys, values = cache.k[:, :, :held], cache.v[:, :, :held]
        return dense_attention(q_t, keys, values, causal=False), cache

    def cache_bytes(self, cache: Window) -> int:
        return cache.nbytes()

    def cache_model(self, *, batch, seq_len, head_dim, kv_heads, dtype=torch.float32):
        return 2 * batch * kv_heads * min(seq_len, self.cfg.window) * head_dim * itemsize(dtype)

    # --- cost models ------------------------------------------------------------------------
    def flops(
        self, *, batch, heads, seq_len, head_dim, causal=False, backward=False, kv_heads=None
    ):
        pairs = band_pairs(seq_len, self.cfg.window, causal)
        return softmax_flops(
            batch=batch, heads=heads, pairs=pairs, head_dim=head_dim, backward=backward
        )

    def decode_flops(self, *, batch, heads, seq_len, head_dim, kv_heads=None):
        """The new query against the window's keys and itself."""
        pairs = min(seq_len, self.cfg.window) + 1
        return softmax_flops(batch=batch, heads=heads, pairs=pairs, head_dim=head_dim)

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
        """Forward: the query and output blocks (copies only when grouped or padded), one
        chunk's scores and k, v framed: whole (when padded) or, read in place, one chunk's
        rows at an end of the sequence. Backward, above the output: the blocks of q, output
        and output gradient, the framed gradients of k and v, two chunk buffers and a chunk's
        slab gradient; at its end, the gradients in the caller's layout. The caps, kept from
        a shape's first call (the harness measures after a warm-up), are not counted."""
        size, kv = itemsize(dtype), kv_heads or heads
        band = Band.build(seq_len, self.cfg.window, causal, batch * kv, heads // kv)
        d, b, N = head_dim, band.b, band.nb * band.b
        padded = N != seq_len
        q = batch * heads * seq_len * d * size
        q_blocks = batch * heads * N * d * size
        copied = q_blocks if (band.G > 1 or padded) else 0  # to_blocks copies
        frame = (band.left + band.blocks + band.right) * b * d * size
        piece = (min(band.per_chunk, band.blocks) + band.left + band.right) * b * d * size
        read = 2 * frame if padded else piece  # what the Slabs of k and v hold
        chunk = band.per_chunk * band.G * b * band.span * size
        forward = max(read + copied + q_blocks + chunk, q_blocks + (q if copied else 0))
        if not backward:
            return forward
        rows = band.per_chunk * band.G * b * d * size  # a chunk's dO * O before its sums
        slab = band.per_chunk * band.span * d * size
        # an end's framed piece and the dO * O product are not alive at once
        held = 2 * frame if padded else 0
        ends = rows if padded else max(rows, piece)
        loop = 3 * copied + held + 2 * frame + q_blocks + 2 * chunk + slab + ends
        padded_kv = 2 * batch * kv * seq_len * d * size if padded else 0
        end = q_blocks + 2 * frame + (q if copied else 0) + padded_kv
        return max(forward, q + max(loop, end))
