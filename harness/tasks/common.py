"""Small helpers shared by the task generators: split seeds and the ignore index."""

from __future__ import annotations

import zlib

SPLITS = ("train", "val", "test")
IGNORE = -100  # label of positions that carry no target (cross_entropy's default ignore_index)


def split_seed(task: str, seed: int, split: str) -> int:
    """One 31-bit seed per (task, seed, split).

    crc32 rather than ``hash()``: Python salts string hashes per process, and a split must be the
    same examples in every run and on every machine.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return zlib.crc32(f"{task}:{seed}:{split}".encode()) & 0x7FFFFFFF
