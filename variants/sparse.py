"""``sparse``: block-sparse attention, computed block by block (never a dense n x n mask).

The sequence is cut into ``nb`` blocks of ``block_size`` positions and a boolean (nb x nb) block
layout says which key blocks each query block sees:

- ``fixed`` (Child et al. 2019): a block sees the blocks of its own period of ``stride`` blocks
  and the last ``num_summary_blocks`` ("summary") blocks of every period. Causal: only blocks
  at or before it. Non-causal, made symmetric: summary blocks also see every block.
- ``strided`` (Child et al. 2019): the previous ``stride`` blocks and every ``stride``-th block
  before (non-causal: both directions, symmetric).
- ``bigbird`` (Zaheer et al. 2020, bidirectional only): a window of ``num_window_blocks`` blocks,
  ``num_global_blocks`` global blocks (the first and last ones) that see and are seen by every
  block, and ``num_random_blocks`` random key blocks per query block drawn from ``seed``.

``stride=None`` takes about sqrt(nb) blocks, as the paper picks l ~ sqrt(n): a row sees ~2 sqrt(nb)
blocks, so fixed and strided cost n sqrt(n); bigbird's rows see a constant number: linear.

Inside, query blocks are computed in tiles of a few blocks that share one gathered list of key
blocks (the union of what they see; blocks with identical layout rows make ideal tiles). Tiles
are grouped by how many key blocks they see, each list padded to its group's longest with a
validity mask, and a batched matmul per group (in rounds of bounded size) does the work; a group
that sees most of the sequence uses the keys in place. The tiling is chosen per length by a cost
model. Causal pairs are masked token by token inside the diagonal blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .common import itemsize, pad_to_multiple, softmax_, softmax_flops, softmax_scale
from .registry import Attention, Common, Unsupported, register

PATTERNS = ("fixed", "strided", "bigbird")
MAX_GROUPS = 4  # row groups of different widths: less padding, few enough matmul calls


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


# --- layouts: (nb, nb) bool, True where query block I sees key block J ----------------------
def default_stride(nb: int) -> int:
    return max(1, round(math.sqrt(nb)))


def _grid(nb: int):
    return torch.arange(nb)[:, None], torch.arange(nb)[None, :]  # query block qb, key block kb


def fixed_layout(nb: int, stride: int, summary: int, causal: bool) -> torch.Tensor:
    qb, kb = _grid(nb)
    same_period = qb // stride == kb // stride
    is_summary = kb % stride >= stride - min(summary, stride)  # key block kb summarises its period
    if causal:
        return (same_period | is_summary) & (kb <= qb)
    return same_period | is_summary | is_summary.T  # summaries see all: the layout is symmetric


def strided_layout(nb: int, stride: int, causal: bool) -> torch.Tensor:
    qb, kb = _grid(nb)
    offset = qb - kb
    recent = (offset >= 0) & (offset < stride) if causal else offset.abs() < stride
    every_stride = offset % stride == 0
    return (recent | every_stride) & (kb <= qb) if causal else recent | every_stride


def bigbird_layout(nb: int, window: int, globals_: int, random: int, seed: int) -> torch.Tensor:
    qb, kb = _grid(nb)
    layout = (qb - kb).abs() <= window // 2
    is_global = torch.zeros(nb, dtype=torch.bool)
    is_global[: (globals_ + 1) // 2] = True  # the first blocks, and the last ones for the rest
    is_global[nb - globals_ // 2 :] = True
    layout |= is_global[None, :] | is_global[:, None]
    if random > 0:
        # r blocks per row drawn uniformly among those not yet seen: seen ones get a key of 2,
        # above every uniform draw, so topk of the smallest picks them only when nothing is left
        g = torch.Generator().manual_seed(seed)
        keys = torch.rand(nb, nb, generator=g).masked_fill(layout, 2.0)
        picks = keys.topk(min(random, nb), dim=1, largest=False).indices  # (nb, r)
        layout[torch.arange(nb)[:, None], picks] = True
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

    tiles: torch.Tensor  # (R, size) query block indices
    keys: torch.Tensor | None  # (R, W) key block indices to gather; None: every key (dense)
    hidden: torch.Tensor  # (R, size*b, W*b) bool, or (R, size*b, nb*b) when dense: masked pairs


@dataclass
class Plan:
    groups: list[Group]
    first: torch.Tensor  # (nb,) where each block's output is, in the groups' tiles, flattened


def consecutive_tiles(layout: torch.Tensor, size: int) -> torch.Tensor:
    """(ntiles, size): blocks 0..size-1, size..2 size-1, ...; the last block fills the last tile."""
    nb = layout.shape[0]
    return torch.arange(-(-nb // size) * size).clamp_max(nb - 1).view(-1, size)


def alike_tiles(layout: torch.Tensor, size: int) -> torch.Tensor:
    """(ntiles, size): blocks with identical layout rows together, a class's last tile filled
    with its last block, so no tile mixes two key lists."""
    _, cls = torch.unique(layout, dim=0, return_inverse=True)
    tiles = []
    for c in range(int(cls.max()) + 1):
        blocks = (cls == c).nonzero().view(-1)
        fill = blocks[-1:].expand((-len(blocks)) % size)
        tiles.append(torch.cat([blocks, fill]).view(-1, size))
    return torch.cat(tiles)


def _dense(width: int, nb: int) -> bool:
    return 2 * width >= nb  # seeing most blocks: use the keys in place, gathering would copy


def _tile_groups(layout: torch.Tensor, tiles: torch.Tensor):
    """Yield (tile rows, their key-block union, its width), one per row group."""
    union = layout[tiles].any(1)  # (ntiles, nb): the key blocks a tile sees
    for rows in group_rows(union.sum(1)):
        rows = rows.sort().values
        yield rows, union[rows], int(union[rows].sum(1).max())


def tiling_cost(layout, tiles: torch.Tensor, b: int, head_dim: int) -> float:
    """Elements written and read: every tile's scores against its padded key list, plus the
    gathered keys and values (what makes one-block tiles expensive)."""
    nb, size = layout.shape[0], tiles.shape[1]
    cost = 0.0
    for rows, _, width in _tile_groups(layout, tiles):
        dense = _dense(width, nb)
        keys = nb if dense else width
        cost += len(rows) * size * b * keys * b  # scores
        cost += 0 if dense else 2 * len(rows) * keys * b * head_dim  # gathered k and v
    return cost


def choose_tiles(layout: torch.Tensor, b: int, head_dim: int, period: int | None):
    """The cheapest tiling among consecutive and alike tiles of a few sizes."""
    nb = layout.shape[0]
    sizes = sorted({t for t in (1, 2, 4, 8, 16, period) if t is not None and t <= nb})
    options = [make(layout, t) for t in sizes for make in (consecutive_tiles, alike_tiles)]
    return min(options, key=lambda tiles: tiling_cost(layout, tiles, b, head_dim))


def plan_groups(layout, tiles: torch.Tensor, n: int, b: int, causal: bool, device) -> Plan:
    """Row groups of tiles, each with its key lists and token-level mask."""
    nb = layout.shape[0]
    groups = []
    for rows, union, width in _tile_groups(layout, tiles):
        blocks = tiles[rows]  # (R, size)
        q_pos = (blocks[:, :, None] * b + torch.arange(b)).flatten(1)[:, :, None]  # (R, size*b, 1)
        if _dense(width, nb):
            keys = None
            seen = layout[blocks]  # (R, size, nb)
            k_pos = torch.arange(nb * b)  # (nb*b,)
        else:
            keys, ok = block_lists(union, width)  # (R, W)
            seen = layout[blocks[:, :, None], keys[:, None, :]] & ok[:, None, :]  # (R, size, W)
            k_pos = (keys[:, :, None] * b + torch.arange(b)).flatten(1)[:, None, :]  # (R, 1, W*b)
            keys = keys.to(device)
        seen = seen.repeat_interleave(b, dim=1).repeat_interleave(b, dim=2)  # blocks to tokens
        visible = seen & (k_pos < n) & ((k_pos <= q_pos) if causal else True)
        hidden = ~visible & (q_pos < n)  # padded query rows hide nothing: no all -inf row
        groups.append(Group(blocks.to(device), keys, hidden.to(device)))
    flat = torch.cat([g.tiles.cpu() for g in groups]).flatten()  # in the order outputs come
    first = torch.full((nb,), len(flat)).scatter_reduce(0, flat, torch.arange(len(flat)), "amin")
    return Plan(groups, first.to(device))


def block_sparse_attention(q, k, v, plan: Plan, b: int):
    """Attention of (B, H, n, d) tensors over the pairs the plan leaves visible."""
    B, H, n, d = q.shape
    q, _ = pad_to_multiple(q * softmax_scale(d), b)  # (B, H, nb*b, d)
    k, _ = pad_to_multiple(k, b)
    v, _ = pad_to_multiple(v, b)
    nb = q.shape[-2] // b
    qb, kb, vb = (t.view(B, H, nb, b, d) for t in (q, k, v))
    outs = []
    for g in plan.groups:
        R, rows_per_tile, keys = g.hidden.shape
        step = max(1, SCORE_BUDGET // (B * H * rows_per_tile * keys))  # tiles per round
        for r in range(0, R, step):
            tiles = g.tiles[r : r + step]  # (r, size)
            qs = take_blocks(qb, tiles)  # (B, H, r, size*b, d)
            hidden = g.hidden[r : r + step]  # (r, size*b, keys)
            if g.keys is None:  # every key of the sequence, used in place
                s = qs.flatten(2, 3) @ k.transpose(-1, -2)  # (B, H, r*size*b, nb*b)
                p = softmax_(s.view(B, H, *hidden.shape).masked_fill_(hidden, float("-inf")))
                outs.append((p.flatten(2, 3) @ v).view(B, H, *hidden.shape[:2], d))
            else:
                ks = take_blocks(kb, g.keys[r : r + step])  # (B, H, r, W*b, d)
                vs = take_blocks(vb, g.keys[r : r + step])
                s = qs @ ks.transpose(-1, -2)  # (B, H, r, size*b, W*b)
                outs.append(softmax_(s.masked_fill_(hidden, float("-inf"))) @ vs)
    out = torch.cat(outs, dim=2).view(B, H, -1, b, d)  # (B, H, tiles*size, b, d), tile order
    return take_blocks(out, plan.first[None]).view(B, H, nb * b, d)[:, :, :n]


def take_blocks(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, H, nb, b, d) blocks, (R, W) block indices -> (B, H, R, W*b, d): block copies with
    index_select, much faster than advanced indexing's element-wise gather."""
    B, H, _, b, d = x.shape
    R, W = index.shape
    picked = x.flatten(3, 4).index_select(2, index.flatten())  # (B, H, R*W, b*d)
    return picked.view(B, H, R, W * b, d)


# --- the module -----------------------------------------------------------------------------
@register("sparse", config=SparseConfig)
class Sparse(Attention):
    def __init__(self, cfg: SparseConfig):
        super().__init__(cfg)
        self._plans: dict = {}  # (n, head_dim, causal, device) -> Plan, made on first use
        self._tilings: dict = {}  # (n, head_dim, causal) -> the chosen tiles

    def num_blocks(self, seq_len: int) -> int:
        return -(-seq_len // self.cfg.block_size)

    def stride(self, nb: int) -> int:
        return self.cfg.stride or default_stride(nb)

    def layout(self, seq_len: int, causal: bool = False) -> torch.Tensor:
        """The (nb, nb) block layout for ``seq_len`` positions (deterministic for a seed)."""
        cfg, nb = self.cfg, self.num_blocks(seq_len)
        if cfg.pattern == "fixed":
            return fixed_layout(nb, self.stride(nb), cfg.num_summary_blocks, causal)
        if cfg.pattern == "strided":
            return strided_layout(nb, self.stride(nb), causal)
        return bigbird_layout(
            nb, cfg.num_window_blocks, cfg.num_global_blocks, cfg.num_random_blocks, cfg.seed
        )

    def dense_mask(self, seq_len: int, causal: bool = False) -> torch.Tensor:
        """The (1, n, n) bool pairs attended (same for every head); for tests and pictures."""
        b = self.cfg.block_size
        mask = self.layout(seq_len, causal).repeat_interleave(b, 0).repeat_interleave(b, 1)
        mask = mask[:seq_len, :seq_len]
        if causal:
            mask &= torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
        return mask[None]

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

    def attend(self, q, k, v, causal):
        n = q.shape[-2]
        if k.shape[-2] != n:
            raise Unsupported(
                f"{self.name}: the layout is over one sequence; q has {n} positions and k "
                f"{k.shape[-2]} (use full for cross-attention)"
            )
        key = (n, q.shape[-1], causal, str(q.device))
        if key not in self._plans:
            self._plans[key] = self.plan(n, q.shape[-1], causal, q.device)
        return block_sparse_attention(q, k, v, self._plans[key], self.cfg.block_size)

    def plan(self, seq_len: int, head_dim: int, causal: bool, device="cpu") -> Plan:
        """How the layout is computed: the cheapest tiling, its row groups and their masks."""
        layout = self.layout(seq_len, causal)
        tiles = self.tiles(layout, seq_len, head_dim, causal)
        return plan_groups(layout, tiles, seq_len, self.cfg.block_size, causal, device)

    def tiles(self, layout, seq_len: int, head_dim: int, causal: bool) -> torch.Tensor:
        """The cheapest tiling of the layout's query blocks (cached: the search takes a while)."""
        key = (seq_len, head_dim, causal)
        if key not in self._tilings:
            nb = layout.shape[0]
            period = None if self.cfg.pattern == "bigbird" else self.stride(nb)
            self._tilings[key] = choose_tiles(layout, self.cfg.block_size, head_dim, period)
        return self._tilings[key]

    # --- cost models ------------------------------------------------------------------------
    def visible_pairs(self, seq_len: int, causal: bool) -> int:
        """Pairs the dense mask holds, from the layout: a full block pair counts its query
        length x key length, a diagonal block under causal its triangle."""
        b, nb = self.cfg.block_size, self.num_blocks(seq_len)
        sizes = torch.full((nb,), b, dtype=torch.long)
        sizes[-1] = seq_len - (nb - 1) * b
        layout = self.layout(seq_len, causal).long()
        pairs = int((layout * sizes[:, None] * sizes[None, :]).sum())
        if causal:  # the diagonal blocks hold a triangle, not a square
            pairs -= int((sizes * sizes - sizes * (sizes + 1) // 2).sum())
        return pairs

    def flops(
        self, *, batch, heads, seq_len, head_dim, causal=False, backward=False, kv_heads=None
    ):
        pairs = self.visible_pairs(seq_len, causal)
        return softmax_flops(
            batch=batch, heads=heads, pairs=pairs, head_dim=head_dim, backward=backward
        )

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
        """One round's scores, probabilities and gathered k and v (the largest round of any
        group), every group's mask, the padded q/k/v, the rounds' outputs and their cat."""
        size, b = itemsize(dtype), self.cfg.block_size
        layout = self.layout(seq_len, causal)
        nb = layout.shape[0]
        tiles = self.tiles(layout, seq_len, head_dim, causal)
        peak_round = masks = rows_out = 0
        for group_tiles, _, width in _tile_groups(layout, tiles):
            R, rows = len(group_tiles), tiles.shape[1] * b  # tiles, query rows per tile
            keys = nb * b if _dense(width, nb) else width * b  # key columns per query row
            step = min(R, max(1, SCORE_BUDGET // (batch * heads * rows * keys)))
            scores = 2 * batch * heads * step * rows * keys * size
            gathered = 0 if _dense(width, nb) else 2 * batch * heads * step * keys * head_dim
            peak_round = max(peak_round, scores + gathered * size)
            masks += R * rows * keys
            rows_out += R * rows
        padded = 3 * batch * heads * nb * b * head_dim
        outputs = 2 * batch * heads * rows_out * head_dim
        return peak_round + masks + (padded + outputs) * size
