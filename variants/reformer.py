"""``reformer``: LSH attention with shared QK (Kitaev et al. 2020, "Reformer", section 2).

Keys are the normalised queries, k_j = q_j / |q_j| (the key input is not used), so a query and
its keys hash alike. Each of ``n_hashes`` rounds:

1. hashes every position by a random rotation: h(x) = argmax([x R; -x R]) with R (d, nb / 2),
   nb = max(2, ceil(n / bucket_size)) rounded up to even, so buckets hold ~bucket_size on average;
2. sorts positions by (bucket, position);
3. cuts the sorted order into chunks of ``bucket_size``; a chunk's queries attend to the keys of
   their own chunk and of the previous one (whatever their buckets);
4. adds -1e5 to a position's score with its own key (not -inf, as the paper: it is attended
   only when nothing else is visible), and masks padding and, for ``causal=True``, keys later in
   the original order. Which keys share a window depends on where every position hashes, later
   ones included (as in the paper); a causal output never reads a later key or value.

Rounds are combined with their log-sum-exp weights, and a (query, key) pair visible in several
rounds is counted once: it is kept in the first round whose windows hold it and masked in the
later ones. The result is softmax attention over the union of the rounds' windows, so with one
chunk covering the sequence it equals full shared-QK attention with the diagonal masked.

Cost per round: chunked attention over n * 2 * bucket_size pairs, a sort (n log n), and the
hashing matmul, n * d * nb / 2 multiply-adds: the paper's hashing grows as n^2 / bucket_size,
but stays below the attention's cost until n ~ 8 * bucket_size^2 (32768 for 64). Memory
O(n * bucket_size * n_hashes). Batched over rounds and chunks (the only Python loop is over
earlier rounds, to find duplicate pairs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .common import itemsize, pad_to_multiple, softmax_flops, softmax_scale
from .registry import Attention, Common, register


@dataclass
class ReformerConfig(Common):
    bucket_size: int = 64  # average bucket occupancy and the chunk length (the paper's 64)
    n_hashes: int = 4  # hashing rounds; more rounds miss fewer near neighbours, cost grows linearly

    def __post_init__(self):
        if self.bucket_size < 1 or self.n_hashes < 1:
            raise ValueError("reformer: bucket_size and n_hashes must be positive ints")


def num_buckets(seq_len: int, bucket_size: int) -> int:
    nb = max(2, math.ceil(seq_len / bucket_size))
    return nb + nb % 2  # even: half the buckets are +x R, half -x R


def random_rotations(dim: int, n_hashes: int, n_buckets: int, seed: int) -> torch.Tensor:
    """(d, n_hashes, nb / 2) Gaussian, the same for a given seed and shape."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(dim, n_hashes, n_buckets // 2, generator=gen, dtype=torch.float64)


@torch.no_grad()
def hash_buckets(x, rotations):
    """Bucket of each position per round: argmax([x R; -x R]), (..., n, d) -> (R, ..., n).

    The max and the min of x R give that argmax without building the (.., nb) concatenation."""
    d, rounds, half = rotations.shape
    proj = (x @ rotations.reshape(d, rounds * half)).unflatten(-1, (rounds, half))  # (.,n,R,nb/2)
    top, top_i = proj.max(-1)
    bottom, bottom_i = proj.min(-1)
    buckets = torch.where(top >= -bottom, top_i, bottom_i + half)  # ties: the first, as argmax
    return buckets.movedim(-1, 0).contiguous()  # (R, ..., n): rounds outermost


def mask_values(dtype):
    """(mask, self): finite values below any score; self above mask, so a position whose only
    visible key is itself attends to itself. -1e5 is the paper's; half precision needs less."""
    lowest = torch.finfo(dtype).min
    return lowest / 2, max(-1e5, lowest / 4)


@torch.no_grad()
def mask_in_place(scores, hide, n: int, chunk: int):
    """Masks scores (R*BH, C, c, 2c) in place: each query's own key (the diagonal of the
    current half) gets the additive self value; chunk 0 has nothing to look back to; sorted
    slots >= n are padding (they sort last, at the end of the last chunk); ``hide`` (the
    same shape, or None) marks later keys and duplicates.

    Outside autograd, so gradients pass straight through: exact for the additive self value,
    and for a masked pair the gradient reaching it is its probability, 0 at working precision
    (< e^-80). Recorded masking would copy the whole score gradient once per masked view."""
    mask, self_value = mask_values(scores.dtype)
    scores[..., chunk:].diagonal(dim1=-2, dim2=-1).add_(self_value)
    scores[:, 0, :, :chunk].fill_(mask)
    first_pad = n - (scores.shape[1] - 1) * chunk  # offset of the first padded slot, last chunk
    scores[:, -1, :, chunk + first_pad :].fill_(mask)
    if hide is not None:
        scores.masked_fill_(hide.view_as(scores), mask)


def sorted_rows(x, order, chunk: int, filler: bool = False):
    """Each round's sorted copy of x (BH, n, W): (R * BH * N, W), gathered through flat row
    indices (n-sized, not n*W-sized). ``filler``: with one leading chunk more, so that
    ``windows`` gives every chunk the window (previous chunk, own chunk) as a view."""
    R, BH, N = order.shape
    rows = pad_to_multiple(x, chunk)[0].reshape(BH * N, -1)  # (BH*N, W)
    flat = (order + torch.arange(BH, device=x.device).view(1, BH, 1) * N).reshape(-1)
    if filler:  # copies of the first chunk, only ever seen by chunk 0 and masked there
        flat = torch.cat([flat[:chunk], flat])
    return rows.index_select(0, flat)


def windows(rows, chunk: int):
    """rows ((G + 1) c, W) -> (G, W, 2c): chunk g's keys are rows of chunks g - 1 and g."""
    return rows.unfold(0, 2 * chunk, chunk)


def duplicate_mask(slot_chunk, order, chunk: int, hide, fresh: bool):
    """Marks in ``hide`` (R, BH * C, c, 2c) bool the pairs that some earlier round's windows
    already hold, so that every pair is counted once (``fresh``: rounds >= 1 of ``hide`` are
    not yet written, so the first test writes instead of or-ing).

    slot_chunk (R, BH, N): the chunk each position lands in, per round; order (R, BH, N): the
    sorted positions. Query i and key j share a window in round r' iff j's chunk there is i's
    or the one before. Rounds are outermost, so every slice here is contiguous."""
    R, BH, N = order.shape
    C = N // chunk
    hit = torch.empty_like(hide[1:])  # one scratch buffer, not a fresh one per test
    for r0 in range(R - 1):  # a few rounds: loops over rounds, never over chunks
        later = order[r0 + 1 :]  # (R', BH, N)
        in_r0 = slot_chunk[r0].expand_as(later).gather(-1, later).view(-1, C, chunk)
        filler = torch.full_like(in_r0[:, :1], -2)  # no chunk is -2 or its successor
        keys = torch.cat([torch.cat([filler, in_r0[:, :-1]], 1), in_r0], -1)  # (R'BH, C, 2c)
        kq, qq = keys.view(-1, 1, 2 * chunk), in_r0.view(-1, chunk, 1)  # per chunk of round r
        target = hide[r0 + 1 :].view(-1, chunk, 2 * chunk)
        scratch = hit[r0:].view(-1, chunk, 2 * chunk)
        if fresh and r0 == 0:
            torch.eq(kq, qq, out=target)
        else:
            target |= torch.eq(kq, qq, out=scratch)
        target |= torch.eq(kq, qq - 1, out=scratch)


def hidden_pairs(order, slot, chunk: int, causal: bool):
    """(G, c, 2c) bool of the pairs to mask (later keys if causal, duplicates), or None."""
    R, BH, N = order.shape
    if not causal and R == 1:
        return None
    G = R * BH * (N // chunk)
    if causal:  # by original positions: a key later than the query is hidden
        flat = order.reshape(-1)
        kpos = windows(torch.cat([flat[:chunk], flat]), chunk)  # (G, 2c)
        hide = kpos[:, None, :] > order.reshape(G, chunk, 1)  # (G, c, 2c)
    else:
        hide = torch.empty(G, chunk, 2 * chunk, dtype=torch.bool, device=order.device)
        hide.view(R, -1)[0] = False  # round 0 hides nothing; later rounds: written below
    small = torch.int16 if N // chunk < 2**15 else torch.int32  # chunk ids: less to compare
    codes = (slot // chunk).to(small)
    duplicate_mask(codes, order, chunk, hide.view(R, -1, chunk, 2 * chunk), fresh=not causal)
    return hide


def lsh_attention(q, v, rotations, chunk: int, causal: bool):
    """q (B, H, n, d), v (B, H, n, dv), rotations (d, R, nb / 2): (B, H, n, dv)."""
    B, H, n, d = q.shape
    R = rotations.shape[1]
    q, v = q.reshape(B * H, n, d), v.reshape(B * H, n, -1)
    keys = q / q.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)  # shared QK
    # Hash in float32 at least: a half-precision projection would flip buckets (other windows)
    wide = torch.promote_types(q.dtype, torch.float32)
    buckets = hash_buckets(keys.to(wide), rotations.to(device=q.device, dtype=wide))  # (R,BH,n)
    buckets, _ = pad_to_multiple(buckets, chunk, dim=-1)
    N = buckets.shape[-1]
    buckets[..., n:] = 2 * rotations.shape[2]  # padding sorts after every real position
    order = torch.sort(buckets, dim=-1, stable=True)[1]  # (R, BH, N): positions, sorted
    # slot[r, bh, p]: where position p sits in round r's sorted order (inverse of order).
    slot = torch.empty_like(order).scatter_(-1, order, torch.arange(N).to(order).expand_as(order))
    G = R * B * H * (N // chunk)

    # Sorted copies; separate tensors, so that each one's gradient is written once, whole.
    queries = sorted_rows(q * softmax_scale(d), order, chunk).view(G, chunk, d)
    key_rows = sorted_rows(keys, order, chunk, filler=True)  # ((G + 1) c, d)
    scores = queries @ windows(key_rows, chunk)  # (G, c, 2c)
    hide = hidden_pairs(order, slot, chunk, causal)
    mask_in_place(scores.view(R * B * H, -1, chunk, 2 * chunk), hide, n, chunk)

    expd, total, lse = exp_scores(scores)  # (G, c, 2c), (G, c), (G, c)
    value_rows = sorted_rows(v, order, chunk, filler=True)  # ((G + 1) c, dv)
    out = expd @ windows(value_rows, chunk).transpose(-1, -2)  # (G, c, dv), unnormalised
    return combine_rounds(out, total, lse, order, slot, n).view(B, H, n, -1)


def exp_scores(scores):
    """exp(scores - row max) in place (a fresh rounds-by-n-by-2c buffer costs more than the
    extra pass: its pages are new), with each row's sum and log-sum-exp. The max is only a
    stabiliser: detached, the lse's gradient is still exactly the softmax.

    Exponents are clamped at -80 first: e^-80 is 0 next to the row's e^0 = 1 at any precision
    we check, and CPU exp is ~6x slower on inputs that underflow (the masked pairs). Outside
    autograd: recorded, the in-place clamp would save a copy of the scores."""
    top = scores.amax(-1, keepdim=True).detach()  # (G, c, 1)
    scores.sub_(top)
    with torch.no_grad():  # numerical only (value and gradient are 0 below e^-80 anyway)
        scores.clamp_min_(-80.0)
    expd = scores.exp_()
    total = expd.sum(-1)  # (G, c); >= 1: the max contributes exp(0)
    return expd, total, top[..., 0] + total.log()


def combine_rounds(out, total, lse, order, slot, n: int):
    """Each round's softmax (out / total) weighted by the softmax over rounds of its lse,
    summed straight into the original order. out (G, c, dv), total and lse (G, c), sorted;
    order and slot (R, BH, N). -> (BH, n, dv)"""
    R, BH, N = slot.shape
    base = torch.arange(R * BH, device=slot.device).view(R, BH, 1) * N
    by_position = (slot[..., :n] + base).reshape(-1)  # each real position's slot, per round
    weight = lse.reshape(-1).index_select(0, by_position).view(R, BH, n).softmax(dim=0)
    weight = pad_to_multiple(weight, N, dim=-1)[0].reshape(-1)  # padded positions: weight 0
    scale = weight.index_select(0, (order + base).reshape(-1)) / total.reshape(-1)  # sorted
    out = out.reshape(R * BH * N, -1)
    out = out * scale[:, None] if out.requires_grad else out.mul_(scale[:, None])
    target = (order + torch.arange(BH, device=slot.device).view(1, BH, 1) * N).reshape(-1)
    summed = out.new_zeros(BH * N, out.shape[-1]).index_add_(0, target, out)
    return summed.view(BH, N, -1)[:, :n]


@register("reformer", config=ReformerConfig)
class Reformer(Attention):
    def __init__(self, cfg: ReformerConfig):
        super().__init__(cfg)
        self._rotations = {}  # (d, nb) -> rotations: drawn once per shape from the seed

    def rotations(self, dim: int, seq_len: int) -> torch.Tensor:
        nb = num_buckets(seq_len, self.cfg.bucket_size)
        if (dim, nb) not in self._rotations:
            self._rotations[dim, nb] = random_rotations(dim, self.cfg.n_hashes, nb, self.cfg.seed)
        return self._rotations[dim, nb]

    def attend(self, q, k, v, causal):
        n = q.shape[-2]
        rotations = self.rotations(q.shape[-1], n)
        return lsh_attention(q, v, rotations, min(self.cfg.bucket_size, n), causal)

    def _shape(self, seq_len):
        chunk = min(self.cfg.bucket_size, seq_len)
        padded = -(-seq_len // chunk) * chunk
        return chunk, padded, num_buckets(seq_len, self.cfg.bucket_size)

    def flops(
        self, *, batch, heads, seq_len, head_dim, causal=False, backward=False, kv_heads=None
    ):
        """Hashing (x R, no gradient) plus softmax attention over the pairs computed: each
        round, every (padded) query against 2 chunks of keys, masked or not."""
        chunk, padded, nb = self._shape(seq_len)
        rounds = self.cfg.n_hashes
        hashing = 2 * batch * heads * seq_len * head_dim * rounds * (nb // 2)
        pairs = rounds * padded * 2 * chunk
        attn = softmax_flops(
            batch=batch, heads=heads, pairs=pairs, head_dim=head_dim, backward=backward
        )
        return hashing + attn

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
        """The attention phase: scores (exponentiated in place), the boolean masks (causal
        and duplicates, plus a scratch of the later rounds), the gathered q / keys / v and the
        per-round outputs. Hashing's n x nb / 2 projections come first and are smaller."""
        chunk, padded, nb = self._shape(seq_len)
        rounds, size = self.cfg.n_hashes, itemsize(dtype)
        slots = batch * heads * rounds * padded  # sorted positions over all rounds
        pairs = slots * 2 * chunk
        masks = pairs * (2 * rounds - 1) // rounds if (causal or rounds > 1) else 0
        attn = pairs * size + masks + slots * (3 * head_dim + head_dim) * size
        hashing = batch * heads * seq_len * rounds * (nb // 2) * size
        return max(hashing, attn)
