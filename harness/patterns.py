"""Which keys each query sees, found from the code that ran, recorded in the run folder
(``patterns.json``) so that a report rebuilt later shows what this code did.

No variant is asked to describe itself: query i sees key j iff out_i depends on v_j, read from
autograd (d out_i / d v_j nonzero) on a small random input in float64. A variant with no
backward on this device is probed forward only instead: each v_j perturbed in its own batch
element. Small options make the structure visible at n = 64 (a window of 8, blocks of 8, ...);
only the options a variant has are changed, and the row records the options used.
"""

from __future__ import annotations

import warnings

import torch

import variants

N, D = 64, 16  # small enough to draw one cell per (query, key) pair
SMALL_OPTIONS = {
    "window": 8, "block_size": 8, "bucket_size": 8, "proj_len": 16, "compile": False,
}  # fmt: skip
METHOD = "autograd: (i, j) visible iff d out_i / d v_j != 0 on a random float64 input"


def patterns_job(job: dict) -> dict:
    """The worker's job of kind ``patterns``: one entry per (variant, options) and causal."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only add spin-waits
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager FlexAttention warns that it is unfused
            entries = [p for e in job["entries"] for p in patterns_of(e["name"], e["options"])]
    finally:
        torch.set_num_threads(threads)
    record = {"format": 1, "n": N, "head_dim": D, "dtype": "float64", "method": METHOD}
    return {"status": "ok", "patterns": record | {"patterns": entries}}


def small(name: str, options: dict) -> dict:
    known = set(variants.option_names(name))
    fixed = {"seq_len": N, "num_heads": 1, "kv_heads": None, "head_dim": D}
    return {**options, **{k: v for k, v in SMALL_OPTIONS.items() if k in known}, **fixed}


def patterns_of(name: str, options: dict) -> list[dict]:
    opts = small(name, options)
    shown = {k: v for k, v in opts.items() if k not in ("seq_len", "num_heads", "kv_heads")}
    try:
        attn = variants.build(name, **opts).eval()
    except Exception as e:  # a variant that cannot be built is recorded, not fatal
        return [entry(name, shown, c, None, note=f"could not build: {e}") for c in (False, True)]
    return [pattern(attn, name, shown, causal) for causal in (False, True)]


def entry(name, options, causal, visible, method="", note="") -> dict:
    rows = None if visible is None else ["".join("1" if x else "0" for x in r) for r in visible]
    return {"variant": name, "options": options, "causal": causal, "method": method,
            "visible": rows, "note": note}  # fmt: skip


def pattern(attn, name: str, options: dict, causal: bool) -> dict:
    why = attn.unsupported(device="cpu", dtype=torch.float64, causal=causal, seq_len=N)
    if why:
        return entry(name, options, causal, None, note="unsupported on CPU: " + "; ".join(why))
    try:
        if attn.backward_unsupported(device="cpu"):
            return entry(name, options, causal, by_perturbation(attn, causal), "perturbation")
        return entry(name, options, causal, by_autograd(attn, causal), "autograd")
    except Exception as e:  # recorded as a pattern not drawn, with its reason
        return entry(name, options, causal, None, note=f"{type(e).__name__}: {e}"[:300])


def inputs(batch=1):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 1, N, D, generator=g, dtype=torch.float64) for _ in range(3)]


def by_autograd(attn, causal: bool) -> list[list[bool]]:
    q, k, v = inputs()
    v.requires_grad_(True)
    out = attn(q, k, v, causal=causal)  # (1, 1, N, D)
    w = torch.randn(D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows = []
    for i in range(N):  # a random cotangent: no accidental cancellation across channels
        (g,) = torch.autograd.grad(out[0, 0, i] @ w, v, retain_graph=True)
        rows.append(g[0, 0].abs().sum(-1))  # (N,) over keys j
    return nonzero(torch.stack(rows))


@torch.no_grad()
def by_perturbation(attn, causal: bool) -> list[list[bool]]:
    q, k, v = inputs()
    bq, bk, bv = (t.expand(N + 1, -1, -1, -1).clone() for t in (q, k, v))  # (N+1, 1, N, D)
    bv[1 + torch.arange(N), 0, torch.arange(N)] += 1.0  # element 1 + j has v_j moved
    out = attn(bq, bk, bv, causal=causal)
    diff = (out[1:] - out[:1]).abs().sum(-1)[:, 0]  # (j, i)
    return nonzero(diff.T)


def nonzero(effect: torch.Tensor) -> list[list[bool]]:
    """Visible where the effect is above rounding noise, relative to the row's largest."""
    scale = effect.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return (effect > 1e-10 * scale).tolist()
