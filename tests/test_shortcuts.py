"""Shortcut probes (docs/tasks.md, "No shortcuts"): simple rules that look at a few
pixels or positions must stay near chance on the data of every preset (ci, cpu, gpu sizes).

Every rule is fitted on one generated split (train) and scored on another (test). A rule fails
its probe when its held-out accuracy beats chance by more than SLACK (5 points) with 99%
confidence: accuracy > chance + SLACK + Z * sqrt(chance * (1 - chance) / n), n the test
examples (whole sequences, not MQAR queries, which share a sequence and are not independent).
Each probe is also run on data built here with a known shortcut (per-curve grey levels, dots
placed without matching, MQAR pairs at fixed positions, ...) and must score far above chance
there: a probe that cannot fail proves nothing.

Known and kept: ListOps' root operator is a baseline (the task's nature). Pathfinder's curves
must be long enough to hide where they head: 16x16 images with curves of 4 dashes let the
direction a curve leaves a dot in tell 83% of them apart, so the ci and cpu presets draw 20x20
images with curves of 8 dashes (at chance here).
"""

from __future__ import annotations

import functools
import math
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from harness.sweep import compose_config
from harness.tasks import listops, mqar, pathfinder
from harness.tasks.common import IGNORE

PRESETS = ("ci", "cpu", "gpu")
SLACK = 0.05  # how far above chance a rule may score
Z = 2.33  # one-sided 99% normal quantile
SIZES = {"ci": 600, "cpu": 600, "gpu": 300}  # examples per split (32x32 images: ~5 ms each)


@functools.cache
def composed(task: str, preset: str):
    """The task's config as `python -m harness task=<task> preset=<preset>` composes it."""
    return compose_config([f"task={task}", f"preset={preset}"])


def data_of(task: str, preset: str) -> dict:
    """Generator options of a preset (the one place that reads the presets)."""
    return OmegaConf.to_container(composed(task, preset).task.data)


def proj_len(task: str, preset: str) -> int:
    return composed(task, preset).variant.linformer.proj_len


# --- statistics and rule fitting ---------------------------------------------------------------
def margin(chance: float, n: int) -> float:
    return Z * math.sqrt(chance * (1 - chance) / n)


def near_chance(acc: float, chance: float, n: int) -> bool:
    return acc <= chance + SLACK + margin(chance, n)


def far_above(acc: float, chance: float, n: int) -> bool:
    """The lower 99% bound of ``acc`` beats chance by at least twice the slack."""
    return acc - Z * math.sqrt(acc * (1 - acc) / n) > chance + 2 * SLACK


def check(scores: dict, chance, n: int):
    """Assert every rule in ``scores`` (name -> accuracy) is near chance; the message lists all.
    ``chance`` is one number or a name -> chance dict."""
    level = chance if isinstance(chance, dict) else dict.fromkeys(scores, chance)
    bad = {k: round(v, 3) for k, v in scores.items() if not near_chance(v, level[k], n)}
    table = {k: round(v, 3) for k, v in scores.items()}
    assert not bad, f"rules beat chance by more than {SLACK}: {bad} (all: {table}, n={n})"


def threshold_rule(f_train, y_train):
    """The best 'label 1 iff feature > t' (or < t) on the train split."""
    t = f_train.unique()[:, None].float()  # (thresholds, 1)
    above = (f_train[None].float() > t).long() == y_train  # (thresholds, examples)
    acc = torch.stack([above.float().mean(1), 1 - above.float().mean(1)])  # > t, <= t
    sign, i = divmod(int(acc.argmax()), len(t))
    return lambda f: ((f.float() > t[i]) != bool(sign)).long()


def lookup_rule(f_train, y_train):
    """The train split's majority label for each feature value (overall majority if unseen)."""
    overall = Counter(y_train.tolist()).most_common(1)[0][0]
    table = {}
    for v, y in zip(f_train.tolist(), y_train.tolist(), strict=True):
        table.setdefault(v, Counter())[y] += 1
    best = {v: c.most_common(1)[0][0] for v, c in table.items()}
    return lambda f: torch.tensor([best.get(v, overall) for v in f.tolist()])


def held_out(fit, f_train, y_train, f_test, y_test) -> float:
    return (fit(f_train, y_train)(f_test) == y_test).float().mean().item()


def logistic(x_train, y_train, x_test, y_test, steps: int = 10) -> float:
    """A small L2-regularised logistic regression on the features and their squares
    (standardised on train), fitted by Newton's method: a few exact steps in float64."""
    x_train, x_test = x_train.double(), x_test.double()
    mu, sd = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    lift = lambda x: torch.cat([torch.ones(len(x), 1), (x - mu) / sd, ((x - mu) / sd) ** 2], 1)
    a, b, y = lift(x_train), lift(x_test), y_train.double()
    w = torch.zeros(a.shape[1], dtype=torch.float64)
    ridge = 1e-2 * torch.eye(len(w), dtype=torch.float64)
    for _ in range(steps):
        p = torch.sigmoid(a @ w)
        hessian = a.T @ (a * (p * (1 - p))[:, None]) + ridge
        w = w - torch.linalg.solve(hessian, a.T @ (p - y) + ridge @ w)
    return (((b @ w) > 0).long() == y_test).float().mean().item()


# --- Pathfinder -------------------------------------------------------------------------------
def pf_config(preset: str) -> pathfinder.PathfinderConfig:
    return pathfinder.PathfinderConfig(**data_of("pathfinder", preset))


@functools.lru_cache(maxsize=4)
def _pf_split(items: tuple, split: str, n: int):
    return pathfinder.generate(split, n, 0, **dict(items))


def pf_data(preset: str, split: str):
    """(images (n, size, size) int64, labels); ci and cpu share their data settings, so their
    images are generated once."""
    items = tuple(sorted(data_of("pathfinder", preset).items()))
    tokens, labels = _pf_split(items, split, SIZES[preset])
    size = pf_config(preset).size
    return tokens.view(-1, size, size).long(), labels


def dot_centres(images, top: int) -> torch.Tensor:
    """(n, 2, 2): the (y, x) centres of each image's two 3x3 dots."""
    full = F.avg_pool2d((images == top).float()[:, None], 3, stride=1)[:, 0] > 0.999
    centres = full.nonzero()
    assert len(centres) == 2 * len(images), "every image has exactly two dots"
    return centres[:, 1:].view(-1, 2, 2) + 1


def beside(images, centres, top: int) -> torch.Tensor:
    """(n, 2): the grey level of the curve pixel nearest each dot (Chebyshev; ties: first)."""
    size = images.shape[-1]
    grid = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1)
    dist = (grid[None, None] - centres[:, :, None, None]).abs().amax(-1)  # (n, 2, size, size)
    curve = (images > 0) & (images < top)
    dist = dist.masked_fill(~curve[:, None], size).flatten(2)
    return images.flatten(1).gather(1, dist.argmin(-1))


def heading(images, centres, top: int) -> torch.Tensor:
    """(n, 2): per dot, the cosine between where its nearest curve pixels lie (their mean) and
    where the other dot lies: near 1 when a curve leaves the dot heading for the other."""
    size = images.shape[-1]
    grid = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1)
    dist = (grid[None, None] - centres[:, :, None, None]).abs().amax(-1)  # (n, 2, size, size)
    curve = ((images > 0) & (images < top))[:, None]
    dist = dist.masked_fill(~curve, size)
    nearest = (dist == dist.amin((2, 3), keepdim=True)) & curve  # (n, 2, size, size)
    where = (nearest[..., None] * grid).sum((2, 3)) / nearest.sum((2, 3))[..., None]
    leave = where - centres  # (n, 2, 2)
    other = centres.flip(1) - centres
    return F.cosine_similarity(leave, other.float(), dim=-1)


def pf_features(images, cfg: pathfinder.PathfinderConfig) -> dict:
    """Hand features: the grey levels beside the dots (same or not), lit pixels, the distance
    between the dots (Chebyshev, Manhattan, squared Euclidean, smaller axis), each dot's
    distance to the image edge (smaller, larger) and how many dots touch the empty border."""
    top = cfg.levels - 1
    c = dot_centres(images, top)
    grey = beside(images, c, top)
    d = (c[:, 0] - c[:, 1]).abs()
    edge = torch.minimum(c, cfg.size - 1 - c).amin(2).sort(1).values  # (n, 2)
    return {
        "same grey": (grey[:, 0] == grey[:, 1]).long(),
        "lit pixels": (images > 0).sum((1, 2)),
        "chebyshev": d.amax(1),
        "manhattan": d.sum(1),
        "euclidean^2": (d**2).sum(1),
        "smaller axis": d.amin(1),
        "nearer edge": edge[:, 0],
        "farther edge": edge[:, 1],
        "on border": (edge == cfg.border + 1).sum(1),  # a dot one pixel in can go no nearer
    }


def pf_scores(train, test, cfg) -> dict:
    """Held-out accuracy of a threshold and a lookup rule per feature and of the regression."""
    (x_tr, y_tr), (x_te, y_te) = train, test
    f_tr, f_te = pf_features(x_tr, cfg), pf_features(x_te, cfg)
    scores = {}
    for name in f_tr:
        for fit in (threshold_rule, lookup_rule):
            scores[f"{name} {fit.__name__}"] = held_out(fit, f_tr[name], y_tr, f_te[name], y_te)
    stack = lambda f: torch.stack([v.float() for v in f.values()], 1)
    scores["logistic"] = logistic(stack(f_tr), y_tr, stack(f_te), y_te)
    return scores


@pytest.mark.parametrize("preset", PRESETS)
def test_pathfinder_rules_stay_near_chance(preset):
    train, test = pf_data(preset, "train"), pf_data(preset, "test")
    check(pf_scores(train, test, pf_config(preset)), 0.5, len(test[1]))


@pytest.mark.parametrize("preset", PRESETS)
def test_pathfinder_curves_do_not_head_for_the_other_dot(preset):
    """A rule on the direction a curve leaves each dot in: a threshold on the larger, the
    smaller and the sum of the two cosines (see heading)."""
    cfg = pf_config(preset)
    (x_tr, y_tr), (x_te, y_te) = pf_data(preset, "train"), pf_data(preset, "test")
    top = cfg.levels - 1
    cos = lambda x: heading(x, dot_centres(x, top), top).sort(1).values
    c_tr, c_te = cos(x_tr), cos(x_te)
    scores = {
        name: held_out(threshold_rule, f(c_tr), y_tr, f(c_te), y_te)
        for name, f in (
            ("larger", lambda c: c[:, 1]),
            ("smaller", lambda c: c[:, 0]),
            ("sum", lambda c: c.sum(1)),
        )
    }
    check(scores, 0.5, len(y_te))


def components(images, reach: int) -> torch.Tensor:
    """Label each lit pixel with its curve: the largest pixel id within ``reach`` steps (the
    generator keeps curves further apart than that), spread until nothing changes."""
    lit = images > 0
    n, size, _ = images.shape
    ids = torch.arange(1, size * size + 1, dtype=torch.float).view(1, size, size) * lit
    while True:
        spread = F.max_pool2d(ids[:, None], 2 * reach + 1, stride=1, padding=reach)[:, 0] * lit
        if torch.equal(spread, ids):
            return ids.long()
        ids = spread


def per_curve_grey(images, cfg, seed: int = 0):
    """The old rendering: every curve its own grey level in the contrast range (dots stay)."""
    top = cfg.levels - 1
    g = torch.Generator().manual_seed(seed)
    lo, hi = cfg.contrast
    grey = ((lo + (hi - lo) * torch.rand(len(images), cfg.size**2 + 1, generator=g)) * top).round()
    level = grey.long().gather(1, components(images, cfg.reach).flatten(1)).view_as(images)
    return torch.where(images == top, images, torch.where(images > 0, level, 0))


def unmatched(cfg, split: str, n: int):
    """The old negatives: a dot on a random end of each marked curve, as far apart as chance
    has it (the generator's own layout and rendering, only the dots chosen otherwise)."""
    rng = random.Random(f"unmatched:{split}")
    grid = pathfinder._Grid(cfg)
    images, labels = [], [i % 2 for i in range(n)]
    for y in labels:
        layout = None
        while layout is None:
            layout = pathfinder._layout(rng, cfg, grid)
        curves, positive, _ = layout
        a, b = curves[0], curves[1]
        ends = positive if y else (rng.choice((a[0], a[-1])), rng.choice((b[0], b[-1])))
        images.append(pathfinder._render(rng, cfg, grid, curves, ends))
    return torch.tensor(images).view(n, cfg.size, cfg.size), torch.tensor(labels)


def biased(images, labels, feature):
    """Keep positives whose ``feature`` lies above its median and negatives at or below it:
    what a generator that rejects layouts depending on the label would produce."""
    f = feature(images)
    keep = (f > f.float().median()) == labels.bool()
    return images[keep], labels[keep]


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_pathfinder_probes_catch_per_curve_grey_levels(preset):
    cfg = pf_config(preset)
    (x_tr, y_tr), (x_te, y_te) = pf_data(preset, "train"), pf_data(preset, "test")
    old = pf_scores((per_curve_grey(x_tr, cfg), y_tr), (per_curve_grey(x_te, cfg, 1), y_te), cfg)
    for rule in ("same grey lookup_rule", "logistic"):
        assert far_above(old[rule], 0.5, len(y_te)), (rule, old[rule])


def test_pathfinder_probes_catch_dots_placed_without_matching():
    cfg = pf_config("cpu")  # short curves: their two ends lie close, two curves' ends far apart
    train, test = unmatched(cfg, "train", 400), unmatched(cfg, "test", 400)
    old = pf_scores(train, test, cfg)
    assert far_above(max(old["chebyshev lookup_rule"], old["manhattan lookup_rule"]), 0.5, 400)


def test_pathfinder_probes_catch_lit_pixels_and_positions():
    cfg = pf_config("cpu")
    (x_tr, y_tr), (x_te, y_te) = pf_data("cpu", "train"), pf_data("cpu", "test")
    edge = lambda x: pf_features(x, cfg)["nearer edge"]
    train, test = biased(x_tr, y_tr, edge), biased(x_te, y_te, edge)
    old = pf_scores(train, test, cfg)
    assert far_above(old["nearer edge threshold_rule"], 0.5, len(test[1]))

    def one_pixel_less(x, y):  # negatives drawn one curve pixel short
        flat = x.flatten(1).clone()
        first = ((flat > 0) & (flat < cfg.levels - 1)).int().argmax(1)  # a curve pixel
        flat[y == 0, first[y == 0]] = 0
        return flat.view_as(x), y

    old = pf_scores(one_pixel_less(x_tr, y_tr), one_pixel_less(x_te, y_te), cfg)
    assert far_above(old["lit pixels threshold_rule"], 0.5, len(y_te))


# --- MQAR -------------------------------------------------------------------------------------
def mq_config(preset: str) -> mqar.MQARConfig:
    return mqar.MQARConfig(**data_of("mqar", preset))


def mq_data(preset: str, split: str):
    return mqar.generate(split, SIZES[preset], 0, **data_of("mqar", preset))


def mq_queries(tokens, labels, cfg: mqar.MQARConfig) -> dict:
    """Every query (row, position, rank among its row's queries, key, answer, and ``pair``:
    where its key's pair sits), and every row's value positions (``values``, padded with L)."""
    n, L = tokens.shape
    row, pos = (labels != IGNORE).nonzero(as_tuple=True)
    rank = torch.cat([torch.arange(int(k)) for k in (labels != IGNORE).sum(1)])
    is_value = tokens > cfg.num_keys  # values exist in pairs only, right after their key
    most = int(is_value.sum(1).max())
    values = is_value.float().argsort(dim=1, descending=True, stable=True)[:, :most]
    values[~is_value.gather(1, values)] = L
    r = torch.arange(n)[:, None].expand_as(values)[values < L]
    k = values[values < L] - 1  # the pairs' key positions
    seen = torch.zeros(n, cfg.num_keys + 1).index_put_(
        (r, tokens[r, k].long()), torch.ones(len(k)), accumulate=True
    )
    assert seen.max() == 1, "keys in the context are distinct"
    at = torch.full((n, cfg.num_keys + 1), -1)
    at[r, tokens[r, k].long()] = k
    key = tokens[row, pos].long()
    assert (at[row, key] >= 0).all(), "every asked key has a pair"
    return dict(
        row=row,
        pos=pos,
        rank=rank,
        key=key,
        answer=labels[row, pos],
        pair=at[row, key],
        values=values,
    )


def hits(tokens, q) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, position) of every token equal to a query's answer: where a rule would be right
    (only values can equal an answer, so only the value positions are compared)."""
    L = tokens.shape[1]
    at = q["values"][q["row"]]  # (queries, most pairs)
    got = torch.cat([tokens, torch.full_like(tokens[:, :1], -1)], 1).gather(1, q["values"])
    i, k = (got[q["row"]] == q["answer"][:, None]).nonzero(as_tuple=True)
    keep = at[i, k] < L
    return i[keep], at[i, k][keep]


def offset_rule(train, test) -> float:
    """The token at the train split's best fixed offset from the query."""
    L = train[0].shape[1]

    def right(tokens, q):  # queries right at each offset -(L-1)..L-1
        i, j = hits(tokens, q)
        return torch.zeros(2 * L - 1).index_add_(0, j - q["pos"][i] + L - 1, torch.ones(len(i)))

    return right(*test)[right(*train).argmax()].item() / len(test[1]["pos"])


def rank_position_rule(train, test) -> float:
    """For the r-th query of a sequence, the token at the absolute position that held the
    answer of train's r-th queries most often."""
    (t_tr, q_tr), (t_te, q_te) = train, test
    ranks, L = int(q_tr["rank"].max()) + 1, t_tr.shape[1]
    i, j = hits(t_tr, q_tr)
    count = torch.zeros(ranks * L).index_add_(0, q_tr["rank"][i] * L + j, torch.ones(len(i)))
    where = count.view(ranks, L).argmax(1)
    at = where[q_te["rank"].clamp(max=ranks - 1)]
    seen = q_te["rank"] < ranks
    return ((t_te[q_te["row"], at] == q_te["answer"]) & seen).float().mean().item()


def common_value_rule(train, test) -> float:
    """Always the train split's most common answer."""
    top = Counter(train[1]["answer"].tolist()).most_common(1)[0][0]
    return (test[1]["answer"] == top).float().mean().item()


def recent_pair_rule(train, test) -> float:
    """The value of the last pair before the query (fits nothing)."""
    tokens, q = test
    at = q["values"][q["row"]]  # (queries, most pairs), padded with L
    last = torch.where(at < q["pos"][:, None], at, -1).amax(1)
    got = tokens[q["row"], last.clamp(min=0)]
    return ((got == q["answer"]) & (last >= 0)).float().mean().item()


def window_rule(train, test, width: int) -> float:
    """Recall through ``width`` fixed positions, what a learned Linformer projection of that
    length can select exactly: right wherever the query's pair lies inside the train split's
    best window (contiguous, or the positions that held a pair most often), wrong elsewhere.
    (It probes selection only: a projection can also pool the context, which varied positions
    do not prevent while the pairs are fewer than proj_len; see mqar's docstring.)"""
    (t_tr, q_tr), (_, q_te) = train, test
    L = t_tr.shape[1]
    # window [o, o + width) holds a pair at k, k + 1 for o in k - width + 2 .. k
    k = q_tr["pair"]
    ends = torch.zeros(L + 1)
    ends.index_add_(0, (k - width + 2).clamp(min=0), torch.ones(len(k)))
    ends.index_add_(0, k + 1, -torch.ones(len(k)))
    start = int(ends.cumsum(0)[: max(1, L - width + 1)].argmax())
    often = torch.zeros(L).index_add_(0, k, torch.ones(len(k)))
    often = often + often.roll(1)  # a pair fills its key's position and the next

    def acc(q, w):
        inside = torch.zeros(L + 1, dtype=torch.bool)
        inside[w] = True
        return (inside[q["pair"]] & inside[q["pair"] + 1]).float().mean().item()

    windows = [torch.arange(start, min(L, start + width)), often.topk(min(width, L)).indices]
    return acc(q_te, max(windows, key=lambda w: acc(q_tr, w)))


def mq_scores(train, test, cfg, width: int) -> dict:
    train = (train[0], mq_queries(*train, cfg))
    test = (test[0], mq_queries(*test, cfg))
    return {
        "fixed offset": offset_rule(train, test),
        "position by rank": rank_position_rule(train, test),
        "most common value": common_value_rule(train, test),
        "most recent pair": recent_pair_rule(train, test),
        "fixed window": window_rule(train, test, width),
    }


def mq_chance(cfg, width: int) -> dict:
    """A rule blind to which key is asked picks the right one of p values 1 / p of the time
    (p = num_kv_pairs); a window of ``width`` positions holds a share (width - 1) / (C - 1) of
    the pairs when they are spread evenly over the C = seq_len - queries context positions."""
    blind = 1 / cfg.num_kv_pairs
    spread = min(1.0, (width - 1) / (cfg.seq_len - cfg.queries - 1))
    names = ("fixed offset", "position by rank", "most common value", "most recent pair")
    return dict.fromkeys(names, blind) | {"fixed window": spread}


@pytest.mark.parametrize("preset", PRESETS)
def test_mqar_rules_stay_near_chance(preset):
    cfg, width = mq_config(preset), proj_len("mqar", preset)
    train, test = mq_data(preset, "train"), mq_data(preset, "test")
    check(mq_scores(train, test, cfg, width), mq_chance(cfg, width), SIZES[preset])


def fixed_rows(cfg, n: int, seed: int, layout: str):
    """MQAR rows with fixed positions, keys asked in pair order: "prefix" puts the pairs at
    0..2p-1 and the queries right after (the old context block), "beside" puts each query
    right after its own pair."""
    g = torch.Generator().manual_seed(seed)
    p = cfg.num_kv_pairs
    keys = 1 + torch.rand(n, cfg.num_keys, generator=g).argsort(1)[:, :p]
    values = 1 + cfg.num_keys + torch.randint(cfg.num_values, (n, p), generator=g)
    step = 2 if layout == "prefix" else 3
    at = step * torch.arange(p)
    asked = 2 * p + torch.arange(p) if layout == "prefix" else at + 2
    tokens = torch.full((n, cfg.seq_len), mqar.FILLER, dtype=torch.int32)
    labels = torch.full((n, cfg.seq_len), IGNORE)
    tokens[:, at], tokens[:, at + 1], tokens[:, asked] = keys.int(), values.int(), keys.int()
    labels[:, asked] = values
    return tokens, labels


@pytest.mark.parametrize("preset", PRESETS)
def test_mqar_probes_catch_fixed_positions(preset):
    cfg, width, n = mq_config(preset), proj_len("mqar", preset), SIZES[preset]
    chance = mq_chance(cfg, width)
    for layout, rules in (
        ("prefix", ("fixed window", "position by rank")),
        ("beside", ("fixed offset", "most recent pair")),
    ):
        old = mq_scores(fixed_rows(cfg, n, 0, layout), fixed_rows(cfg, n, 1, layout), cfg, width)
        for rule in rules:
            assert far_above(old[rule], chance[rule], n), (layout, rule, old[rule])


def test_mqar_probes_catch_a_common_value():
    cfg = mq_config("cpu")

    def lump(t):  # even value ids become one value, in the context and the answers alike
        return torch.where((t > cfg.num_keys) & (t % 2 == 0), cfg.num_keys + 2, t)

    def skewed(split):
        tokens, labels = mq_data("cpu", split)
        return lump(tokens), torch.where(labels == IGNORE, IGNORE, lump(labels))

    old = mq_scores(skewed("train"), skewed("test"), cfg, proj_len("mqar", "cpu"))
    assert far_above(old["most common value"], 1 / cfg.num_kv_pairs, SIZES["cpu"])


@pytest.mark.parametrize("extra", [{}, {"min_kv_pairs": 2}, {"num_queries": 20}])
def test_mqar_pairs_anywhere_in_the_context_answers_beside_their_keys(extra):
    """The layout itself: distinct keys, each pair a key then its value, every query's target
    the value after its key's pair, IGNORE elsewhere; pairs do not start at fixed positions."""
    data = {"seq_len": 48, "num_kv_pairs": 6, "vocab_size": 40} | extra
    cfg = mqar.MQARConfig(**data)
    tokens, labels = mqar.generate("train", 300, 3, **data)
    q = mq_queries(tokens, labels, cfg)  # asserts distinct keys, one pair per asked key
    assert torch.equal(tokens[q["row"], q["pair"] + 1].long(), q["answer"])
    key = (tokens >= 1) & (tokens <= cfg.num_keys)
    pair = key & torch.cat([tokens[:, 1:] > cfg.num_keys, torch.zeros_like(key[:, :1])], 1)
    assert torch.equal(labels != IGNORE, key & ~pair)  # targets at the queries alone
    lo = extra.get("min_kv_pairs", cfg.num_kv_pairs)
    assert set(pair.sum(1).tolist()) == set(range(lo, cfg.num_kv_pairs + 1))
    assert len(set(pair.float().argmax(1).tolist())) > 5, "the first pair starts anywhere"


# --- ListOps ----------------------------------------------------------------------------------
# Baselines, not shortcuts (see listops' docstring): held-out accuracy of the majority class and
# of "the most common value under this root operator" on SIZES test expressions. The report
# should show the second beside every ListOps accuracy.
LISTOPS_BASELINES = {
    "ci": {"majority": 0.10, "root operator": 0.20},
    "cpu": {"majority": 0.07, "root operator": 0.25},
    "gpu": {"majority": 0.21, "root operator": 0.37},
}


@pytest.mark.parametrize("preset", PRESETS)
def test_listops_baselines_stay_where_documented(preset):
    data = data_of("listops", preset)
    x_tr, y_tr = listops.generate("train", SIZES[preset], 0, **data)
    x_te, y_te = listops.generate("test", SIZES[preset], 0, **data)
    root = lambda x: x[:, 0].long()  # every expression opens with its root operator
    assert set(root(x_tr).tolist()) <= {listops.OP0 + i for i in range(len(listops.OPS))}
    none = torch.zeros(len(y_te), dtype=torch.long)
    scores = {
        "majority": held_out(lookup_rule, none[: len(y_tr)], y_tr, none, y_te),
        "root operator": held_out(lookup_rule, root(x_tr), y_tr, root(x_te), y_te),
    }
    for name, documented in LISTOPS_BASELINES[preset].items():
        assert abs(scores[name] - documented) <= SLACK + margin(documented, len(y_te)), scores
