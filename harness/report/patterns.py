"""Attention patterns as the run recorded them (``<run_dir>/patterns.json``); nothing is
computed here, so a page rebuilt from old results shows what that code did.

The format (version 1)::

    {"format": 1, "n": 64, "head_dim": 16, "dtype": "float64",
     "method": "autograd: (i, j) visible iff d out_i / d v_j != 0 on a random input",
     "patterns": [
        {"variant": "local", "options": {"window": 8}, "causal": false,
         "method": "autograd",             # or "perturbation" (no backward on the device)
         "visible": ["1110...", ...],      # n rows (queries) of n characters (keys): 1 = sees
         "note": ""},                      # why not drawn, when "visible" is null
        ...]}

``visible`` may also be a list of n lists of 0/1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .load import variant_labels


@dataclass
class Pattern:
    variant: str
    options: dict
    causal: bool
    visible: np.ndarray | None  # (n, n) bool: [query, key]; None when the run could not draw it
    method: str = ""
    note: str = ""
    label: str = ""  # the variant, with the options that tell its entries apart


def patterns_of(doc: dict) -> list[Pattern]:
    """The patterns of one patterns.json; an entry that cannot be decoded is kept, not drawn,
    with the reason."""
    pats = [_pattern(entry, int(doc.get("n") or 0)) for entry in doc.get("patterns") or []]
    options = [json.dumps(p.options, sort_keys=True, default=str) for p in pats]
    named = pd.DataFrame({"kind": "pattern", "task": "", "variant": [p.variant for p in pats],
                          "options": options})  # fmt: skip
    for p, label in zip(pats, variant_labels(named), strict=True):
        p.label = label
    return pats


def _pattern(entry: dict, n: int) -> Pattern:
    base = {
        "variant": str(entry.get("variant", "?")),
        "options": entry.get("options") or {},
        "causal": bool(entry.get("causal")),
        "method": str(entry.get("method", "")),
        "note": str(entry.get("note", "")),
    }
    try:
        visible = decode(entry.get("visible"), n)
    except ValueError as e:
        return Pattern(**base | {"note": f"unreadable pattern: {e}"}, visible=None)
    return Pattern(**base, visible=visible)


def decode(visible, n: int) -> np.ndarray | None:
    """Rows of "0"/"1" characters (or of 0/1 numbers) as an (n, n) bool array."""
    if visible is None:
        return None
    rows = [[c == "1" for c in r] if isinstance(r, str) else [bool(x) for x in r] for r in visible]
    if not rows or any(len(r) != len(rows[0]) for r in rows):
        raise ValueError("rows of unequal length")
    out = np.array(rows, dtype=bool)
    if n and out.shape != (n, n):
        raise ValueError(f"shape {out.shape}, the file says n = {n}")
    return out


def encode(visible: np.ndarray) -> list[str]:
    """The inverse of :func:`decode` (what the measuring side writes)."""
    return ["".join("1" if x else "0" for x in row) for row in np.asarray(visible, dtype=bool)]
