#!/usr/bin/env python3
"""Times GQE against dense GQA from a cold process, the figure a user of gqe-run sees.

    /usr/bin/python3 tools/cold_prefill.py [--run build/examples/gqe-run] [--tokens 2048 4096]
        [--pairs 11] [--threads N] [--chunk N] [--models build/cold-models]

Each run is a whole `gqe-run -m MODEL -p PROMPT --stats` process (start, load, prefill of T tokens,
exit), timed by the wall clock; its page faults (minor and major, the kernel's count for the child)
are reported beside, since first touches of memory are most of what a cold process adds. The models
are one layer of the paper's shape (d=1024, d_h=64, N=16, G=8, k=1; SwiGLU intermediate 256,
vocabulary 256, random weights), written once by tools/make_large_checkpoint.py into --models. Dense
and GQE run in turn, in alternating order, for --pairs pairs per T on the same random prompt; the
speed-up is the median of the pairs' ratios (with its range), the times are medians. The whole-model
FLOP ceiling counts the layer (the FLOP model of docs/flop-model.md, as tools/bench_report.py
computes it), its feed-forward block and the last position's logits, which is all gqe-run computes
without --logits-out.
"""

import argparse
import os
import random
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_report import D, DH, G, K, N, dense_flops, gqe_flops  # noqa: E402  (the one FLOP model)
from make_large_checkpoint import MAX_POSITIONS  # noqa: E402  (of the models it writes for this tool)
from tool_cli import Parser, child_failed, refuse  # noqa: E402

PROG = "cold_prefill"

INTERMEDIATE, VOCAB = 256, 256
SHAPE = ["--hidden", str(D), "--layers", "1", "--vocab", str(VOCAB), "--heads", str(N), "--kv-heads", str(G),
         "--head-dim", str(DH), "--top-k", str(K), "--intermediate", str(INTERMEDIATE)]


def whole_model_ceiling(T):
    rest = 2 * T * 3 * D * INTERMEDIATE + 2 * D * VOCAB  # feed-forward of every token, one row of logits
    return (dense_flops(T) + rest) / (gqe_flops(T) + rest)


def make_models(folder):
    here = os.path.dirname(os.path.abspath(__file__))
    paths = {}
    for attention in ("gqa", "gqe"):
        path = os.path.join(folder, f"one-layer-{attention}")
        if not os.path.isfile(os.path.join(path, "config.json")):
            print(f"cold_prefill: writing {path}", file=sys.stderr)
            done = subprocess.run([sys.executable, os.path.join(here, "make_large_checkpoint.py"), "--attention",
                                   attention, *SHAPE, "--out", path], stdout=subprocess.DEVNULL)
            if done.returncode != 0:  # its own message is above
                child_failed(PROG, f"could not write {path} (make_large_checkpoint.py status {done.returncode})", done.returncode)
        paths[attention] = path
    return paths


def child_faults():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_minflt + usage.ru_majflt


def timed_run(args, model, prompt):
    """(wall seconds, page faults) of one whole gqe-run process."""
    cmd = [args.run, "-m", model, "-p", prompt, "--stats"]
    if args.threads:
        cmd += ["-t", str(args.threads)]
    if args.chunk:
        cmd += ["--chunk", str(args.chunk)]
    faults = child_faults()  # the children's counts add up as each is waited for: one run's is the difference
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        child_failed(PROG, f"{' '.join(cmd[:3])} ... failed with status {done.returncode}: {done.stderr.strip()}", done.returncode)
    return seconds, child_faults() - faults


def main():
    ap = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="build/examples/gqe-run", help="the gqe-run program")
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096], help="prompt lengths T")
    ap.add_argument("--pairs", type=int, default=11, help="dense/GQE pairs per T")
    ap.add_argument("--threads", type=int, help="gqe-run -t (default: its own, the CPUs it may use)")
    ap.add_argument("--chunk", type=int, help="gqe-run --chunk N (default: the whole prompt in one call)")
    ap.add_argument("--models", default="build/cold-models", help="folder of the two one-layer models")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random prompts")
    args = ap.parse_args()
    if not os.access(args.run, os.X_OK):
        refuse(PROG, f"{args.run} is not an executable; build it with "
               "cmake --build build --target gqe-run, or pass --run")
    if args.pairs < 1 or any(T < 1 for T in args.tokens) or any(v is not None and v < 1 for v in (args.threads, args.chunk)):
        refuse(PROG, "--pairs, every --tokens, --threads and --chunk must be at least 1")
    if max(args.tokens) > MAX_POSITIONS:
        refuse(PROG, f"--tokens {max(args.tokens)} is more than the models' {MAX_POSITIONS} positions")
    models = make_models(args.models)
    rng = random.Random(args.seed)
    progress = sys.stderr.isatty()  # a line rewritten in place on a terminal; nothing in a log
    print("| T | dense s | GQE s | speed-up (range) | whole-model FLOP ceiling | of ceiling | page faults, dense / GQE |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for T in args.tokens:
        prompt = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(T))
        times = {"gqa": [], "gqe": []}
        faults = {"gqa": [], "gqe": []}
        ratios = []
        for pair in range(args.pairs):
            order = ("gqa", "gqe") if pair % 2 == 0 else ("gqe", "gqa")
            runs = {name: timed_run(args, models[name], prompt) for name in order}
            for name in order:
                times[name].append(runs[name][0])
                faults[name].append(runs[name][1])
            ratios.append(runs["gqa"][0] / runs["gqe"][0])
            if progress:
                print(f"cold_prefill: T={T} pair {pair + 1}/{args.pairs}", end="\r", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        speedup, ceiling = statistics.median(ratios), whole_model_ceiling(T)
        print(f"| {T} | {statistics.median(times['gqa']):.3f} | {statistics.median(times['gqe']):.3f} | "
              f"{speedup:.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | {ceiling:.2f} | {100 * speedup / ceiling:.0f}% | "
              f"{statistics.median(faults['gqa']):.0f} / {statistics.median(faults['gqe']):.0f} |", flush=True)


if __name__ == "__main__":
    main()
