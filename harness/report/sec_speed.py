"""The kernel evidence: latency, memory and throughput against n, speed-ups, growth
exponents, and one-token decoding."""

from __future__ import annotations

from . import decode as decm
from . import plots, tables
from .context import Context
from .markup import details, esc, img, note, table


def sec_kernel(ctx: Context) -> str:
    if ctx.cells.empty:
        return note("No ok fwd or fwd_bwd speed rows.")
    ctx.csv["speed_cells.csv"] = ctx.cells[
        [
            "run",
            "machine",
            "config",
            "pass",
            "label",
            "variant",
            "options",
            "seq_len",
            "latency_ms",
            "lat_lo",
            "lat_hi",
            "noisy",
            "peak_mem_mb",
            "rss_peak_mb",
            "model_mem_mb",
            "flops",
            "gflops_per_s",
        ]
    ]
    text = (
        "Per machine and config, one row of panels per set of variant groups (whole groups "
        f"packed while they fit in {plots.MAX_LINES} lines; {ctx.reference} drawn thin black in "
        "each; the same colour for a variant on every plot), fwd and fwd_bwd "
        "side by side. Latency: median with the inter-quartile band of the timed blocks. "
        "Memory: peak of live tensor bytes above the inputs; dotted crosses: the variant's "
        "analytic model of the same pass. Throughput: analytic FLOPs / median latency, dashed: "
        "the matmul peak measured in the same run at that dtype."
    )
    parts = [note(text)]
    peaks = tables.matmul_peaks(ctx.data.runs, ctx.data.rows)
    for machine, m in ctx.cells.groupby("machine", sort=False):
        configs = [tables.main_config(m)] + sorted(set(m["config"]) - {tables.main_config(m)})
        parts.append(f"<h3>{esc(machine)}</h3>")
        for i, config in enumerate(configs):
            body = _kernel_figures(ctx, m[m["config"] == config], peaks, machine, config, i == 0)
            parts.append(body if i == 0 else details(f"{config}: latency and memory", body))
    return "".join(parts)


def _kernel_figures(ctx: Context, c, peaks, machine: str, config: str, main: bool) -> str:
    """Latency, memory and (main config only: the page stays quick) throughput."""
    dtype = config.split()[0]
    mine = [v for m, d, v in peaks if m == machine and d in ("", dtype)]
    # each run measures the peak again (a busy machine gives less): the best is the machine's
    hlines = (
        [(f"matmul peak {max(mine):,.0f} GFLOP/s (best of {len(mine)})", max(mine))] if mine else []
    )
    grid = dict(looks=ctx.looks, reference=ctx.reference, col="pass", col_order=["fwd", "fwd_bwd"])
    lat = plots.series_grid(c, "latency_ms", "latency (ms)", band=("lat_lo", "lat_hi"), **grid)
    mem = plots.series_grid(c, "peak_mem_mb", "peak memory (MB)", model="model_mem_mb", **grid)
    if not main:
        return img(lat, f"latency {config}", "No latency.") + img(mem, f"memory {config}", "")
    gf = plots.series_grid(c, "gflops_per_s", "GFLOP/s", hlines=hlines, **grid)
    return (
        f"<h4>{esc(config)}</h4>"
        + img(lat, f"latency {config}", "No latency.")
        + img(mem, f"memory {config}", "No positive peak-memory measurements.")
        + img(gf, f"throughput {config}", "No FLOP counts to compute throughput from.")
        + ("" if hlines else note("No run on this machine recorded matmul_peak_gflops."))
    )


def sec_speedup(ctx: Context) -> str:
    sp = tables.speedup(ctx.cells, ctx.reference)
    cx = tables.crossovers(ctx.cells, ctx.reference)
    ctx.csv |= {"speedup.csv": sp, "crossover.csv": cx}
    if sp.empty:
        return note(f"The reference {ctx.reference!r} has no ok speed rows: no speedups.", "warn")
    text = (
        f"{ctx.reference} time / variant time on the same machine, config, pass and length: "
        "above 1 (blue) the variant is faster. Blank: not measured or not ok. Crossover: the "
        f"length above which a variant stays faster than {ctx.reference}, interpolated on "
        "log-log axes between the two measured lengths around the crossing."
    )
    parts = [note(text)]
    for machine, s in sp.groupby("machine", sort=False):
        parts += [
            f"<h3>{esc(machine)}</h3>",
            img(plots.speedup_heatmap(s, ctx.reference, ctx.looks), "speedup", ""),
        ]
        c = cx[cx["machine"] == machine].drop(columns=["machine"])
        parts.append(details("crossover lengths", table(c)))
    return "".join(parts)


def sec_exponents(ctx: Context) -> str:
    ctx.csv["exponents.csv"] = ctx.exps
    if ctx.exps.empty:
        return note("No speed series.")
    text = (
        f"Least-squares slope of log(metric) against log(n) over the largest {tables.FIT_POINTS} "
        "measured lengths of each series (scipy.stats.linregress), +/- its standard error: 1 is "
        "linear growth, 2 quadratic. Memory is the peak of live tensor bytes."
    )
    parts = [note(text)]
    for machine, e in ctx.exps.groupby("machine", sort=False):
        config = tables.main_config(ctx.cells[ctx.cells["machine"] == machine])
        chart = plots.exponent_chart(e[e["config"] == config], ctx.looks)
        parts += [
            f"<h3>{esc(machine)}: {esc(config)}</h3>",
            img(chart, "exponents", ""),
            details("every series (all configs)", table(tables.exponents_wide(e))),
        ]
    return "".join(parts)


# --- 4. decode ------------------------------------------------------------------------------------
def sec_decode(ctx: Context) -> str:
    d = ctx.dec
    if d.empty:
        return note("No decode rows in these results (sweep.passes=[decode] measures them).")
    be = decm.breakeven(d, ctx.dec_exps, ctx.reference)
    ctx.csv |= {
        "decode_cells.csv": d.drop(columns=["samples_ms"]),
        "decode_exponents.csv": ctx.dec_exps,
        "decode_breakeven.csv": be,
    }
    text = (
        "One decoding step at context n (the prompt's state is set up, not timed): per-token "
        "latency and the decoding state's size (cache_mb) against n, log-log, one column per "
        f"number of key/value heads (grouped heads: fewer than the query heads). A KV cache "
        f"grows like n (exponent about 1); a bounded state stays flat (about 0). Break-even: "
        f"the context past which a variant's step is cheaper than {ctx.reference}'s."
    )
    parts = [note(text)]
    for (machine, config), c in d.groupby(["machine", "config"], sort=False):
        kv = decm.kv_order(c)
        grid = dict(looks=ctx.looks, reference=ctx.reference, col="kv", col_order=kv)
        lat = plots.series_grid(c, "latency_ms", "ms per token", band=("lat_lo", "lat_hi"), **grid)
        cache = plots.series_grid(c, "cache_mb", "decoding state (MB)", **grid)
        e = ctx.dec_exps[(ctx.dec_exps["machine"] == machine) & (ctx.dec_exps["config"] == config)]
        b = be[(be["machine"] == machine) & (be["config"] == config)]
        parts += [
            f"<h3>{esc(machine)}: {esc(config)}</h3>",
            img(lat, "decode latency", "No decode latency."),
            img(cache, "decode cache", "No cache sizes recorded (cache_mb)."),
            "<h4>Growth exponents (time, cache, peak memory) and break-even</h4>",
            table(tables.exponents_wide(e, ("kv", "label"), ("metric",))),
            table(b[["kv", "label", "state", "crossover_n", "verdict"]]),
        ]
    return "".join(parts)
