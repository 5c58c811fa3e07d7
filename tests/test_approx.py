"""The approximation family (issue 3): linformer, reformer, linear.

Each variant is checked in float64 against an independent computation of its definition
(variants-api.md): an einsum and explicit softmax in tests/oracles.py, or a quadratic form, a
brute-force LSH layout or a hand count written here, never the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from oracles import causal_mask, qkv, relative_error, softmax_attention
from torch.utils.flop_counter import FlopCounterMode

import variants
from harness.measure import tensor_peak_bytes
from variants import linformer, reformer
from variants.linear import orthogonal_features

TIGHT = dict(rtol=1e-10, atol=1e-12)
SELF = -1e5  # the paper's score for a position's own key (attended only when nothing else is)


def double(name, **options):
    return variants.build(name, **options).double()


# --- linformer --------------------------------------------------------------------------------
def project(P, x):
    """P (heads or 1, k, n) applied along the sequence of x (B, H, n, d), written out."""
    return torch.einsum("hkn,bhnd->bhkd", P.expand(x.shape[1], -1, -1), x)


@pytest.fixture(params=["one block", "blocks of 7 queries"])
def score_block(request, monkeypatch):
    """Linformer's queries in one block, and in blocks of 7 rows (3 heads x 12 keys each)."""
    if request.param != "one block":
        monkeypatch.setattr(linformer, "SCORE_BLOCK", 7 * 3 * 12)


@pytest.mark.parametrize("share", ["headwise", "kv", "none"])
@pytest.mark.parametrize("seq_len", [40, 29])  # 29: a shorter call uses the leading columns
def test_linformer_equals_projected_softmax(share, seq_len, score_block):
    attn = double("linformer", seq_len=40, proj_len=12, num_heads=3, share=share)
    E, F_ = attn.projections()
    assert E.shape == F_.shape == (3 if share == "none" else 1, 12, 40)
    assert (E is F_) == (share == "kv")
    q, k, v = qkv(heads=3, seq_len=seq_len)
    E, F_ = E.detach()[..., :seq_len], F_.detach()[..., :seq_len]
    ref = softmax_attention(q, project(E, k), project(F_, v))
    torch.testing.assert_close(attn(q, k, v), ref, **TIGHT)


def test_linformer_projections_are_seeded_and_shared_as_asked():
    a, b, c = (variants.build("linformer", seq_len=16, proj_len=4, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.E, b.E) and not torch.equal(a.E, c.E)
    assert not torch.equal(a.E, a.F)  # headwise: two matrices
    assert abs(float(a.E.detach().var()) - 1 / 4) < 0.15  # N(0, 1/k), as the paper initialises


def test_linformer_refuses_causal_longer_and_missing_seq_len():
    attn = variants.build("linformer", seq_len=32, proj_len=8, num_heads=2)
    q = torch.randn(1, 2, 32, 8)
    assert any("future" in r for r in attn.unsupported(causal=True, seq_len=32))
    with pytest.raises(variants.Unsupported, match="future"):
        attn(q, q, q, causal=True)
    long = torch.randn(1, 2, 33, 8)
    assert any("rebuild" in r for r in attn.unsupported(seq_len=33))
    with pytest.raises(variants.Unsupported, match="seq_len>=33"):
        attn(long, long, long)
    with pytest.raises(ValueError, match="seq_len"):
        variants.build("linformer")
    with pytest.raises(ValueError, match="share"):
        variants.build("linformer", seq_len=8, share="layerwise")


@pytest.mark.parametrize("share", ["headwise", "none"])
def test_linformer_grouped_heads_project_each_key_value_head_once(share):
    """k, v with 2 heads for 4 query heads: each key/value head projected once (share='none':
    by its own E_g, F_g) and read by its 2 query heads; the oracle repeats the projected
    heads."""
    attn = double("linformer", seq_len=30, proj_len=6, num_heads=4, kv_heads=2, share=share)
    E, F_ = (p.detach() for p in attn.projections())
    assert E.shape[0] == (2 if share == "none" else 1)
    q = qkv(batch=2, heads=4, seq_len=30)[0]
    k, v = qkv(batch=2, heads=2, seq_len=30, seed=1)[1:]
    kp, vp = (project(P, x).repeat_interleave(2, dim=1) for P, x in ((E, k), (F_, v)))
    torch.testing.assert_close(attn(q, k, v), softmax_attention(q, kp, vp), **TIGHT)


@pytest.mark.parametrize("n_k", [20, 40])
def test_linformer_keys_of_another_length_are_unsupported(n_k):
    attn = variants.build("linformer", seq_len=64, proj_len=8, num_heads=2)
    q = torch.randn(1, 2, 30, 8)
    k = torch.randn(1, 2, n_k, 8)
    with pytest.raises(variants.Unsupported, match="as long as queries"):
        attn(q, k, k)


def test_linformer_per_head_projections_refuse_other_key_value_heads():
    attn = variants.build(
        "linformer", seq_len=16, proj_len=4, num_heads=4, kv_heads=2, share="none"
    )
    assert attn.unsupported(kv_heads=2) == []
    assert any("kv_heads=4" in r for r in attn.unsupported(kv_heads=4))
    q = torch.randn(1, 4, 16, 8)
    with pytest.raises(variants.Unsupported, match="kv_heads=4"):
        attn(q, q, q)


# --- reformer ---------------------------------------------------------------------------------
def shared_qk_keys(q):
    return q / q.norm(dim=-1, keepdim=True)


def self_bias(n):
    return SELF * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("n_hashes", [1, 3])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len", [50, 64])
def test_reformer_one_chunk_equals_shared_qk_attention(n_hashes, causal, seq_len):
    """The contract's oracle: bucket_size >= seq_len, any rounds: full attention of q against
    q / |q| with the diagonal masked (to -1e5: causal row 0 sees only itself)."""
    attn = double("reformer", bucket_size=64, n_hashes=n_hashes)
    q, k, v = qkv(seq_len=seq_len)
    mask = causal_mask(seq_len) if causal else None
    ref = softmax_attention(q, shared_qk_keys(q), v, mask=mask, bias=self_bias(seq_len))
    torch.testing.assert_close(attn(q, k, v, causal=causal), ref, **TIGHT)


def lsh_visible(q, rotations, bucket_size):
    """Brute force from the definition: (B, H, n, n) bool, True where key j is in query i's
    window (its sorted chunk or the one before) in at least one round."""
    B, H, n, _ = q.shape
    x = shared_qk_keys(q)
    visible = torch.zeros(B, H, n, n, dtype=torch.bool)
    chunk = min(bucket_size, n)
    for r in range(rotations.shape[1]):
        proj = x @ rotations[:, r].double()  # (B, H, n, nb / 2)
        buckets = torch.cat([proj, -proj], -1).argmax(-1)  # (B, H, n)
        for b in range(B):
            for h in range(H):
                order = sorted(range(n), key=lambda p: (int(buckets[b, h, p]), p))
                chunk_of = {p: s // chunk for s, p in enumerate(order)}
                for i in range(n):
                    for j in range(n):
                        if chunk_of[j] in (chunk_of[i], chunk_of[i] - 1):
                            visible[b, h, i, j] = True
    return visible


@pytest.mark.parametrize("n_hashes", [1, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_reformer_equals_attention_over_the_union_of_windows(n_hashes, causal):
    """Several chunks, a length that needs padding: softmax over every pair some round's
    windows hold, each counted once, own key at -1e5, causal by original positions."""
    n, bucket = 45, 8  # 6 chunks of 8, 3 padded slots; 6 buckets
    attn = double("reformer", bucket_size=bucket, n_hashes=n_hashes, seed=3)
    q, k, v = qkv(batch=1, heads=2, seq_len=n, head_dim=8)
    visible = lsh_visible(q, attn.rotations(8, n), bucket)
    assert not visible.all()  # the windows really are sparse here
    if causal:
        visible &= causal_mask(n)
    ref = softmax_attention(q, shared_qk_keys(q), v, mask=visible, bias=self_bias(n))
    torch.testing.assert_close(attn(q, k, v, causal=causal), ref, **TIGHT)


def test_reformer_ignores_the_key_input():
    attn = variants.build("reformer", bucket_size=8, n_hashes=2)
    q, k, v = qkv(batch=1, heads=2, seq_len=40, dtype=torch.float32)
    assert torch.equal(attn(q, k, v), attn(q, torch.randn_like(k), v))


def test_reformer_hashes_are_seeded():
    q, k, v = qkv(batch=1, heads=2, seq_len=64, head_dim=8, dtype=torch.float32)
    a, b, c = (variants.build("reformer", bucket_size=8, seed=s) for s in (0, 0, 1))
    assert torch.equal(a(q, k, v), b(q, k, v))
    assert torch.equal(a.rotations(8, 64), b.rotations(8, 64))
    assert not torch.equal(a.rotations(8, 64), c.rotations(8, 64))
    assert not torch.allclose(a(q, k, v), c(q, k, v))  # other hashes, other windows


@pytest.mark.parametrize("causal", [False, True])
def test_reformer_grouped_values_equal_repeated_value_heads(causal):
    """Shared QK: grouping touches the values only. One chunk: the oracle is full attention of
    q against q / |q| (diagonal masked) over each query head's value head, repeated."""
    attn = double("reformer", bucket_size=64, n_hashes=2)
    q = qkv(batch=2, heads=4, seq_len=40)[0]
    v = qkv(batch=2, heads=2, seq_len=40, seed=1)[2]  # value head h // 2 for query head h
    mask = causal_mask(40) if causal else None
    ref = softmax_attention(
        q, shared_qk_keys(q), v.repeat_interleave(2, dim=1), mask=mask, bias=self_bias(40)
    )
    torch.testing.assert_close(attn(q, v, v, causal=causal), ref, **TIGHT)
    # Several chunks: the windows come from q alone, so gathering the group's values equals
    # repeating them.
    chunked = double("reformer", bucket_size=8, n_hashes=3)
    repeated = v.repeat_interleave(2, dim=1)
    grouped = chunked(q, v, v, causal=causal)
    torch.testing.assert_close(grouped, chunked(q, repeated, repeated, causal=causal), **TIGHT)


def hashes(q, attn):
    """The buckets (R, BH, n) the module hashes q (B, H, n, d) to."""
    B, H, n, d = q.shape
    return reformer.shared_keys_and_buckets(q.reshape(B * H, n, d), attn.rotations(d, n))[1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reformer_hashing_in_blocks_of_rows_changes_nothing(dtype, monkeypatch):
    """Blocks of 7 rows (several blocks, the last one short) against one block for all rows:
    identical buckets and an identical output."""
    attn = variants.build("reformer", bucket_size=8, n_hashes=3).to(dtype)
    q, k, v = qkv(batch=2, heads=3, seq_len=93, head_dim=8, dtype=dtype)
    whole_buckets, whole = hashes(q, attn), attn(q, k, v)
    nb = reformer.num_buckets(93, 8)
    monkeypatch.setattr(reformer, "HASH_BLOCK", 7 * 2 * 3 * 3 * nb // 2)  # 7 rows of 6 heads
    assert torch.equal(hashes(q, attn), whole_buckets)
    assert torch.equal(attn(q, k, v), whole)


def test_reformer_hashing_memory_is_bounded(monkeypatch):
    """The projections are made a block of rows at a time: above the buckets (int64) the
    hashing holds a few blocks (a block, its max and min), not the (BH, n, R nb / 2)
    projection, 128 blocks here."""
    block = 2**15
    monkeypatch.setattr(reformer, "HASH_BLOCK", block)
    attn = variants.build("reformer", bucket_size=64, n_hashes=4)
    rotations = attn.rotations(16, 8192).float()  # 128 buckets: 64 projections per round
    x = torch.randn(2, 8192, 16)
    peak = tensor_peak_bytes(lambda: reformer.hash_buckets(x, rotations))
    buckets = 4 * 2 * 8192 * 8
    assert 2 * 8192 * 4 * 64 == 128 * block
    assert peak - buckets < 3 * block * 4, (peak - buckets) / (block * 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reformer_hashes_half_inputs_in_float32(dtype):
    """Keys are normalised and hashed in float32 whatever the input dtype: half-precision
    inputs land in the buckets of the same (rounded) values in float32, so the windows, and
    so the attention, do not depend on the dtype."""
    attn = variants.build("reformer", bucket_size=16, n_hashes=4)
    q = qkv(batch=1, heads=2, seq_len=2048, head_dim=32, dtype=torch.float32)[0].to(dtype)
    assert torch.equal(hashes(q, attn), hashes(q.float(), attn))


def test_linformer_and_reformer_do_not_decode_and_say_why():
    for attn, why in (
        (variants.build("linformer", seq_len=16, proj_len=4), "mixes all positions"),
        (variants.build("reformer"), "later ones included"),
    ):
        assert any(why in r for r in attn.decode_unsupported())
        q = torch.randn(1, 8, 16, 64)
        with pytest.raises(variants.Unsupported, match=why):
            attn.prefill(q, q, q)


# --- linear -----------------------------------------------------------------------------------
PHI = {"elu": lambda x: F.elu(x) + 1, "relu": F.relu}


@pytest.mark.parametrize("feature_map", ["elu", "relu"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len", [48, 50, 7])  # chunk 16: divides, does not, one short chunk
def test_linear_equals_the_quadratic_form(feature_map, causal, seq_len):
    eps = 1e-6
    attn = double("linear", feature_map=feature_map, chunk_size=16, eps=eps)
    q, k, v = qkv(seq_len=seq_len)
    phi = PHI[feature_map]
    w = phi(q) @ phi(k).transpose(-1, -2)  # (B, H, n, n)
    if causal:
        w = w * causal_mask(seq_len)
    ref = (w @ v) / (w.sum(-1, keepdim=True) + eps)
    torch.testing.assert_close(attn(q, k, v, causal=causal), ref, **TIGHT)


def favor_error(num_features, seed, causal=False):
    attn = double("linear", feature_map="favor", num_features=num_features, head_dim=16, seed=seed)
    q, k, v = qkv(batch=1, heads=2, seq_len=32, head_dim=16, seed=100 + seed)
    q, k = 0.5 * q, 0.5 * k  # moderate scores: where positive random features are accurate
    mask = causal_mask(32) if causal else None
    return relative_error(attn(q, k, v, causal=causal), softmax_attention(q, k, v, mask=mask))


@pytest.mark.parametrize("causal", [False, True])
def test_favor_error_shrinks_as_features_grow(causal):
    """FAVOR estimates softmax attention and its error falls as features are added: over 5
    seeds, 256 features beat 16 clearly (measured: mean 0.33 -> 0.15, every seed lower)."""
    few = sum(favor_error(16, s, causal) for s in range(5)) / 5
    many = sum(favor_error(256, s, causal) for s in range(5)) / 5
    assert many < 0.6 * few, (few, many)
    assert many < 0.2


def test_favor_features_are_orthogonal_within_blocks_and_seeded():
    w = orthogonal_features(40, 16, torch.Generator().manual_seed(0))  # blocks of 16, 16, 8
    for block in (w[:16], w[16:32], w[32:]):
        gram = block @ block.T
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-10, rtol=0)
    a, b, c = (variants.build("linear", feature_map="favor", seed=s) for s in (0, 0, 1))
    assert torch.equal(a.features, b.features) and not torch.equal(a.features, c.features)


def test_favor_causal_stabiliser_never_reads_the_future():
    """Future keys placed on a feature vector reach the largest logit any key can (|w|^2 / 2):
    a stabiliser taking the maximum over all keys would rescale the past; the prefix one does
    not even change its rounding."""
    attn = double("linear", feature_map="favor", num_features=64, head_dim=16, chunk_size=8)
    q, k, v = qkv(batch=1, heads=2, seq_len=40, head_dim=16)
    w = attn.features[attn.features.norm(dim=1).argmax()]  # (d,)
    k2 = k.clone()
    k2[:, :, 21:] = w * 16**0.25  # the map scales keys by d^-1/4: this one lands on w
    past = attn(q, k, v, causal=True)[:, :, :21]
    assert torch.equal(attn(q, k2, v, causal=True)[:, :, :21], past)


def feature_oracle(attn, feature_map):
    """phi written from the definitions; favor's from the module's random features (data)."""
    if feature_map != "favor":
        return PHI[feature_map]
    w = attn.features.double()  # (m, d)

    def phi(x):
        x = x * x.shape[-1] ** -0.25
        return torch.exp(x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True))

    return phi


def linear_quadratic(phi, q, k, v, causal, eps):
    """(phi(Q) phi(K)^T, masked, row-normalised) v, k and v repeated for grouped heads."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    w = phi(q) @ phi(k).transpose(-1, -2)  # (B, H, n, n)
    if causal:
        w = w * causal_mask(q.shape[-2])
    return (w @ v) / (w.sum(-1, keepdim=True) + eps)


LINEAR_MAPS = [
    dict(feature_map="elu"),
    dict(feature_map="relu"),
    # eps only guards a zero denominator in favor's stabilised units: 0 to compare exactly
    dict(feature_map="favor", num_features=24, head_dim=8, eps=0.0),
]


def grouped_qkv(kv_heads, seq_len, seed=0, scale_keys=False):
    q = qkv(batch=2, heads=4, seq_len=seq_len, head_dim=8, seed=seed)[0]
    k, v = qkv(batch=2, heads=kv_heads, seq_len=seq_len, head_dim=8, seed=seed + 1)[1:]
    if scale_keys:  # later keys longer: favor's running maximum grows along the sequence
        k = k * torch.linspace(0.5, 2.0, seq_len, dtype=k.dtype)[:, None]
    return q, k, v


@pytest.mark.parametrize("options", LINEAR_MAPS, ids=lambda o: o["feature_map"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_linear_grouped_heads_equal_the_quadratic_form_on_repeated_heads(options, causal, kv_heads):
    """One key summary per key/value head, read by its group: the quadratic form with each
    key/value head repeated for its query heads."""
    attn = double("linear", chunk_size=16, **options)
    q, k, v = grouped_qkv(kv_heads, 45)
    phi = feature_oracle(attn, options["feature_map"])
    ref = linear_quadratic(phi, q, k, v, causal, attn.cfg.eps)
    torch.testing.assert_close(attn(q, k, v, causal=causal), ref, **TIGHT)


@pytest.mark.parametrize("options", LINEAR_MAPS, ids=lambda o: o["feature_map"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_linear_decode_equals_the_quadratic_causal_form(options, kv_heads):
    """Prefill of m tokens, then one token at a time from the running sums, row by row equal
    to the quadratic causal form (favor: keys growing along the sequence, so that the running
    maximum of the key log-weights moves and the sums are rescaled)."""
    n = 37
    attn = double("linear", chunk_size=8, **options)
    q, k, v = grouped_qkv(kv_heads, n, seed=3, scale_keys=True)
    ref = linear_quadratic(
        feature_oracle(attn, options["feature_map"]), q, k, v, True, attn.cfg.eps
    )
    for m in (1, 8, 20):
        out, cache = attn.prefill(q[:, :, :m], k[:, :, :m], v[:, :, :m])
        rows = [out]
        for t in range(m, n):
            step, cache = attn.decode(*(x[:, :, t : t + 1] for x in (q, k, v)), cache)
            rows.append(step)
        torch.testing.assert_close(torch.cat(rows, dim=2), ref, **TIGHT)


@pytest.mark.parametrize("options", LINEAR_MAPS, ids=lambda o: o["feature_map"])
def test_linear_state_is_bounded(options):
    """The decoding state is the running sums (m x dv + 1 per key/value head, favor: and the
    running maximum): the same bytes at any context length, as cache_model says; kept in
    float32 for half-precision inputs."""
    attn = variants.build("linear", **options)
    m = attn.num_features(8)
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 4), (torch.float64, 8)):
        held = set()
        for n in (3, 100, 1000):
            q, k, v = (x.to(dtype) for x in grouped_qkv(2, n))
            _, cache = attn.prefill(q, k, v, output=False)
            _, cache = attn.decode(*(x[:, :, :1] for x in (q, k, v)), cache)
            held.add(attn.cache_bytes(cache))
            model = attn.cache_model(batch=2, seq_len=n, head_dim=8, kv_heads=2, dtype=dtype)
            assert attn.cache_bytes(cache) == model
        favor = options["feature_map"] == "favor"
        assert held == {2 * 2 * (m * 9 + favor) * size}, held


def test_linear_half_precision_decode_at_long_context():
    """Float16 at a context where a float16 normaliser would have overflowed long before
    (about 1.7 m n > 65504): the float32 running sums keep prefill and decode close to
    float64."""
    n, attn = 6000, variants.build("linear")
    q, k, v = (x.to(torch.float16) for x in qkv(batch=1, heads=2, seq_len=n + 1, head_dim=16))
    ref = attn.double()(*(x.double() for x in (q, k, v)), causal=True)
    out, cache = attn.prefill(q[:, :, :n], k[:, :, :n], v[:, :, :n])
    step, _ = attn.decode(q[:, :, n:], k[:, :, n:], v[:, :, n:], cache)
    eps = torch.finfo(torch.float16).eps
    assert relative_error(out, ref[:, :, :n]) < 4 * eps
    assert relative_error(step, ref[:, :, n:]) < 4 * eps


# --- every causal-capable variant -------------------------------------------------------------
CAUSAL_VARIANTS = [
    ("linear", dict(feature_map="elu", chunk_size=8)),
    ("linear", dict(feature_map="relu", chunk_size=8)),
    ("linear", dict(feature_map="favor", num_features=32, head_dim=8, chunk_size=8)),
    ("reformer", dict(bucket_size=8, n_hashes=3)),
]


@pytest.mark.parametrize("name,options", CAUSAL_VARIANTS, ids=lambda x: str(x))
@pytest.mark.parametrize("t", [1, 13, 16])
def test_causal_outputs_do_not_depend_on_the_future(name, options, t):
    """Positions >= t replaced: outputs before t unchanged, bit for bit for linear (later keys
    meet exact zeros). Reformer's masked pairs keep a weight below e^-80 (its exp clamp), so
    it is checked to 1e-12; its key input is ignored and its windows depend on where every
    query hashes (future ones too, as in the paper), so for it the future's values are
    replaced (and its queries with one chunk, below)."""
    attn = double(name, **options)
    q, k, v = qkv(batch=1, heads=2, seq_len=40, head_dim=8)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    torch.manual_seed(t)
    for x in (k2, v2) if name == "reformer" else (q2, k2, v2):
        x[:, :, t:] = 3 * torch.randn_like(x[:, :, t:])
    before = attn(q, k, v, causal=True)[:, :, :t]
    after = attn(q2, k2, v2, causal=True)[:, :, :t]
    if name == "reformer":
        torch.testing.assert_close(after, before, **TIGHT)
    else:
        assert torch.equal(after, before)


def test_reformer_one_chunk_causal_ignores_future_queries():
    attn = double("reformer", bucket_size=64, n_hashes=2)
    q, k, v = qkv(batch=1, heads=2, seq_len=40, head_dim=8)
    q2 = q.clone()
    q2[:, :, 20:] = torch.randn_like(q2[:, :, 20:])
    torch.testing.assert_close(
        attn(q2, k, v, causal=True)[:, :, :20], attn(q, k, v, causal=True)[:, :, :20], **TIGHT
    )


# --- gradients --------------------------------------------------------------------------------
SMALL = [
    ("linformer", dict(seq_len=12, proj_len=5, num_heads=2, share="none"), False),
    ("reformer", dict(bucket_size=4, n_hashes=2), False),
    ("reformer", dict(bucket_size=4, n_hashes=2), True),
    ("linear", dict(feature_map="elu", chunk_size=4), False),
    ("linear", dict(feature_map="elu", chunk_size=4), True),
    ("linear", dict(feature_map="favor", num_features=8, head_dim=4, chunk_size=4, eps=0), True),
    ("linear", dict(feature_map="favor", num_features=8, head_dim=4, eps=0), False),
]


@pytest.mark.parametrize("name,options,causal", SMALL, ids=lambda x: str(x))
def test_gradients_match_finite_differences(name, options, causal):
    """In-place steps and detached stabilisers leave the gradient exact (gradcheck in
    float64); reformer's hashes are piecewise constant, so they do not move under the nudge."""
    attn = double(name, **options)
    q, k, v = qkv(batch=1, heads=2, seq_len=10, head_dim=4, requires_grad=True)
    inputs = (q, v) if name == "reformer" else (q, k, v)
    call = (
        (lambda q, v: attn(q, k, v, causal))
        if name == "reformer"
        else (lambda q, k, v: attn(q, k, v, causal))
    )
    assert torch.autograd.gradcheck(call, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


def test_gradients_reach_inputs_and_projections():
    q, k, v = qkv(batch=1, heads=2, seq_len=24, head_dim=8, requires_grad=True)
    lin = double("linformer", seq_len=24, proj_len=6, num_heads=2)
    lin(q, k, v).square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v, lin.E, lin.F))
    q.grad = k.grad = v.grad = None
    double("reformer", bucket_size=8)(q, k, v).square().sum().backward()
    assert q.grad.abs().sum() > 0 and v.grad.abs().sum() > 0
    assert k.grad is None  # the key input is not used


# --- cost models ------------------------------------------------------------------------------
def test_flops_by_hand():
    shape = dict(batch=1, heads=2, seq_len=10, head_dim=4)
    # linformer, k=3: E k and F v 2*3*10*4 each per head; scores and p v 2*10*3*4 each.
    lin = variants.build("linformer", seq_len=10, proj_len=3)
    assert lin.flops(**shape) == 2 * (2 * 240 + 2 * 240)
    # Grouped: one key/value head projected once for both query heads.
    assert lin.flops(**shape, kv_heads=1) == 2 * 240 + 2 * (2 * 240)
    # reformer, bucket 4, 2 rounds; hashing: 4 buckets -> 2 rotations per round, 2*10*4*2*2.
    # Windows of the 10 real positions: chunk 0's 4 queries see its 4 keys, chunk 1's 4 see 8,
    # chunk 2's 2 see 4 + 2 (padding is not counted): 60 pairs, 10 of them a query's own key,
    # so 5 of the 9 other keys per query per round; the expected union of 2 independent
    # rounds: 9 (1 - (4/9)^2) = 7.22 keys per query, 72 pairs; causal half of them, 36.
    ref = variants.build("reformer", bucket_size=4, n_hashes=2)
    hashing = 2 * 2 * 10 * 4 * 2 * 2
    assert ref.flops(**shape) == hashing + 2 * 2 * 72 * (4 + 4)
    assert ref.flops(**shape, causal=True) == hashing + 2 * 2 * 36 * (4 + 4)
    assert ref.flops(**shape, backward=True) == hashing + 3 * 2 * 2 * 72 * (4 + 4)
    # linear elu: fk^T [v, 1] and fq @ that, m = 4 features, 5 columns.
    elu = variants.build("linear")
    assert elu.flops(**shape) == 2 * (2 * 10 * 4 * 5 * 2)
    # Grouped: the summary is built once, for the one key/value head.
    assert elu.flops(**shape, kv_heads=1) == 2 * 10 * 4 * 5 * (1 + 2)
    # causal, chunk 4 (chunks of 4, 4 and 2 real rows): the pairs j <= i inside chunks,
    # 10 + 10 + 3, each m + 5 products; the summaries of the chunks a later chunk reads (8
    # keys) and the read-outs of the rows that have an earlier chunk (rows 4..9), 4 x 5 each.
    elu4 = variants.build("linear", chunk_size=4)
    useful = 23 * (4 + 5) + 8 * 20 + 6 * 20
    assert elu4.flops(**shape, causal=True) == 2 * 2 * useful
    # favor adds the two feature projections, 2*10*4*m each, and computes with m features;
    # the random features are constants: their backward is x's gradient only (1x).
    fav = variants.build("linear", feature_map="favor", num_features=6, head_dim=4)
    proj, core = 2 * 2 * 10 * 4 * 6, 2 * 2 * 10 * 6 * 5
    assert fav.flops(**shape) == 2 * (proj + core)
    assert fav.flops(**shape, backward=True) == 2 * (2 * proj + 3 * core)


COUNTED = [
    ("linformer", dict(seq_len=48, proj_len=16), False),
    ("linear", dict(), False),
    ("linear", dict(feature_map="favor", num_features=24, head_dim=8), False),
]


@pytest.mark.parametrize("name,options,causal", COUNTED, ids=lambda x: str(x))
@pytest.mark.parametrize("seq_len", [48, 45])
@pytest.mark.parametrize("kv_heads", [3, 1])
def test_flops_equal_the_counted_matmuls(name, options, causal, seq_len, kv_heads):
    """flops() is what really runs: FlopCounterMode sees every product of these variants,
    grouped heads too (the key side counted once per key/value head)."""
    attn = variants.build(name, **options)
    q, _, _ = qkv(batch=2, heads=3, seq_len=seq_len, head_dim=8, dtype=torch.float32)
    k, v = (torch.randn(2, kv_heads, seq_len, 8) for _ in "kv")
    with FlopCounterMode(display=False) as counter:
        attn(q, k, v, causal=causal)
    shape = dict(batch=2, heads=3, seq_len=seq_len, head_dim=8, causal=causal, kv_heads=kv_heads)
    assert attn.flops(**shape) == counter.get_total_flops()
    assert attn.flops(**shape, backward=True) > attn.flops(**shape)


COMPUTED_MORE = [
    ("reformer", dict(bucket_size=8), False),
    ("reformer", dict(bucket_size=8), True),
    ("linear", dict(chunk_size=16), True),
    ("linear", dict(feature_map="favor", num_features=24, head_dim=8, chunk_size=16), True),
]


def computed_by_hand(name, attn, seq_len, causal):
    """What the call computes, padding and hidden pairs included (B 2, H 3, d 8)."""
    bh, d = 2 * 3, 8
    if name == "reformer":  # hashing, then every round's every slot against its 2c window
        c, rounds = 8, attn.cfg.n_hashes
        padded = math.ceil(seq_len / c) * c
        half = math.ceil(seq_len / c) // 2 + math.ceil(seq_len / c) % 2
        return bh * (2 * seq_len * d * rounds * half + 2 * rounds * padded * 2 * c * 2 * d)
    m, c = attn.num_features(d), 16
    padded = math.ceil(seq_len / c) * c
    proj = 2 * 2 * seq_len * d * m if attn.cfg.feature_map == "favor" else 0
    # full (c x c) chunk scores and their product with [v, 1]; every chunk's summary and read-out
    return bh * (proj + 2 * padded * c * (m + d + 1) + 2 * 2 * padded * m * (d + 1))


@pytest.mark.parametrize("name,options,causal", COMPUTED_MORE, ids=lambda x: str(x))
@pytest.mark.parametrize("seq_len", [48, 45])
def test_flops_count_less_than_the_call_computes(name, options, causal, seq_len):
    """Reformer and causal linear compute padding, hidden and duplicate pairs: the counter
    sees that work (by hand, below), flops() only the useful part of it."""
    attn = variants.build(name, **options)
    assert not attn.counted_equals_analytic or name == "linear"
    q, k, v = qkv(batch=2, heads=3, seq_len=seq_len, head_dim=8, dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        attn(q, k, v, causal=causal)
    assert counter.get_total_flops() == computed_by_hand(name, attn, seq_len, causal)
    shape = dict(batch=2, heads=3, seq_len=seq_len, head_dim=8, causal=causal)
    assert attn.flops(**shape) < counter.get_total_flops()


def hashing_flops(shape, rounds, bucket_size):
    """x R for every position and round: nb = n / bucket_size buckets (even), nb / 2 columns."""
    nb = math.ceil(shape["seq_len"] / bucket_size)
    nb += nb % 2
    return (
        2
        * shape["batch"]
        * shape["heads"]
        * shape["seq_len"]
        * shape["head_dim"]
        * rounds
        * nb
        // 2
    )


def union_of_windows(q, rotations, bucket_size, causal):
    """The visible pairs of LSH attention counted from the definition (vectorised): per head,
    pairs (i, j), j != i, that share a window (j's sorted chunk is i's or the one before) in
    some round, and j <= i if causal."""
    B, H, n, _ = q.shape
    x = shared_qk_keys(q)
    chunk = min(bucket_size, n)
    seen = torch.zeros(B, H, n, n, dtype=torch.bool)
    for r in range(rotations.shape[1]):
        proj = x @ rotations[:, r].double()
        buckets = torch.cat([proj, -proj], -1).argmax(-1)  # (B, H, n)
        order = torch.sort(buckets * n + torch.arange(n), dim=-1)[1]  # by (bucket, position)
        chunk_of = torch.empty_like(order).scatter_(-1, order, torch.arange(n).expand_as(order))
        chunk_of = chunk_of // chunk
        gap = chunk_of[..., :, None] - chunk_of[..., None, :]  # query's chunk - key's
        seen |= (gap == 0) | (gap == 1)
    seen &= ~torch.eye(n, dtype=torch.bool)
    if causal:
        seen &= causal_mask(n)
    return int(seen.sum())


@pytest.mark.parametrize("causal", [False, True])
def test_reformer_flops_count_the_union_of_windows(causal):
    """On Gaussian inputs (rounds that hash nearly independently) the expected union that
    flops() counts is within 3% of the real one; causal about halves it."""
    n, H = 1024, 2
    attn = double("reformer", seed=1)
    q = qkv(batch=1, heads=H, seq_len=n, head_dim=64, seed=5)[0]
    real = union_of_windows(q, attn.rotations(64, n), 64, causal)
    shape = dict(batch=1, heads=H, seq_len=n, head_dim=64, causal=causal)
    pairs = (attn.flops(**shape) - hashing_flops(shape, 4, 64)) / (2 * (64 + 64))  # all heads
    assert abs(pairs / real - 1) < 0.03, (pairs, real)


@pytest.mark.parametrize(
    "name,options",
    [
        ("linformer", dict(seq_len=16384)),
        ("reformer", dict()),
        ("linear", dict()),
        ("linear", dict(feature_map="favor")),
    ],
    ids=lambda x: str(x),
)
@pytest.mark.parametrize("causal", [False, True])
def test_cost_models_grow_linearly(name, options, causal):
    """FLOPs and memory, n = 4096 -> 16384. Reformer's hashing (n x n / bucket_size
    multiply-adds) is its one superlinear term: left out of the FLOPs checked here; its memory
    is bounded (blocks of rows), so memory grows linearly."""
    attn = variants.build(name, **options)
    if attn.unsupported(causal=causal):
        return
    shape = dict(batch=1, heads=8, head_dim=64, causal=causal)

    def flops(seq_len):
        hashing = hashing_flops({**shape, "seq_len": seq_len}, 4, 64) if name == "reformer" else 0
        return attn.flops(seq_len=seq_len, **shape) - hashing

    # Reformer: the rounds' windows overlap less as n grows (duplicates 6% of the pairs at
    # 4096, 2.5% at 16384 on random inputs), so its union of pairs grows a little faster.
    limit = 1.05 if name == "reformer" else 1.01
    for model in (flops, lambda seq_len: attn.memory_model(seq_len=seq_len, **shape)):
        small, large = model(seq_len=4096), model(seq_len=16384)
        assert math.log(large / small, 4) < limit
