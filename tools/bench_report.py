#!/usr/bin/env python3
"""Runs gqe-bench (or reads its JSON) and reports dense GQA against GQE beside the FLOP ceiling.

    /usr/bin/python3 tools/bench_report.py [--bench build/bench/gqe-bench] [--repetitions 3]
        [--min-time 0.2] [--threads N] [--filter REGEX] [--json FILE] [--out build/bench-results]
        [--model DIR [--decode-tokens 32]]

Every speed figure is a ratio measured in one run. The suite runs with random interleaving: each
round runs every benchmark once, in a shuffled order, so that a dense and a GQE figure of the same
round saw the same load on a shared machine. A speed-up is the median over rounds of that round's
ratio, printed with its range; times are medians over rounds. Wall-clock time is the figure that
counts; the ratio of process CPU times (summed over the library's threads) is printed beside it,
the steadier one when other programs compete for the cores.

The FLOP ceiling of GQE's speed-up is computed here from the FLOP model of docs/flop-model.md, and
checked against the one gqe-bench recorded. docs/benchmarks.md says how to read the report.

With --model, the report ends with gqe-bench --model on that checkpoint folder (load, time to the
first token, decode beside the read bandwidth, peak memory): a model larger than the last-level cache
shows decode at the memory's speed, which the suite's one-layer decode may not
(tools/make_large_checkpoint.py writes such a model).

Writes bench.json and bench.log (when it runs the suite), model.txt (with --model), report.md,
speedup.dat, speedup.gp and speedup.png (gnuplot; apt-get install gnuplot-nox) into --out, and
prints the report.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tool_cli import Parser, child_failed, refuse  # noqa: E402

PROG = "bench_report"

# The paper's layer, as gqe-bench measures it.
D, DH, N, G, K = 1024, 64, 16, 8, 1
M = N // G
UNIT = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
# Rate counters as gqe-bench names them (per second), and the names older JSON gave them.
RENAMED = {"GFLOPS": "GFLOP", "GBps": "GB", "tokens_per_s": "tokens"}


# ---- the FLOP model of docs/flop-model.md (a multiply-add is 2 FLOPs; causal attention has T(T+1)/2 pairs)
def pairs(T):
    return T * (T + 1) / 2


def dense_flops(T, d=D, dh=DH, n=N, g=G):
    return 2 * T * d * (n + 2 * g + n) * dh + 4 * n * dh * pairs(T)


def gqe_flops(T, d=D, dh=DH, n=N, g=G, k=K, queries=None):
    """GQE computing only the kept experts' queries (k*G + 1 heads); `queries` overrides the number
    of query heads projected (N + 1 for the authors' module, which computes all N then gathers)."""
    m = n // g
    q = k * g + 1 if queries is None else queries
    return 2 * T * d * (q + 2 * g + (k * g + 2)) * dh + 2 * T * d * g * m + 4 * (k * g + 1) * dh * pairs(T)


def ceiling(T):
    return dense_flops(T) / gqe_flops(T)


def module_ceiling(T):
    return dense_flops(T) / gqe_flops(T, queries=N + 1)


def attention_flops(T, heads):
    return 4 * heads * DH * pairs(T)


# ---- running the suite and reading its JSON --------------------------------------------------------
def run_suite(args, out_json):
    cmd = [args.bench, f"--benchmark_repetitions={args.repetitions}", "--benchmark_enable_random_interleaving=true",
           "--benchmark_report_aggregates_only=false", f"--benchmark_min_time={args.min_time}",
           f"--benchmark_out={out_json}", "--benchmark_out_format=json"]
    if args.threads:
        cmd.append(f"--threads={args.threads}")
    if args.filter:
        cmd.append(f"--benchmark_filter={args.filter}")
    log = os.path.splitext(out_json)[0] + ".log"
    print(f"running: {' '.join(cmd)}\n(console output in {log}; this takes a few minutes)", file=sys.stderr)
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        child_failed(PROG, f"gqe-bench failed with status {done.returncode}; see {log}", done.returncode)
    if not os.path.exists(out_json) or os.path.getsize(out_json) == 0:  # a filter that matched nothing
        if os.path.exists(out_json):
            os.remove(out_json)
        refuse(PROG, f"gqe-bench ran no benchmark (--filter {args.filter!r}?); see {log}")
    return cmd


class Runs:
    """Iteration runs by (family, argument), each a dict repetition index -> figures."""

    def __init__(self, data):
        self.runs = {}
        for b in data["benchmarks"]:
            if b.get("run_type", "iteration") != "iteration" or b.get("error_occurred"):
                continue
            name = b.get("run_name", b["name"]).split("/")
            unit = UNIT[b.get("time_unit", "ns")]
            figures = {k: v for k, v in b.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            figures["time"] = b["real_time"] * unit
            figures["cpu"] = b["cpu_time"] * unit
            for old_name, name_now in RENAMED.items():  # JSON of gqe-bench before 0.2.0
                if old_name in figures and name_now not in figures:
                    figures[name_now] = figures[old_name]
            # A second numeric argument (decode_one_kv_head/L/threads) becomes part of the family.
            family = name[0] + (f"/{name[2]}" if len(name) > 2 and name[2].isdigit() else "")
            key = (family, int(name[1]) if len(name) > 1 and name[1].isdigit() else None)
            reps = self.runs.setdefault(key, {})
            reps[b.get("repetition_index", len(reps))] = figures

    def get(self, family, arg):
        return self.runs.get((family, arg))

    def median(self, family, arg, figure="time"):
        reps = self.get(family, arg)
        return statistics.median(r[figure] for r in reps.values()) if reps else None

    def ratio(self, num, den, arg, figure="time"):
        """num/den per round (same repetition index), as (median, min, max); None when missing."""
        a, b = self.get(num, arg), self.get(den, arg)
        if not a or not b:
            return None
        r = [a[i][figure] / b[i][figure] for i in a if i in b]
        if not r:
            return None
        return statistics.median(r), min(r), max(r)


def float_or_none(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def share_of(rate, whole):
    return rate / whole if rate and whole else None


def percent(share):
    return f"{100 * share:.0f}%" if share is not None else "-"


def last_level_cache_bytes(ctx):
    """The largest data or unified cache Google Benchmark found (the whole cache, however shared)."""
    sizes = [c.get("size", 0) for c in ctx.get("caches", []) if c.get("type") in ("Data", "Unified")]
    return max(sizes, default=0)


def fmt_range(r, digits=2):
    med, lo, hi = r
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


# ---- the report -----------------------------------------------------------------------------------
def report(data, command=None):
    runs = Runs(data)
    ctx = data.get("context", {})
    reps = max((len(v) for v in runs.runs.values()), default=0)
    out = []
    add = out.append
    add("# gqe-bench: GQE against dense GQA")
    add("")
    peak, bandwidth = float_or_none(ctx.get("fma_peak_gflops")), float_or_none(ctx.get("read_bandwidth_gbps"))
    peak_one = float_or_none(ctx.get("fma_peak_gflops_1_thread"))
    add(f"Machine: {ctx.get('cpu', '?')}" + (f" ({ctx['cpu_model']})" if ctx.get("cpu_model") else "")
        + f", {ctx.get('num_cpus', '?')} logical CPUs, load average at start "
        f"{', '.join(f'{x:.2f}' for x in ctx.get('load_avg', []))}; gqe {ctx.get('gqe_version', '?')}, threads "
        f"{ctx.get('gqe_threads', '?')}. Compiler {ctx.get('compiler', '?')}, {ctx.get('build_type', '?')}: "
        f"`{ctx.get('flags', '?')}`; SIMD {ctx.get('simd_level', '?')}; GEMM backend "
        f"{ctx.get('gemm_backend', ctx.get('projections', '?'))}"
        + (f" ({ctx['gemm_backend_kernels']} kernels)" if ctx.get("gemm_backend_kernels") else "")
        + f". {reps} interleaved repetitions; figures are "
        f"medians, speed-ups the median of the per-round ratios with their range.")
    if ctx.get("gemm_backend_warning"):
        add("")
        add(f"**Warning:** {ctx['gemm_backend_warning']}")
    if peak and bandwidth:
        add("")
        add(f"Measured in the same run: float32 FMA peak {peak:.0f} GFLOP/s on {ctx.get('gqe_threads', '?')} threads"
            + (f" ({peak_one:.0f} on one)" if peak_one else "")
            + f", read bandwidth {bandwidth:.1f} GB/s. \"of peak\" and \"of bandwidth\" below are shares of them.")
    if command:
        add("")
        add(f"Command: `{' '.join(command)}`")

    # Prefill of one layer.
    gemm = {}
    for fam in ("gemm_gqe_linear", "gemm_backend", "gemm_openblas", "gemm_eigen_1thread"):
        v = runs.median(fam, 4096, "GFLOP")
        if v:
            gemm[fam] = v
    multi = {k: v for k, v in gemm.items() if k != "gemm_eigen_1thread"}
    best = max(multi, key=multi.get) if multi else None
    add("")
    add(f"## One attention layer, prefill (d={D}, d_h={DH}, N={N}, G={G}, k={K}: {K * G + 1} of {N} query heads)")
    add("")
    add("| T | dense ms | GQE ms | speed-up (range) | FLOP ceiling | of ceiling | speed-up, CPU time | "
        "dense GFLOP/s | dense, of peak | dense, of GEMM rate | GQE useful GFLOP/s |")
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    points = []
    for T in sorted(t for (f, t) in runs.runs if f == "prefill_gqa"):
        speed = runs.ratio("prefill_gqa", "prefill_gqe", T)
        if not speed:
            continue
        c = ceiling(T)
        recorded = runs.median("prefill_gqe", T, "flop_ceiling")
        if recorded and abs(recorded / c - 1) > 1e-6:
            print(f"bench_report: T={T}: gqe-bench recorded a ceiling of {recorded:.4f}, the FLOP model gives "
                  f"{c:.4f}", file=sys.stderr)
        cpu = runs.ratio("prefill_gqa", "prefill_gqe", T, "cpu")
        dense_rate = runs.median("prefill_gqa", T, "GFLOP")
        of_gemm = f"{100 * dense_rate / multi[best]:.0f}%" if best else "-"
        points.append((T, *speed, c, module_ceiling(T), cpu[0], share_of(dense_rate, peak)))
        add(f"| {T} | {1e3 * runs.median('prefill_gqa', T):.1f} | {1e3 * runs.median('prefill_gqe', T):.1f} | "
            f"{fmt_range(speed)} | {c:.2f} | {100 * speed[0] / c:.0f}% | {cpu[0]:.2f} | {dense_rate:.1f} | "
            f"{percent(share_of(dense_rate, peak))} | {of_gemm} | {runs.median('prefill_gqe', T, 'GFLOP'):.1f} |")
    share = [runs.median("prefill_gqe", T, "expert0_share") for (f, T) in runs.runs if f == "prefill_gqe"]
    share = [s for s in share if s is not None]
    if share:
        add("")
        add(f"Routing is mixed: {100 * min(share):.0f}-{100 * max(share):.0f}% of the (token, group) choices keep "
            f"expert 0 of {M}. The authors' module (all {N} queries computed, then gathered) has a FLOP ceiling of "
            + ", ".join(f"{module_ceiling(p[0]):.2f}" for p in points) + " at these T.")
    if gemm:
        add("")
        add("GEMM [4096 x 1024] x [1024 x 1024] in the same run: "
            + ", ".join(f"{name[5:]} {rate:.1f} GFLOP/s" for name, rate in sorted(gemm.items()))
            + (f"; the layer's figures are compared with the faster multi-threaded one ({best[5:]})." if best else "."))
    tile = [(kc, runs.median("register_tile", kc, "GFLOP"), runs.median("register_tile", kc, "of_peak"))
            for kc in (64, 256) if runs.get("register_tile", kc)]
    if tile:
        add("")
        add("The register tile that carries every product, alone on one thread over the depth of the score product "
            "(64) and of a key tile (256): "
            + ", ".join(f"{rate:.1f} GFLOP/s at depth {kc}" for kc, rate, _ in tile)
            + (", " + " and ".join(percent(share) for _, _, share in tile) + " of one thread's FMA peak"
               if all(share for _, _, share in tile) else "")
            + ": the ceiling of the layer's products, whose operands come from further away.")

    # The attention kernel alone, and what is left of the layer's time.
    kernel_T = sorted(t for (f, t) in runs.runs if f == "attention_gqa" and runs.get("attention_gqe", t))
    if kernel_T:
        add("")
        add("## The causal attention kernel alone (the layer's head layout, random Q/K/V)")
        add("")
        add(f"| T | dense ms | GQE ms | speed-up (range) | FLOP ceiling {N}/{K * G + 1} | dense GFLOP/s | dense, of peak | GQE GFLOP/s |")
        add("|---|---|---|---|---|---|---|---|")
        for T in kernel_T:
            add(f"| {T} | {1e3 * runs.median('attention_gqa', T):.1f} | {1e3 * runs.median('attention_gqe', T):.1f} | "
                f"{fmt_range(runs.ratio('attention_gqa', 'attention_gqe', T))} | {N / (K * G + 1):.2f} | "
                f"{runs.median('attention_gqa', T, 'GFLOP'):.1f} | "
                f"{percent(share_of(runs.median('attention_gqa', T, 'GFLOP'), peak))} | "
                f"{runs.median('attention_gqe', T, 'GFLOP'):.1f} |")
        wide_T = [T for T in kernel_T if runs.get("attention_gqa_dh128", T)]
        if wide_T:
            add("")
            add(f"The same dense kernel at d_h = 128 ({N * DH // 128} heads over {G * DH // 128} KV heads, the same width): "
                + ", ".join(f"{runs.median('attention_gqa_dh128', T, 'GFLOP'):.1f} GFLOP/s at T = {T}"
                            f" ({percent(share_of(runs.median('attention_gqa_dh128', T, 'GFLOP'), peak))} of the peak)"
                            for T in wide_T) + ".")
        add("")
        add("The rest of the layer (projections, router, kept-query gather and scatter, RoPE, cache writes, weighted "
            f"slot) has a FLOP ceiling of {(2 * D * (2 * N + 2 * G) * DH) / (2 * D * ((K * G + 1) + 2 * G + (K * G + 2)) * DH + 2 * D * G * M):.2f} "
            "at every T; the layer's ceiling lies between the two, nearer the kernel's as T grows.")

    # Decode.
    decode_L = sorted(t for (f, t) in runs.runs if f == "decode_gqa" and runs.get("decode_gqe", t))
    if decode_L:
        add("")
        add("## Decode step (one token) of the same layer")
        add("")
        add("| cache | dense us | GQE us | speed-up (range) | speed-up, CPU time | dense GB/s read | dense, of bandwidth | GQE GB/s read |")
        add("|---|---|---|---|---|---|---|---|")
        # A step whose bytes fit in the last-level cache may be read from there, not from memory: its
        # share of the memory's bandwidth is then no measure of the kernel, and is marked.
        llc = last_level_cache_bytes(ctx)
        in_cache = []
        for L in decode_L:
            seconds, rate = runs.median('decode_gqa', L), runs.median('decode_gqa', L, 'GB')
            share = percent(share_of(rate, bandwidth))
            if llc and rate * 1e9 * seconds <= llc:
                in_cache.append(L)
                share += " (in cache)"
            add(f"| {L} | {1e6 * seconds:.0f} | {1e6 * runs.median('decode_gqe', L):.0f} | "
                f"{fmt_range(runs.ratio('decode_gqa', 'decode_gqe', L))} | "
                f"{runs.ratio('decode_gqa', 'decode_gqe', L, 'cpu')[0]:.2f} | "
                f"{rate:.1f} | {share} | "
                f"{runs.median('decode_gqe', L, 'GB'):.1f} |")
        add("")
        add("GB/s: the weights a step multiplies by (GQE: the kept experts' rows of Wq only) and the whole cache "
            "(GQE: plus the mean K/V of the shared head, 9 KV heads' worth against 8), per second.")
        if in_cache:
            add(f"At cache {', '.join(map(str, in_cache))} a dense step reads less than this machine's "
                f"{llc / 2**20:.0f} MiB last-level cache, so its bytes may come from the cache rather than from "
                "memory: its share of the memory's read bandwidth is not a measure of the kernel there (the "
                "`--model` mode on a checkpoint larger than the cache is).")

    # One KV head's decode: one group, so only its key chunks spread over threads.
    for L in sorted(t for (f, t) in runs.runs if f == "decode_one_kv_head/1"):
        pool = runs.get("decode_one_kv_head/0", L)
        r = runs.ratio("decode_one_kv_head/1", "decode_one_kv_head/0", L)
        if not pool or not r:
            continue
        threads = int(next(iter(pool.values())).get("threads", 0))
        add("")
        add(f"One KV head's decode step in the kernel alone (8 query heads, d_h=128, a multi-query model's layer; "
            f"cache {L}): {1e6 * runs.median('decode_one_kv_head/1', L):.0f} us on 1 thread, "
            f"{1e6 * runs.median('decode_one_kv_head/0', L):.0f} us on {threads}: {fmt_range(r)} times as fast. "
            "Its key chunks are the only work to spread over the threads.")

    # The small model.
    rows = []
    for kind, label in (("prefill", "prefill"), ("decode", "decode step after")):
        for T in sorted(t for (f, t) in runs.runs if f == f"model_{kind}_gqa"):
            d, g = runs.median(f"model_{kind}_gqa", T, "tokens"), runs.median(f"model_{kind}_gqe", T, "tokens")
            r = runs.ratio(f"model_{kind}_gqa", f"model_{kind}_gqe", T)
            if d and g and r:
                rows.append(f"| {label} T={T} | {d:.0f} | {g:.0f} | {fmt_range(r)} |")
    if rows:
        add("")
        add("## Small transformer (L=4, d=512, N=16, G=8, d_h=32, I=1376, V=256), tokens/s")
        add("")
        add("| | dense | GQE | GQE speed-up (range) |")
        add("|---|---|---|---|")
        out.extend(rows)
    return "\n".join(out) + "\n", points


# ---- the plot -------------------------------------------------------------------------------------
def plot(points, out_dir, ctx):
    data = os.path.join(out_dir, "speedup.dat")
    with open(data, "w") as f:
        f.write("# T  speed-up(median)  min  max  flop_ceiling  module_ceiling(all queries, then gather)  cpu_time_speed-up\n")
        for p in points:
            f.write(" ".join(f"{v:.6g}" for v in p[:7]) + "\n")
    png = os.path.join(out_dir, "speedup.png")
    last = points[-1]
    dense_share = f", dense layer at {100 * last[7]:.0f}% of the FMA peak at T={last[0]}" if last[7] else ""
    title = (f"GQE ({K * G + 1} of {N} query heads) vs dense GQA, one layer prefill, d={D}"
             f"\\n{ctx.get('cpu', '?')}, SIMD {ctx.get('simd_level', '?')}, {ctx.get('gqe_threads', '?')} threads, "
             f"GEMM {ctx.get('gemm_backend', ctx.get('projections', '?'))}{dense_share}")
    script_path = os.path.join(out_dir, "speedup.gp")
    ts = " ".join(str(p[0]) for p in points)
    top = max(max(p[3] for p in points), max(p[4] for p in points), max(p[6] for p in points)) * 1.2
    bottom = min(0.9, min(p[2] for p in points) * 0.95, min(p[6] for p in points) * 0.95)
    with open(script_path, "w") as f:
        f.write(f"""# gnuplot {os.path.basename(script_path)}: drawn by tools/bench_report.py from {os.path.basename(data)}
set terminal pngcairo size 1000,620 enhanced font 'Sans,11'
set output '{png}'
set title "{title}"
set xlabel 'tokens T (log scale)'
set ylabel 'speed-up of GQE over dense GQA (time ratio)'
set logscale x 2
set xtics ({', '.join(f'"{t}" {t}' for t in ts.split())})
set xrange [{points[0][0] / 1.4}:{points[-1][0] * 1.4}]
set yrange [{bottom:.2f}:{top:.2f}]
set grid
set key top left box opaque
set style line 1 lw 2 pt 7 ps 1.3 lc rgb '#1f77b4'
set style line 2 lw 2 dt 2 pt 6 lc rgb '#d62728'
set style line 3 lw 1.5 dt 3 pt 4 lc rgb '#7f7f7f'
set style line 4 lw 1.5 pt 9 ps 1.2 lc rgb '#2ca02c'
plot 1 with lines lw 1 lc rgb '#000000' notitle, \\
     '{data}' using 1:5 with linespoints ls 2 title 'FLOP ceiling (FLOP model, kept queries only)', \\
     '{data}' using 1:6 with linespoints ls 3 title "FLOP ceiling of the authors' module (all queries, gather)", \\
     '{data}' using 1:7 with linespoints ls 4 title 'measured in process CPU time (median of per-round ratios)', \\
     '{data}' using 1:2:3:4 with yerrorlines ls 1 title 'measured in wall-clock time: median of per-round ratios (bar: range)'
""")
    if not shutil.which("gnuplot"):
        print(f"gnuplot not found (apt-get install gnuplot-nox): {script_path} written, no plot", file=sys.stderr)
        return None
    done = subprocess.run(["gnuplot", script_path], capture_output=True, text=True)
    if done.returncode != 0:  # a gnuplot without cairo: the plain png terminal
        with open(script_path) as f:
            script = f.read().replace("pngcairo size 1000,620 enhanced font 'Sans,11'", "png size 1000,620")
        with open(script_path, "w") as f:
            f.write(script)
        subprocess.run(["gnuplot", script_path], check=True)
    return png


def run_model(args):
    """gqe-bench --model on args.model; its output, written to model.txt in --out too."""
    cmd = [args.bench, "--model", args.model, "--decode-tokens", str(args.decode_tokens)]
    if args.threads:
        cmd.append(f"--threads={args.threads}")
    print(f"running: {' '.join(cmd)}", file=sys.stderr)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        child_failed(PROG, f"gqe-bench --model failed with status {done.returncode}: {done.stderr.strip()}", done.returncode)
    # Its warnings (such as OpenBLAS's fallback kernels) go with the figures they qualify.
    output = "".join(line + "\n" for line in done.stderr.splitlines() if "warning:" in line) + done.stdout
    with open(os.path.join(args.out, "model.txt"), "w") as f:
        f.write(output)
    return cmd, output


def model_section(model_dir, cmd, output):
    return "\n".join(["", f"## A checkpoint: `{os.path.basename(os.path.normpath(model_dir))}`", "",
                       f"Command: `{' '.join(cmd)}`", "", "```", output.rstrip(), "```", ""])


def read_results(path, pattern):
    """gqe-bench's JSON, or an exit naming what is wrong with it."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        refuse(PROG, f"cannot read {path}: {e.strerror}")
    except ValueError:
        hint = f" (did --filter {pattern!r} match no benchmark?)" if pattern else ""
        refuse(PROG, f"{path} is not gqe-bench's JSON{hint}")
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list) or not data["benchmarks"]:
        refuse(PROG, f"{path} holds no benchmarks; expected gqe-bench's --benchmark_out JSON")
    return data


def main():
    ap = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="build/bench/gqe-bench", help="the gqe-bench program")
    ap.add_argument("--json", help="report on this gqe-bench JSON instead of running the suite")
    ap.add_argument("--repetitions", type=int, default=3, help="interleaved repetitions (rounds)")
    ap.add_argument("--min-time", default="0.2", help="--benchmark_min_time of each repetition, seconds")
    ap.add_argument("--threads", type=int, help="gqe-bench --threads (default: its own, the CPUs the process may use)")
    ap.add_argument("--filter", help="--benchmark_filter regex")
    ap.add_argument("--out", default="build/bench-results", help="folder for the JSON, report and plot")
    ap.add_argument("--model", help="also run gqe-bench --model on this checkpoint folder and report it")
    ap.add_argument("--decode-tokens", type=int, default=32, help="decode steps timed with --model")
    args = ap.parse_args()
    if args.model and not os.path.isdir(args.model):
        refuse(PROG, f"--model {args.model} is not a folder; expected a checkpoint folder "
               "(config.json and safetensors), such as tools/make_large_checkpoint.py writes")
    if args.threads is not None and args.threads < 1:
        refuse(PROG, f"--threads is {args.threads}; expected at least 1")
    if args.repetitions < 1:
        refuse(PROG, f"--repetitions is {args.repetitions}; expected at least 1")
    if args.decode_tokens < 1:
        refuse(PROG, f"--decode-tokens is {args.decode_tokens}; expected at least 1")
    try:
        min_time = float(args.min_time)
    except ValueError:
        min_time = math.nan
    if not 0 < min_time < 1e6:  # NaN included: gqe-bench would never finish a repetition
        refuse(PROG, f"--min-time is {args.min_time}; expected a number of seconds above 0")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        refuse(PROG, f"--out {args.out} exists and is not a folder")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        refuse(PROG, f"cannot make --out {args.out}: {e.strerror}")
    command = None
    path = args.json
    if (not path or args.model) and not os.access(args.bench, os.X_OK):
        refuse(PROG, f"{args.bench} is not an executable; build it with "
               "cmake --build build --target gqe-bench, or pass --bench" + ("" if args.model else " or --json"))
    if not path:
        path = os.path.join(args.out, "bench.json")
        command = run_suite(args, path)
    data = read_results(path, args.filter)
    text, points = report(data, command)
    report_path = os.path.join(args.out, "report.md")
    with open(report_path, "w") as f:  # written before the checkpoint's run, which may fail
        f.write(text)
    if args.model:
        section = model_section(args.model, *run_model(args))
        with open(report_path, "a") as f:
            f.write(section)
        text += section
    print(text)
    if points:
        png = plot(points, args.out, data.get("context", {}))
        if png:
            print(f"plot: {png}")


if __name__ == "__main__":
    main()
