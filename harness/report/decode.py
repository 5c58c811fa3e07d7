"""One-token decoding: per-token latency and state size against the context length.

A decode row times one step at context ``seq_len`` against the state of that prompt;
``cache_mb`` is the state's size. A KV cache grows with n (exponent about 1); a sliding window
or a linear-attention state is bounded (about 0). Series group by ``kv`` (key/value heads)
instead of ``pass``.
"""

from __future__ import annotations

import pandas as pd

from .tables import config_label, crossovers, exponents, num, ok_speed, with_band

GROUP = ["machine", "config", "kv"]
METRICS = (("time", "latency_ms"), ("cache", "cache_mb"), ("memory", "peak_mem_mb"))
BOUNDED = 0.2  # a cache exponent below this is a bounded state


def decode_cells(rows: pd.DataFrame) -> pd.DataFrame:
    df = ok_speed(rows, ("decode",))
    df["config"] = config_label(df, kv=False)
    df["kv"] = "kv_heads=" + df["kv_heads"].map(lambda x: num(x, "{:.0f}")).astype(str)
    df = with_band(df)
    return df.sort_values(GROUP + ["label", "seq_len"]).reset_index(drop=True)


def decode_exponents(cells: pd.DataFrame) -> pd.DataFrame:
    return exponents(cells, METRICS, GROUP)


def breakeven(cells: pd.DataFrame, exps: pd.DataFrame, reference: str) -> pd.DataFrame:
    """The context past which each variant's step is cheaper than the reference's, and
    whether its state is bounded (its cache exponent)."""
    cx = crossovers(cells, reference, GROUP)
    cache = exps[exps["metric"] == "cache"].set_index(GROUP + ["label"])["exponent"]
    state = cx.set_index(GROUP + ["label"]).index.map(lambda k: _state(cache.get(k)))
    return cx.assign(state=list(state))


def _state(exponent) -> str:
    if exponent is None or pd.isna(exponent):
        return "no cache size"
    return "bounded" if exponent < BOUNDED else f"grows (n^{exponent:.2f})"


def kv_order(cells: pd.DataFrame) -> list[str]:
    """Facets: all heads first, then fewer key/value heads."""
    kv = cells.drop_duplicates("kv").sort_values("kv_heads", ascending=False)
    return list(kv["kv"])
