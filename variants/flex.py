"""FlexAttention baselines: ``torch.compile(flex_attention)`` with the block mask or score_mod
that reproduces one of our own variants exactly (``flex_full`` reproduces ``full``).

Each flex variant wraps its twin (built with the same options, so parameters are shared) and
takes its FLOPs and memory model from it. The first call for a new shape compiles: its wall
time is kept in ``compile_s`` so the harness reports it apart from latency.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from . import full, local, registry, relative, sparse  # noqa: F401  (twins register first)
from .common import itemsize
from .registry import Attention, Common, register
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


class FlexTwin(Attention):
    """Subclasses set ``twin`` and may override :meth:`mask_mod` and :meth:`score_mod`."""

    baseline = True  # a library kernel, not our own implementation

    twin: str = "full"
    compiled = True

    def __init__(self, cfg):
        super().__init__(cfg)
        options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        options.pop("compile")
        self.inner = registry.build(self.twin, **options)  # shares its parameters
        self.compile_s: float | None = None  # wall time of the last first-call-for-a-shape
        self._seen: set = set()

    def mask_mod(self, causal: bool, seq_len: int):
        """A flex mask_mod (b, h, q_idx, kv_idx) -> bool, or None when every pair is visible."""
        if causal:
            return lambda b, h, q_idx, kv_idx: q_idx >= kv_idx
        return None

    def score_mod(self, seq_len: int):
        return None

    def unsupported(
        self, *, device="cpu", dtype=torch.float32, causal=False, seq_len=None, kv_heads=None
    ):
        reasons = super().unsupported(
            device=device, dtype=dtype, causal=causal, seq_len=seq_len, kv_heads=kv_heads
        )
        reasons += self.inner.unsupported(
            device=device, dtype=dtype, causal=causal, seq_len=seq_len, kv_heads=kv_heads
        )
        if self.cfg.compile and torch.device(device).type == "cpu" and dtype == torch.float64:
            reasons.append("compiled FlexAttention on CPU has no float64 kernel; use float32")
        return reasons

    def backward_unsupported(self, *, device="cpu"):
        if torch.device(device).type == "cpu":
            return ["FlexAttention has no backward on CPU (PyTorch refuses it); time fwd only"]
        return []

    def attend(self, q, k, v, causal):
        n_q, n_k = q.shape[-2], k.shape[-2]
        block_mask = self._block_mask(causal, n_q, n_k, q.device.type, str(q.device))
        fn = compiled_flex() if self.cfg.compile else flex_attention
        key = (tuple(q.shape), q.dtype, str(q.device), causal, q.requires_grad)
        first = self.cfg.compile and key not in self._seen
        start = time.perf_counter()
        out = fn(q, k, v, score_mod=self.score_mod(n_q), block_mask=block_mask)
        if first:
            self._seen.add(key)
            self.compile_s = time.perf_counter() - start
        return out

    @functools.lru_cache(maxsize=32)  # noqa: B019 (one module lives as long as its masks)
    def _block_mask(self, causal, n_q, n_k, device_type, device):
        mod = self.mask_mod(causal, n_q)
        if mod is None:
            return None
        return create_block_mask(mod, None, None, n_q, n_k, device=device)

    def flops(self, **shape):
        return self.inner.flops(**shape)

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
        if not self.cfg.compile:  # eager flex_attention materialises the scores like `full`
            return registry.build("full").memory_model(
                batch=batch, heads=heads, seq_len=seq_len, head_dim=head_dim, dtype=dtype
            )
        # The compiled kernel holds scores a tile at a time: the output and its logsumexp.
        return batch * heads * seq_len * (head_dim * itemsize(dtype) + 4)


@register("flex_full", config=twin_config(registry.config_class("full")))
class FlexFull(FlexTwin):
    twin = "full"


class CallAwareTwin(FlexTwin):
    """A twin whose mask_mod / score_mod capture tensors (a block layout, a bias table) that must
    live on the call's device, or that depend on causal (T5 buckets the past differently).
    ``attend`` records the call's device, causal flag, key length and dtype before the base class
    asks for the mods."""

    def attend(self, q, k, v, causal):
        self._call = (q.device, causal, k.shape[-2], q.dtype)
        return super().attend(q, k, v, causal)


@register("flex_local", config=twin_config(registry.config_class("local")))
class FlexLocal(FlexTwin):
    twin = "local"

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
        layout = self.inner.layout(seq_len, causal).to(device)  # (nb, nb), the twin's own
        size = self.cfg.block_size

        def visible(b, h, q_idx, kv_idx):
            seen = layout[q_idx // size, kv_idx // size]
            return (seen & (q_idx >= kv_idx)) if causal else seen

        return visible


@register("flex_relative", config=twin_config(registry.config_class("relative")))
class FlexRelative(CallAwareTwin):
    twin = "relative"

    def attend(self, q, k, v, causal):
        self.inner.check_heads(q)  # the bias has one column per head it was built for
        return super().attend(q, k, v, causal)

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
