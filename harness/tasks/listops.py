"""ListOps: classify the value (0-9) of a nested expression such as
``[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]``.

Written from Long Range Arena's description (Tay et al. 2020, after Nangia & Bowman 2018): the
operators MIN, MAX, MED (median) and SM (sum modulo 10) over the digits 0-9; every argument is a
leaf digit with probability ``leaf_prob``, else a nested operator; at most ``max_depth`` nested
operators and ``max_args`` arguments per operator; expressions are drawn until their length lies
in ``[min_len, max_len]``. The length counts one token per digit and two per operator
(``[OP`` and its ``]``): the bracketed tokens stay in the sequence, since finding where an
argument list ends is half of the task.

Shortcuts (probes in tests/test_shortcuts.py): none beyond the task's nature. Every expression
opens with its root operator, which shapes the value (MIN leans to 0, MAX to 9): "the most
common value under this root operator" is right 20% (ci), 25% (cpu) and 37% (gpu preset) of
the time, against 10%, 7% and 21% for the majority class. That is a baseline, not a leak, and
an accuracy means something only above it: LRA's own Transformer figure, 36.4%, sits on it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .common import split_seed

OPS = ("MIN", "MAX", "MED", "SM")
PAD = 0  # right padding up to max_len
DIGIT0 = 1  # digit d is token DIGIT0 + d
OP0 = 11  # "[MIN", "[MAX", "[MED", "[SM" are tokens OP0 .. OP0 + 3
CLOSE = 15  # "]"
VOCAB_SIZE = 16
NUM_CLASSES = 10


@dataclass(frozen=True)
class ListOpsConfig:
    min_len: int = 500  # LRA: 500 to 2000 tokens
    max_len: int = 2000  # also the padded sequence length the model sees
    max_depth: int = 10  # most operators nested inside one another
    max_args: int = 10  # most arguments of one operator (the least is 2)
    leaf_prob: float = 0.75  # chance that an argument is a digit rather than a nested operator
    max_tries: int = 100_000  # draws per example before giving up on an impossible length range


def apply_op(op: str, args: list[int]) -> int:
    """The value of one operator; MED of an even count is the floor of the two middle values'
    mean (what ``int(statistics.median(...))`` gives for digits)."""
    if op == "MIN":
        return min(args)
    if op == "MAX":
        return max(args)
    if op == "SM":
        return sum(args) % 10
    s = sorted(args)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) // 2


class _TooLong(Exception):
    """Raised inside the recursion as soon as a draw passes max_len: abandoning it early is what
    keeps long length ranges cheap to sample."""


def _operator(rng: random.Random, cfg: ListOpsConfig, depth: int, out: list[int]) -> int:
    """Append the tokens of a random operator at nesting ``depth`` (1 = root) to ``out``;
    return its value."""
    k = rng.randrange(len(OPS))
    out.append(OP0 + k)
    args = []
    for _ in range(rng.randint(2, cfg.max_args)):
        if depth < cfg.max_depth and rng.random() >= cfg.leaf_prob:
            args.append(_operator(rng, cfg, depth + 1, out))
        else:
            d = rng.randrange(10)
            out.append(DIGIT0 + d)
            args.append(d)
        if len(out) + depth > cfg.max_len:  # every open operator still needs its "]"
            raise _TooLong
    out.append(CLOSE)
    return apply_op(OPS[k], args)


def sample(rng: random.Random, cfg: ListOpsConfig) -> tuple[list[int], int]:
    """One expression (token ids, unpadded) whose length is within the range, and its value."""
    for _ in range(cfg.max_tries):
        out: list[int] = []
        try:
            value = _operator(rng, cfg, 1, out)
        except _TooLong:
            continue
        if cfg.min_len <= len(out):
            return out, value
    raise ValueError(
        f"listops: no expression of length {cfg.min_len}..{cfg.max_len} in {cfg.max_tries} draws "
        f"with max_depth={cfg.max_depth}, max_args={cfg.max_args}, leaf_prob={cfg.leaf_prob}; "
        "widen the range or raise max_depth"
    )


def generate(split: str, n: int, seed: int = 0, **config) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples of ``split``: tokens (n, max_len) uint8 padded with PAD (uint8 keeps LRA's
    96,000 x 2,000 tokens at 192 MB), labels (n,) int64 in 0..9."""
    cfg = ListOpsConfig(**config)
    rng = random.Random(split_seed("listops", seed, split))
    tokens = torch.full((n, cfg.max_len), PAD, dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.long)
    for i in range(n):
        seq, labels[i] = sample(rng, cfg)
        tokens[i, : len(seq)] = torch.tensor(seq, dtype=torch.uint8)
    return tokens, labels


def decode(tokens) -> str:
    """Token ids back to the bracketed text (padding dropped), for reading examples."""
    words = {CLOSE: "]", **{OP0 + i: f"[{op}" for i, op in enumerate(OPS)}}
    words.update({DIGIT0 + d: str(d) for d in range(10)})
    return " ".join(words[int(t)] for t in tokens if int(t) != PAD)
