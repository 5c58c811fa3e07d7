"""What kind of mechanism each variant is, and its colour: the same on every plot of every report.

The report knows variants only by name (it imports nothing from ``variants``): the groups below
are the project's own variants and baselines; a run whose meta.json lists a variant with a
``group`` (and ``exact``) says so itself and wins over this table.
"""

from __future__ import annotations

import colorsys

GROUPS = ("exact", "masking", "approximation", "baselines", "other")
GROUP_TEXT = {
    "exact": "exact (own): every pair, softmax; relative adds a position bias",
    "masking": "masking: a fixed subset of pairs (window, blocks)",
    "approximation": "approximation: low rank, kernel features, hashing",
    "baselines": "baselines: library kernels (SDPA, xformers, FlexAttention)",
    "other": "other",
}
_OWN = {
    "full": "exact",
    "relative": "exact",
    "local": "masking",
    "sparse": "masking",
    "linear": "approximation",
    "linformer": "approximation",
    "reformer": "approximation",
}
_BASELINE_PREFIXES = ("sdpa", "xformers", "flex_")
# Exact dense softmax attention (the same function as `full`): what "fastest exact" ranks.
# `relative` is exact attention too, but of a different function (it adds a bias), so it is not.
EXACT_DENSE = (
    "full",
    "sdpa",
    "sdpa_math",
    "sdpa_flash",
    "sdpa_efficient",
    "sdpa_cudnn",
    "xformers",
    "flex_full",
)
EXACT_TEXT = "exact = dense softmax attention, the function full computes: " + ", ".join(
    EXACT_DENSE
)

# Hand-picked so that the variants sharing a panel differ; `sdpa` (the reference drawn in every
# panel) is black.
COLOURS = {
    "full": "#1f77b4",
    "relative": "#17becf",
    "local": "#2ca02c",
    "sparse": "#bcbd22",
    "linear": "#d62728",
    "linformer": "#9467bd",
    "reformer": "#8c564b",
    "sdpa": "#000000",
    "sdpa_math": "#7f7f7f",
    "sdpa_flash": "#ff7f0e",
    "sdpa_efficient": "#e377c2",
    "sdpa_cudnn": "#c49c00",
    "xformers": "#6b3fa0",
    "flex_full": "#1a237e",
    "flex_local": "#1b5e20",
    "flex_sparse": "#827717",
    "flex_relative": "#e65100",
}
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")


def group_of(variant: str, declared: dict | None = None) -> str:
    """The variant's group: as its run declared it, else the table above."""
    if declared and declared.get(variant):
        return declared[variant]
    if variant in _OWN:
        return _OWN[variant]
    return "baselines" if variant.startswith(_BASELINE_PREFIXES) else "other"


def is_exact(variant: str) -> bool:
    return variant in EXACT_DENSE


def colour(variant: str):
    """A fixed colour for a known variant; others get one from their name (stable between
    reports, distinct from the fixed ones by lightness)."""
    if variant in COLOURS:
        return COLOURS[variant]
    hue = (sum(map(ord, variant)) * 0.618034) % 1.0
    return colorsys.hls_to_rgb(hue, 0.62, 0.55)


def styles(labels: dict) -> dict:
    """label -> (linestyle, marker): the option sets of one variant told apart by line style,
    in the order given. ``labels`` maps label -> variant."""
    seen: dict[str, int] = {}
    out = {}
    for label, variant in labels.items():
        i = seen.get(variant, 0)
        seen[variant] = i + 1
        out[label] = (LINESTYLES[i % len(LINESTYLES)], MARKERS[i % len(MARKERS)])
    return out
