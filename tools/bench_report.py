#!/usr/bin/env python3
"""Runs gqe-bench (or reads its JSON) and reports dense GQA against GQE beside the FLOP ceiling.

    /usr/bin/python3 tools/bench_report.py [--bench build/bench/gqe-bench] [--repetitions 5]
                                           [--json FILE] [--out build/bench-results]

Every figure is a median over interleaved repetitions of one run, and every speed-up a ratio of
two such medians: on a shared machine, load then weighs on both sides alike. Wall-clock time is the
figure that counts; the ratio of CPU times (summed over the library's threads) is printed beside it,
since it is the steadier one when other programs compete for the cores. Writes bench.json,
report.md and speedup.png (gnuplot) into --out and prints the report.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys


def run_suite(bench, repetitions, out_json, min_time):
    cmd = [bench, f"--benchmark_repetitions={repetitions}", "--benchmark_enable_random_interleaving=true",
           f"--benchmark_min_time={min_time}", f"--benchmark_out={out_json}", "--benchmark_out_format=json"]
    print("running:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=sys.stderr)


def medians(data):
    """name -> {"time": median real time in s, counter: median value}, over the repetitions."""
    runs = {}
    for b in data["benchmarks"]:
        if b.get("run_type") != "iteration":
            continue
        name = b["run_name"] if "run_name" in b else b["name"]
        unit = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b.get("time_unit", "ns")]
        entry = runs.setdefault(name, {})
        entry.setdefault("time", []).append(b["real_time"] * unit)
        entry.setdefault("cpu", []).append(b["cpu_time"] * unit)
        for key, value in b.items():
            if key in ("GFLOPS", "flop_ceiling", "tokens_per_s", "active_heads", "cache", "tokens"):
                entry.setdefault(key, []).append(value)
    return {name: {k: statistics.median(v) for k, v in entry.items()} for name, entry in runs.items()}


def find(m, prefix, arg):
    for name, value in m.items():
        if name.startswith(f"{prefix}/{arg}/") or name == f"{prefix}/{arg}":
            return value
    return None


def report(data):
    m = medians(data)
    ctx = data.get("context", {})
    lines = [f"Machine: {ctx.get('cpu', '?')}, {ctx.get('num_cpus', '?')} cores, gqe threads {ctx.get('gqe_threads', '?')}; "
             f"{ctx.get('compiler', '?')}, {ctx.get('flags', '?')}; projections by {ctx.get('projections', '?')}.", ""]
    lines += ["One attention layer, prefill (d=1024, d_h=64, N=16, G=8, k=1):", "",
              "| T | dense ms | GQE ms | speed-up | FLOP ceiling | of ceiling | speed-up in CPU time | dense GFLOP/s | GQE useful GFLOP/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    points = []
    for T in (512, 1024, 2048, 4096, 8192, 16384):
        d, g = find(m, "prefill_gqa", T), find(m, "prefill_gqe", T)
        if not d or not g:
            continue
        speedup = d["time"] / g["time"]
        ceiling = g["flop_ceiling"]
        points.append((T, speedup, ceiling))
        lines.append(f"| {T} | {1e3 * d['time']:.1f} | {1e3 * g['time']:.1f} | {speedup:.2f} | {ceiling:.2f} | "
                     f"{100 * speedup / ceiling:.0f}% | {d['cpu'] / g['cpu']:.2f} | {d['GFLOPS']:.1f} | {g['GFLOPS']:.1f} |")
    gemm = {name: v["GFLOPS"] for name, v in m.items() if name.startswith("gemm_")}
    dense4k = find(m, "prefill_gqa", 4096)
    if gemm and dense4k:
        best = max(gemm, key=gemm.get)
        lines += ["", "GEMM [4096 x 1024] x [1024 x 1024] in the same run: " +
                  ", ".join(f"{k.split('/')[0]} {v:.1f} GFLOP/s" for k, v in sorted(gemm.items())) + ".",
                  f"The dense layer at T=4096 reaches {dense4k['GFLOPS']:.1f} GFLOP/s of useful work, "
                  f"{100 * dense4k['GFLOPS'] / gemm[best]:.0f}% of the faster GEMM ({best.split('/')[0]})."]
    lines += ["", "Decode step (one token) of the same layer:", "", "| cache | dense us | GQE us | GQE speed-up |", "|---|---|---|---|"]
    for L in (1024, 4096, 16384):
        d, g = find(m, "decode_gqa", L), find(m, "decode_gqe", L)
        if d and g:
            lines.append(f"| {L} | {1e6 * d['time']:.0f} | {1e6 * g['time']:.0f} | {d['time'] / g['time']:.2f} |")
    mp = [find(m, f"model_{kind}_{t}", 1024) for kind in ("prefill", "decode") for t in ("gqa", "gqe")]
    if all(mp):
        lines += ["", "Small transformer (L=4, d=512, N=16, G=8, d_h=32), tokens/s:", "",
                  "| | dense | GQE | ratio |", "|---|---|---|---|",
                  f"| prefill T=1024 | {mp[0]['tokens_per_s']:.0f} | {mp[1]['tokens_per_s']:.0f} | {mp[1]['tokens_per_s'] / mp[0]['tokens_per_s']:.2f} |",
                  f"| decode after 1024 | {mp[2]['tokens_per_s']:.0f} | {mp[3]['tokens_per_s']:.0f} | {mp[3]['tokens_per_s'] / mp[2]['tokens_per_s']:.2f} |"]
    return "\n".join(lines) + "\n", points


def plot(points, out_dir, title):
    if not shutil.which("gnuplot"):
        print("gnuplot not found (apt-get install gnuplot-nox): no plot", file=sys.stderr)
        return None
    data = os.path.join(out_dir, "speedup.dat")
    with open(data, "w") as f:
        for T, s, c in points:
            f.write(f"{T} {s} {c}\n")
    png = os.path.join(out_dir, "speedup.png")
    script = f"""
set terminal pngcairo size 900,560 enhanced font 'Sans,11'
set output '{png}'
set title '{title}'
set xlabel 'tokens T (prefill, one attention layer)'
set ylabel 'GQE speed-up over dense GQA'
set logscale x 2
set grid
set key top left
set yrange [1:*]
plot '{data}' using 1:3 with linespoints lw 2 dt 2 lc rgb '#888888' title 'FLOP ceiling (spec model)', \\
     '{data}' using 1:2 with linespoints lw 2 pt 7 lc rgb '#1f77b4' title 'measured (median ratio)'
"""
    try:
        subprocess.run(["gnuplot"], input=script, text=True, check=True)
    except subprocess.CalledProcessError:
        script = script.replace("pngcairo size 900,560 enhanced font 'Sans,11'", "png size 900,560")
        subprocess.run(["gnuplot"], input=script, text=True, check=True)
    return png


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="build/bench/gqe-bench", help="the gqe-bench program")
    ap.add_argument("--json", help="report on this JSON instead of running the suite")
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--min-time", default="0.3", help="--benchmark_min_time per repetition, in seconds")
    ap.add_argument("--out", default="build/bench-results")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = args.json
    if not path:
        if not os.access(args.bench, os.X_OK):
            sys.exit(f"bench_report: {args.bench} is not an executable; build it with cmake --build build --target gqe-bench")
        path = os.path.join(args.out, "bench.json")
        run_suite(args.bench, args.repetitions, path, args.min_time)
    with open(path) as f:
        data = json.load(f)
    text, points = report(data)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text)
    print(text)
    if points:
        png = plot(points, args.out, f"GQE (9 of 16 heads) vs dense GQA prefill on {data.get('context', {}).get('cpu', 'this CPU')}")
        if png:
            print(f"plot: {png}")


if __name__ == "__main__":
    main()
