"""Published figures shown beside our own (never mixed into them): see design/published.md."""

from __future__ import annotations

import pandas as pd

LRA_TABLE1_SOURCE = "Long Range Arena (Tay et al., ICLR 2021), Table 1: test accuracy (%)"
LRA_TABLE2_SOURCE = (
    "Long Range Arena (Tay et al., ICLR 2021), Table 2: training steps per second and peak "
    "memory per device (GB), byte-level Text task, batch 32, TPU v3 4x4"
)
_LRA_COLUMNS = ["model", "ListOps", "Text", "Retrieval", "Image", "Pathfinder", "Path-X", "Avg"]
_LRA_ROWS = [
    ("Transformer", 36.37, 64.27, 57.46, 42.44, 71.40, "FAIL", 54.39),
    ("Local Attention", 15.82, 52.98, 53.39, 41.46, 66.63, "FAIL", 46.06),
    ("Sparse Trans.", 17.07, 63.58, 59.59, 44.24, 71.71, "FAIL", 51.24),
    ("Longformer", 35.63, 62.85, 56.89, 42.22, 69.71, "FAIL", 53.46),
    ("Linformer", 35.70, 53.94, 52.27, 38.56, 76.34, "FAIL", 51.36),
    ("Reformer", 37.27, 56.10, 53.40, 38.07, 68.50, "FAIL", 50.67),
    ("Sinkhorn Trans.", 33.67, 61.20, 53.83, 41.23, 67.45, "FAIL", 51.39),
    ("Synthesizer", 36.99, 61.68, 54.67, 41.61, 69.45, "FAIL", 52.88),
    ("BigBird", 36.05, 64.02, 59.29, 40.83, 74.87, "FAIL", 55.01),
    ("Linear Trans.", 16.13, 65.90, 53.09, 42.34, 75.30, "FAIL", 50.55),
    ("Performer", 18.01, 65.40, 53.82, 42.77, 77.05, "FAIL", 51.41),
]
LRA_TABLE2_LENGTHS = (1024, 2048, 3072, 4096)
# model: steps/s at 1K, 2K, 3K, 4K, then peak memory (GB) at the same lengths
_LRA_TABLE2 = {
    "Transformer": ((8.1, 4.9, 2.3, 1.4), (0.85, 2.65, 5.51, 9.48)),
    "Local Attention": ((9.2, 8.4, 7.4, 7.4), (0.42, 0.76, 1.06, 1.37)),
    "Linformer": ((9.3, 9.1, 8.5, 7.7), (0.37, 0.55, 0.99, 0.99)),
    "Reformer": ((4.4, 2.2, 1.5, 1.1), (0.48, 0.99, 1.53, 2.28)),
    "Sinkhorn": ((9.1, 7.9, 6.6, 5.3), (0.47, 0.83, 1.13, 1.48)),
    "Synthesizer": ((8.7, 5.7, 6.6, 1.9), (0.65, 1.98, 4.09, 6.99)),
    "BigBird": ((7.4, 3.9, 2.7, 1.5), (0.77, 1.49, 2.18, 2.88)),
    "Linear Trans.": ((9.1, 9.3, 8.6, 7.8), (0.37, 0.57, 0.80, 1.03)),
    "Performer": ((9.5, 9.4, 8.7, 8.0), (0.37, 0.59, 0.82, 1.06)),
}
LRA_TABLE2_NOTE = "Sparse Transformer and Longformer were not timed there (dense-mask emulation)."
# Our variant closest to each LRA model, for its colour and for reading the two side by side.
LRA_VARIANT = {
    "Transformer": "full",
    "Local Attention": "local",
    "Sparse Trans.": "sparse",
    "Linformer": "linformer",
    "Reformer": "reformer",
    "BigBird": "sparse",
    "Linear Trans.": "linear",
    "Performer": "linear",
}
# Our task name -> the LRA Table 1 column of the same task.
LRA_TASK = {
    "listops": "ListOps",
    "text": "Text",
    "retrieval": "Retrieval",
    "image": "Image",
    "pathfinder": "Pathfinder",
}


def lra_variant(model: str) -> str:
    """Our variant nearest an LRA model named as in Table 1 or Table 2 ("" if none)."""
    return LRA_VARIANT.get(_TABLE2_TO_TABLE1.get(model, model), "")


def lra_table1() -> pd.DataFrame:
    return pd.DataFrame(_LRA_ROWS, columns=_LRA_COLUMNS)


def lra_table2() -> pd.DataFrame:
    """Long: model, seq_len, steps_per_s, speedup (over Transformer), memory_gb."""
    base = dict(zip(LRA_TABLE2_LENGTHS, _LRA_TABLE2["Transformer"][0], strict=True))
    rows = [
        {"model": model, "seq_len": n, "steps_per_s": s, "speedup": s / base[n], "memory_gb": m}
        for model, (steps, mem) in _LRA_TABLE2.items()
        for n, s, m in zip(LRA_TABLE2_LENGTHS, steps, mem, strict=True)
    ]
    return pd.DataFrame(rows)


def lra_table2_wide() -> pd.DataFrame:
    """As printed: steps/s (speed-up) and memory per length."""
    df = lra_table2()
    df["text"] = df["steps_per_s"].map("{:.1f}".format) + df["speedup"].map(" ({:.1f}x)".format)
    steps = df.pivot(index="model", columns="seq_len", values="text")
    mem = df.pivot(index="model", columns="seq_len", values="memory_gb")
    steps.columns = [f"steps/s {n // 1024}K" for n in steps.columns]
    mem.columns = [f"GB {n // 1024}K" for n in mem.columns]
    out = steps.join(mem).reindex(list(_LRA_TABLE2)).reset_index()
    out.columns.name = None
    return out


def lra_points(task: str, seq_len: float | None) -> pd.DataFrame:
    """LRA's accuracy on ``task`` against its Table 2 speed-up and memory ratio over the
    Transformer at the Table 2 length nearest ``seq_len`` (4K without one): the published
    counterpart of our accuracy-vs-speed panel. Empty when LRA has no such task."""
    column = LRA_TASK.get(task)
    if column is None:
        return pd.DataFrame(columns=["model", "variant", "accuracy", "speedup", "mem_ratio", "n"])
    n = min(LRA_TABLE2_LENGTHS, key=lambda x: abs(x - (seq_len or 4096)))
    t2 = lra_table2()
    t2 = t2[t2["seq_len"] == n].set_index("model")
    base_mem = t2.loc["Transformer", "memory_gb"]
    acc = lra_table1().set_index("model")[column]
    rows = []
    for model, t1_name in _TABLE2_TO_TABLE1.items():
        if model in t2.index and t1_name in acc.index:
            rows.append(
                {
                    "model": model,
                    "variant": lra_variant(model),
                    "accuracy": float(acc[t1_name]),
                    "speedup": t2.loc[model, "speedup"],
                    "mem_ratio": t2.loc[model, "memory_gb"] / base_mem,
                    "n": n,
                }
            )
    return pd.DataFrame(rows)


_TABLE2_TO_TABLE1 = {m: m for m in _LRA_TABLE2} | {
    "Sinkhorn": "Sinkhorn Trans.",
}
