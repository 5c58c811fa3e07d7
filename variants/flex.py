"""FlexAttention baselines: ``torch.compile(flex_attention)`` with the block mask or score_mod
that reproduces one of our own variants exactly (``flex_full`` reproduces ``full``).

Each flex variant wraps its twin (built with the same options, so parameters are shared) and
takes its FLOPs from it. The first call for a new shape compiles: its wall time is kept in
``compile_s`` so the harness reports it apart from latency.

Grouped heads go through flex's own ``enable_gqa``. Decoding keeps a KV cache; a step is a
query of length 1 against it, with the twin's mask_mod / score_mod shifted so that the query's
q_idx is its position in the whole sequence (the cache length): the window of ``flex_local``
and the distances of ``flex_relative`` are the forward's.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode_temporarily
from torch.utils.flop_counter import _FlopCounterMode

from . import full, local, registry, relative, sparse  # noqa: F401  (twins register first)
from .common import itemsize
from .registry import Attention, Common, KVCacheDecoding, register
from .relative import t5_bucket


@functools.cache
def compiled_flex():
    # One compiled function serves every twin and shape; past dynamo's recompile limit (8 by
    # default) it would silently fall back to eager flex_attention, which materialises the n x n
    # scores: a sweep would then time the wrong thing.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    return torch.compile(flex_attention, dynamic=False)


def twin_config(twin: type[Common]) -> type[Common]:
    """The twin's config plus ``compile`` (False runs flex_attention eagerly: slow, same maths)."""
    return dataclasses.make_dataclass(
        f"Flex{twin.__name__}",
        [("compile", bool, dataclasses.field(default=True))],
        bases=(twin,),
    )


def shift_mask(mod, q_offset: int):
    """A mask_mod of whole-sequence positions, for queries that start at ``q_offset``."""
    if q_offset == 0:
        return mod
    return lambda b, h, q_idx, kv_idx: mod(b, h, q_idx + q_offset, kv_idx)


def shift_score(mod, q_offset: int):
    """A score_mod of whole-sequence positions, for queries that start at ``q_offset``."""
    if mod is None or q_offset == 0:
        return mod
    return lambda score, b, h, q_idx, kv_idx: mod(score, b, h, q_idx + q_offset, kv_idx)


def outside_flop_counter(fn):
    """Run ``fn()`` outside an active FlopCounterMode: PyTorch cannot run flex_attention under
    it (torch 2.13 raises TypeError in the dispatch mode, and the counter's module hooks fail on
    flex's traced score_mod), so the counter sees no work, as for any fused kernel. Only the
    counter steps aside (its per-module backward bookkeeping of modules in flight is dropped;
    totals are unaffected); other dispatch modes (fake tensors while tracing) stay."""
    mode = _get_current_dispatch_mode()
    if not isinstance(mode, _FlopCounterMode):
        return fn()
    tracker = mode.counter.mod_tracker
    tracker.__exit__()
    try:
        with _pop_mode_temporarily():
            return fn()
    finally:
        tracker.__enter__()


class FlexTwin(KVCacheDecoding, Attention):
    """Subclasses set ``twin`` and may override :meth:`mask_mod` and :meth:`score_mod`, both
    written for positions in a sequence of ``seq_len`` queries against its keys."""

    baseline = True  # a library kernel, not our own implementation
    # The kernel computes whole blocks, the masked pairs of partly visible ones too; True for
    # the twins that see every pair (full, relative) when not causal.
    counted_equals_analytic = False
    # Whether what a query sees depends only on its distance to each key (causal full, a
    # window, a relative bias), so a decode step's shifted mods are the forward's last row;
    # otherwise the twin's own decode_unsupported decides (a layout made for one length).
    decodes_by_distance = False

    twin: str = "full"

    def __init__(self, cfg):
        super().__init__(cfg)
        options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        options.pop("compile")
        self.inner = registry.build(self.twin, **options)  # shares its parameters
        self.compile_s: float | None = None  # wall time of the last first-call-for-a-shape
        self._seen: set = set()

    @property
    def compiled(self) -> bool:
        return self.cfg.compile

    def mask_mod(self, causal: bool, seq_len: int):
        """A flex mask_mod (b, h, q_idx, kv_idx) -> bool. Every pair visible is a mask too, not
        None: without a block mask the compiled CPU kernel (torch 2.13) builds two n x n bool
        masks (measured at n=2048, 8 heads: 91 MB against 24 MB, 1.7x the time)."""
        if causal:
            return lambda b, h, q_idx, kv_idx: q_idx >= kv_idx
        return lambda b, h, q_idx, kv_idx: q_idx >= 0

    def score_mod(self, seq_len: int):
        return None

    def unsupported(
        self, *, device="cpu", dtype=torch.float32, causal=False, seq_len=None, kv_heads=None
    ):
        reasons = super().unsupported(
            device=device, dtype=dtype, causal=causal, seq_len=seq_len, kv_heads=kv_heads
        )
        reasons += self.inner.unsupported(  # flex groups heads itself, whatever the twin does
            device=device, dtype=dtype, causal=causal, seq_len=seq_len
        )
        if self.cfg.compile and torch.device(device).type == "cpu" and dtype == torch.float64:
            reasons.append("compiled FlexAttention on CPU has no float64 kernel; use float32")
        return reasons

    def backward_unsupported(self, *, device="cpu"):
        if torch.device(device).type == "cpu":
            return ["FlexAttention has no backward on CPU (PyTorch refuses it); time fwd only"]
        return []

    def decode_unsupported(self, *, device="cpu", dtype=torch.float32):
        reasons = super().decode_unsupported(device=device, dtype=dtype)
        if not self.decodes_by_distance:
            reasons += self.inner.decode_unsupported(device=device, dtype=dtype)
        return reasons

    def attend(self, q, k, v, causal):
        return self._flex(q, k, v, causal, q_offset=0)

    def step(self, q_t, keys, values):
        """The new token is the last of the keys' sequence: causal at q_offset n_k - 1."""
        return self._flex(q_t, keys, values, True, q_offset=keys.shape[-2] - 1)

    def _flex(self, q, k, v, causal, q_offset):
        """flex_attention of queries at positions q_offset.. of the sequence against all of k."""
        n_q, n_k = q.shape[-2], k.shape[-2]
        block_mask = self._block_mask(causal, n_q, n_k, q_offset, str(q.device))
        score_mod = shift_score(self.score_mod(n_q + q_offset), q_offset)
        fn = compiled_flex() if self.cfg.compile else flex_attention
        key = (tuple(q.shape), tuple(k.shape), q.dtype, str(q.device), causal, q.requires_grad)
        first = self.cfg.compile and key not in self._seen
        start = time.perf_counter()
        out = outside_flop_counter(
            lambda: fn(
                q,
                k,
                v,
                score_mod=score_mod,
                block_mask=block_mask,
                enable_gqa=q.shape[1] != k.shape[1],
            )
        )
        if first:
            self._seen.add(key)
            self.compile_s = time.perf_counter() - start
        return out

    @functools.lru_cache(maxsize=32)  # noqa: B019 (one module lives as long as its masks)
    def _block_mask(self, causal, n_q, n_k, q_offset, device):
        mod = shift_mask(self.mask_mod(causal, n_q + q_offset), q_offset)
        return create_block_mask(mod, None, None, n_q, n_k, device=device)

    def flops(self, **shape):
        return self.inner.flops(**shape)

    def decode_flops(self, **shape):
        return self.inner.decode_flops(**shape)

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
        """Forward: measured with the profiler's allocation events (torch 2.13, CPU). Backward
        (CUDA only) is not measured here: the compiled kernel's output, log-sum-exp, its
        rowsum(dO * O) and the three gradients."""
        size = itemsize(dtype)
        out = batch * heads * seq_len * head_dim * size
        rows = batch * heads * seq_len * 4  # one float32 per query row (log-sum-exp, max)
        if backward:
            grads = out + 2 * batch * (kv_heads or heads) * seq_len * head_dim * size
            return out + 2 * rows + grads
        if self.cfg.compile:
            kv = batch * (kv_heads or heads) * seq_len * head_dim * size
            return compiled_flex_memory(seq_len, head_dim, dtype, out, kv)
        return eager_flex_memory(batch, heads, seq_len, dtype, out, rows)


def compiled_flex_memory(seq_len, head_dim, dtype, out, kv) -> int:
    """The compiled CPU kernel (inductor's cpp flex template, torch 2.13) holds scores a tile
    at a time: the output, k and v reordered into its own layout, and per thread a (q block x
    kv block) tile of scores (float32 and the input dtype), its row max and sum, an output
    tile and two (block x d) staging buffers; blocks are the block mask's 128. Measured: B1 H8
    d64 at n = 1024 and 2048, causal or not, grouped or not, within 0.1%."""
    block = min(128, seq_len)
    acc, size = 8 if dtype == torch.float64 else 4, itemsize(dtype)
    tiles = (block * block + 2 * block + block * head_dim) * acc
    tiles += (block * block + 2 * block * head_dim) * size
    return out + 2 * kv + torch.get_num_threads() * tiles


def eager_flex_memory(batch, heads, seq_len, dtype, out, rows) -> int:
    """Eager flex_attention (PyTorch's math_attention) materialises the scores in float32 (or
    float64): at its peak, inside the softmax, three n x n (the scaled scores, the masked ones
    and the probabilities) and _safe_softmax's n x n bool check, beside two n x d buffers
    (the output and, grouped or not, one more) and a few float32 rows."""
    work = 8 if dtype == torch.float64 else 4
    pairs = batch * heads * seq_len * seq_len
    return 2 * out + 3 * pairs * work + pairs + 3 * rows


@register("flex_full", config=twin_config(registry.config_class("full")))
class FlexFull(FlexTwin):
    twin = "full"
    counted_equals_analytic = True
    decodes_by_distance = True


class CallAwareTwin(FlexTwin):
    """A twin whose mask_mod / score_mod capture tensors (a block layout, a bias table) that must
    live on the call's device, or that depend on causal (T5 buckets the past differently).
    Each call (forward or decode step) records its device, causal flag, key length and dtype
    before the base class asks for the mods."""

    def _flex(self, q, k, v, causal, q_offset):
        self._call = (q.device, causal, k.shape[-2], q.dtype)
        return super()._flex(q, k, v, causal, q_offset)


@register("flex_local", config=twin_config(registry.config_class("local")))
class FlexLocal(FlexTwin):
    twin = "local"
    decodes_by_distance = True

    def mask_mod(self, causal, seq_len):
        window = self.cfg.window
        if causal:
            return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx <= window)
        return lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() <= window


@register("flex_sparse", config=twin_config(registry.config_class("sparse")))
class FlexSparse(CallAwareTwin):
    twin = "sparse"

    def mask_mod(self, causal, seq_len):
        device = self._call[0]
        layout = self.inner.layout(seq_len, causal).to(device)  # (heads or 1, nb, nb), its own
        size, per_head = self.cfg.block_size, layout.shape[0] > 1

        def visible(b, h, q_idx, kv_idx):
            seen = layout[h if per_head else 0, q_idx // size, kv_idx // size]
            return (seen & (q_idx >= kv_idx)) if causal else seen

        return visible

    @functools.lru_cache(maxsize=32)  # noqa: B019 (one module lives as long as its masks)
    def _block_mask(self, causal, n_q, n_k, q_offset, device):
        """BigBird's layout differs per head: its block mask must too (H=None broadcasts the
        first head's blocks to all)."""
        heads = self.inner.layout_heads
        if heads == 1:
            return super()._block_mask(causal, n_q, n_k, q_offset, device)
        mod = shift_mask(self.mask_mod(causal, n_q + q_offset), q_offset)
        return create_block_mask(mod, None, heads, n_q, n_k, device=device)


@register("flex_relative", config=twin_config(registry.config_class("relative")))
class FlexRelative(CallAwareTwin):
    twin = "relative"
    counted_equals_analytic = True
    decodes_by_distance = True

    def _flex(self, q, k, v, causal, q_offset):
        self.inner.check_heads(q)  # the bias has one column per head it was built for
        return super()._flex(q, k, v, causal, q_offset)

    def score_mod(self, seq_len):
        """Adds the twin's bias, reading its own parameter (t5) or slopes (alibi)."""
        device, causal, n_k, dtype = self._call
        inner, cfg = self.inner, self.cfg
        if cfg.kind == "t5":
            rel = torch.arange(-(seq_len - 1), n_k, device=device)  # every j - i
            buckets = t5_bucket(rel, not causal, cfg.num_buckets, cfg.max_distance)
            weight, offset = inner.t5_bias, seq_len - 1  # (num_buckets, heads)

            def add_bias(score, b, h, q_idx, kv_idx):
                return score + weight[buckets[kv_idx - q_idx + offset], h].to(score.dtype)

            return add_bias
        slopes = inner.slopes.to(dtype)  # float64 as stored; the kernel computes in dtype

        def add_penalty(score, b, h, q_idx, kv_idx):
            dist = kv_idx - q_idx if causal else -(kv_idx - q_idx).abs()
            return score + slopes[h] * dist

        return add_penalty
