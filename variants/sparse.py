"""``sparse``: block-sparse attention, computed block by block (never a dense n x n mask).

The sequence is cut into ``nb`` blocks of ``block_size`` positions and a boolean block layout
(heads or 1, nb, nb) says which key blocks each query block sees:

- ``fixed`` (Child et al. 2019): a block sees the blocks of its own period of ``stride`` blocks
  and the last ``num_summary_blocks`` ("summary") blocks of every period. Causal: only blocks
  at or before it. Non-causal, made symmetric: summary blocks also see every block.
- ``strided`` (Child et al. 2019): the previous ``stride`` blocks and every ``stride``-th block
  before (non-causal: both directions, symmetric).
- ``bigbird`` (Zaheer et al. 2020, bidirectional only): a window of ``num_window_blocks`` blocks,
  ``num_global_blocks`` global blocks (the first and last ones) that see and are seen by every
  block, and ``num_random_blocks`` random key blocks per query block, drawn per head from
  ``seed`` as the reference implementation does: its layout is (heads, nb, nb).

``stride=None`` takes about sqrt(nb) blocks, as the paper picks l ~ sqrt(n): a row sees ~2 sqrt(nb)
blocks, so fixed and strided cost n sqrt(n); bigbird's rows see a constant number: linear.

Inside, query blocks are computed in tiles of a few blocks that share one gathered list of key
blocks (the union of what they see; blocks with identical layout rows make ideal tiles). Tiles
are grouped by how many key blocks they see, each list padded to its group's longest with a
validity mask, and a batched matmul per group (in rounds of bounded size) does the work; a group
that sees most of the sequence uses the keys in place. The tiling is chosen per length by a cost
model. A plan keeps only block-level facts (tiles, key lists, which block pairs are seen); each
round makes its own token-level mask (padding, and the causal triangle of diagonal blocks), so
a plan stays small at any length and a few recent ones are kept.

Grouped heads: with one layout for every head, the G query heads of a key/value head are
stacked into one tile of rows against the same gathered keys (k and v are not copied per query
head); with BigBird's per-head layouts each query head gathers its own key blocks from its
key/value head. Backward is a custom autograd Function (FlashAttention's scheme): it keeps q,
k, v and the output, recomputes each round's probabilities and adds the gradients back onto the
blocks they came from, so fwd_bwd memory is O(n d) plus one round. Decoding (fixed and strided
with an explicit ``stride``: the layout of a block must not change as the sequence grows) keeps
a KV cache and attends the new token to the key positions its block row sees.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .common import (
    add_bmm,
    ceiling,
    itemsize,
    pad_to_multiple,
    softmax_,
    softmax_flops,
    softmax_scale,
)
from .full import dense_attention
from .registry import Attention, Common, KVCacheDecoding, Unsupported, register

PATTERNS = ("fixed", "strided", "bigbird")
MAX_GROUPS = 4  # row groups of different widths: less padding, few enough matmul calls
PLANS_KEPT = 4  # plans (and tilings) kept per module: the lengths a sweep is measuring


@dataclass
class SparseConfig(Common):
    pattern: str = "fixed"  # "fixed" or "strided" (Child et al. 2019), "bigbird" (Zaheer et al.)
    block_size: int = 64  # positions per block; the layout is over blocks
    stride: int | None = None  # fixed/strided period in blocks; None: about sqrt(number of blocks)
    num_summary_blocks: int = 1  # fixed: last blocks of each period that every later block sees
    num_window_blocks: int = 3  # bigbird: sliding window in blocks (own block and 1 each side)
    num_global_blocks: int = 2  # bigbird: global blocks (first and last), see and seen by all
    num_random_blocks: int = 2  # bigbird: random key blocks per query block, drawn from seed

    def __post_init__(self):
        if self.pattern not in PATTERNS:
            raise ValueError(f"sparse: pattern must be one of {PATTERNS}, got {self.pattern!r}")
        counts = ("block_size", "num_summary_blocks", "num_window_blocks")
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"sparse: {name} must be >= 1, got {getattr(self, name)}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"sparse: stride must be >= 1 or None, got {self.stride}")
        if self.num_global_blocks < 0 or self.num_random_blocks < 0:
            raise ValueError("sparse: num_global_blocks and num_random_blocks must be >= 0")


# --- layouts: (heads or 1, nb, nb) bool, True where query block I sees key block J ---------
def default_stride(nb: int) -> int:
    return max(1, round(math.sqrt(nb)))


def _grid(nb: int):
    return torch.arange(nb)[:, None], torch.arange(nb)[None, :]  # query block qb, key block kb


def fixed_rule(qb, kb, stride: int, summary: int, causal: bool) -> torch.Tensor:
    """Whether query blocks qb see key blocks kb (broadcast index tensors): the same period,
    or a summary block (the last ``summary`` of a period)."""
    same_period = qb // stride == kb // stride
    summarises = lambda x: x % stride >= stride - min(summary, stride)
    if causal:
        return (same_period | summarises(kb)) & (kb <= qb)
    return same_period | summarises(kb) | summarises(qb)  # summaries see all: symmetric


def strided_rule(qb, kb, stride: int, causal: bool) -> torch.Tensor:
    """The previous ``stride`` blocks and every ``stride``-th one (non-causal: both ways)."""
    offset = qb - kb
    recent = (offset >= 0) & (offset < stride) if causal else offset.abs() < stride
    every_stride = offset % stride == 0
    return (recent | every_stride) & (kb <= qb) if causal else recent | every_stride


def bigbird_layout(
    nb: int, window: int, globals_: int, random: int, seed: int, heads: int
) -> torch.Tensor:
    """(heads, nb, nb): window and global blocks shared, random blocks drawn per head."""
    qb, kb = _grid(nb)
    layout = (qb - kb).abs() <= window // 2
    is_global = torch.zeros(nb, dtype=torch.bool)
    is_global[: (globals_ + 1) // 2] = True  # the first blocks, and the last ones for the rest
    is_global[nb - globals_ // 2 :] = True
    layout = (layout | is_global[None, :] | is_global[:, None]).expand(heads, nb, nb).clone()
    if random > 0:
        # r blocks per row drawn uniformly among those not yet seen: seen ones get a key of 2,
        # above every uniform draw, so topk of the smallest picks them only when nothing is left
        g = torch.Generator().manual_seed(seed)
        keys = torch.rand(heads, nb, nb, generator=g).masked_fill(layout, 2.0)
        picks = keys.topk(min(random, nb), dim=2, largest=False).indices  # (heads, nb, r)
        layout.scatter_(2, picks, True)
    return layout


# --- row groups: rows of similar width computed together -------------------------------------
def group_rows(counts: torch.Tensor, max_groups: int = MAX_GROUPS) -> list[torch.Tensor]:
    """Split the block rows into at most ``max_groups`` groups of similar width (the number of
    key blocks a row sees). Every row of a group is padded to the group's widest, so the work is
    the sum over groups of rows x widest: minimised by dynamic programming over the rows sorted
    by width. A split into more groups is kept only if it saves over 10% (each group is one more
    round of matmuls)."""
    order = counts.argsort(stable=True)
    width = counts[order].double()  # ascending: a group [i, j) is as wide as row j - 1
    m = len(width)
    i = torch.arange(m, dtype=torch.float64)[:, None]  # a group's first row
    j = torch.arange(1, m + 1, dtype=torch.float64)[None, :]  # one past its last row
    group_cost = (width[None, :] * (j - i)).masked_fill(i >= j, math.inf)  # (m, m)
    best = torch.full((m + 1,), math.inf, dtype=torch.float64)  # rows [0, j) in exactly g groups
    best[0] = 0.0
    splits = []  # per g: (cost of all m rows in g groups, where each prefix's last group starts)
    for _ in range(min(max_groups, m)):
        total, start = (best[:-1, None] + group_cost).min(dim=0)  # over the start i, for each j
        best = torch.cat([best.new_full((1,), math.inf), total])
        splits.append((float(best[m]), start))
    cheapest = min(cost for cost, _ in splits)
    g = next(g for g, (cost, _) in enumerate(splits, 1) if cost <= 1.1 * cheapest)
    groups, end = [], m
    for level in reversed(range(g)):  # walk the split back from the last group
        begin = int(splits[level][1][end - 1])
        groups.append(order[begin:end])
        end = begin
    return groups[::-1]


def block_lists(layout_rows: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, nb) bool -> (R, width) visible key block indices (ascending) and their validity;
    short rows are padded with an arbitrary block, marked invalid."""
    seen, index = layout_rows.to(torch.uint8).sort(dim=1, descending=True, stable=True)
    return index[:, :width], seen[:, :width].bool()


# --- plans: which query blocks are computed together, against which key blocks --------------
# A tile is ``size`` query blocks computed against one gathered key list, the union of what they
# see: the gathered keys are then shared by every block of the tile. Tiles of blocks that see
# the same key blocks cost nothing extra (fixed's blocks of one period); a block may repeat in
# a tile to fill it (its copy's output is not used).
SCORE_BUDGET = 2**22  # score elements per matmul round (16 MB fp32): bounds the transient memory
# and keeps a round near the cache; 2**26 was ~1.7x slower at n=16384 (bigbird, 2 cores)


@dataclass
class Group:
    """Tiles computed by one batched matmul (per round), each against ``W`` key blocks."""

    tiles: torch.Tensor  # (R, size) query block indices, the same for every head
    keys: torch.Tensor | None  # (L, R, W) key blocks per layout head; None: every key (dense)
    seen: torch.Tensor  # (L, R, size, W or nb) bool: which of those blocks each block sees
    repeat: torch.Tensor  # (R, size, 1) bool: a block's extra copy in its tile


@dataclass
class Plan:
    groups: list[Group]
    n: int
    b: int
    causal: bool

    @property
    def nb(self) -> int:
        return -(-self.n // self.b)


def consecutive_tiles(layout: torch.Tensor, size: int) -> torch.Tensor:
    """(ntiles, size): blocks 0..size-1, size..2 size-1, ...; the last block fills the last tile."""
    nb = layout.shape[-1]
    return torch.arange(-(-nb // size) * size).clamp_max(nb - 1).view(-1, size)


def alike_tiles(layout: torch.Tensor, size: int) -> torch.Tensor:
    """(ntiles, size): blocks with identical layout rows (in every head) together, a class's
    last tile filled with its last block, so no tile mixes two key lists."""
    rows = layout.transpose(0, 1).flatten(1)  # (nb, heads * nb)
    _, cls = torch.unique(rows, dim=0, return_inverse=True)
    tiles = []
    for c in range(int(cls.max()) + 1):
        blocks = (cls == c).nonzero().view(-1)
        fill = blocks[-1:].expand((-len(blocks)) % size)
        tiles.append(torch.cat([blocks, fill]).view(-1, size))
    return torch.cat(tiles)


def _dense(width: int, nb: int) -> bool:
    return 2 * width >= nb  # seeing most blocks: use the keys in place, gathering would copy


def _tile_groups(layout: torch.Tensor, tiles: torch.Tensor):
    """Yield (tile rows, their key-block unions (L, R, nb), the widest), one per row group."""
    union = layout[:, tiles].any(2)  # (L, ntiles, nb): the key blocks a tile sees, per head
    counts = union.sum(-1).amax(0)
    for rows in group_rows(counts):
        rows = rows.sort().values
        yield rows, union[:, rows], int(counts[rows].max())


def tiling_cost(layout, tiles: torch.Tensor, b: int, head_dim: int) -> float:
    """Elements written and read: every tile's scores against its padded key list, plus the
    gathered keys and values (what makes one-block tiles expensive)."""
    nb, size = layout.shape[-1], tiles.shape[1]
    cost = 0.0
    for rows, _, width in _tile_groups(layout, tiles):
        dense = _dense(width, nb)
        keys = nb if dense else width
        cost += len(rows) * size * b * keys * b  # scores
        cost += 0 if dense else 2 * len(rows) * keys * b * head_dim  # gathered k and v
    return cost


def choose_tiles(layout: torch.Tensor, b: int, head_dim: int, period: int | None):
    """The cheapest tiling among consecutive and alike tiles of a few sizes."""
    nb = layout.shape[-1]
    sizes = sorted({t for t in (1, 2, 4, 8, 16, period) if t is not None and t <= nb})
    options = [make(layout, t) for t in sizes for make in (consecutive_tiles, alike_tiles)]
    return min(options, key=lambda tiles: tiling_cost(layout, tiles, b, head_dim))


def plan_groups(layout, tiles: torch.Tensor, n: int, b: int, causal: bool, device) -> Plan:
    """Row groups of tiles, each with its key lists and block-level visibility."""
    nb = layout.shape[-1]
    parts = []
    for rows, union, width in _tile_groups(layout, tiles):
        blocks = tiles[rows]  # (R, size)
        seen = layout[:, blocks]  # (L, R, size, nb)
        keys = None
        if not _dense(width, nb):
            keys, ok = block_lists(union.flatten(0, 1), width)
            keys, ok = keys.view(*union.shape[:2], width), ok.view(*union.shape[:2], width)
            picked = keys[:, :, None, :].expand(-1, -1, blocks.shape[1], -1)
            seen = seen.gather(3, picked) & ok[:, :, None, :]  # (L, R, size, W)
        parts.append((blocks, keys, seen))
    flat = torch.cat([blocks.flatten() for blocks, _, _ in parts])  # in the order outputs come
    first = torch.full((nb,), len(flat)).scatter_reduce(0, flat, torch.arange(len(flat)), "amin")
    repeat = (first[flat] != torch.arange(len(flat))).split([p[0].numel() for p in parts])
    groups = [
        Group(
            blocks.to(device),
            None if keys is None else keys.to(device),
            seen.to(device),
            again.view(*blocks.shape, 1).to(device),
        )  # fmt: skip
        for (blocks, keys, seen), again in zip(parts, repeat, strict=True)
    ]
    return Plan(groups, n, b, causal)


def round_hidden(plan: Plan, g: Group, rows: slice) -> torch.Tensor:
    """(L, r, size, b or 1, keys/b, b) bool: the token pairs a round of tiles must not see.

    A key outside the seen blocks or past n (padding); causal, also a key after its query in
    the diagonal block. Padded query rows see their own block's real keys, so no row is all
    -inf. Non-causal, the mask does not depend on the query row: one row broadcasts."""
    b, device = plan.b, g.seen.device
    tiles, seen = g.tiles[rows], g.seen[:, rows]  # (r, size), (L, r, size, K)
    blocks = torch.arange(plan.nb, device=device)[None, None] if g.keys is None else g.keys[:, rows]
    k_pos = blocks[..., None] * b + torch.arange(b, device=device)  # (L or 1, r or 1, K, b)
    hidden = ~(seen[..., None] & (k_pos < plan.n)[:, :, None])[:, :, :, None]  # (L,r,size,1,K,b)
    if plan.causal:
        diagonal = blocks[:, :, None, :] == tiles[None, :, :, None]  # (L, r, size, K)
        ahead = torch.ones(b, b, dtype=torch.bool, device=device).triu(1)  # key after query
        hidden = hidden | (diagonal[:, :, :, None, :, None] & ahead[:, None, :])
    return hidden


# --- the computation ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Heads:
    """How heads meet the layout. One layout for every head (L = 1): the G query heads of a
    key/value head share its gathered keys, X = KV groups of G = Gx rows each. A layout per
    head (L = H): each query head gathers its own keys from its key/value head, X = H, Gx = 1."""

    B: int
    H: int
    KV: int
    per_head: bool

    @property
    def X(self) -> int:
        return self.H if self.per_head else self.KV

    @property
    def Gx(self) -> int:
        return 1 if self.per_head else self.H // self.KV


def query_rows(x: torch.Tensor, heads: Heads, b: int) -> torch.Tensor:
    """(B, H, N, d) padded -> (B, X, nb, Gx*b*d): each block's positions of the Gx query heads
    of a group in one row, so a gather of blocks gathers every head of the group (a copy only
    when G query heads are stacked)."""
    B, H, N, d = x.shape
    if heads.Gx == 1:
        return x.view(B, heads.X, N // b, b * d)
    x = x.view(B, heads.KV, heads.Gx, N // b, b * d).transpose(2, 3)
    return x.reshape(B, heads.KV, N // b, heads.Gx * b * d)


def unrows(x: torch.Tensor, heads: Heads, n: int, d: int) -> torch.Tensor:
    """Inverse of :func:`query_rows`, padding dropped: (B, H, n, d), contiguous."""
    B, X, nb, _ = x.shape
    x = x.view(B, X, nb, heads.Gx, -1).transpose(2, 3).reshape(B, heads.H, -1, d)
    return x[:, :, :n].contiguous()


class Round:
    """One batched product over tiles ``rows`` of group ``g``, in 3-d (batch, rows, d) form:
    per (batch, group, tile) against the tile's gathered key blocks, or, for a dense group, per
    (batch, key/value head) against every key in place."""

    def __init__(self, plan: Plan, g: Group, rows: slice, heads: Heads, d: int):
        self.plan, self.heads, self.d = plan, heads, d
        self.tiles, self.repeat = g.tiles[rows], g.repeat[rows]  # (r, size), (r, size, 1)
        self.hidden = round_hidden(plan, g, rows)  # (L, r, size, b or 1, K/b, b)
        self.cap = None  # its ceiling, made in the scores' dtype on first use
        r = self.tiles.shape[0]
        self.dense = g.keys is None
        self.batches = heads.B * (heads.KV if self.dense else heads.X * r)
        if not self.dense:  # block indices into (B, KV * nb, b*d): the key/value head of each X
            kv_of = torch.arange(heads.X, device=g.keys.device) // (heads.X // heads.KV)
            keys = g.keys[:, rows].expand(heads.X, -1, -1)  # (X, r, W)
            self.key_index = (kv_of[:, None, None] * plan.nb + keys).flatten()

    def rows(self, xr: torch.Tensor) -> torch.Tensor:
        """(B, X, nb, Gx*b*d) -> the round's query-side rows (batches, rows, d), a copy."""
        return xr.index_select(2, self.tiles.flatten()).view(self.batches, -1, self.d)

    def put_rows(self, xr: torch.Tensor, y: torch.Tensor, add: bool) -> None:
        """Write (add) the round's rows back into (B, X, nb, Gx*b*d); a block's repeated copy
        writes the same values (forward) or zero (backward, its gradient masked)."""
        B, X, _, L = xr.shape
        y = y.view(B, X, -1, L)
        if add:
            xr.index_add_(2, self.tiles.flatten(), y)
        else:
            xr.index_copy_(2, self.tiles.flatten(), y)

    def keys(self, xf: torch.Tensor) -> torch.Tensor:
        """(B, KV, N, d) -> (batches, keys, d): in place for a dense group, else gathered."""
        B, KV, N, d = xf.shape
        if self.dense:
            return xf.view(self.batches, N, d)
        flat = xf.view(B, KV * self.plan.nb, -1)
        return flat.index_select(1, self.key_index).view(self.batches, -1, d)

    def put_keys(self, dxf: torch.Tensor, y: torch.Tensor) -> None:
        """Add gathered key-side gradients (batches, keys, d) back onto (B, KV, N, d)."""
        B, KV = dxf.shape[:2]
        dxf.view(B, KV * self.plan.nb, -1).index_add_(
            1, self.key_index, y.view(B, -1, y.shape[-1] * self.plan.b)
        )

    def probs(self, qs, ks, buf, scale: float) -> torch.Tensor:
        """(batches, rows, keys) probabilities in ``buf``: scaled q k^T, hidden pairs set to
        -inf by a :func:`variants.common.ceiling` cap (never a -inf bias, which gives NaN where
        q.k overflows), softmax in place."""
        s = buf[: self.batches * qs.shape[1] * ks.shape[1]].view(self.batches, qs.shape[1], -1)
        add_bmm(s, qs, ks.transpose(1, 2), beta=0, alpha=scale)
        B, X, Gx, b = self.heads.B, self.heads.X, self.heads.Gx, self.plan.b
        r, size = self.tiles.shape
        grid = s.view(B, X, r, size, Gx, b, -1, b)
        if self.cap is None:
            self.cap = ceiling(self.hidden, s.dtype)[:, :, :, None]
        grid.clamp_max_(self.cap)
        return softmax_(s)

    def drop_repeats(self, rows: torch.Tensor) -> torch.Tensor:
        """Zero the rows of blocks' repeated copies (their outputs are not used)."""
        B, X = self.heads.B, self.heads.X
        r, size = self.tiles.shape
        rows.view(B, X, r, size, -1).masked_fill_(self.repeat, 0)
        return rows


def rounds(plan: Plan, heads: Heads, d: int):
    """The rounds of every group: as many tiles as fit SCORE_BUDGET score elements."""
    for g in plan.groups:
        for r in range(0, len(g.tiles), round_tiles(plan, g, heads)):
            yield Round(plan, g, slice(r, r + round_tiles(plan, g, heads)), heads, d)


def round_tiles(plan: Plan, g: Group, heads: Heads) -> int:
    keys = plan.nb if g.keys is None else g.keys.shape[-1]
    per_tile = heads.B * heads.H * g.tiles.shape[1] * plan.b * keys * plan.b
    return max(1, SCORE_BUDGET // per_tile)


def round_buffer(plan: Plan, heads: Heads, like: torch.Tensor) -> torch.Tensor:
    """One buffer as large as the largest round's scores, reused by every round."""
    most = 0
    for g in plan.groups:
        keys = plan.nb if g.keys is None else g.keys.shape[-1]
        tiles = min(len(g.tiles), round_tiles(plan, g, heads))
        most = max(most, heads.B * heads.H * tiles * g.tiles.shape[1] * plan.b * keys * plan.b)
    return like.new_empty(most)


def padded(x: torch.Tensor, b: int) -> torch.Tensor:
    return pad_to_multiple(x, b)[0].contiguous()


def sparse_forward(q, k, v, plan: Plan, heads: Heads):
    b, d = plan.b, q.shape[-1]
    scale = softmax_scale(d)
    qr, kf, vf = query_rows(padded(q, b), heads, b), padded(k, b), padded(v, b)
    out = torch.empty_like(qr)
    buf = round_buffer(plan, heads, q)
    for rnd in rounds(plan, heads, d):
        p = rnd.probs(rnd.rows(qr), rnd.keys(kf), buf, scale)
        rnd.put_rows(out, torch.bmm(p, rnd.keys(vf)), add=False)
    return out


def sparse_backward(q, k, v, out, grad_out, plan: Plan, heads: Heads):
    """Gradients (row form for q, padded for k and v), each round's probabilities recomputed:
    dS = P * (dO V^T - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO."""
    b, d = plan.b, q.shape[-1]
    scale = softmax_scale(d)
    qr, kf, vf = query_rows(padded(q, b), heads, b), padded(k, b), padded(v, b)
    o_rows, do_rows = (query_rows(padded(x, b), heads, b) for x in (out, grad_out))
    dq, dk, dv = torch.zeros_like(qr), torch.zeros_like(kf), torch.zeros_like(vf)
    buf = round_buffer(plan, heads, q)
    grad_buf = torch.empty_like(buf)
    for rnd in rounds(plan, heads, d):  # a function per round: its gathers go with it
        backward_round(rnd, (qr, kf, vf, o_rows, do_rows), (dq, dk, dv), buf, grad_buf, scale)
    return dq, dk, dv


def backward_round(rnd: Round, inputs, grads, buf, grad_buf, scale: float) -> None:
    """One round's share of the gradients, added into ``grads`` (see :func:`sparse_backward`)."""
    qr, kf, vf, o_rows, do_rows = inputs
    dq, dk, dv = grads
    wide = torch.promote_types(qr.dtype, torch.float32)  # row sums of a half type in float32
    qs, ks, vs = rnd.rows(qr), rnd.keys(kf), rnd.keys(vf)
    p = rnd.probs(qs, ks, buf, scale)
    do = rnd.drop_repeats(rnd.rows(do_rows))
    ds = grad_buf[: p.numel()].view(p.shape)
    torch.bmm(do, vs.transpose(1, 2), out=ds)
    ds.sub_((do * rnd.rows(o_rows)).sum(-1, keepdim=True, dtype=wide)).mul_(p)
    rnd.put_rows(dq, torch.bmm(ds, ks).mul_(scale), add=True)
    if rnd.dense:  # the keys were used in place: accumulate in place
        add_bmm(rnd.keys(dk), ds.transpose(1, 2), qs, alpha=scale)
        add_bmm(rnd.keys(dv), p.transpose(1, 2), do)
    else:
        rnd.put_keys(dk, torch.bmm(ds.transpose(1, 2), qs).mul_(scale))
        rnd.put_keys(dv, torch.bmm(p.transpose(1, 2), do))


class SparseFunction(torch.autograd.Function):
    """Block-sparse attention of (B, H, n, d) q and (B, KV, n, d) k, v under ``plan``."""

    @staticmethod
    def forward(ctx, q, k, v, plan: Plan, per_head: bool):
        heads = Heads(q.shape[0], q.shape[1], k.shape[1], per_head)
        out = unrows(sparse_forward(q, k, v, plan, heads), heads, q.shape[2], v.shape[-1])
        ctx.save_for_backward(q, k, v, out)
        ctx.plan, ctx.heads = plan, heads
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out = ctx.saved_tensors
        n = q.shape[2]
        dq, dk, dv = sparse_backward(q, k, v, out, grad_out.contiguous(), ctx.plan, ctx.heads)
        dq = unrows(dq, ctx.heads, n, q.shape[-1])
        return dq, dk[:, :, :n].contiguous(), dv[:, :, :n].contiguous(), None, None


class Recent(OrderedDict):
    """The ``size`` most recently used entries (plans and tilings: small, block-level)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def recall(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        if len(self) > self.size:
            self.popitem(last=False)
        return value


# --- the module -----------------------------------------------------------------------------
@register("sparse", config=SparseConfig)
class Sparse(KVCacheDecoding, Attention):
    # Tiles share padded key lists and diagonal blocks are computed whole and masked: the call
    # computes more products than the visible pairs flops() counts.
    counted_equals_analytic = False

    def __init__(self, cfg: SparseConfig):
        super().__init__(cfg)
        self._plans = Recent(PLANS_KEPT)  # (n, head_dim, causal, device) -> Plan
        self._tilings = Recent(PLANS_KEPT)  # (n, head_dim, causal) -> the chosen tiles

    def num_blocks(self, seq_len: int) -> int:
        return -(-seq_len // self.cfg.block_size)

    def stride(self, nb: int) -> int:
        return self.cfg.stride or default_stride(nb)

    @property
    def layout_heads(self) -> int:
        """Heads with a layout of their own: BigBird's random blocks are drawn per head."""
        return self.cfg.num_heads if self.cfg.pattern == "bigbird" else 1

    def rule(self, qb, kb, causal: bool, stride: int) -> torch.Tensor:
        """fixed / strided visibility of key blocks kb from query blocks qb."""
        if self.cfg.pattern == "fixed":
            return fixed_rule(qb, kb, stride, self.cfg.num_summary_blocks, causal)
        return strided_rule(qb, kb, stride, causal)

    def layout(self, seq_len: int, causal: bool = False) -> torch.Tensor:
        """The (heads or 1, nb, nb) block layout for ``seq_len`` positions (deterministic for a
        seed)."""
        cfg, nb = self.cfg, self.num_blocks(seq_len)
        if cfg.pattern == "bigbird":
            return bigbird_layout(
                nb,
                cfg.num_window_blocks,
                cfg.num_global_blocks,
                cfg.num_random_blocks,
                cfg.seed,
                cfg.num_heads,
            )
        return self.rule(*_grid(nb), causal, self.stride(nb))[None]

    def dense_mask(self, seq_len: int, causal: bool = False) -> torch.Tensor:
        """The (heads or 1, n, n) bool pairs attended; for tests and pictures."""
        b = self.cfg.block_size
        mask = self.layout(seq_len, causal).repeat_interleave(b, 1).repeat_interleave(b, 2)
        mask = mask[:, :seq_len, :seq_len]
        if causal:
            mask &= torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
        return mask

    def unsupported(
        self, *, device="cpu", dtype=torch.float32, causal=False, seq_len=None, kv_heads=None
    ):
        reasons = super().unsupported(
            device=device, dtype=dtype, causal=causal, seq_len=seq_len, kv_heads=kv_heads
        )
        if causal and self.cfg.pattern == "bigbird":
            reasons.append(
                "bigbird's global and random blocks look ahead, so it has no causal form "
                "(Zaheer et al. use it for encoders); use pattern='fixed' or 'strided' for causal"
            )
        return reasons

    def decode_unsupported(self, *, device="cpu", dtype=torch.float32) -> list[str]:
        reasons = super().decode_unsupported(device=device, dtype=dtype)
        if self.cfg.pattern != "bigbird" and self.cfg.stride is None:
            reasons.append(
                "the default stride (about sqrt(number of blocks)) grows with the sequence, so "
                "a decoded sequence has no fixed layout; build it with an explicit stride "
                "(in blocks), e.g. stride=8"
            )
        return reasons

    def attend(self, q, k, v, causal):
        n = q.shape[-2]
        if k.shape[-2] != n:
            raise Unsupported(
                f"{self.name}: the layout is over one sequence; q has {n} positions and k "
                f"{k.shape[-2]} (use full for cross-attention)"
            )
        per_head = self.layout_heads > 1
        if per_head and q.shape[1] != self.layout_heads:
            raise Unsupported(
                f"{self.name}: bigbird draws random blocks per head and was built for "
                f"num_heads={self.layout_heads}, called with {q.shape[1]} heads; build it "
                f"with num_heads={q.shape[1]}"
            )
        plan = self.plan(n, q.shape[-1], causal, q.device)
        return SparseFunction.apply(q, k, v, plan, per_head)

    def plan(self, seq_len: int, head_dim: int, causal: bool, device="cpu") -> Plan:
        """How the layout is computed: the cheapest tiling, its row groups and their block
        visibility (a few recent plans are kept)."""

        def make():
            layout = self.layout(seq_len, causal)
            tiles = self.tiles(layout, seq_len, head_dim, causal)
            return plan_groups(layout, tiles, seq_len, self.cfg.block_size, causal, device)

        return self._plans.recall((seq_len, head_dim, causal, str(device)), make)

    def tiles(self, layout, seq_len: int, head_dim: int, causal: bool) -> torch.Tensor:
        """The cheapest tiling of the layout's query blocks (kept: the search takes a while)."""
        nb = layout.shape[-1]
        period = None if self.cfg.pattern == "bigbird" else self.stride(nb)
        return self._tilings.recall(
            (seq_len, head_dim, causal),
            lambda: choose_tiles(layout, self.cfg.block_size, head_dim, period),
        )

    # --- decoding: a KV cache, the new token's layout row -----------------------------------
    def prefill(self, q, k, v, *, output: bool = True):
        reasons = self.decode_unsupported(device=q.device, dtype=q.dtype)
        if reasons:
            raise Unsupported(f"{self.name}: " + "; ".join(reasons))
        return super().prefill(q, k, v, output=output)

    def visible_keys(self, t: int, device="cpu") -> torch.Tensor:
        """Positions the query at position t sees (its block's causal layout row, up to t)."""
        b = self.cfg.block_size
        block = t // b
        row = self.rule(torch.tensor(block), torch.arange(block + 1), True, self.cfg.stride)
        pos = (row.nonzero()[:, :1] * b + torch.arange(b)).flatten()
        return pos[pos <= t].to(device)

    def step(self, q_t, keys, values):
        """The new token, the last of the keys' sequence, against the keys its row sees. Every
        key stays cached: strided rows look back to every stride-th block, fixed ones to every
        period's summaries, so the whole past stays reachable."""
        seen = self.visible_keys(keys.shape[-2] - 1, q_t.device)
        return dense_attention(q_t, keys.index_select(2, seen), values.index_select(2, seen), False)

    # --- cost models ------------------------------------------------------------------------
    def visible_pairs(self, seq_len: int, causal: bool) -> int:
        """Pairs the dense mask holds, summed over the layout's heads, from the layout: a full
        block pair counts its query length x key length, a diagonal block under causal its
        triangle."""
        b, nb = self.cfg.block_size, self.num_blocks(seq_len)
        sizes = torch.full((nb,), b, dtype=torch.long)
        sizes[-1] = seq_len - (nb - 1) * b
        layout = self.layout(seq_len, causal).long()
        pairs = int((layout * sizes[:, None] * sizes[None, :]).sum())
        if causal:  # the diagonal blocks hold a triangle, not a square
            pairs -= layout.shape[0] * int((sizes * sizes - sizes * (sizes + 1) // 2).sum())
        return pairs

    def flops(
        self, *, batch, heads, seq_len, head_dim, causal=False, backward=False, kv_heads=None
    ):
        pairs = self.visible_pairs(seq_len, causal) * heads // self.layout_heads
        return softmax_flops(
            batch=batch, heads=1, pairs=pairs, head_dim=head_dim, backward=backward
        )

    def decode_flops(self, *, batch, heads, seq_len, head_dim, kv_heads=None):
        if self.decode_unsupported():
            return None
        pairs = len(self.visible_keys(seq_len))  # the new token is at position seq_len
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
        """Forward: the output rows, the round buffer, and the largest round's mask with its
        gathered q, k (then v and the product); copies where heads are stacked or the length
        padded. Backward, above the output: the rows of q, output and output gradient, the
        gradients, two round buffers, and the largest round's mask, gathered q, k, v, dO, O
        and their product."""
        size, kv, b = itemsize(dtype), kv_heads or heads, self.cfg.block_size
        plan = self.plan(seq_len, head_dim, causal)
        per_head = self.layout_heads > 1
        shape = Heads(batch, heads, kv, per_head)
        N = plan.nb * b
        q_rows = batch * heads * N * head_dim  # elements of a padded (B, H, N, d) tensor
        kv_padded = batch * kv * N * head_dim
        padding = N != seq_len
        rows_copy = q_rows if (shape.Gx > 1 or padding) else 0  # query_rows / unrows copies
        kv_copy = 2 * kv_padded if padding else 0
        buffer = round_buffer(plan, shape, torch.empty(0, dtype=dtype)).numel()
        fwd_round = bwd_round = 0
        for g in plan.groups:
            step = round_tiles(plan, g, shape)
            r, tile = min(step, len(g.tiles)), g.tiles.shape[1]
            keys = (plan.nb if g.keys is None else g.keys.shape[-1]) * b
            # the round's mask and its float cap, in elements of dtype
            mask = g.seen.shape[0] * r * tile * (b if causal else 1) * keys * (1 + 1 / size)
            qs = batch * heads * r * tile * b * head_dim
            ks = 0 if g.keys is None else batch * shape.X * r * keys * head_dim
            fwd_round = max(fwd_round, mask + qs + ks)  # then v and the product: as large
            # q, dO and k, v gathered, then the largest of O with dO * O, or a gradient
            bwd_round = max(bwd_round, mask + 2 * ks + 2 * qs + max(2 * qs, ks))
        forward = rows_copy + kv_copy + q_rows + buffer + fwd_round
        forward = max(forward, q_rows + rows_copy)
        if not backward:
            return int(forward * size)
        loop = 3 * rows_copy + kv_copy + q_rows + 2 * kv_padded + 2 * buffer + bwd_round
        end = q_rows + 2 * kv_padded + rows_copy + kv_copy
        q = batch * heads * seq_len * head_dim
        return int(max(forward, q + max(loop, end)) * size)
