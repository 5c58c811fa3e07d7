"""``sdpa`` and ``sdpa_<backend>``: PyTorch's fused scaled_dot_product_attention, what most users
pick instead. The backend variants force one kernel through ``torch.nn.attention.sdpa_kernel``.

Grouped heads go through SDPA's own ``enable_gqa`` (on CPU both the math and the flash kernel
accept it); decoding is a query of length 1 against the KV cache, with no mask: the new token
sees every cached one and itself.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .common import itemsize
from .registry import DenseAttention, KVCacheDecoding, Unsupported, register

HALF = (torch.float16, torch.bfloat16)

# What PyTorch says when a forced backend has no kernel for the inputs; matched on the message
# with its whitespace collapsed and lower-cased ("No available kernel.  Aborting execution." has
# two spaces in torch 2.13). Other RuntimeErrors are real errors and are raised as such.
REFUSALS = ("no available kernel", "no viable backend", "not supported", "kernel not used")


def is_refusal(error: RuntimeError) -> bool:
    """True when ``error`` is SDPA declining the inputs, not a failure while computing."""
    text = " ".join(str(error).split()).lower()
    return any(phrase in text for phrase in REFUSALS)


def refusal_reason(backend: SDPBackend, q, k, v, **kw) -> str:
    """Why ``backend`` refuses: PyTorch explains in warnings it emits while dispatching (the
    refusal comes before any work, so asking again is cheap), else the error's first line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, **kw)
        except RuntimeError as e:
            error = " ".join(str(e).split()) or type(e).__name__
        else:
            return "it ran when asked again"
    said = [" ".join(str(w.message).split()).split(" (Triggered internally")[0] for w in caught]
    said = [s for s in said if s and "kernel not used because" not in s.lower()]
    return "; ".join(dict.fromkeys(said))[:300] or error.split(". ")[0]


def sdpa_call(backend: SDPBackend | None, q, k, v, *, is_causal: bool, name: str):
    """F.scaled_dot_product_attention, grouped where k, v have fewer heads than q, forced to
    ``backend`` (None: PyTorch's dispatch). A backend's refusal is Unsupported, with its reason."""
    kw = {"is_causal": is_causal, "enable_gqa": q.shape[1] != k.shape[1]}
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    try:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, **kw)
    except RuntimeError as e:
        if not is_refusal(e):
            raise
        why = refusal_reason(backend, q, k, v, **kw)
        raise Unsupported(f"{name}: PyTorch's {backend.name} kernel refused ({why})") from e


class SDPA(KVCacheDecoding, DenseAttention):
    baseline = True  # a library kernel, not our own implementation
    backend: SDPBackend | None = None  # None: PyTorch's own dispatch
    # The fused CPU kernel is invisible to FlopCounterMode (it counts 0); the math backend is
    # made of matmuls over exactly the visible pairs of a non-causal call.

    def unsupported(
        self, *, device="cpu", dtype=torch.float32, causal=False, seq_len=None, kv_heads=None
    ):
        reasons = super().unsupported(
            device=device, dtype=dtype, causal=causal, seq_len=seq_len, kv_heads=kv_heads
        )
        reasons += self._backend_limits(torch.device(device).type, dtype)
        if not reasons and self.backend is not None:
            grouped = kv_heads is not None and kv_heads != self.cfg.num_heads
            reasons += _probe(self.backend, str(device), dtype, causal, grouped)
        return reasons

    def _backend_limits(self, device_type, dtype) -> list[str]:
        return []

    def attend(self, q, k, v, causal):
        return sdpa_call(self.backend, q, k, v, is_causal=causal, name=self.name)

    def step(self, q_t, keys, values):
        return sdpa_call(self.backend, q_t, keys, values, is_causal=False, name=self.name)

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
        shape = (batch, heads, kv_heads or heads, seq_len, head_dim, dtype)
        if self.backend == SDPBackend.MATH:
            return math_memory(*shape, causal, backward)
        return fused_memory(*shape, backward, cpu_buffers=self.backend in CPU_FLASH)


# Backends that run PyTorch's CPU flash kernel on CPU (default dispatch picks it for our calls).
CPU_FLASH = (None, SDPBackend.FLASH_ATTENTION)


def math_memory(batch, heads, kv_heads, n, d, dtype, causal, backward) -> int:
    """Peak bytes of SDPA's math backend above its inputs (torch 2.13, traced with the
    profiler's allocation events). Causal builds an additive (n x n) float mask; grouped heads
    are first repeated to every query head (copies of k and v); q and k are scaled by d^-1/4
    each; then the n x n scores, their softmax, and _safe_softmax's n x n bool check. Backward
    peaks inside the softmax's backward as the dense ``full`` does: P, dP and dS beside the
    scaled q and k, the output and dV. Half precision on CPU is computed in float32 (q, k, v
    upcast first): about 10% above what is measured, in float32 the model is exact."""
    size = 4 if dtype in HALF else itemsize(dtype)
    upcast = 3 * batch * heads * n * d * size if dtype in HALF else 0
    nd = batch * heads * n * d * size
    n2 = batch * heads * n * n * size
    mask = n * n * size if causal else 0
    repeated = 2 * nd if kv_heads != heads else 0
    checks = batch * heads * n * n  # bool
    if not backward:  # the scaled k dies with the product; the scaled q lives to the end
        return upcast + mask + repeated + nd + 2 * n2 + checks
    forward = mask + repeated + 2 * nd + 2 * n2 + checks
    return upcast + max(forward, 4 * nd + 3 * n2)


def fused_memory(batch, heads, kv_heads, n, d, dtype, backward, cpu_buffers) -> int:
    """Fused kernels hold scores a tile at a time: forward the output and its log-sum-exp
    (float32, one per row); backward also the three gradients. PyTorch's CPU flash kernel adds
    per-thread tiles of (q block x kv block) floats (ATen's FlashAttentionKernel.cpp: blocks of
    256, 64 or 32 query rows by the query length, and 512 keys) and, in backward, a copy of the
    output gradient in its (B, n, H, d) layout."""
    size, acc = itemsize(dtype), 4 if dtype in HALF else itemsize(dtype)
    out = batch * heads * n * d * size
    lse = batch * heads * n * acc
    grads = out + 2 * batch * kv_heads * n * d * size
    if not cpu_buffers:
        return out + lse + (grads if backward else 0)
    threads = torch.get_num_threads()
    qs = min(256 if n >= 768 else 64 if n >= 192 else 32, n)
    kvs = min(512, n)
    reduced = size if dtype in HALF else 0  # half tiles are also kept in the input dtype
    if not backward:
        return out + lse + threads * ((qs * kvs + 2 * qs + qs * d) * acc + qs * kvs * reduced)
    tiles = threads * (2 * qs * kvs * (acc + reduced) + qs * acc)
    return out + lse + grads + out + tiles


@functools.cache
def _probe(backend, device: str, dtype: torch.dtype, causal: bool, grouped: bool) -> list[str]:
    """Ask PyTorch itself, on a tiny input, whether the forced backend has a kernel here."""
    q = torch.randn(1, 2, 16, 16, device=device).to(dtype)
    k = q[:, :1] if grouped else q  # one key/value head for two query heads
    try:
        sdpa_call(backend, q, k, k, is_causal=causal, name="probe")
    except (RuntimeError, Unsupported) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = "grouped heads in " if grouped else ""
        return [f"PyTorch has no {backend.name} kernel for {what}{dtype} on {device} ({why})"]
    return []


@register("sdpa")
class SDPADefault(SDPA):
    pass


@register("sdpa_math")
class SDPAMath(SDPA):
    backend = SDPBackend.MATH


@register("sdpa_flash")
class SDPAFlash(SDPA):
    backend = SDPBackend.FLASH_ATTENTION

    def _backend_limits(self, device_type, dtype):
        if device_type == "cuda" and dtype not in HALF:
            return [f"FlashAttention on CUDA runs float16/bfloat16 only, not {dtype}"]
        return []


@register("sdpa_efficient")
class SDPAEfficient(SDPA):
    backend = SDPBackend.EFFICIENT_ATTENTION

    def _backend_limits(self, device_type, dtype):
        if device_type != "cuda":
            return ["the memory-efficient SDPA kernel exists on CUDA only; use sdpa_flash on CPU"]
        return []


@register("sdpa_cudnn")
class SDPACudnn(SDPA):
    backend = SDPBackend.CUDNN_ATTENTION

    def _backend_limits(self, device_type, dtype):
        if device_type != "cuda":
            return ["cuDNN attention exists on CUDA only"]
        if dtype not in HALF:
            return [f"cuDNN attention runs float16/bfloat16 only, not {dtype}"]
        return []
