"""Pathfinder: are the two marked dots joined by one dashed curve, among distractor curves?

Written from the description of Linsley et al. (2018) as used by Long Range Arena: every image
holds two long dashed curves and a few short distractor curves; two dots mark curve ends. In a
positive both dots sit on the two ends of the same curve; in a negative one dot sits on an end of
each long curve, so both classes have the same curves and dots and differ only in what is joined.
The image is flattened row by row into a sequence of quantised intensities (0 = background).

Curves are walks on the pixel grid that keep their heading or turn by 45 degrees (``turn_prob``
sets how wiggly, the paper's "continuity"); ``dash`` pixels on, ``gap`` pixels off. Every curve
keeps at least ``gap + 2`` pixels (Chebyshev) from every other curve and dot, so stepping at most
``gap + 1`` pixels between non-zero pixels follows one curve and never jumps to another: that is
the invariant the tests check with a breadth-first search.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .common import split_seed

# The 8 headings in turning order: index +- 1 is a 45 degree turn.
HEADINGS = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1))
NUM_CLASSES = 2


@dataclass(frozen=True)
class PathfinderConfig:
    size: int = 32  # image side; the sequence has size * size tokens
    contour_length: int = 14  # dashes per marked curve (LRA's "hard" split: 14)
    dash: int = 2  # pixels per dash (LRA's paddle length)
    gap: int = 1  # background pixels between dashes
    distractor_length: int | None = None  # dashes per distractor; None: contour_length // 3
    num_distractors: int | None = None  # None: 20 // distractor_length, scaled by area / 32^2
    turn_prob: float = 0.25  # chance of a 45 degree turn per pixel step (lower: smoother)
    border: int = 1  # pixels left empty along the image edge (LRA's padding)
    levels: int = 256  # intensity tokens 0..levels-1 (LRA: 8-bit pixels)
    contrast: tuple[float, float] = (0.45, 0.8)  # curve intensity range; dots are 1.0
    max_tries: int = 500  # attempts per curve before the whole image is redrawn

    @property
    def distractor_dashes(self) -> int:
        return self.distractor_length or max(1, self.contour_length // 3)

    @property
    def distractors(self) -> int:
        if self.num_distractors is not None:
            return self.num_distractors
        return round(20 // self.distractor_dashes * (self.size / 32) ** 2)

    @property
    def reach(self) -> int:
        """Largest step between consecutive non-zero pixels of one curve (across a gap)."""
        return self.gap + 1


class _Grid:
    """Pixel geometry for one config. A pixel is one int, ``(y + pad) * width + (x + pad)``, on a
    grid padded by ``pad`` so that neighbourhoods of edge pixels need no bounds checks: sets of
    ints are what makes thousands of images per second possible in pure Python."""

    def __init__(self, cfg: PathfinderConfig):
        self.cfg = cfg
        self.pad = cfg.reach + 2
        self.width = cfg.size + 2 * self.pad
        w = self.width
        self.moves = [dy * w + dx for dy, dx in HEADINGS]  # heading h -> pixel offset
        self.near = [
            dy * w + dx
            for dy in range(-cfg.reach, cfg.reach + 1)
            for dx in range(-cfg.reach, cfg.reach + 1)
        ]
        self.dot = [dy * w + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # a 3x3 marker
        # inside[m][p]: p lies within the border (marked curves keep a dot radius more)
        self.inside = [self._box(cfg.border + m) for m in (0, 1)]

    def pixel(self, y: int, x: int) -> int:
        return (y + self.pad) * self.width + (x + self.pad)

    def yx(self, p: int) -> tuple[int, int]:
        y, x = divmod(p, self.width)
        return y - self.pad, x - self.pad

    def _box(self, margin: int) -> bytearray:
        inside = bytearray(self.width * self.width)
        for y in range(margin, self.cfg.size - margin):
            for x in range(margin, self.cfg.size - margin):
                inside[self.pixel(y, x)] = 1
        return inside

    def widen(self, pixels, out: set) -> None:
        """Add every pixel within ``reach`` (Chebyshev) of ``pixels`` to ``out``."""
        near = self.near
        for p in pixels:
            out.update([p + o for o in near])

    def apart(self, a: int, b: int) -> int:
        (ya, xa), (yb, xb) = self.yx(a), self.yx(b)
        return max(abs(ya - yb), abs(xa - xb))


def _step(rng, cfg: PathfinderConfig, grid: _Grid, end: int, h: int, ok) -> tuple | None:
    """Next (heading, pixel) after ``end``: straight, or a 45 degree turn with probability
    turn_prob; the other two moves are fallbacks. None at a dead end."""
    s = 1 if rng.random() < 0.5 else -1
    order = (s, 0, -s) if rng.random() < cfg.turn_prob else (0, s, -s)
    for t in order:
        nh = (h + t) % 8
        p = end + grid.moves[nh]
        if ok(p):
            return nh, p
    return None


def _walk(rng, cfg: PathfinderConfig, grid: _Grid, npix: int, claimed: set, free: list, inside):
    """One self-avoiding pixel walk of ``npix`` pixels inside the border that stays clear of
    ``claimed``, or None. At a dead end the walk grows on from its other end once."""
    path = [rng.choice(free)]
    h = rng.randrange(8)
    lag = 2 * cfg.reach + 2  # pixels this far back along the curve must stay out of reach
    own: set = set()
    ok = lambda p: inside[p] and p not in claimed and p not in own and p not in path[-lag:]
    flipped = False
    while len(path) < npix:
        if len(path) >= lag:
            grid.widen([path[len(path) - lag]], own)
        step = _step(rng, cfg, grid, path[-1], h, ok)
        if step is None:
            if flipped:
                return None
            flipped = True
            path.reverse()
            own = set()
            grid.widen(path[: max(0, len(path) - lag)], own)
            h = grid.moves.index(path[-1] - path[-2]) if len(path) > 1 else rng.randrange(8)
            continue
        h, p = step
        path.append(p)
    return path


def _curve(rng, cfg: PathfinderConfig, grid: _Grid, dashes: int, claimed: set, marked: bool):
    """Place one curve (a list of pixels) and widen ``claimed`` by it; None if it does not fit.

    Marked curves reserve a dot at each end (whether drawn or not) so that both classes share the
    same layout rules; their ends stay one dot radius inside the border and apart from each other.
    """
    npix = dashes * (cfg.dash + cfg.gap) - cfg.gap  # starts and ends with a dash
    inside = grid.inside[marked]
    free = [p for p in range(len(inside)) if inside[p] and p not in claimed]
    if not free:
        return None
    for _ in range(cfg.max_tries):
        path = _walk(rng, cfg, grid, npix, claimed, free, inside)
        if path is None:
            continue
        dots = [e + o for e in (path[0], path[-1]) for o in grid.dot] if marked else []
        if marked and (
            grid.apart(path[0], path[-1]) <= 2 + cfg.reach or any(d in claimed for d in dots)
        ):
            continue
        grid.widen(path + dots, claimed)
        return path
    return None


def _layout(rng, cfg: PathfinderConfig, grid: _Grid):
    """Two marked curves and the distractors, or None if they did not fit."""
    claimed: set = set()
    plan = [(cfg.contour_length, True)] * 2 + [(cfg.distractor_dashes, False)] * cfg.distractors
    curves = []
    for dashes, marked in plan:
        path = _curve(rng, cfg, grid, dashes, claimed, marked)
        if path is None:
            return None
        curves.append(path)
    return curves


def _render(rng, cfg: PathfinderConfig, grid: _Grid, curves, positive: bool) -> list[int]:
    """Token ids of the flattened image (size * size)."""
    img = {}  # pixel -> intensity in [0, 1]
    for path in curves:
        level = rng.uniform(*cfg.contrast)
        for i, p in enumerate(path):
            if i % (cfg.dash + cfg.gap) < cfg.dash:
                img[p] = level
    a, b = curves[0], curves[1]
    ends = [a[0], a[-1]] if positive else [rng.choice((a[0], a[-1])), rng.choice((b[0], b[-1]))]
    for e in ends:
        for o in grid.dot:
            img[e + o] = 1.0
    top = cfg.levels - 1
    out = [0] * (cfg.size * cfg.size)
    for p, v in img.items():
        y, x = grid.yx(p)
        out[y * cfg.size + x] = round(v * top)
    return out


def sample(rng: random.Random, cfg: PathfinderConfig, positive: bool, grid=None) -> list[int]:
    grid = grid or _Grid(cfg)
    for _ in range(cfg.max_tries):  # a layout that does not fit is redrawn from scratch
        curves = _layout(rng, cfg, grid)
        if curves is not None:
            return _render(rng, cfg, grid, curves, positive)
    raise ValueError(
        f"pathfinder: {cfg.distractors} distractors and two curves of {cfg.contour_length} dashes "
        f"do not fit a {cfg.size}x{cfg.size} image; shorten the curves or use fewer distractors"
    )


def generate(split: str, n: int, seed: int = 0, **config) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples of ``split``: tokens (n, size * size), uint8 when levels <= 256; labels (n,)
    int64 with n // 2 positives."""
    cfg = PathfinderConfig(**config)
    rng = random.Random(split_seed("pathfinder", seed, split))
    labels = [1] * (n // 2) + [0] * (n - n // 2)
    rng.shuffle(labels)
    grid = _Grid(cfg)
    dtype = torch.uint8 if cfg.levels <= 256 else torch.int32
    tokens = torch.tensor([sample(rng, cfg, bool(y), grid) for y in labels], dtype=dtype)
    return tokens.view(n, cfg.size * cfg.size), torch.tensor(labels, dtype=torch.long)
