"""Which keys each query sees, found from the code of every registered variant.

No variant is asked to describe itself: query i sees key j iff out_i depends on v_j, read from
autograd (d out_i / d v_j nonzero) on a small random input. A variant with no backward on this
device is probed forward only instead: each v_j perturbed in its own batch element.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

N, D = 64, 16  # small enough to draw one cell per (query, key) pair
# Small option values so that a window, block, bucket or projection shows inside n = 64;
# only the options a variant has are passed (flex twins inherit their twin's options).
SMALL_OPTIONS = {
    "seq_len": N, "num_heads": 1, "head_dim": D, "window": 8, "block_size": 8,
    "bucket_size": 8, "proj_len": 16, "compile": False,
}  # fmt: skip


@dataclass
class Pattern:
    variant: str
    causal: bool
    visible: np.ndarray | None  # (N, N) bool: [query, key]; None when not computed
    method: str = ""
    dtype: str = ""
    note: str = ""  # why it was not computed


def attention_patterns(names: list[str] | None = None) -> list[Pattern]:
    import variants  # heavy (torch, xformers): only when a report asks for patterns

    names = variants.available() if names is None else names
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only add spin-waits on a busy machine
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager FlexAttention warns that it is unfused
            for name in names:
                out += _patterns_of(variants, name)
    finally:
        torch.set_num_threads(threads)
    return out


def _patterns_of(variants, name: str) -> list[Pattern]:
    try:
        options = {k: v for k, v in SMALL_OPTIONS.items() if k in variants.option_names(name)}
        attn = variants.build(name, **options).eval()
    except Exception as e:  # a variant that cannot be built is reported, not fatal
        return [Pattern(name, c, None, note=f"could not build: {e}") for c in (False, True)]
    return [_pattern(attn, name, causal) for causal in (False, True)]


def _pattern(attn, name: str, causal: bool) -> Pattern:
    reasons = {}
    for dtype in (torch.float64, torch.float32):  # float64 makes an exact zero unambiguous
        why = attn.unsupported(device="cpu", dtype=dtype, causal=causal, seq_len=N)
        if not why:
            return _measure(attn, name, causal, dtype)
        reasons[dtype] = why
    first = next(iter(reasons.values()))
    return Pattern(name, causal, None, note="unsupported on CPU: " + "; ".join(first))


def _measure(attn, name: str, causal: bool, dtype: torch.dtype) -> Pattern:
    no_backward = getattr(attn, "backward_unsupported", lambda **_: [])(device="cpu")
    try:
        if no_backward:
            return Pattern(
                name, causal, _by_perturbation(attn, causal, dtype), "perturbation", str(dtype)
            )
        return Pattern(name, causal, _by_autograd(attn, causal, dtype), "autograd", str(dtype))
    except Exception as e:  # shown in the report as a skipped pattern with its reason
        return Pattern(name, causal, None, note=f"{type(e).__name__}: {e}"[:300])


def _inputs(dtype, batch=1):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 1, N, D, generator=g, dtype=dtype) for _ in range(3)]


def _by_autograd(attn, causal: bool, dtype) -> np.ndarray:
    q, k, v = _inputs(dtype)
    v.requires_grad_(True)
    out = attn(q, k, v, causal=causal)  # (1, 1, N, D)
    w = torch.randn(D, generator=torch.Generator().manual_seed(1), dtype=dtype)
    rows = []
    for i in range(N):  # a random cotangent: no accidental cancellation across channels
        (g,) = torch.autograd.grad(out[0, 0, i] @ w, v, retain_graph=True)
        rows.append(g[0, 0].abs().sum(-1))  # (N,) over keys j
    return _nonzero(torch.stack(rows), dtype)


@torch.no_grad()
def _by_perturbation(attn, causal: bool, dtype) -> np.ndarray:
    q, k, v = _inputs(dtype)
    bq, bk, bv = (t.expand(N + 1, -1, -1, -1).clone() for t in (q, k, v))  # (N+1, 1, N, D)
    bv[1 + torch.arange(N), 0, torch.arange(N)] += 1.0  # element 1 + j has v_j moved
    out = attn(bq, bk, bv, causal=causal)
    diff = (out[1:] - out[:1]).abs().sum(-1)[:, 0]  # (j, i)
    return _nonzero(diff.T, dtype)


def _nonzero(effect: torch.Tensor, dtype) -> np.ndarray:
    """Visible where the effect is above rounding noise, relative to the row's largest."""
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    scale = effect.amax(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    return (effect > tol * scale).numpy()
