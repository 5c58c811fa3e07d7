"""The whole-model training step (Long Range Arena's Table 2 protocol) beside the kernel.

A training step runs the task encoder (projections, MLPs, embeddings, AdamW) around the
attention, so a kernel's speed-up shrinks in a model; "kernel x, model y" puts the two side by
side at the same variant and n.
"""

from __future__ import annotations

import math

import pandas as pd

from .load import compact_options
from .tables import main_config, short_n

MODEL_GROUP = ["machine", "task", "model", "batch", "dtype"]


def train_cells(rows: pd.DataFrame) -> pd.DataFrame:
    """The ok train_step rows, with steps/s filled from the latency and the model size as text."""
    df = rows[(rows["kind"] == "train_step") & (rows["status"] == "ok")].copy()
    df = df[df["latency_ms"].notna() & (df["latency_ms"] > 0)]
    missing = df["steps_per_s"].isna()
    df.loc[missing, "steps_per_s"] = 1000.0 / df["latency_ms"]
    df["model_text"] = df["model"].map(compact_options)
    return df.sort_values(MODEL_GROUP + ["label", "seq_len"]).reset_index(drop=True)


def against_full(train: pd.DataFrame) -> pd.DataFrame:
    """steps/s over full's and peak memory over full's, at the same model, batch and n."""
    if train.empty:
        return train.assign(speedup=pd.Series(dtype=float), mem_ratio=pd.Series(dtype=float))
    full = train[train["variant"] == "full"].groupby(MODEL_GROUP + ["seq_len"], dropna=False)
    ref = full.agg(full_steps=("steps_per_s", "max"), full_mem=("peak_mem_mb", "min"))
    df = train.merge(ref.reset_index(), on=MODEL_GROUP + ["seq_len"], how="left")
    df["speedup"] = df["steps_per_s"] / df["full_steps"]
    df["mem_ratio"] = df["peak_mem_mb"] / df["full_mem"]
    return df.drop(columns=["full_steps", "full_mem"])


def with_kernel(train: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Each training-step row with the kernel's fwd_bwd speed-up over full at the same variant
    and n (main config of its machine), and the "kernel x, model y" text."""
    kernel = [_kernel_x(r, cells) for _, r in train.iterrows()]
    df = train.assign(kernel_x=[k[0] for k in kernel], kernel_config=[k[1] for k in kernel])
    df["kernel_vs_model"] = [
        _both(k, m) for k, m in zip(df["kernel_x"], df["speedup"], strict=True)
    ]
    return df


def _kernel_x(r, cells: pd.DataFrame) -> tuple[float, str]:
    c = cells[
        (cells["machine"] == r["machine"])
        & (cells["pass"] == "fwd_bwd")
        & (cells["seq_len"] == r["seq_len"])
    ]
    mine, full = c[c["variant"] == r["variant"]], c[c["variant"] == "full"]
    configs = set(mine["config"]) & set(full["config"])
    if not configs:
        return math.nan, ""
    config = main_config(c[c["config"].isin(configs)])
    mine = mine[mine["config"] == config]
    same = mine[mine["options"] == r["options"]]  # the very options if measured, else any
    v = (same if not same.empty else mine)["latency_ms"].min()
    return full[full["config"] == config]["latency_ms"].min() / v, config


def _both(kernel: float, model: float) -> str:
    k = "no kernel row" if pd.isna(kernel) else f"kernel {kernel:.2f}x"
    return f"{k}, model {'?' if pd.isna(model) else f'{model:.2f}x'}"


def setups(train: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(what was measured, its rows) per machine, task, model size, batch and dtype: the one
    with the most rows (the Table 2 sweep rather than a task run's own steps) first."""
    out = []
    for key, g in train.groupby(MODEL_GROUP, dropna=False, sort=True):
        machine, task, _, batch, dtype = key
        lengths = ", ".join(short_n(n) for n in sorted(set(g["seq_len"])))
        title = (
            f"{machine}: task {task or '?'}, model {g['model_text'].iloc[0] or '?'}, batch "
            f"{batch:.0f}, {dtype}, n = {lengths}"
        )
        out.append((title, g))
    return sorted(out, key=lambda tg: -len(tg[1]))
