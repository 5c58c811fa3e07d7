"""The results table: its kinds of rows, their columns and the key that identifies each row.

Every run folder holds one ``results.csv`` with the header :data:`COLUMNS`; ``kind`` says which
columns a row uses. :data:`ROW_KEYS` is the one definition of what makes two rows the same
measurement: resume skips a key that is done, readers pool a key's rounds, compare matches
keys between runs. Only :mod:`harness.results` reads and writes the file.
"""

from __future__ import annotations

PASSES = ("fwd", "fwd_bwd", "decode")
STATUSES = ("ok", "oom", "unsupported", "error", "timeout")

# What identifies a row of each kind. A key is compared as text (see results.key_text).
ROW_KEYS = {
    # one attention call (fwd, fwd_bwd) or one decode step at context seq_len (decode)
    "speed": [
        "variant", "options", "device", "dtype", "batch", "heads", "kv_heads", "seq_len",
        "head_dim", "causal", "pass",
    ],
    # a trained model's test accuracy, one row per seed
    "accuracy": ["task", "variant", "options", "device", "dtype", "seq_len", "seed"],
    # relative error against full on the same q, k, v
    "approx": ["task", "variant", "options", "device", "seq_len", "input", "seed"],
    # one whole training step of the task encoder (LRA Table 2)
    "train_step": ["task", "variant", "options", "device", "dtype", "batch", "seq_len", "model"],
}  # fmt: skip
KINDS = tuple(ROW_KEYS)
CELL_KEY = ROW_KEYS["speed"]

TIMING = [
    "latency_ms",  # median over timed blocks (speed: per call or per decode step)
    "latency_iqr_ms",  # inter-quartile range of the timed blocks
    "noisy",  # IQR / median > 10%
    "samples_ms",  # raw per-block times, space separated (kept for rank tests and pooling)
    "peak_mem_mb",  # peak of live tensor bytes above the inputs (CUDA allocator, CPU profiler)
    "rss_peak_mb",  # CPU only: the process high-water mark above its start (what the OS saw)
    "compile_s",  # compiled baselines: first-call compile time, never part of latency
]
SPEED = [
    "round",  # which of sweep.rounds measured this row (rows of one key are pooled on reading)
    *TIMING,
    "model_mem_mb",  # the variant's analytic memory model of the pass measured
    "cache_mb",  # decode: bytes of the decoding state at this context (cache_bytes)
    "flops",  # analytic FLOPs of the useful work of the pass (or of one decode step)
    "counted_flops",  # FlopCounterMode's count where it sees the work, else empty
    "gflops_per_s",  # flops / latency
]
ACCURACY = [
    "accuracy",  # test accuracy of the best validation checkpoint
    "val_accuracy",  # that checkpoint's validation accuracy
    "best_step",  # the step it was taken at
    "steps",  # optimizer steps run
    "stopped",  # why training stopped: target, patience, max_steps, time
    "train_s",
    "params",
]
APPROX = ["input", "approx_error"]
TRAIN_STEP = [
    "steps_per_s",  # 1000 / latency_ms
    "tokens_per_s",  # batch * seq_len * steps_per_s
    "state_mb",  # parameters, gradients and optimizer state: present before the step starts
]
COMMON = ["status", "reason"]  # status: one of STATUSES; reason: why a row is not ok
PROVENANCE = [
    "run_id", "git_commit", "torch_version", "threads", "cpu", "gpu", "timestamp",
]  # fmt: skip

KEY_COLUMNS = list(dict.fromkeys(c for key in ROW_KEYS.values() for c in key))
COLUMNS = (
    list(dict.fromkeys(["kind", *KEY_COLUMNS, *COMMON, *SPEED, *ACCURACY, *APPROX, *TRAIN_STEP]))
    + PROVENANCE
)
