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
but stays below the attention's cost until n ~ 8 * bucket_size^2 (32768 for 64). Its
projections are made a block of rows at a time, so memory stays O(n * bucket_size * n_hashes).
Batched over rounds and chunks (the Python loops are over earlier rounds, to find duplicate
pairs, and over the hashing's blocks of rows).

Keys are normalised and hashed in float32 whatever the input dtype, so the buckets, and so the
windows, do not depend on it. Grouped heads: only the values have key/value heads (the keys are
made from q), and each query head gathers its group's values. There is no decoding form: where a
position hashes, and so which window it lands in, depends on every position of the sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .common import itemsize, pad_to_multiple, softmax_flops, softmax_scale
from .registry import Attention, Common, Unsupported, register

HASH_BLOCK = 2**22  # hash projections per block of rows (16 MB in float32)


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
    """Bucket of each position per round: argmax([x R; -x R]), (BH, n, d) -> (R, BH, n).

    The max and the min of x R give that argmax without building the (.., nb) concatenation.
    Rows go in blocks of HASH_BLOCK projections: the whole (BH, n, R nb / 2) projection grows as
    n^2 / bucket_size (4.3 GB at n = 65536, 8 heads), a block stays bounded. Each row's buckets
    depend on that row alone, so the blocks change nothing."""
    d, rounds, half = rotations.shape
    flat = rotations.reshape(d, rounds * half)
    BH, n, _ = x.shape
    buckets = torch.empty(rounds, BH, n, dtype=torch.long, device=x.device)
    rows = max(1, HASH_BLOCK // (BH * rounds * half))
    for start in range(0, n, rows):
        proj = (x[:, start : start + rows] @ flat).unflatten(-1, (rounds, half))  # (BH,r,R,nb/2)
        top, top_i = proj.max(-1)
        bottom, bottom_i = proj.min(-1)
        block = torch.where(top >= -bottom, top_i, bottom_i + half)  # ties: the first, as argmax
        buckets[..., start : start + rows] = block.movedim(-1, 0)  # rounds outermost
    return buckets


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


def sorted_rows(x, order, chunk: int, filler: bool = False, heads=None):
    """Each round's sorted copy of x (BH', n, W): (R * BH * N, W), gathered through flat row
    indices (n-sized, not n*W-sized). ``filler``: with one leading chunk more, so that
    ``windows`` gives every chunk the window (previous chunk, own chunk) as a view. ``heads``
    (BH,): the head of x that each head of ``order`` reads (grouped values); None: its own."""
    R, BH, N = order.shape
    rows = pad_to_multiple(x, chunk)[0].reshape(-1, x.shape[-1])  # (BH' * N, W)
    heads = torch.arange(BH, device=x.device) if heads is None else heads
    flat = (order + heads.view(1, BH, 1) * N).reshape(-1)
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
    """q (B, H, n, d), v (B, KV, n, dv), rotations (d, R, nb / 2): (B, H, n, dv). Query head h
    reads value head h // (H / KV): its values are gathered from that head, never copied per
    query head (shared QK: the keys are made from q, so only the values are grouped).

    Each tensor is dropped as soon as it is used (del): without autograd the peak is then one
    phase's tensors, not all of them."""
    B, H, n, d = q.shape
    R, q = rotations.shape[1], q.reshape(B * H, n, d)
    keys, buckets = shared_keys_and_buckets(q, rotations)  # (BH, n, d), (R, BH, n)
    buckets, _ = pad_to_multiple(buckets, chunk, dim=-1)  # (R, BH, N)
    N = buckets.shape[-1]
    buckets[..., n:] = 2 * rotations.shape[2]  # padding sorts after every real position
    order = torch.sort(buckets, dim=-1, stable=True)[1]  # (R, BH, N): positions, sorted
    del buckets
    # slot[r, bh, p]: where position p sits in round r's sorted order (inverse of order).
    slot = torch.empty_like(order).scatter_(-1, order, torch.arange(N).to(order).expand_as(order))
    G = R * B * H * (N // chunk)

    # Sorted copies; separate tensors, so that each one's gradient is written once, whole.
    queries = sorted_rows(q * softmax_scale(d), order, chunk).view(G, chunk, d)
    key_rows = sorted_rows(keys, order, chunk, filler=True)  # ((G + 1) c, d)
    del keys
    scores = queries @ windows(key_rows, chunk)  # (G, c, 2c)
    del queries, key_rows
    hide = hidden_pairs(order, slot, chunk, causal)
    mask_in_place(scores.view(R * B * H, -1, chunk, 2 * chunk), hide, n, chunk)
    del hide

    expd, total, lse = exp_scores(scores)  # (G, c, 2c): the scores, exponentiated in place
    heads = value_heads(B, H, v.shape[1], q.device)
    value_rows = sorted_rows(v.flatten(0, 1), order, chunk, filler=True, heads=heads)
    out = expd @ windows(value_rows, chunk).transpose(-1, -2)  # (G, c, dv), unnormalised
    del scores, expd, value_rows
    return combine_rounds(out, total, lse, order, slot, n).view(B, H, n, -1)


def value_heads(batch: int, heads: int, kv_heads: int, device):
    """(B * H,): the value head (b, h // (H / KV)) each query head (b, h) reads; None when
    every query head has its own."""
    if kv_heads == heads:
        return None
    b, h = torch.arange(batch, device=device), torch.arange(heads, device=device)
    return (b[:, None] * kv_heads + h[None, :] // (heads // kv_heads)).reshape(-1)


def shared_keys_and_buckets(q, rotations):
    """The shared-QK keys q / |q| (BH, n, d) in q's dtype and their buckets (R, BH, n), both
    from keys normalised and hashed in float32 at least: in half precision the norm and the
    projection would move positions to other buckets (other windows), so the attention would
    depend on the dtype (bfloat16 flipped 0.04% of buckets, 16-33% output error)."""
    wide = torch.promote_types(q.dtype, torch.float32)
    keys = q.to(wide)
    keys = keys / keys.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(wide).tiny)
    buckets = hash_buckets(keys, rotations.to(device=q.device, dtype=wide))
    return keys.to(q.dtype), buckets


def exp_floor(dtype) -> float:
    """Half the exponent range of float32 (or of float64): float16's own range is too narrow
    to serve (its floor would be e^-4.9), and e^-43.7 rounds to 0 in half precision anyway."""
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    return math.log(torch.finfo(wide).tiny) / 2


def exp_scores(scores):
    """exp(scores - row max) in place (a fresh rounds-by-n-by-2c buffer costs more than the
    extra pass: its pages are new), with each row's sum and log-sum-exp. The max is only a
    stabiliser: detached, the lse's gradient is still exactly the softmax.

    Exponents are clamped first, at half the dtype's exponent range (-43.7 in float32): CPU exp
    is ~6x slower on inputs that underflow (the masked pairs), and a probability near the
    smallest normal (e^-80) turns the backward's products into subnormals, which made a
    training step of the LRA text model 3x slower on small activations (subnormal arithmetic
    is slow on CPUs). e^-43.7 ~ 1e-19 is still 0 next to the row's e^0 = 1 in float32. Outside
    autograd: recorded, the in-place clamp would save a copy of the scores."""
    top = scores.amax(-1, keepdim=True).detach()  # (G, c, 1)
    scores.sub_(top)
    with torch.no_grad():  # numerical only (value and gradient are ~0 below the floor)
        scores.clamp_min_(exp_floor(scores.dtype))
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
    # The call computes every slot of its windows: padding, hidden (causal) and duplicate pairs,
    # and each chunk 0's look-back, all masked; flops() counts the visible pairs only.
    counted_equals_analytic = False

    def __init__(self, cfg: ReformerConfig):
        super().__init__(cfg)
        self._rotations = {}  # (d, nb) -> rotations: drawn once per shape from the seed

    def rotations(self, dim: int, seq_len: int) -> torch.Tensor:
        nb = num_buckets(seq_len, self.cfg.bucket_size)
        if (dim, nb) not in self._rotations:
            self._rotations[dim, nb] = random_rotations(dim, self.cfg.n_hashes, nb, self.cfg.seed)
        return self._rotations[dim, nb]

    def attend(self, q, k, v, causal):  # k is not used: keys are q / |q| (shared QK)
        n = q.shape[-2]
        if v.shape[-2] != n:
            raise Unsupported(
                f"reformer: shared-QK self-attention: keys are the queries, so values must be "
                f"as long as queries; q has {n} positions and v {v.shape[-2]}"
            )
        rotations = self.rotations(q.shape[-1], n)
        return lsh_attention(q, v, rotations, min(self.cfg.bucket_size, n), causal)

    def decode_unsupported(self, *, device="cpu", dtype=torch.float32):
        return [
            "no autoregressive form: a position's buckets, sort order and so its window depend "
            "on where every position of the sequence hashes, later ones included, so a prefix "
            "cannot be continued token by token"
        ]

    def _shape(self, seq_len):
        chunk = min(self.cfg.bucket_size, seq_len)
        padded = -(-seq_len // chunk) * chunk
        return chunk, padded, num_buckets(seq_len, self.cfg.bucket_size)

    def flops(
        self, *, batch, heads, seq_len, head_dim, causal=False, backward=False, kv_heads=None
    ):
        """Hashing (x R, no gradient) plus softmax attention over the visible pairs: the union
        of the rounds' windows, without padding, the own key (hidden unless alone) or the
        look-back of chunk 0. Which pairs the rounds share depends on where the data hashes,
        which a count from shapes cannot see: the union is its expectation for rounds that hash
        independently, (n - 1) (1 - (1 - w / (n - 1))^R) keys per query with w the other keys
        of one window (within 1.5% of the real union on Gaussian inputs, n = 1024 .. 16384,
        causal or not; inputs whose neighbours collide in every round share more pairs, so
        they see fewer). Causal: half of them, the expectation when the sorted order is
        independent of the original one."""
        chunk, padded, nb = self._shape(seq_len)
        n, rounds = seq_len, self.cfg.n_hashes
        hashing = 2 * batch * heads * n * head_dim * rounds * (nb // 2)
        if n == 1:
            return hashing  # a single position attends to itself only
        last = n - (padded // chunk - 1) * chunk  # real slots of the last chunk
        # Real keys per window, summed over real queries: chunk 0 sees itself, a later chunk
        # itself and the one before it (padding excepted); the own key is not counted.
        window = chunk * chunk if padded > chunk else n * n
        window += (padded // chunk - 2) * chunk * 2 * chunk if padded > 2 * chunk else 0
        window += last * (chunk + last) if padded > chunk else 0
        w = (window - n) / n
        union = n * (n - 1) * (1 - (1 - w / (n - 1)) ** rounds)
        pairs = round(union / 2 if causal else union)
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
        """The largest of the call's moments, from the tensors live then: hashing (the keys,
        the buckets and one block of projections, in float32 at least), masking (the scores,
        the boolean masks of hidden and duplicate pairs and their scratch) and the values
        (scores exponentiated in place, the gathered values and the rounds' outputs). With
        autograd, the backward through the values (the sorted queries, keys and values and the
        scores kept for it, the scores' gradient and the windows' gradient, as wide as the
        windows, with the rounds' output gradient) or through the scores (the exponentiated
        scores, their gradient and the scores'). Key/value heads: the values are gathered, so
        kv_heads changes no size here. Checked against live tensor bytes (tests/test_contract.py;
        n = 1024 .. 65536 by hand)."""
        chunk, N, nb = self._shape(seq_len)
        R, n, d, BH = self.cfg.n_hashes, seq_len, head_dim, batch * heads
        size, wide = itemsize(dtype), max(itemsize(dtype), 4)
        slots = R * BH * N  # sorted positions over all rounds
        S = slots * 2 * chunk  # scores
        rows = (slots + chunk) * d  # one gathered copy of the queries, keys or values
        index = 2 * slots * 8 + 2 * slots * size  # order and slot (int64), sums and lse
        keys = BH * n * d * (size + (2 * wide if wide > size else 0))  # half: float32 copies
        half = nb // 2  # projections per round
        block = min(n, max(1, HASH_BLOCK // (BH * R * half))) * BH * R * half  # as hash_buckets
        hashing = keys + slots * 8 + block * wide + 4 * block // half * 8  # + its max and min
        masks = S * (2 * R - 1) // R if (causal or R > 1) else 0  # bool
        masking = keys + index + S * size + masks + slots * 2
        # Half precision: the CPU's bmm copies a product's unfolded windows (S d / c).
        windows = S * d // chunk if size < 4 else 0
        values = index + (S + 2 * rows + windows) * size
        if not backward:
            return max(hashing, masking, values)
        out = BH * N * d  # the sum of the rounds, whose view is the output
        through_values = S * (2 + d / chunk) + 4 * rows + out + windows
        through_scores = 3 * S + 2 * rows + 2 * out + windows
        kept = index + (BH * n * d * wide if wide > size else 0)  # half: q in float32
        return max(hashing, masking, kept + int(max(through_values, through_scores)) * size)
