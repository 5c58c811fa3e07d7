"""Pathfinder: are the two marked dots joined by one dashed curve, among distractor curves?

Written from the description of Linsley et al. (2018) as used by Long Range Arena: every image
holds two long dashed curves and a few short distractor curves; two dots mark curve ends. In a
positive both dots sit on the two ends of the first long curve; in a negative one dot sits on
an end of it and one on the start of the second, so both classes have the same curves and dots
and differ only in what is joined. The image is flattened row by row into a sequence of
quantised intensities (0 = background).

Curves are walks on the pixel grid that keep their heading or turn by 45 degrees (``turn_prob``
sets how wiggly, the paper's "continuity"); ``dash`` pixels on, ``gap`` pixels off. Every curve
keeps at least ``gap + 2`` pixels (Chebyshev) from every other curve and dot, so stepping at most
``gap + 1`` pixels between non-zero pixels follows one curve and never jumps to another: that is
the invariant the tests check with a breadth-first search.

What the generator guarantees against shortcuts (probes in tests/test_shortcuts.py):
- One layout serves both labels: the curves are drawn first, then the label picks the dots, so
  nothing but the dots' placement depends on the label; the number of lit pixels is the same.
- One grey level for every curve of an image (drawn per image). With a level per curve, "do the
  pixels beside the two dots share a grey level?" told 92% of the cpu preset's images apart and
  99% of the gpu preset's.
- The second long curve starts where the first one's far end lies, seen from its near end,
  turned or mirrored by a symmetry of the square (_pins). So the negative's dots lie exactly
  as far apart (in every metric) and as near the image edge as the positive's, and the curve
  leaves each dot at (nearly) the angle to the other dot that it does in the positive. Drawn
  anywhere, the dots' distance told 72-78% of the cpu preset's images apart (52-59% at gpu).
- What no placement can hide: a short, nearly straight curve (16x16 images, curves of 4
  dashes) leaves one dot heading for the other in a positive, and a negative cannot put its
  second dot there without touching the first curve. "Does the curve leaving a dot head for the
  other one?" tells ~83% of such images apart (a more winding curve, turn_prob 0.8, still 80%);
  with curves of 8 dashes in 20x20 images (the ci and cpu presets) and at the gpu preset's size
  (32x32, 14 dashes) it is at chance. Curve length is the remedy, a choice of the preset.
"""

from __future__ import annotations

import math
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
    match_tries: int = 20  # starts tried for the second marked curve (_layout)

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
        # inside[m][p]: p lies within the border (marked curves keep a dot radius more);
        # cells[m]: the same pixels listed
        self.inside = [self._box(cfg.border + m) for m in (0, 1)]
        self.cells = [[p for p, on in enumerate(box) if on] for box in self.inside]

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


def _walk(rng, cfg, grid: _Grid, npix: int, claimed: set, inside, starts: list, heading: int):
    """One self-avoiding pixel walk of ``npix`` pixels from one of ``starts``, inside the border
    and clear of ``claimed``, or None; its first heading is ``heading`` (< 0: random). At a
    dead end the walk grows on from its other end once, unless its start was given (a single
    one), which must stay an end: then it gives up."""
    path = [rng.choice(starts)]
    h = heading if heading >= 0 else rng.randrange(8)
    lag = 2 * cfg.reach + 2  # pixels this far back along the curve must stay out of reach
    own: set = set()
    ok = lambda p: inside[p] and p not in claimed and p not in own and p not in path[-lag:]
    flipped = len(starts) == 1
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


def _curve(rng, cfg, grid, dashes: int, claimed: set, marked: bool, start=-1, heading=-1):
    """Place one curve (a list of pixels) and widen ``claimed`` by it; None if it does not fit.

    Marked curves reserve a dot at each end (whether drawn or not) so that both classes share the
    same layout rules; their ends stay one dot radius inside the border and apart from each other.
    A curve that must start at ``start`` (a free pixel) gets one attempt: the caller moves it.
    ``heading`` (< 0: random) is where the walk first heads (_walk).
    """
    npix = dashes * (cfg.dash + cfg.gap) - cfg.gap  # starts and ends with a dash
    inside = grid.inside[marked]
    starts = [p for p in ([start] if start >= 0 else grid.cells[marked]) if p not in claimed]
    if not starts:
        return None
    for _ in range(1 if start >= 0 else cfg.max_tries):
        path = _walk(rng, cfg, grid, npix, claimed, inside, starts, heading)
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


def _ring(grid: _Grid, p: int) -> int:
    """Pixels between ``p`` and the nearest image edge."""
    y, x = grid.yx(p)
    return min(y, x, grid.cfg.size - 1 - y, grid.cfg.size - 1 - x)


# The square's symmetries other than identity, as (axis, sign, sign) maps of an offset (dy, dx).
TURNS = [(u, sy, sx) for u in (0, 1) for sy in (1, -1) for sx in (1, -1)][1:]


def _turn(r: tuple, v: tuple) -> tuple[int, int]:
    u, sy, sx = r
    return sy * v[u], sx * v[1 - u]


def _cos(u: tuple, v: tuple) -> float:
    return (u[0] * v[0] + u[1] * v[1]) / (math.hypot(*u) * math.hypot(*v) or 1.0)


def _pins(grid: _Grid, a: list, claimed: set) -> list[tuple[float, int, int, int]]:
    """Where the second marked curve may start: every (miss, near, t, heading) with ``near`` an
    end of ``a`` and ``t`` a free pixel for a dot that lies from near as a's other end, far,
    does, turned by a symmetry R of the square other than identity, and as far from the image
    edge as far. Dots on near and t lie as far apart (in every metric) and as near the edge as
    dots on near and far; a curve leaving t along ``heading`` (R of a's heading at far) leaves
    it at the angle to near that a leaves far at. ``miss``: how far R moves the angle between
    the other dot and where a leaves near (0 for a mirror along a's way out)."""
    pins = []
    for path in (a, a[::-1]):
        near, far = path[0], path[-1]
        o = grid.yx(near)
        rel = lambda p, o=o: tuple(c - c0 for c, c0 in zip(grid.yx(p), o, strict=True))
        d, leave = rel(far), rel(path[min(3, len(path) - 1)])  # 3: past the dot and a gap
        back = HEADINGS[grid.moves.index(path[-2] - far)]
        for r in TURNS:
            rd = _turn(r, d)
            y, x = o[0] + rd[0], o[1] + rd[1]
            if rd == d or not (0 <= y < grid.cfg.size and 0 <= x < grid.cfg.size):
                continue
            t = grid.pixel(y, x)
            free = grid.inside[1][t] and all(t + e not in claimed for e in grid.dot)
            if free and _ring(grid, t) == _ring(grid, far):
                miss = abs(_cos(leave, rd) - _cos(leave, d))
                pins.append((miss, near, t, HEADINGS.index(_turn(r, back))))
    return pins


def _layout(rng, cfg: PathfinderConfig, grid: _Grid):
    """(curves, positive dots, negative dots), or None if the curves did not fit.

    The positive's dots sit on both ends of the first marked curve; the negative's on one end
    of it and on the start of the second, at one of _pins, the least miss first. One layout
    serves both labels, so nothing but the dots depends on the label."""
    claimed: set = set()
    a = _curve(rng, cfg, grid, cfg.contour_length, claimed, True)
    pins = _pins(grid, a, claimed) if a is not None else []
    rng.shuffle(pins)  # ties in any order, then the least miss first
    pins.sort(key=lambda pin: pin[0])
    for i in range(cfg.match_tries if pins else 0):
        _, near, t, heading = pins[i % len(pins)]
        trial = set(claimed)
        b = _curve(rng, cfg, grid, cfg.contour_length, trial, True, start=t, heading=heading)
        if b is not None:
            break
    else:
        return None
    curves = [a, b]
    for _ in range(cfg.distractors):
        path = _curve(rng, cfg, grid, cfg.distractor_dashes, trial, False)
        if path is None:
            return None
        curves.append(path)
    return curves, (a[0], a[-1]), (near, t)


def _render(rng, cfg: PathfinderConfig, grid: _Grid, curves, ends) -> list[int]:
    """Token ids of the flattened image (size * size), a dot at each pixel of ``ends``; one grey
    level for all curves (a level per curve gave the label away beside the dots)."""
    img = {}  # pixel -> intensity in [0, 1]
    level = rng.uniform(*cfg.contrast)
    for path in curves:
        for i, p in enumerate(path):
            if i % (cfg.dash + cfg.gap) < cfg.dash:
                img[p] = level
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
        layout = _layout(rng, cfg, grid)
        if layout is not None:
            curves, joined, apart = layout
            return _render(rng, cfg, grid, curves, joined if positive else apart)
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
