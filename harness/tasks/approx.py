"""Approximation error: how far each variant's output is from ``full`` on the same q, k, v.

Costs seconds and needs no training, so it sits beside the trained accuracy as a second, cheaper
view of what an approximation gives up. Two kinds of input: random normal q, k, v over a few
sequence lengths, and the q, k, v a trained model actually feeds its first attention layer
(peaked, structured attention, where low-rank and kernel approximations behave differently).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import torch
from torch import nn

import variants

REFERENCE = "full"  # the exact softmax attention every error is measured against


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
def approx_error(name: str, options: dict, q, k, v) -> float:
    """Relative error of variant ``name`` built with ``options`` against exact attention.

    The reference is ``full`` in float64, so the error of an exact variant is its rounding
    (about 1e-7 in float32), not the reference's. Raises ``variants.Unsupported`` where the
    variant cannot run this case.
    """
    _, heads, n, d = q.shape
    attn = variants.build(name, seq_len=n, num_heads=heads, head_dim=d, **options).to(q.device)
    reasons = attn.unsupported(device=q.device, dtype=q.dtype, causal=False, seq_len=n)
    if reasons:
        raise variants.Unsupported(f"{name}: " + "; ".join(reasons))
    ref = variants.build(REFERENCE)(q.double(), k.double(), v.double(), causal=False)
    return relative_error(attn(q, k, v, causal=False), ref)


def is_reference(name: str, options: dict) -> bool:
    """Plain ``full`` is the reference itself; ``full`` with a chunk size is worth a row."""
    return name == REFERENCE and options.get("chunk_size") is None


def approx_row(name: str, options: dict, qkv, input_kind: str, device: str) -> dict:
    """One APPROX row; failures are rows too (unsupported, error), never exceptions."""
    row = {
        "kind": "approx",
        "variant": name,
        "options": json.dumps(options, sort_keys=True),
        "device": str(device),
        "seq_len": qkv[0].shape[-2],
        "input": input_kind,
        "approx_error": None,
        "status": "ok",
        "reason": "",
    }
    try:
        row["approx_error"] = approx_error(name, options, *qkv)
    except variants.Unsupported as e:
        row.update(status="unsupported", reason=str(e))
    except Exception as e:  # a broken variant must not stop the other rows
        row.update(status="error", reason=f"{type(e).__name__}: {e}"[:500])
    return row


def approx_rows(
    names: list[str],
    options: dict[str, dict],
    *,
    seq_lens=(128, 256),
    trained_qkv=None,
    device="cpu",
    heads=4,
    head_dim=16,
    seed=0,
    skip=None,
) -> Iterator[dict]:
    """Rows for every variant except the reference: random inputs at each of ``seq_lens``, then
    ``trained_qkv`` (a (q, k, v) from capture_qkv) when given. ``skip(name, seq_len, input)``
    true: that row is already in the results (a resumed run)."""
    inputs = [
        ("random", random_qkv(n, heads=heads, head_dim=head_dim, seed=seed, device=device))
        for n in seq_lens
    ]
    if trained_qkv is not None:
        inputs.append(("trained", tuple(t.to(device) for t in trained_qkv)))
    for name in names:
        opts = options.get(name, {})
        if is_reference(name, opts):
            continue
        for kind, qkv in inputs:
            if skip is not None and skip(name, qkv[0].shape[-2], kind):
                continue
            yield approx_row(name, opts, qkv, kind, device)
