"""The results table: one tidy row per measured cell (see measurement.md).

Every writer and reader of ``results/<run_id>/results.csv`` uses these names and nothing else.
"""

from __future__ import annotations

# What identifies a speed cell: a rerun with the same key is the same cell (resume skips it).
CELL_KEY = [
    "variant", "options", "device", "dtype", "batch", "heads", "seq_len", "head_dim", "causal",
    "pass",
]  # fmt: skip

STATUSES = ("ok", "oom", "unsupported", "error", "timeout")

SPEED = CELL_KEY + [
    "status",  # one of STATUSES
    "reason",  # why a cell is not ok (empty when ok)
    "latency_ms",  # median over timed blocks
    "latency_iqr_ms",  # inter-quartile range of the timed blocks
    "noisy",  # IQR / median > 10%
    "samples_ms",  # raw per-block times, space separated (kept for rank tests)
    "peak_mem_mb",  # CUDA allocator peak, or CPU process high-water mark, above the inputs
    "model_mem_mb",  # the variant's analytic memory model
    "flops",  # analytic FLOPs of the pass
    "counted_flops",  # FlopCounterMode's count where it sees the work, else empty
    "gflops_per_s",  # flops / latency
    "compile_s",  # compiled baselines: first-call compile time, never part of latency
]

ACCURACY = [
    "task", "variant", "options", "device", "dtype", "seq_len", "status", "reason", "accuracy",
    "steps", "train_s", "params", "seed",
]  # fmt: skip

APPROX = [
    "variant", "options", "device", "seq_len", "input", "approx_error", "status", "reason",
]  # fmt: skip

PROVENANCE = [
    "run_id", "git_commit", "torch_version", "threads", "cpu", "gpu", "timestamp",
]  # fmt: skip

# One file holds every kind of row; "kind" says which columns are meaningful.
KINDS = ("speed", "accuracy", "approx")
COLUMNS = ["kind"] + list(dict.fromkeys(SPEED + ACCURACY + APPROX)) + PROVENANCE
