"""The variant registry: the one way every attention implementation is reached.

See docs/variants-api.md. A variant is a subclass of :class:`Attention` with a
typed config dataclass (a subclass of :class:`Common`), registered under one name with
:func:`register`. The harness, the tests and the reports reach variants only through
:func:`available` and :func:`build`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .common import KVCache, append, dense_flops, itemsize, softmax_flops, start_cache


class Unsupported(NotImplementedError):
    """A case a variant cannot run. The message says why, and what to do instead."""


@dataclass
class Common:
    """Options every variant accepts (a variant that does not need one ignores it)."""

    seq_len: int | None = (
        None  # length the module is built for; Linformer sizes its projections by it
    )
    num_heads: int = 8  # query heads per call; variants with per-head parameters size them by it
    kv_heads: int | None = None  # key/value heads (GQA/MQA); None: num_heads. Query head h uses
    # key/value head h // (num_heads // kv_heads), as SDPA's enable_gqa groups them
    head_dim: int = 64  # channels per head; FAVOR draws its random features in this dimension
    seed: int = 0  # seeds every random draw of the variant (projections, hashes, layouts)

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // (self.kv_heads or self.num_heads)


def check_common(cfg: Common) -> None:
    """The shared options' own rules (a variant's __post_init__ checks its own)."""
    kv = cfg.kv_heads
    if kv is not None and (kv < 1 or cfg.num_heads % kv):
        raise ValueError(
            f"num_heads={cfg.num_heads} is not a multiple of kv_heads={kv}: every key/value head "
            "must serve the same number of query heads; choose kv_heads among the divisors of "
            "num_heads"
        )


FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class Attention(nn.Module):
    """Base of every variant: ``attn(q, k, v, causal=False)``, q (batch, heads, n, head_dim),
    k and v (batch, kv_heads, n_k, head_dim) with heads a multiple of kv_heads.

    Subclasses implement :meth:`attend` and :meth:`flops`, extend :meth:`unsupported` with the
    cases they cannot run, give :meth:`memory_model` for forward and forward+backward, and, where
    the mechanism runs autoregressively, :meth:`prefill`, :meth:`decode` and :meth:`cache_bytes`
    (see docs/variants-api.md).
    """

    name: str = "?"  # set by build(): the registry key
    compiled: bool = False  # True for torch.compile'd baselines: their first call is compile time
    baseline: bool = False  # True for library kernels (sdpa, xformers, flex); False: our own
    # flops() counts every product the call computes (no masked, padded or recomputed work), so
    # FlopCounterMode's count equals it; False where the call computes more than it keeps
    counted_equals_analytic: bool = True

    def __init__(self, cfg: Common):
        super().__init__()
        self.cfg = cfg

    # --- capabilities -------------------------------------------------------------------------
    def unsupported(
        self, *, device="cpu", dtype=torch.float32, causal=False, seq_len=None, kv_heads=None
    ) -> list[str]:
        """Reasons this variant cannot run the case (empty: it can). Runs nothing.
        ``kv_heads``: key/value heads of the call (None: as many as query heads)."""
        if dtype not in FLOAT_DTYPES:
            return [f"dtype {dtype} is not a floating type this variant computes in"]
        return []

    def backward_unsupported(self, *, device="cpu") -> list[str]:
        """Reasons this variant cannot run a backward pass on ``device`` (empty: it can)."""
        return []

    def decode_unsupported(self, *, device="cpu", dtype=torch.float32) -> list[str]:
        """Reasons this variant cannot decode token by token (empty: prefill/decode work)."""
        if type(self).prefill is Attention.prefill:
            return [f"{self.name} has no autoregressive form implemented (prefill/decode)"]
        return self.unsupported(device=device, dtype=dtype, causal=True)

    # --- cost models --------------------------------------------------------------------------
    def flops(
        self, *, batch, heads, seq_len, head_dim, causal=False, backward=False, kv_heads=None
    ) -> int:
        """Analytic FLOPs of the useful work (2 per multiply-add), counted on the query heads;
        ``backward=True`` counts forward plus backward (the ``fwd_bwd`` pass), the backward as
        BACKWARD_FACTOR x the forward's products (variants.common.softmax_flops)."""
        raise NotImplementedError

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
        """Analytic peak bytes of the call's own tensors above its inputs (q, k, v; for
        ``backward=True`` also the output gradient), forward only or forward+backward (the
        gradients of q, k, v are the call's own). None if unknown."""
        return None

    def decode_flops(self, *, batch, heads, seq_len, head_dim, kv_heads=None) -> int | None:
        """FLOPs of one decode step: a new token after a context of ``seq_len`` tokens."""
        return None

    def cache_model(self, *, batch, seq_len, head_dim, kv_heads, dtype=torch.float32):
        """Analytic bytes of the decoding state after ``seq_len`` tokens (what cache_bytes
        should measure), or None."""
        return None

    # --- the call -----------------------------------------------------------------------------
    def forward(self, q, k, v, causal: bool = False):
        _check_inputs(q, k, v)
        reasons = self.unsupported(
            device=q.device,
            dtype=q.dtype,
            causal=causal,
            seq_len=q.shape[-2],
            kv_heads=k.shape[1],
        )
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            reasons += self.backward_unsupported(device=q.device)
        if reasons:
            raise Unsupported(f"{self.name}: " + "; ".join(reasons))
        return self.attend(q, k, v, causal)

    def attend(self, q, k, v, causal: bool):
        raise NotImplementedError

    # --- decoding -----------------------------------------------------------------------------
    def prefill(self, q, k, v, *, output: bool = True):
        """Causal attention over a prompt, and the state to continue from: ``(out, cache)``.
        ``output=False`` builds the state only and returns ``(None, cache)``: a long context is
        then cheap to set up (the harness's decode pass times the steps after it)."""
        raise Unsupported(f"{self.name}: " + "; ".join(self.decode_unsupported(device=q.device)))

    def decode(self, q_t, k_t, v_t, cache):
        """One new token (q_t (B, H, 1, d), k_t and v_t (B, kv_heads, 1, d)): ``(out_t,
        cache)``. The cache passed in is not changed as its holder sees it, so the same step can
        be repeated from it (the harness times steps that way)."""
        raise Unsupported(f"{self.name}: " + "; ".join(self.decode_unsupported(device=q_t.device)))

    def cache_bytes(self, cache) -> int:
        """Bytes of the decoding state for the tokens it holds (what a server keeps per
        sequence)."""
        raise Unsupported(f"{self.name}: no decoding state")

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.cfg).items())


class DenseAttention(Attention):
    """An exact variant that computes every (causally) visible pair: its useful work, and so
    its FLOPs, are those of ``full``."""

    def flops(
        self, *, batch, heads, seq_len, head_dim, causal=False, backward=False, kv_heads=None
    ):
        return dense_flops(
            batch=batch,
            heads=heads,
            seq_len=seq_len,
            head_dim=head_dim,
            causal=causal,
            backward=backward,
        )

    def decode_flops(self, *, batch, heads, seq_len, head_dim, kv_heads=None):
        """The new query against the context and itself: seq_len + 1 keys."""
        return softmax_flops(batch=batch, heads=heads, pairs=seq_len + 1, head_dim=head_dim)


class KVCacheDecoding:
    """prefill / decode / cache_bytes over a KV cache (variants.common.KVCache), for an exact
    variant whose :meth:`step` attends one new query to every key the cache holds: the new
    token sees all of them and itself, so no mask is needed."""

    def step(self, q_t, keys, values):
        """q_t (B, H, 1, d) against keys, values (B, KV, n, d): (B, H, 1, d)."""
        raise NotImplementedError

    def prefill(self, q, k, v, *, output: bool = True):
        self._check_decodes(q, k)
        return (self(q, k, v, causal=True) if output else None), start_cache(k, v)

    def decode(self, q_t, k_t, v_t, cache: KVCache):
        self._check_decodes(q_t, k_t)
        cache = append(cache, k_t, v_t)  # the cache passed in still sees its own tokens only
        return self.step(q_t, cache.keys, cache.values), cache

    def _check_decodes(self, q, k) -> None:
        reasons = self.decode_unsupported(device=q.device, dtype=q.dtype)
        reasons = reasons or self.unsupported(
            device=q.device, dtype=q.dtype, causal=True, kv_heads=k.shape[1]
        )
        if reasons:
            raise Unsupported(f"{self.name}: " + "; ".join(reasons))

    def cache_bytes(self, cache: KVCache) -> int:
        return cache.nbytes()

    def cache_model(self, *, batch, seq_len, head_dim, kv_heads, dtype=torch.float32):
        """Keys and values of every token at kv_heads."""
        return 2 * batch * kv_heads * seq_len * head_dim * itemsize(dtype)


def _check_inputs(q, k, v):
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise ValueError(
            "q, k, v must be 4-d (batch, heads, seq_len, head_dim); got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError("q, k, v must share one dtype and one device")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"q and k need the same head_dim and k, v the same length; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0] or k.shape[:2] != v.shape[:2] or q.shape[1] % k.shape[1]:
        raise ValueError(
            "k and v need q's batch and a number of heads that divides q's (grouped heads); "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )


# --- the registry ---------------------------------------------------------------------------
_REGISTRY: dict[str, tuple[type[Attention], type[Common]]] = {}


def register(name: str, config: type[Common] = Common):
    """Class decorator: register an :class:`Attention` subclass under ``name``."""
    if not (dataclasses.is_dataclass(config) and issubclass(config, Common)):
        raise TypeError(f"{name}: config must be a dataclass derived from variants.Common")

    def deco(cls):
        if name in _REGISTRY:
            raise ValueError(f"variant {name!r} is already registered (by {_REGISTRY[name][0]})")
        if not issubclass(cls, Attention):
            raise TypeError(f"{name}: {cls} must derive from variants.Attention")
        _REGISTRY[name] = (cls, config)
        return cls

    return deco


def available() -> list[str]:
    """Every registered variant name, sorted."""
    return sorted(_REGISTRY)


def config_class(name: str) -> type[Common]:
    """The typed config dataclass (with the defaults) of variant ``name``."""
    return _lookup(name)[1]


def option_names(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(config_class(name))]


def build(name: str, **options) -> Attention:
    """Build variant ``name`` with ``options`` (its config fields; unknown ones are refused)."""
    cls, config = _lookup(name)
    known = option_names(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(
            f"variant {name!r} has no option {unknown[0]!r}; its options are: {', '.join(known)}"
        )
    cfg = config(**options)
    check_common(cfg)
    module = cls(cfg)
    module.name = name
    return module


def _lookup(name: str):
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; available: {', '.join(available())}") from None
