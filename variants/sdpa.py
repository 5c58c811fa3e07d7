"""``sdpa`` and ``sdpa_<backend>``: PyTorch's fused scaled_dot_product_attention, what most users
pick instead. The backend variants force one kernel through ``torch.nn.attention.sdpa_kernel``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .common import itemsize
from .registry import DenseAttention, Unsupported, register

HALF = (torch.float16, torch.bfloat16)


class SDPA(DenseAttention):
    baseline = True  # a library kernel, not our own implementation
    backend: SDPBackend | None = None  # None: PyTorch's own dispatch

    def unsupported(
        self, *, device="cpu", dtype=torch.float32, causal=False, seq_len=None, kv_heads=None
    ):
        reasons = super().unsupported(
            device=device, dtype=dtype, causal=causal, seq_len=seq_len, kv_heads=kv_heads
        )
        reasons += self._backend_limits(torch.device(device).type, dtype)
        if not reasons and self.backend is not None:
            reasons += _probe(self.backend, str(device), dtype, causal)
        return reasons

    def _backend_limits(self, device_type, dtype) -> list[str]:
        return []

    def attend(self, q, k, v, causal):
        if self.backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        try:
            with sdpa_kernel(self.backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        except RuntimeError as e:  # the kernel refused these inputs after all
            if "No viable backend" in str(e) or "not supported" in str(e).lower():
                raise Unsupported(f"{self.name}: {self.backend.name} refused these inputs") from e
            raise

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
        size = itemsize(dtype)
        out = batch * heads * seq_len * head_dim * size
        if self.backend == SDPBackend.MATH:
            return 2 * batch * heads * seq_len * seq_len * size + out
        return out  # fused kernels hold scores a tile at a time


@functools.cache
def _probe(backend: SDPBackend, device: str, dtype: torch.dtype, causal: bool) -> list[str]:
    """Ask PyTorch itself, on a tiny input, whether the forced backend has a kernel here."""
    q = torch.randn(1, 1, 16, 16, device=device).to(dtype)
    try:
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, q, q, is_causal=causal)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return [f"PyTorch has no {backend.name} kernel for {dtype} on {device} ({first})"]
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
