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
from variants import linformer
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
    # reformer, bucket 4: 3 chunks (12 padded slots), 2 rounds, 2*4 keys per query;
    # hashing: 4 buckets -> 2 rotations per round.
    ref = variants.build("reformer", bucket_size=4, n_hashes=2)
    pairs = 2 * 12 * 8
    assert ref.flops(**shape) == 2 * (2 * 10 * 4 * 2 * 2 + 2 * pairs * (4 + 4))
    # linear elu: fk^T [v, 1] and fq @ that, m = 4 features, 5 columns.
    elu = variants.build("linear")
    assert elu.flops(**shape) == 2 * (2 * 10 * 4 * 5 * 2)
    # causal, chunk 4: 3 chunks (12 padded rows) of scores (4x4, m + 5 columns), of chunk
    # summaries and of readouts (m x 5 each row).
    elu4 = variants.build("linear", chunk_size=4)
    assert elu4.flops(**shape, causal=True) == 2 * (2 * 12 * 4 * (4 + 5) + 2 * 2 * 12 * 4 * 5)
    # favor adds the two feature projections, 2*10*4*m each, and computes with m features.
    fav = variants.build("linear", feature_map="favor", num_features=6, head_dim=4)
    assert fav.flops(**shape) == 2 * (2 * 2 * 10 * 4 * 6 + 2 * 2 * 10 * 6 * 5)


COUNTED = [
    ("linformer", dict(seq_len=48, proj_len=16), False),
    ("reformer", dict(bucket_size=8), False),
    ("reformer", dict(bucket_size=8), True),
    ("linear", dict(), False),
    ("linear", dict(chunk_size=16), True),
    ("linear", dict(feature_map="favor", num_features=24, head_dim=8), False),
    ("linear", dict(feature_map="favor", num_features=24, head_dim=8, chunk_size=16), True),
]


@pytest.mark.parametrize("name,options,causal", COUNTED, ids=lambda x: str(x))
@pytest.mark.parametrize("seq_len", [48, 45])
def test_flops_equal_the_counted_matmuls(name, options, causal, seq_len):
    """flops() is what really runs: FlopCounterMode sees every product of these variants."""
    attn = variants.build(name, **options)
    q, k, v = qkv(batch=2, heads=3, seq_len=seq_len, head_dim=8, dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        attn(q, k, v, causal=causal)
    shape = dict(batch=2, heads=3, seq_len=seq_len, head_dim=8, causal=causal)
    assert attn.flops(**shape) == counter.get_total_flops()
    assert attn.flops(**shape, backward=True) > attn.flops(**shape)


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
    attn = variants.build(name, **options)
    if attn.unsupported(causal=causal):
        return
    shape = dict(batch=1, heads=8, head_dim=64, causal=causal)
    for model in (attn.flops, attn.memory_model):
        small, large = model(seq_len=4096, **shape), model(seq_len=16384, **shape)
        # reformer's hashing (n x n / bucket_size) is the only superlinear term, and small
        assert math.log(large / small, 4) < (1.25 if name == "reformer" else 1.01)
