"""Approximation error: how far a variant's attention output is from exact softmax attention
on the same q, k, v, as a figure a reader can act on.

- ``trained``: the q, k, v the trained model feeds its first attention layer on test inputs,
  through that layer's own trained module (a Linformer's learned projections, not fresh
  ones), against exact attention (``full`` in float64) on the same q, k, v: what the
  approximation gives up on the attention the task actually needs.
- ``random``: standard normal q, k, v, only for variants without learned parameters (local,
  sparse, reformer, linear): the error there is a property of the mechanism. A variant with
  learned parameters would be measured at its random initialisation, which says nothing (an
  untrained Linformer projection rescales the values: errors of 38-135 were reported).

Exact variants (full and its library twins, relative: softmax with a bias) have no such row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import torch
from torch import nn

import variants

REFERENCE = "full"  # the exact softmax attention every error is measured against
EXACT = ("full", "relative", "sdpa", "xformers", "flex_full", "flex_relative")  # and sdpa_*


def is_exact(name: str) -> bool:
    return name in EXACT or name.startswith("sdpa_")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (Frobenius, over the whole batch), computed in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def random_qkv(seq_len: int, *, batch=2, heads=4, head_dim=16, seed=0, device="cpu"):
    """Standard normal q, k, v, each (batch, heads, seq_len, head_dim), float32."""
    g = torch.Generator().manual_seed(seed)
    make = lambda: torch.randn(batch, heads, seq_len, head_dim, generator=g)
    return tuple(make().to(device) for _ in range(3))


@torch.no_grad()
def capture_qkv(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The (q, k, v) the model's first attention layer receives on ``tokens`` (B, n)."""
    seen = {}
    hook = model.attentions[0].register_forward_pre_hook(
        lambda mod, args: seen.setdefault("qkv", tuple(a.detach().float() for a in args[:3]))
    )
    was_training = model.training
    model.eval()
    try:
        model(tokens.to(next(model.parameters()).device))
    finally:
        hook.remove()
        model.train(was_training)
    return seen["qkv"]


@torch.no_grad()
def error_of(attn: nn.Module, q, k, v) -> float:
    """Relative error of ``attn`` against exact attention in float64 on the same q, k, v (so an
    exact variant's error is its rounding, about 1e-7 in float32, not the reference's)."""
    reasons = attn.unsupported(device=q.device, dtype=q.dtype, causal=False, seq_len=q.shape[-2])
    if reasons:
        raise variants.Unsupported(f"{attn.name}: " + "; ".join(reasons))
    ref = variants.build(REFERENCE)(q.double(), k.double(), v.double(), causal=False)
    return relative_error(attn(q, k, v, causal=False), ref)


def row(name: str, options: dict, input_kind: str, seq_len: int, attempt) -> dict:
    """One APPROX row; failures are rows too (unsupported, error), never exceptions."""
    out = {
        "kind": "approx",
        "variant": name,
        "options": json.dumps(options, sort_keys=True),
        "seq_len": seq_len,
        "input": input_kind,
        "approx_error": None,
        "status": "ok",
        "reason": "",
    }
    try:
        out["approx_error"] = attempt()
    except variants.Unsupported as e:
        out.update(status="unsupported", reason=str(e))
    except Exception as e:  # a broken variant must not stop the other rows
        out.update(status="error", reason=f"{type(e).__name__}: {e}"[:500])
    return out


def trained_rows(model: nn.Module, tokens, name: str, options: dict) -> Iterator[dict]:
    """The trained row of an approximate variant: its first layer on 8 test examples."""
    if is_exact(name):
        return
    q, k, v = capture_qkv(model, tokens[:8])
    attn = model.attentions[0]
    yield row(name, options, "trained", q.shape[-2], lambda: error_of(attn, q, k, v))


def random_rows(name: str, options: dict, seq_lens, heads: int, head_dim: int, seed: int = 0):
    """Random-input rows of a variant without learned parameters, one per length."""
    if is_exact(name):
        return []
    out = []
    for n in seq_lens:
        attn = variants.build(name, **options, seq_len=n, num_heads=heads, head_dim=head_dim)
        if any(True for _ in attn.parameters()):
            return []  # learned: its random-init error says nothing (see the module doc)
        qkv = random_qkv(n, heads=heads, head_dim=head_dim, seed=seed)
        out.append(row(name, options, "random", n, lambda a=attn, t=qkv: error_of(a, *t)))
    return out
