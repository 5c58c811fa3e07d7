"""The masking family (``local``, ``sparse``, ``relative``) and their FlexAttention twins.

Every oracle mask and bias is built here from the definition in variants-api.md (a band from
|i - j|, layouts written out by hand, T5's buckets and ALiBi's slopes from their papers), never
from the code under test, and checked with the float64 attention of ``oracles.py``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from oracles import causal_mask, qkv, relative_error, softmax_attention

import variants

TOL = dict(rtol=1e-10, atol=1e-12)  # float64 against float64


def band(n: int, window: int, causal: bool) -> torch.Tensor:
    offset = torch.arange(n)[:, None] - torch.arange(n)[None, :]  # i - j
    return (offset >= 0) & (offset <= window) if causal else offset.abs() <= window


def expand(rows: list[str], block: int, n: int, causal: bool) -> torch.Tensor:
    """A block layout written as strings of 0/1 -> the (n, n) token mask it stands for."""
    layout = torch.tensor([[c == "1" for c in row] for row in rows])
    mask = torch.kron(layout.long(), torch.ones(block, block, dtype=torch.long)).bool()[:n, :n]
    return mask & causal_mask(n) if causal else mask


def t5_bucket_by_hand(rel: int, bidirectional: bool, num_buckets=32, max_distance=128) -> int:
    """T5's relative_position_bucket for one integer j - i, in plain Python."""
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        bucket = num_buckets if rel > 0 else 0
        dist = abs(rel)
    else:
        dist = max(-rel, 0)
    exact = num_buckets // 2
    if dist < exact:
        return bucket + dist
    log_part = math.log(dist / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    return bucket + min(exact + int(log_part), num_buckets - 1)


def t5_bias_by_hand(attn, n: int, causal: bool, n_k: int | None = None) -> torch.Tensor:
    """(heads, n, n_k) bias from the module's learned table, indexed by hand-computed buckets."""
    n_k = n if n_k is None else n_k
    buckets = torch.tensor(
        [[t5_bucket_by_hand(j - i, not causal) for j in range(n_k)] for i in range(n)]
    )
    return attn.t5_bias[buckets].permute(2, 0, 1)  # differentiable in the parameter


def alibi_bias_by_hand(slopes: list[float], n: int, causal: bool = False) -> torch.Tensor:
    """-slope * |i - j|; causal: slope * (j - i) (the same on every visible pair)."""
    rel = (torch.arange(n)[None, :] - torch.arange(n)[:, None]).double()  # j - i
    slope = torch.tensor(slopes, dtype=torch.float64)[:, None, None]
    return slope * rel if causal else -slope * rel.abs()


def twin(name: str, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return variants.build(name, compile=False, **options)


# --- local ----------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "seq_len, window",
    [(1, 3), (37, 0), (37, 5), (64, 16), (200, 40), (200, 128), (130, 64)],
)
def test_local_matches_band_oracle(seq_len, window, causal):
    q, k, v = qkv(seq_len=seq_len)
    out = variants.build("local", window=window)(q, k, v, causal=causal)
    ref = softmax_attention(q, k, v, mask=band(seq_len, window, causal))
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [49, 50, 500])
def test_local_window_covering_the_sequence_equals_full(window, causal):
    q, k, v = qkv(seq_len=50)
    out = variants.build("local", window=window)(q, k, v, causal=causal)
    torch.testing.assert_close(out, variants.build("full")(q, k, v, causal=causal), **TOL)


def test_local_flops_count_the_band():
    attn = variants.build("local", window=2)
    shape = dict(batch=2, heads=3, seq_len=10, head_dim=4)
    # rows see 3, 4, then 5 keys x 6, 4, 3 (non-causal); 1, 2, then 3 keys x 8 (causal)
    assert attn.flops(**shape) == 4 * 2 * 3 * 4 * (3 + 4 + 5 * 6 + 4 + 3)
    assert attn.flops(**shape, causal=True) == 4 * 2 * 3 * 4 * (1 + 2 + 3 * 8)
    wide = variants.build("local", window=10)
    for causal in (False, True):
        full = variants.build("full").flops(**shape, causal=causal)
        assert wide.flops(**shape, causal=causal) == full


def test_local_memory_grows_linearly():
    """O(n d) tensors plus one cache-sized chunk of scores: once the chunk is at its budget,
    each doubling of n adds twice what the one before added (linear), never 4x (quadratic)."""
    attn = variants.build("local")
    mem = [
        attn.memory_model(batch=1, heads=8, seq_len=n, head_dim=64) for n in (16384, 32768, 65536)
    ]
    assert 1.8 < (mem[2] - mem[1]) / (mem[1] - mem[0]) < 2.2
    assert mem[2] / mem[0] < 4.5


# --- sparse ---------------------------------------------------------------------------------
FIXED_CAUSAL = ["100000", "110000", "111000", "001100", "001110", "001111"]
FIXED_BIDIRECTIONAL = ["111001", "111001", "111111", "001111", "001111", "111111"]
STRIDED_CAUSAL = ["100000", "110000", "111000", "011100", "101110", "010111"]
STRIDED_BIDIRECTIONAL = ["111010", "111101", "111110", "011111", "101111", "010111"]


@pytest.mark.parametrize("seq_len", [12, 11])  # 6 blocks of 2; the last one half padding
@pytest.mark.parametrize(
    "pattern, causal, rows",
    [
        ("fixed", True, FIXED_CAUSAL),  # periods {0,1,2}, {3,4,5}; summaries 2 and 5
        ("fixed", False, FIXED_BIDIRECTIONAL),  # summaries also see every block
        ("strided", True, STRIDED_CAUSAL),  # the previous 2 blocks and every 2nd block
        ("strided", False, STRIDED_BIDIRECTIONAL),
    ],
)
def test_sparse_dense_mask_is_the_pattern_written_out(pattern, causal, rows, seq_len):
    attn = variants.build(
        "sparse", pattern=pattern, block_size=2, stride=3 if pattern == "fixed" else 2
    )
    mask = attn.dense_mask(seq_len, causal)
    assert mask.shape == (1, seq_len, seq_len) and mask.dtype == torch.bool
    torch.testing.assert_close(mask[0], expand(rows, 2, seq_len, causal))


@pytest.mark.parametrize("seq_len", [64, 100])  # 16-blocks: divides, does not divide
@pytest.mark.parametrize(
    "pattern, causal",
    [("fixed", False), ("fixed", True), ("strided", False), ("strided", True), ("bigbird", False)],
)
def test_sparse_matches_dense_attention_under_its_mask(pattern, causal, seq_len):
    q, k, v = qkv(seq_len=seq_len)  # 3 heads: bigbird's layout is per head
    attn = variants.build("sparse", pattern=pattern, block_size=16, stride=2, num_heads=3)
    ref = softmax_attention(q, k, v, mask=attn.dense_mask(seq_len, causal))
    torch.testing.assert_close(attn(q, k, v, causal=causal), ref, **TOL)


@pytest.mark.parametrize("pattern", ["fixed", "bigbird"])
def test_sparse_default_layout_at_a_longer_length(pattern):
    """The default sizes (64-blocks, about sqrt(nb) period) and the plan's row groups."""
    q, k, v = qkv(batch=1, heads=2, seq_len=1000, head_dim=8)
    attn = variants.build("sparse", pattern=pattern, num_heads=2)
    for causal in (False, True) if pattern == "fixed" else (False,):
        mask = attn.dense_mask(1000, causal)
        ref = softmax_attention(q, k, v, mask=mask)
        torch.testing.assert_close(attn(q, k, v, causal=causal), ref, **TOL)
        assert mask.float().mean() < 0.8  # sparse indeed


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "options",
    [
        dict(pattern="fixed", stride=100),  # one period holds every block
        dict(pattern="strided", stride=100),  # the recent window holds every block
        dict(pattern="bigbird", num_window_blocks=99, num_heads=3),
    ],
)
def test_sparse_all_true_layout_equals_full(options, causal):
    attn = variants.build("sparse", block_size=8, **options)
    if attn.unsupported(causal=causal):
        return
    q, k, v = qkv(seq_len=45)
    assert attn.layout(45, causal=False).all()
    torch.testing.assert_close(
        attn(q, k, v, causal=causal), variants.build("full")(q, k, v, causal=causal), **TOL
    )


def test_bigbird_layout_is_window_global_random_per_head_and_deterministic():
    """Window and globals are the same in every head; the random blocks are drawn per head, as
    in the reference implementation (one draw shared by all heads was a bug)."""
    build = lambda seed: variants.build(
        "sparse", pattern="bigbird", block_size=4, seed=seed, num_heads=4
    )
    layout = build(0).layout(4 * 40)  # 40 blocks
    nb = 40
    assert layout.shape == (4, nb, nb)
    i, j = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
    for head in layout:
        assert head[(i - j).abs() <= 1].all()  # window of 3 blocks
        assert head[[0, nb - 1]].all() and head[:, [0, nb - 1]].all()  # 2 globals
        inner = head[1:-1].sum(1)  # window 3 + globals 2 + random 2, all distinct
        assert (inner[1:-1] == 7).all()
    random = layout & ~((i - j).abs() <= 1)  # the draws (and globals, the same everywhere)
    assert all(not torch.equal(random[0], random[h]) for h in range(1, 4))
    assert torch.equal(build(0).layout(160), layout)  # same seed, same layout
    assert not torch.equal(build(1).layout(160), layout)  # another seed, other random blocks
    mask = build(0).dense_mask(150)  # 38 blocks, the last one half padding
    blocks = build(0).layout(150).repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert mask.shape == (4, 150, 150) and torch.equal(mask, blocks[:, :150, :150])


def test_bigbird_is_computed_per_head_and_refuses_another_head_count():
    q, k, v = qkv(heads=4, seq_len=90)
    attn = variants.build("sparse", pattern="bigbird", block_size=8, num_heads=4, seed=5)
    mask = attn.dense_mask(90)
    torch.testing.assert_close(attn(q, k, v), softmax_attention(q, k, v, mask=mask), **TOL)
    with pytest.raises(variants.Unsupported, match="num_heads=4"):
        attn(q[:, :2], k[:, :2], v[:, :2])


def test_bigbird_has_no_causal_form():
    for name in ("sparse", "flex_sparse"):
        attn = (
            twin(name, pattern="bigbird")
            if name.startswith("flex")
            else variants.build(name, pattern="bigbird")
        )
        reasons = attn.unsupported(causal=True)
        assert any("causal" in r for r in reasons)
        assert attn.unsupported(causal=False) == []
        q = torch.randn(1, 2, 16, 8)
        with pytest.raises(variants.Unsupported, match="causal"):
            attn(q, q, q, causal=True)


def test_sparse_flops_count_the_layout():
    attn = variants.build("sparse", pattern="fixed", block_size=2, stride=3)
    shape = dict(batch=1, heads=2, seq_len=12, head_dim=4)
    # FIXED_BIDIRECTIONAL holds 28 blocks of 2 x 2 pairs; FIXED_CAUSAL 15, whose 6 diagonal
    # blocks keep 3 of their 4 pairs
    assert attn.flops(**shape) == 4 * 2 * 4 * 28 * 4
    assert attn.flops(**shape, causal=True) == 4 * 2 * 4 * (15 * 4 - 6)
    for n, causal in [(11, False), (11, True), (100, False)]:
        pairs = int(attn.dense_mask(n, causal).sum())
        assert attn.flops(**{**shape, "seq_len": n}, causal=causal) == 4 * 2 * 4 * pairs


def test_sparse_cost_grows_as_n_sqrt_n_or_linearly():
    fixed = variants.build("sparse", pattern="fixed")
    bigbird = variants.build("sparse", pattern="bigbird")
    shape = dict(batch=1, heads=8, head_dim=64)
    ratio = lambda a: a.flops(**shape, seq_len=16384) / a.flops(**shape, seq_len=4096)
    assert 6 < ratio(fixed) < 10  # 4^1.5 = 8
    assert 3.5 < ratio(bigbird) < 4.5
    mem = lambda a, n: a.memory_model(**shape, seq_len=n)
    assert mem(bigbird, 16384) / mem(bigbird, 4096) < 4.5
    assert mem(fixed, 16384) / mem(fixed, 4096) < 4**1.6


# --- relative -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rel, bidirectional, bucket",
    [
        (0, True, 0),
        (-3, True, 3),
        (3, True, 19),  # the future half starts at 16
        (-8, True, 8),  # first log bucket: 8 + floor(log(8/8) / log(128/8) * 8)
        (-16, True, 10),  # 8 + floor(log 2 / log 16 * 8) = 8 + 2
        (20, True, 26),  # 16 + 8 + floor(log 2.5 / log 16 * 8) = 16 + 8 + 2
        (-128, True, 15),  # saturates at the half's last bucket
        (-1000, True, 15),
        (5, False, 0),  # causal: the future shares bucket 0
        (-5, False, 5),
        (-16, False, 16),
        (-32, False, 21),  # 16 + floor(log 2 / log 8 * 16) = 16 + 5
        (-128, False, 31),
    ],
)
def test_t5_bucket_hand_values(rel, bidirectional, bucket):
    from variants.relative import t5_bucket

    assert t5_bucket_by_hand(rel, bidirectional) == bucket
    assert int(t5_bucket(torch.tensor([rel]), bidirectional)[0]) == bucket


def test_alibi_slopes_follow_the_paper():
    from variants.relative import alibi_slopes

    pow2 = lambda *exps: [2.0**e for e in exps]
    assert alibi_slopes(8).tolist() == pow2(*range(-1, -9, -1))  # 1/2 ... 1/256
    # 6 heads: the 4-head slopes, then every other slope of 8 heads (1/2, 1/8)
    assert alibi_slopes(6).tolist() == pow2(-2, -4, -6, -8, -1, -3)
    twelve = pow2(*range(-1, -9, -1)) + pow2(-0.5, -1.5, -2.5, -3.5)  # then 16 heads' odd ones
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(twelve, dtype=torch.float64))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len, chunk", [(37, 16), (64, 16), (20, 256)])
@pytest.mark.parametrize("kind", ["t5", "alibi"])
def test_relative_matches_biased_oracle(kind, seq_len, chunk, causal):
    q, k, v = qkv(heads=8, seq_len=seq_len)
    attn = variants.build("relative", kind=kind, chunk_size=chunk, num_heads=8).double()
    if kind == "t5":
        bias = t5_bias_by_hand(attn, seq_len, causal).detach()
    else:
        bias = alibi_bias_by_hand([2.0 ** -(h + 1) for h in range(8)], seq_len, causal)
    mask = causal_mask(seq_len) if causal else None
    torch.testing.assert_close(attn.position_bias(seq_len, seq_len, causal), bias, **TOL)
    ref = softmax_attention(q, k, v, mask=mask, bias=bias)
    torch.testing.assert_close(attn(q, k, v, causal=causal), ref, **TOL)


def test_relative_alibi_six_heads():
    q, k, v = qkv(heads=6, seq_len=30)
    attn = variants.build("relative", kind="alibi", num_heads=6, chunk_size=8)
    bias = alibi_bias_by_hand([2.0**e for e in (-2, -4, -6, -8, -1, -3)], 30)
    torch.testing.assert_close(attn(q, k, v), softmax_attention(q, k, v, bias=bias), **TOL)


def test_relative_cross_attention_lengths():
    q, _, _ = qkv(heads=2, seq_len=13)
    _, k, v = qkv(heads=2, seq_len=40, seed=1)
    attn = variants.build("relative", num_heads=2, chunk_size=5).double()
    bias = t5_bias_by_hand(attn, 13, causal=False, n_k=40).detach()
    torch.testing.assert_close(attn.position_bias(13, 40), bias, **TOL)
    torch.testing.assert_close(attn(q, k, v), softmax_attention(q, k, v, bias=bias), **TOL)


def test_local_and_sparse_refuse_cross_attention():
    q, _, _ = qkv(seq_len=10)
    _, k, v = qkv(seq_len=12)
    for attn in (variants.build("local"), variants.build("sparse")):
        with pytest.raises(variants.Unsupported, match="cross-attention"):
            attn(q, k, v)


def test_relative_t5_causal_buckets_differ_from_bidirectional():
    attn = variants.build("relative", num_heads=2)
    assert not torch.equal(attn.position_bias(20, 20, causal=True), attn.position_bias(20, 20))


def test_relative_gradients_match_the_oracle_and_reach_the_bias():
    """Chunks are checkpointed under autograd: their gradients must still be exact."""
    q, k, v = qkv(heads=4, seq_len=40, requires_grad=True)
    attn = variants.build("relative", num_heads=4, chunk_size=16).double()
    grads = []
    for compute in (
        lambda: attn(q, k, v, causal=True),
        lambda: softmax_attention(
            q, k, v, mask=causal_mask(40), bias=t5_bias_by_hand(attn, 40, causal=True)
        ),
    ):
        for t in (q, k, v, attn.t5_bias):
            t.grad = None
        compute().square().sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v, attn.t5_bias)])
    assert grads[0][3].abs().sum() > 0  # the bias parameter learns
    for ours, ref in zip(*grads, strict=True):
        torch.testing.assert_close(ours, ref, **TOL)


def test_relative_refuses_another_head_count_as_unsupported():
    """A head count the bias was not built for is a case it cannot run (the harness records
    an `unsupported` row), not bad input: Unsupported, from the call and from decode."""
    attn = variants.build("relative", num_heads=8)
    q = torch.randn(1, 4, 10, 8)
    with pytest.raises(variants.Unsupported, match="num_heads=8"):
        attn(q, q, q)
    _, cache = variants.build("relative", num_heads=4).prefill(q, q, q)
    with pytest.raises(variants.Unsupported, match="num_heads=8"):
        attn.decode(q[:, :, :1], q[:, :, :1], q[:, :, :1], cache)


def test_relative_memory_grows_as_n_times_chunk():
    attn = variants.build("relative")
    mem = [attn.memory_model(batch=1, heads=8, seq_len=n, head_dim=64) for n in (4096, 16384)]
    assert mem[1] / mem[0] < 4.5
    full = variants.build("full").memory_model(batch=1, heads=8, seq_len=16384, head_dim=64)
    assert mem[1] < full / 10


# --- grouped heads and decoding, against the float64 oracle ---------------------------------
def grouped_qkv(heads: int, kv_heads: int, seq_len: int, requires_grad=False):
    """q with ``heads`` heads; k and v with ``kv_heads`` (drawn apart from q)."""
    q, _, _ = qkv(heads=heads, seq_len=seq_len, requires_grad=requires_grad)
    _, k, v = qkv(heads=kv_heads, seq_len=seq_len, seed=1, requires_grad=requires_grad)
    return q, k, v


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """The oracle's own expansion: query head h reads key/value head h // (heads / kv_heads)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def oracle_of(attn, name: str, n: int, causal: bool):
    """The (mask, bias) the definition gives: a band for local, the layout for sparse, the
    hand-made bias (and the causal mask) for relative."""
    if name == "local":
        return band(n, attn.cfg.window, causal), None
    if name == "sparse":
        return attn.dense_mask(n, causal), None
    if attn.cfg.kind == "t5":
        bias = t5_bias_by_hand(attn, n, causal).detach()
    else:
        slopes = variants.build("relative", kind="alibi", num_heads=attn.cfg.num_heads).slopes
        bias = alibi_bias_by_hand(slopes.tolist(), n, causal)
    return (causal_mask(n) if causal else None), bias


GROUPED = [
    ("local", dict(window=5)),
    ("local", dict(window=0)),
    ("sparse", dict(pattern="fixed", block_size=8, stride=2)),
    ("sparse", dict(pattern="strided", block_size=8, stride=2)),
    ("sparse", dict(pattern="bigbird", block_size=8)),
    ("relative", dict(kind="t5", chunk_size=8)),
    ("relative", dict(kind="alibi", chunk_size=8)),
]


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name, options", GROUPED)
def test_grouped_heads_match_the_oracle_forward_and_gradients(name, options, causal, kv_heads):
    """k, v at kv_heads, used in place: output and gradients (dk, dv summed over each group)
    equal the oracle on key/value heads repeated for their query heads."""
    H, n = 4, 45
    attn = variants.build(name, num_heads=H, kv_heads=kv_heads, **options).double()
    if attn.unsupported(causal=causal, kv_heads=kv_heads):
        return  # bigbird has no causal form (tested above)
    q, k, v = grouped_qkv(H, kv_heads, n, requires_grad=True)
    mask, bias = oracle_of(attn, name, n, causal)
    grads = []
    for compute in (
        lambda: attn(q, k, v, causal=causal),
        lambda: softmax_attention(q, repeat_kv(k, H), repeat_kv(v, H), mask=mask, bias=bias),
    ):
        for t in (q, k, v):
            t.grad = None
        out = compute()
        out.square().sum().backward()
        grads.append([out.detach()] + [t.grad.clone() for t in (q, k, v)])
    for ours, ref in zip(*grads, strict=True):
        torch.testing.assert_close(ours, ref, **TOL)


def prefill_then_decode(attn, q, k, v, m: int):
    """Rows of prefill over the first m tokens, then one decode step per remaining token."""
    out, cache = attn.prefill(q[:, :, :m], k[:, :, :m], v[:, :, :m])
    rows = [out]
    for t in range(m, q.shape[2]):
        step = (x[:, :, t : t + 1] for x in (q, k, v))
        out, cache = attn.decode(*step, cache)
        rows.append(out)
    return torch.cat(rows, dim=2), cache


DECODING = [
    ("local", dict(window=0)),
    ("local", dict(window=5)),
    ("local", dict(window=70)),  # longer than the sequence
    ("relative", dict(kind="t5", chunk_size=8)),
    ("relative", dict(kind="alibi", chunk_size=8)),
    ("sparse", dict(pattern="fixed", block_size=4, stride=3)),
    ("sparse", dict(pattern="strided", block_size=4, stride=3)),
]


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("name, options", DECODING)
def test_prefill_then_decode_matches_the_causal_oracle(name, options, kv_heads):
    """Every decoded row equals the oracle's causal row: local's band (the rolling window),
    relative's bias by distance (T5's causal buckets, ALiBi's slopes), sparse's layout row."""
    H, n = 4, 50
    attn = variants.build(name, num_heads=H, kv_heads=kv_heads, **options).double()
    q, k, v = grouped_qkv(H, kv_heads, n)
    mask, bias = oracle_of(attn, name, n, causal=True)
    ref = softmax_attention(q, repeat_kv(k, H), repeat_kv(v, H), mask=mask, bias=bias)
    for m in (1, 9, 30):
        rows, _ = prefill_then_decode(attn, q, k, v, m)
        torch.testing.assert_close(rows, ref, **TOL)


def test_local_decoding_state_is_bounded_by_the_window():
    """The rolling window holds the last `window` tokens whatever the context: cache_bytes is
    constant once n passes the window, and the buffers never exceed window + 1 slots."""
    window, d = 16, 16
    attn = variants.build("local", window=window, num_heads=2, kv_heads=1).double()
    q, k, v = grouped_qkv(2, 1, 200)
    per_token = 2 * q.shape[0] * 1 * d * 8  # k and v, the batch, one key/value head, float64
    sizes, slots = [], []
    _, cache = attn.prefill(q[:, :, :3], k[:, :, :3], v[:, :, :3])
    for t in range(3, 200):
        _, cache = attn.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], cache)
        sizes.append(attn.cache_bytes(cache))
        slots.append(cache.k.shape[2])
    assert sizes[: window - 3] == [(t + 1) * per_token for t in range(3, window)]
    assert set(sizes[window:]) == {window * per_token}
    assert max(slots) == window + 1
    _, long = attn.prefill(q, k, v)  # a long prompt: the same bound
    assert attn.cache_bytes(long) == window * per_token and long.k.shape[2] == window + 1
    model = attn.cache_model(batch=2, seq_len=10**6, head_dim=d, kv_heads=1, dtype=torch.float64)
    assert model == window * per_token


def test_sparse_decoding_needs_a_fixed_stride():
    """The default stride grows with n, so a decoded sequence would change layout as it
    grows: decode says so and what to set; bigbird has no causal form at all."""
    attn = variants.build("sparse")
    assert any("stride" in r for r in attn.decode_unsupported())
    q = torch.randn(1, 8, 16, 8)
    with pytest.raises(variants.Unsupported, match="stride"):
        attn.prefill(q, q, q)
    assert variants.build("sparse", stride=4).decode_unsupported() == []
    bigbird = variants.build("sparse", pattern="bigbird", stride=4)
    assert any("causal" in r for r in bigbird.decode_unsupported())


def test_sparse_keeps_a_few_block_level_plans():
    """Plans are kept for the last few lengths only, and hold block-level facts: at
    n = 65536 the token-level masks kept before took about 270 MB."""
    from variants.sparse import PLANS_KEPT

    attn = variants.build("sparse", block_size=8, num_heads=1)
    for n in range(40, 40 + 8 * (PLANS_KEPT + 3), 8):
        q = torch.randn(1, 1, n, 4)
        attn(q, q, q)
    assert len(attn._plans) == PLANS_KEPT
    plan = variants.build("sparse").plan(65536, 64, causal=False)
    tensors = [t for g in plan.groups for t in (g.tiles, g.keys, g.seen, g.repeat)]
    held = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    assert held < 8 * 2**20


def test_local_float16_overflow_in_a_hidden_pair_stays_hidden():
    """A hidden pair whose q.k overflows float16 (+inf) is masked with masked_fill; as an
    additive -inf bias it gave -inf + inf = NaN in every row of its slab."""
    n, d, window = 64, 8, 4
    q, k = torch.zeros(1, 1, n, d), torch.full((1, 1, n, d), 0.0)
    q[..., 0], k[..., 0] = 1000.0, 0.01
    k[:, :, 48:, 0] = 1000.0  # keys 48.. overflow against every query
    v = torch.randn(1, 1, n, d)
    out = variants.build("local", window=window)(q.half(), k.half(), v.half())
    ref = softmax_attention(q, k, v, mask=band(n, window, causal=False))
    rows = slice(0, 40)  # rows that see only small keys (their slabs hold the large ones)
    assert torch.isfinite(out[:, :, rows]).all()
    assert relative_error(out[:, :, rows], ref[:, :, rows]) < 4e-3


# --- properties shared by the family --------------------------------------------------------
FAMILY = [
    ("local", dict(window=6)),
    ("sparse", dict(pattern="fixed", block_size=8, stride=2)),
    ("sparse", dict(pattern="strided", block_size=8, stride=2)),
    ("relative", dict(kind="t5", num_heads=2, chunk_size=8)),
    ("relative", dict(kind="alibi", num_heads=2, chunk_size=8)),
]


@pytest.mark.parametrize("name, options", FAMILY)
def test_causal_never_sees_the_future(name, options):
    attn = variants.build(name, **options).double()
    q, k, v = qkv(heads=2, seq_len=45)
    t = 20
    out = attn(q, k, v, causal=True)
    later = lambda x: torch.cat([x[:, :, : t + 1], torch.randn_like(x[:, :, t + 1 :]) * 5], 2)
    moved = attn(later(q), later(k), later(v), causal=True)
    torch.testing.assert_close(moved[:, :, : t + 1], out[:, :, : t + 1], **TOL)
    assert not torch.allclose(moved[:, :, t + 1 :], out[:, :, t + 1 :])


@pytest.mark.parametrize("name, options", FAMILY[:3])
def test_gradients_match_the_masked_oracle(name, options):
    attn = variants.build(name, **options)
    q, k, v = qkv(heads=2, seq_len=37, requires_grad=True)
    mask = band(37, 6, True) if name == "local" else attn.dense_mask(37, True)
    grads = []
    for compute in (
        lambda: attn(q, k, v, causal=True),
        lambda: softmax_attention(q, k, v, mask=mask),
    ):
        for x in (q, k, v):
            x.grad = None
        compute().square().sum().backward()
        grads.append([x.grad.clone() for x in (q, k, v)])
    for ours, ref in zip(*grads, strict=True):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, ref, **TOL)


@pytest.mark.parametrize("name, options", FAMILY)
def test_float32_agrees_with_float64(name, options):
    attn = variants.build(name, **options)
    q, k, v = qkv(heads=2, seq_len=50)
    with torch.no_grad():
        ref = attn.double()(q, k, v, causal=True)
        out = attn.float()(q.float(), k.float(), v.float(), causal=True)
    assert out.dtype == torch.float32 and relative_error(out, ref) < 1e-5


# --- the FlexAttention twins (eager: the same maths without a ~30 s compile) ----------------
TWIN_CASES = [
    ("local", dict(window=5), True),
    ("local", dict(window=5), False),
    ("sparse", dict(pattern="fixed", block_size=8, stride=2), True),
    ("sparse", dict(pattern="strided", block_size=8, stride=2), False),
    ("sparse", dict(pattern="bigbird", block_size=8, num_heads=2), False),
    ("relative", dict(kind="t5", num_heads=2), True),
    ("relative", dict(kind="t5", num_heads=2), False),
    ("relative", dict(kind="alibi", num_heads=2), True),
]


@pytest.mark.parametrize("name, options, causal", TWIN_CASES)
def test_flex_twin_matches_its_variant(name, options, causal):
    flex = twin(f"flex_{name}", **options)
    q, k, v = qkv(heads=2, seq_len=40)
    ours = flex.inner(q, k, v, causal=causal)
    torch.testing.assert_close(flex(q, k, v, causal=causal), ours, **TOL)
    assert flex.flops(batch=2, heads=2, seq_len=40, head_dim=16, causal=causal) == (
        flex.inner.flops(batch=2, heads=2, seq_len=40, head_dim=16, causal=causal)
    )


def test_flex_relative_shares_the_bias_parameter():
    flex = twin("flex_relative", num_heads=2)
    q, k, v = qkv(heads=2, seq_len=24)
    before = flex(q, k, v)
    with torch.no_grad():
        flex.inner.t5_bias.add_(torch.randn_like(flex.inner.t5_bias))
    after = flex(q, k, v)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, flex.inner(q, k, v), **TOL)
    (only,) = flex.parameters()  # one parameter, the twin's own
    assert only is flex.inner.t5_bias


def test_flex_sparse_follows_bigbirds_per_head_layout():
    """Its block mask is made per head (H=None would give every head the first's blocks)."""
    flex = twin("flex_sparse", pattern="bigbird", block_size=8, num_heads=4, kv_heads=2)
    q, k, v = grouped_qkv(4, 2, 160)
    assert not torch.equal(flex.inner.layout(160)[0], flex.inner.layout(160)[1])
    torch.testing.assert_close(flex(q, k, v), flex.inner(q, k, v), **TOL)


@pytest.mark.slow
def test_compiled_flex_local_matches_local():
    attn = variants.build("flex_local", window=16)
    q, k, v = (torch.randn(1, 2, 128, 16) for _ in range(3))
    out = attn(q, k, v, causal=True)
    assert attn.compile_s is not None and attn.compile_s > 0
    assert relative_error(out, attn.inner(q, k, v, causal=True)) < 1e-5


# --- options --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, options",
    [
        ("local", dict(window=-1)),
        ("sparse", dict(pattern="dense")),
        ("sparse", dict(block_size=0)),
        ("sparse", dict(stride=0)),
        ("relative", dict(kind="rope")),
        ("relative", dict(chunk_size=0)),
    ],
)
def test_bad_options_are_refused(name, options):
    with pytest.raises(ValueError):
        variants.build(name, **options)
