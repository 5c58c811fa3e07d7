"""The regression check on synthetic runs of the regress grid: machine drift, shape spells, cell
noise and slow rounds (as a shared 2-core machine gives them), slowdowns injected as
``inject_slowdown`` does. Verdicts are asserted exactly: which (variant, group) is flagged."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from harness import compare as cmp
from harness.results import ResultsFile, write_meta

# variant -> ms at n=1024 fwd, non-causal (about the AMD baseline); `linformer` has no causal form
TIMES = {
    "full": 24.0, "linear": 1.1, "linformer": 5.0, "local": 12.0, "reformer": 120.0,
    "relative": 180.0, "sdpa": 12.0, "sdpa_flash": 12.5, "sdpa_math": 45.0, "sparse": 70.0,
}  # fmt: skip
UNSUPPORTED = ("sdpa_cudnn", "sdpa_efficient", "xformers")  # CUDA only: unsupported rows
DENSE = ("full", "sdpa", "sdpa_math", "relative")
EXTRA = (("sparse", {"pattern": "bigbird"}, 40.0), ("sparse", {"pattern": "strided"}, 60.0),
         ("linear", {"feature_map": "favor"}, 3.0))  # fmt: skip
ENV = {"device": "cpu", "cpu": "Test CPU", "threads": 2, "torch_version": "2.13.0+cpu",
       "allocator": "system", "dtypes": ["float32"]}  # fmt: skip
GRID = [(n, c, p) for c in (False, True) for n in (512, 1024) for p in ("fwd", "fwd_bwd")]


def write_run(folder, seed, slow=None, extra=(), drop=(), env=None, finished=True, rounds=3):
    """A regress-shaped run folder: ``rounds`` of 5 samples per cell, written as the sweep does.

    Noise per run: the machine (x lognormal 0.15), each shape (0.08: a busy spell hits every
    variant measured at it), each cell (0.06), each round of a cell (0.05, and one round in
    ten 1.5x slower), each sample (0.03). ``slow``: {"local": 1.5, "local@fwd_bwd": 1.6, ...}
    as inject_slowdown takes it; ``extra``: more option sets; ``drop``: variants not swept."""
    folder.mkdir(parents=True)
    table = ResultsFile(folder / "results.csv")
    units = [(v, {"seed": 0}, t) for v, t in TIMES.items() if v not in drop]
    units += [(v, {"seed": 0, **o}, t) for v, o, t in extra]
    machine = np.random.default_rng([seed, 0]).lognormal(0, 0.15)
    for i, (n, causal, pss) in enumerate(GRID):
        shape = machine * np.random.default_rng([seed, 1, i]).lognormal(0, 0.08)
        for variant, options, t in units:
            row = _cell(variant, options, n, causal, pss)
            if variant == "linformer" and causal:
                table.append(row | {"round": 0, "status": "unsupported", "reason": "no causal"})
                continue
            # each cell its own random stream: adding or dropping a variant moves no other cell
            rng = np.random.default_rng(
                [seed, 2, i, zlib.crc32(json.dumps([variant, options]).encode())]
            )
            t_cell = t * (n / 1024) ** 1.5 * (3 if pss == "fwd_bwd" else 1) * (0.8 if causal else 1)
            t_cell *= shape * rng.lognormal(0, 0.06) * _slowdown(slow or {}, variant, causal, pss)
            for r in range(rounds):
                spell = rng.lognormal(0, 0.05) * (1.5 if rng.random() < 0.1 else 1)
                raw = t_cell * spell * rng.lognormal(0, 0.03, 5)
                table.append(row | _timing(raw, variant, n, pss) | {"round": r})
        for variant in UNSUPPORTED:
            table.append(_cell(variant, {"seed": 0}, n, causal, pss) | {"round": 0,
                         "status": "unsupported", "reason": "CUDA only"})  # fmt: skip
    meta = {**ENV, **(env or {}), "run_id": folder.name, "started": "2026-01-01T00:00:00+0000",
            "peak_memory": "tensor bytes (profiler on CPU, allocator on CUDA)"}  # fmt: skip
    if finished:
        meta["finished"] = "2026-01-01T00:01:00+0000"
    write_meta(folder, {k: v for k, v in meta.items() if v is not None})
    return folder


def _cell(variant, options, n, causal, pss) -> dict:
    return {"kind": "speed", "variant": variant, "options": options, "device": "cpu",
            "dtype": "float32", "batch": 1, "heads": 4, "kv_heads": 4, "seq_len": n,
            "head_dim": 64, "causal": causal, "pass": pss}  # fmt: skip


def _timing(raw, variant, n, pss) -> dict:
    flops = 4 * 4 * 64 * n * n * (3 if pss == "fwd_bwd" else 1)
    return {"status": "ok", "latency_ms": float(np.median(raw)),
            "samples_ms": " ".join(f"{x:.6g}" for x in raw), "flops": flops,
            "peak_mem_mb": round(len(variant) * n / 256, 3)}  # fmt: skip


def _slowdown(slow: dict, variant, causal, pss) -> float:
    """The product of the selectors that match, as harness.validate.Plan.slowdown_of."""
    parts = {pss, "causal" if causal else "noncausal"}
    factor = 1.0
    for selector, f in slow.items():
        name, _, part = selector.partition("@")
        if name == variant and (not part or part in parts):
            factor *= f
    return factor


def _edit_rows(folder, edit):
    """Rewrite a run's rows through ResultsFile, each as ``edit(row)`` returns it (None: as is)."""
    rows = ResultsFile(folder / "results.csv").rows()
    (folder / "results.csv").unlink()
    table = ResultsFile(folder / "results.csv")
    for r in rows:
        table.append(edit(r) or r)


def verdicts(base, new, *flags):
    """(exit status, the flagged (variant, group) pairs, the printed text)."""
    out = cmp.run([str(base), str(new), *flags])
    flagged = set(out.comparison.flagged) if out.comparison else set()
    return out.code, flagged, out.text


# the runs the tests compare, by name (or aa-<seed>): every new run has seed 2 unless named
# otherwise, the same noise, so that two scenarios differ only by what they inject
NAMED = {
    "base": {"seed": 1},
    "slow-all": {"slow": {"local": 1.5}},
    "slow-fwd_bwd": {"slow": {"local@fwd_bwd": 1.6}},
    "slow-causal": {"slow": {"local@causal": 1.6}},
    "dense": {"slow": {v: 1.3 for v in DENSE}},
    "added": {"extra": EXTRA},
    "removed": {"drop": ("sparse",)},
    "slow-removed": {"slow": {"local": 1.5}, "drop": ("sparse", "linear")},
    "slow-added": {"slow": {"local": 1.5}, "extra": EXTRA},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The folder of a named run, written on first use."""
    root = tmp_path_factory.mktemp("runs")
    made = {}

    def get(name):
        if name not in made:
            kw = NAMED.get(name) or {"seed": int(name.removeprefix("aa-"))}
            made[name] = write_run(root / name, **{"seed": 2, **kw})
        return made[name]

    return get


# --- the scenarios of scripts/check_compare.py, on synthetic runs -------------------------------
@pytest.mark.parametrize("seed", range(2, 12))
def test_aa_with_realistic_noise_passes(runs, seed):
    code, flagged, text = verdicts(runs("base"), runs(f"aa-{seed}"))
    assert (code, flagged) == (0, set()), text


@pytest.mark.parametrize("group", ["all", "fwd_bwd", "causal"])
def test_one_variant_slowed_is_caught_in_its_group(runs, group):
    """local 1.5x in every cell, 1.6x in its fwd_bwd cells only, 1.6x in its causal cells only."""
    code, flagged, text = verdicts(runs("base"), runs(f"slow-{group}"))
    assert code == 1 and ("local", group) in flagged, text
    assert {v for v, _ in flagged} == {"local"}, text  # nothing else flagged
    assert f"REGRESSION local {group}: +" in text


def test_part_slowdown_is_not_blamed_on_the_other_part(runs):
    _, flagged, text = verdicts(runs("base"), runs("slow-fwd_bwd"))
    assert ("local", "fwd_bwd") in flagged and ("local", "fwd") not in flagged, text


def test_dense_family_slowed_together_is_caught(runs):
    """All four 1.3x: each reads +25% to +31% against the untouched majority (the shorth does
    not follow the four). Ranked among ten variants of which four moved, a member's evidence is
    weaker than a lone variant's, so here one member carries the verdict: caught means one."""
    code, flagged, text = verdicts(runs("base"), runs("dense"))
    assert (code, flagged) == (1, {("sdpa", "all")}), text
    res = cmp.run([str(runs("base")), str(runs("dense"))]).comparison
    whole = res.groups[res.groups["group"] == "all"].set_index("variant")["change"]
    assert (whole[list(DENSE)] > 0.2).all() and (whole.drop(list(DENSE)) < 0.1).all(), whole


def test_a_fixed_reference_inside_the_family_hides_it(runs):
    """Why the reference is not a fixed variant: with ``--reference sdpa_math`` the family slows
    with its yardstick, and what is left reads faster, never slower."""
    args = [str(runs("base")), str(runs("dense")), "--reference", "sdpa_math"]
    out = cmp.run(args)
    assert (out.code, out.comparison.flagged) == (0, []), out.text
    whole = out.comparison.groups.query("group == 'all'").set_index("variant")["change"]
    outside = whole.drop([v for v in DENSE if v != "sdpa_math"])
    assert (outside < -0.15).all(), whole  # outside the family: about -23%


def test_added_variants_change_nothing(runs):
    """Three option sets only in the new run: listed as new, and every other verdict, change
    and p-value exactly as without them."""
    plain = cmp.run([str(runs("base")), str(runs("aa-2"))]).comparison
    code, flagged, text = verdicts(runs("base"), runs("added"))
    assert (code, flagged) == (0, set()), text
    assert (
        "new (not judged): sparse[pattern=bigbird] (8 cells), sparse[pattern=strided] (8 " in text
    )
    assert "linear[feature_map=favor] (8 cells)" in text
    added = cmp.run([str(runs("base")), str(runs("added"))]).comparison
    assert added.groups.equals(plain.groups)


def test_removed_variant_is_missing_and_nothing_else_moves(runs):
    code, flagged, text = verdicts(runs("base"), runs("removed"))
    assert (code, flagged) == (1, {("sparse", "all")}), text
    assert "REGRESSION sparse all: missing from the new run (8 cells ok in the base)" in text
    code, flagged, text = verdicts(runs("base"), runs("removed"), "--allow-missing")
    assert (code, flagged) == (0, set()), text
    assert "sparse all: missing from the new run" in text  # still said, as a note


def test_adding_or_removing_a_variant_changes_no_other_verdict(runs):
    """With a real regression in the new run, dropping or adding variants keeps every other
    verdict: the reference of a variant holds only variants present in both runs."""
    base = runs("base")
    plain = cmp.run([str(base), str(runs("slow-all"))]).comparison
    for other in (runs("slow-removed"), runs("slow-added")):
        res = cmp.run([str(base), str(other), "--allow-missing"]).comparison
        kept = plain.groups[~plain.groups["variant"].isin(["sparse", "linear"])]
        mine = res.groups[res.groups["variant"].isin(kept["variant"])]
        assert list(mine["verdict"]) == list(kept["verdict"]), (kept, mine)
        assert set(res.flagged) == {f for f in plain.flagged if f[0] == "local"}


def test_machine_wide_drift_is_not_a_regression(tmp_path, runs):
    """Every time 1.4x (a slower machine): the drift of each shape takes it out."""
    new = write_run(tmp_path / "drift", seed=3, slow={v: 1.4 for v in TIMES})
    code, flagged, text = verdicts(runs("base"), new)
    assert (code, flagged) == (0, set()), text


def test_one_cell_alone_needs_the_cell_threshold(tmp_path, runs):
    """One cell of local 2x (+71% against its drift): under --cell-threshold (100%) and its
    groups' medians; past a cell threshold of 50%, that cell alone is the regression."""
    new = write_run(tmp_path / "one", seed=2)

    def double(r):
        if (r["variant"], r["seq_len"], r["causal"], r["pass"]) == ("local", "1024", "True", "fwd"):
            return r | {"samples_ms": " ".join(str(float(x) * 2) for x in r["samples_ms"].split())}

    _edit_rows(new, double)
    code, flagged, text = verdicts(runs("base"), new)
    assert (code, flagged) == (0, set()), text
    code, flagged, text = verdicts(runs("base"), new, "--cell-threshold", "0.5")
    assert (code, flagged) == (1, {("local", "cell float32 B1 H4 n1024 d64 causal fwd")}), text


# --- what makes the inputs incomparable ----------------------------------------------------------
@pytest.mark.parametrize(
    "env, what",
    [
        ({"threads": 4}, "threads: 2 (base) vs 4 (new)"),
        ({"cpu": "Other CPU"}, "model: Test CPU (base) vs Other CPU (new)"),
        ({"torch_version": "2.14.0"}, "torch: 2.13.0+cpu (base) vs 2.14.0 (new)"),
        ({"allocator": "jemalloc"}, "allocator: system (base) vs jemalloc (new)"),
    ],  # fmt: skip
    ids=["threads", "cpu", "torch", "allocator"],
)
def test_environment_mismatch_exits_2_unless_allowed(tmp_path, runs, env, what):
    new = write_run(tmp_path / "env", seed=2, env=env)
    code, _, text = verdicts(runs("base"), new)
    assert code == 2 and what in text and "--allow-env-mismatch" in text, text
    code, flagged, text = verdicts(runs("base"), new, "--allow-env-mismatch")
    assert (code, flagged) == (0, set()) and text.startswith("WARNING: environments differ"), text


def test_an_allowed_field_is_warned_and_the_others_still_refused(tmp_path, runs):
    """CI's machine may have another CPU model than the one that measured the baseline:
    `make regress` allows that field alone."""
    other_cpu = write_run(tmp_path / "cpu", seed=2, env={"cpu": "Other CPU"})
    code, flagged, text = verdicts(runs("base"), other_cpu, "--allow-env-mismatch=model")
    assert (code, flagged) == (0, set()) and text.startswith("WARNING: environments differ")
    both = write_run(tmp_path / "both", seed=2, env={"cpu": "Other CPU", "threads": 4})
    code, _, text = verdicts(runs("base"), both, "--allow-env-mismatch=model")
    assert code == 2 and "threads: 2 (base) vs 4 (new)" in text and "model:" not in text


def test_an_older_run_without_allocator_is_unknown_not_a_mismatch(tmp_path, runs):
    new = write_run(tmp_path / "old", seed=2, env={"allocator": None})
    code, _, text = verdicts(runs("base"), new)
    assert code == 0 and "note: allocator unknown in the new run" in text, text


def test_interrupted_run_is_reported(tmp_path, runs):
    new = write_run(tmp_path / "cut", seed=2, finished=False)
    code, _, text = verdicts(runs("base"), new)
    assert code == 2 and "the new run did not finish" in text and "interrupted" in text, text
    code, _, text = verdicts(runs("base"), new, "--allow-interrupted")
    assert code == 0 and text.startswith("WARNING: the new run did not finish"), text


@pytest.mark.parametrize("case", ["missing", "no_reference", "no_common", "not_json"])
def test_uncomparable_inputs_exit_2(tmp_path, runs, case):
    new = tmp_path / "new"
    extra = []
    if case == "no_reference":
        new, extra = runs("aa-2"), ["--reference", "nonexistent"]
    elif case == "no_common":
        new = write_run(new, seed=2, drop=tuple(TIMES), extra=EXTRA)
    elif case == "not_json":
        new = tmp_path / "new.json"
        new.write_text("[1, 2]")
    code, _, text = verdicts(runs("base"), new, *extra)
    assert code == 2 and text.startswith("cannot compare:"), text


# --- cells that broke, exact metrics -------------------------------------------------------------
def test_cell_that_now_fails_is_flagged(tmp_path, runs):
    new = write_run(tmp_path / "oom", seed=2)
    target = ("local", "1024", "False", "fwd_bwd")

    def oom(r):
        if (r["variant"], r["seq_len"], r["causal"], r["pass"]) == target:
            return r | {"status": "oom", "reason": "out of memory", "samples_ms": ""}

    _edit_rows(new, oom)
    code, flagged, text = verdicts(runs("base"), new)
    assert (code, flagged) == (1, {("local", "cell float32 B1 H4 n1024 d64 fwd_bwd")}), text
    assert "now oom: out of memory" in text


@pytest.mark.parametrize("metric", ["flops", "peak_mem_mb"])
def test_exact_metric_change_is_a_regression(tmp_path, runs, metric):
    """FLOP counts and CPU tensor-byte peaks are exact: any change is flagged."""
    new = write_run(tmp_path / metric, seed=2)

    def bump(r):
        if r["variant"] == "linear" and r["seq_len"] == "512" and r["pass"] == "fwd":
            return r | {metric: str(float(r[metric]) * 2)}

    _edit_rows(new, bump)
    code, flagged, text = verdicts(runs("base"), new)
    assert code == 1 and {v for v, _ in flagged} == {"linear"}, text
    assert f"REGRESSION linear exact float32 B1 H4 n512 d64 fwd: {metric} " in text


def test_cpu_peak_of_an_older_run_is_not_compared(tmp_path, runs):
    """Before tensor-byte peaks, a CPU peak_mem_mb was the RSS high-water mark: not exact."""
    new = write_run(tmp_path / "rss", seed=2)
    meta = json.loads((new / "meta.json").read_text())
    del meta["peak_memory"]
    (new / "meta.json").write_text(json.dumps(meta))
    _edit_rows(new, lambda r: r | {"peak_mem_mb": "999"})
    code, flagged, text = verdicts(runs("base"), new)
    assert (code, flagged) == (0, set()), text
    assert "note: peak_mem_mb not compared: one run's CPU peaks are not tensor bytes" in text


# --- the statistics -----------------------------------------------------------------------------
def test_rank_sum_p_is_exact():
    assert cmp.rank_sum_p([10, 10, 10, 10], [10] * 4) == pytest.approx(1e-4)
    assert cmp.rank_sum_p([10, 10, 10, 9], [10] * 4) == pytest.approx(5e-4)
    assert cmp.rank_sum_p([1, 1], [3, 3]) == 1.0


def test_shorth_follows_the_majority():
    """Four of nine moved together by +0.26: the median is pulled up, the shorth is not."""
    values = [-0.04, -0.02, 0.0, 0.01, 0.03, 0.25, 0.26, 0.27, 0.28]
    assert cmp.shorth(values) == pytest.approx(0.0)
    assert cmp.shorth([1.0, 3.0]) == 2.0


def test_holm():
    assert list(cmp.holm([0.01, 0.04, 0.03, float("nan")])) == pytest.approx([0.04, 0.09, 0.09, 1])


# --- pytest-benchmark JSON ------------------------------------------------------------------
def bench_json(path, seed=0, scale=1.0, slow=None, rounds=15):
    """The shape of ``pytest --benchmark-json`` output (times in seconds)."""
    rng = np.random.default_rng(seed)
    slow = slow or {}
    benches = []
    for name, ms in (("control_matmul", 2.0), ("full", 3.0), ("local", 1.0)):
        data = list(ms / 1000 * scale * slow.get(name, 1) * rng.lognormal(0, 0.03, rounds))
        info = {"device": "cpu", "threads": 2, "dtype": "torch.float32"}
        info |= (
            {"control": True}
            if name.startswith("control")
            else {"variant": name, "shape": "B1 H4 n256 d32 float32", "flops": 33554432}
        )
        benches.append(
            {
                "group": "attention-micro",
                "name": f"test_micro[{name}]",
                "extra_info": info,
                "stats": {"data": data, "median": float(np.median(data)), "rounds": rounds},
            }
        )
    data = {"benchmarks": benches, "machine_info": {"cpu": {"brand_raw": "Test CPU"}}}
    path.write_text(json.dumps(data))
    return path


def test_benchmark_json(tmp_path):
    base = bench_json(tmp_path / "base.json", seed=0)
    assert verdicts(base, bench_json(tmp_path / "aa.json", seed=1))[:2] == (0, set())
    assert verdicts(base, bench_json(tmp_path / "drift.json", seed=2, scale=1.4))[:2] == (0, set())
    code, flagged, text = verdicts(
        base, bench_json(tmp_path / "s.json", seed=3, slow={"full": 1.5})
    )
    assert (code, flagged) == (1, {("full", "cell test_micro[full] B1 H4 n256 d32 float32")}), text


def test_benchmark_json_without_control_exits_2(tmp_path):
    path = bench_json(tmp_path / "b.json")
    data = json.loads(path.read_text())
    data["benchmarks"] = [b for b in data["benchmarks"] if "control" not in b["name"]]
    path.write_text(json.dumps(data))
    code, _, text = verdicts(path, path)
    assert code == 2 and "control" in text
