"""MQAR, multi-query associative recall (Zoology, Arora et al. 2023), for a bidirectional encoder.

A sequence opens with a context: ``num_kv_pairs`` key-value pairs ``k v`` (distinct keys, each
value right after its key) at random places among filler tokens, over all positions but the
last ``num_queries``; those hold the queries, keys of the context asked in random order. The
target at a query position is the value that followed that key in the context; every other
position is ignored. Zoology trains causal language models, where the query is followed by its
answer; an encoder sees the whole sequence, so the answer is never written after a query here,
only asked for at the query's position.

Keys and values come from disjoint halves of the vocabulary, so a query can only be answered by
finding the key's occurrence in the context and reading its neighbour: a sharp lookup that
softmax attention makes at any distance, a window cannot make beyond its width, and low-rank or
kernelised attention blurs as the number of pairs grows. Two options shape the train split only
(see MQARConfig): a mixture of pair counts and targets at the context's keys.

What the generator guarantees against shortcuts (probes in tests/test_shortcuts.py):
- No fixed positions hold the pairs: every arrangement of the pairs among the context's filler
  is equally likely, so a set of w positions holds about (w - 1) / (C - 1) of the pairs, C =
  seq_len - num_queries (about a quarter for a Linformer's proj_len in every preset). With the
  pairs always at 0..2p-1 and proj_len = 2p, a learned projection could select all of them.
  That stops exact selection, not compression: with fewer pairs than proj_len a projection
  can pool the context into proj_len slots that rarely hold two pairs each (the cpu preset's
  linformer, 8 pairs and proj_len 16, still reached 99.1% with these positions). Whether
  low-rank attention degrades is a question for presets with more pairs than proj_len.
- Which key a query asks is drawn apart from where its pair lies and where the query sits, so
  the token at a fixed offset from the query, the token at a fixed position for the r-th query
  and the value of the pair nearest before the query answer no more often than a guess among
  the context's values (1 / p); values are uniform, so the most common value no more than
  1 / (number of values).
- What stays by design: queries follow the context, as in Zoology, so "is this key in the
  context?" is a matter of position (a query never has a value beside it, either). Pairs
  spread over the whole sequence, queries among them, removed that cue too, but then a
  2-layer `full` (64 tokens, 4 pairs) stayed on its 30% plateau for the 1500 steps tried; with
  the context first it reached 97% in 1300. Few queries keep the context spread: as
  num_queries approaches seq_len - 2p, the context shrinks to its pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import IGNORE, split_seed

FILLER = 0  # the token in every slot that holds no pair and no query
CHUNK = 8192  # rows generated at once


@dataclass(frozen=True)
class MQARConfig:
    seq_len: int = 256  # whole sequence: the context (pairs among filler), then the queries
    num_kv_pairs: int = 16
    vocab_size: int = 8192  # token ids 0..vocab_size-1: filler, then keys, then values
    # queries per sequence; None: one per key (every key asked once, as in Zoology); more than
    # num_kv_pairs asks keys again (denser supervision), up to seq_len - 2 * num_kv_pairs
    num_queries: int | None = None
    # A mix: each example draws its pair count from min_kv_pairs..num_kv_pairs (Zoology trains
    # on such mixtures). Few-pair examples teach reading a value before binding is learned,
    # which shortens the plateau a small model sits on; presets use it for the train split.
    min_kv_pairs: int | None = None
    # Also ask for the value at each key of the context (train split only), as a causal model's
    # next-token loss would. Recall takes two hops (a key picks up the value beside it, then a
    # query finds that key); a direct target for the first hop lets a small model learn in a few
    # hundred steps what otherwise takes it tens of thousands. Accuracy counts queries alone.
    context_targets: bool = False

    def __post_init__(self):
        if 2 * self.num_kv_pairs + self.queries > self.seq_len:
            raise ValueError(
                f"mqar: seq_len {self.seq_len} cannot hold {self.num_kv_pairs} pairs and "
                f"{self.queries} queries"
            )
        if self.min_kv_pairs is not None and not 1 <= self.min_kv_pairs <= self.num_kv_pairs:
            raise ValueError("mqar: min_kv_pairs must lie in 1..num_kv_pairs")
        if self.num_keys < self.num_kv_pairs:
            raise ValueError(f"mqar: vocab_size {self.vocab_size} has too few keys for the pairs")

    @property
    def queries(self) -> int:
        return self.num_kv_pairs if self.num_queries is None else self.num_queries

    @property
    def num_keys(self) -> int:  # keys are ids 1..num_keys, values the ids above
        return (self.vocab_size - 1) // 2

    @property
    def num_values(self) -> int:
        return self.vocab_size - 1 - self.num_keys


def _distinct(n: int, k: int, high: int, g: torch.Generator) -> torch.Tensor:
    """(n, k) draws without replacement from 0..high-1 per row.

    A small range is shuffled (argsort of noise); a large one is drawn with replacement and the
    rows holding a repeat redrawn, since shuffling 8192 ids to keep 32 costs 250x the draws.
    """
    if high <= 8 * k:
        return torch.rand(n, high, generator=g).argsort(dim=1)[:, :k]
    out = torch.randint(high, (n, k), generator=g)
    redo = torch.arange(n)  # rows that may hold a repeat: only these are checked again
    while redo.numel():
        s = out[redo].sort(dim=1).values
        redo = redo[(s[:, 1:] == s[:, :-1]).any(dim=1)]
        out[redo] = torch.randint(high, (redo.numel(), k), generator=g)
    return out


def _slots(n: int, p: int, q: int, L: int, g: torch.Generator):
    """Where things go in ``n`` rows of length ``L``: (keys, queries), (n, p) and (n, q)
    positions, each row increasing; a pair's value sits right after its key.

    The first L - q slots hold the pairs among filler, each arrangement of p two-slot pair units
    and L - q - 2p filler slots equally likely (a unit's position is its index plus the pairs
    before it, which keeps the pairs whole and apart); the last q slots hold the queries."""
    units = L - q - p
    pair = torch.rand(n, units, generator=g).argsort(dim=1) < p  # p units drawn at random
    pos = torch.arange(units) + pair.cumsum(dim=1) - pair.long()  # unit index + pairs before
    return pos[pair].view(n, p), (L - q + torch.arange(q)).expand(n, q)


def _fixed(n: int, p: int, q: int, cfg: MQARConfig, g: torch.Generator):
    """``n`` examples with exactly ``p`` pairs and ``q`` queries, at length cfg.seq_len."""
    if n > CHUNK:  # the (rows, seq_len) temporaries would take gigabytes at LRA size
        parts = [_fixed(min(CHUNK, n - i), p, q, cfg, g) for i in range(0, n, CHUNK)]
        return tuple(torch.cat(t) for t in zip(*parts, strict=True))
    keys = 1 + _distinct(n, p, cfg.num_keys, g)  # (n, p)
    values = 1 + cfg.num_keys + torch.randint(cfg.num_values, (n, p), generator=g)  # (n, p)
    if q <= p:  # every key asked at most once
        asked = _distinct(n, q, p, g)  # (n, q): which pairs are queried
    else:  # each key once, then keys drawn again for the remaining queries
        again = torch.randint(p, (n, q - p), generator=g)
        asked = torch.cat([_distinct(n, p, p, g), again], dim=1)
    at, where = _slots(n, p, q, cfg.seq_len, g)  # (n, p) keys, (n, q) queries
    rows = torch.arange(n)[:, None]
    tokens = torch.full((n, cfg.seq_len), FILLER, dtype=torch.int32)  # half of int64's memory
    tokens[rows, at] = keys.int()
    tokens[rows, at + 1] = values.int()
    tokens[rows, where] = keys.gather(1, asked).int()
    labels = torch.full((n, cfg.seq_len), IGNORE, dtype=torch.long)
    labels[rows, where] = values.gather(1, asked)
    if cfg.context_targets:
        labels[rows, at] = values
    return tokens, labels


def _queries(cfg: MQARConfig, p: int) -> int:
    """Queries of an example with ``p`` pairs in a mixture: as many as the config asks of the
    largest pair count, capped by what the sequence can hold after the context."""
    if cfg.num_queries is None:
        return p
    return min(cfg.num_queries, cfg.seq_len - 2 * p)


def generate(split: str, n: int, seed: int = 0, **config) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples of ``split``: tokens (n, seq_len) int32; labels (n, seq_len) int64, a value
    id at each query position and IGNORE elsewhere."""
    cfg = MQARConfig(**config)
    g = torch.Generator().manual_seed(split_seed("mqar", seed, split))
    if cfg.min_kv_pairs is None:
        return _fixed(n, cfg.num_kv_pairs, cfg.queries, cfg, g)
    counts = range(cfg.min_kv_pairs, cfg.num_kv_pairs + 1)
    share = torch.arange(n) % len(counts)  # as even a mix as n allows
    parts = [
        _fixed(int((share == i).sum()), p, _queries(cfg, p), cfg, g) for i, p in enumerate(counts)
    ]
    order = torch.randperm(n, generator=g)  # interleave the pair counts
    return tuple(torch.cat(t)[order] for t in zip(*parts, strict=True))
