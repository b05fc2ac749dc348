#!/usr/bin/env python3
"""Quality and prefill speed of GQE across expert pools M and kept experts k, against dense GQA.

    /usr/bin/python3 tools/gqe_sweep.py --text FILE --out DIR [--seeds 3] [--steps 1200]
        [--experts 2,4,8] [--top-k 1,2] [--variants gqe,hard_concat,weighted_concat]
        [--dense-heads N] [--hidden 64] [--layers 2] [--kv-heads 4] [--head-dim 16] ...

At one number of KV heads G, hidden size d and head dim d_h, it trains with gqe-train a dense GQA
baseline and a GQE model for every (M, k, variant) with k <= M (N = G*M routed query experts),
each for seeds 0..S-1, all on the same byte-level split of FILE (gqe-train holds out its last 10%).
Every checkpoint is then judged with gqe-run on that held-out tail [start, end): the mean
next-byte cross-entropy in nats over whole, non-overlapping windows of the trained sequence length
T (window i feeds bytes start + iT .. start + iT + T - 1; it counts when its last target byte,
start + iT + T, lies before end). The prefill speed-up of one attention layer of each shape at
T = 4096 is timed with gqe-bench --layer-speedup against the same dense baseline, beside the
FLOP ceiling of docs/flop-model.md.

The dense baseline is GQA with N = 2G query heads (--dense-heads): the paper's pairing (M = 2),
the same G, d and d_h (so the same KV cache), and every GQE point is measured against that one
model in quality and in speed. See the README section "Sweeping expert pools and k".

Writes into DIR:
  sweep.json       {"heldout": [start, end], "runs": [...]}: one entry per configuration
  sweep.md         the table
  pareto.png       held-out loss against prefill speed-up (error bars over seeds; gnuplot)
  runs/<config>/   gqe-train's folder per configuration: <gqa|gqe>-seed<S>/ checkpoints
and its own bookkeeping (sweep_options.json, speedup.json, timing.json, logs/, heldout files).
Ctrl-C stops it cleanly; the same command continues: finished runs are not redone, an
interrupted one continues with gqe-train --resume.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tool_cli import Parser, refuse  # noqa: E402

PROG = "gqe_sweep.py"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = 4096  # the prefill length of the speed-up
BENCH_INNER_ROUNDS = 3  # gqe-bench's own rounds per process; its medians are one round of the sweep's
HELDOUT_FRACTION = 0.1  # gqe-train's held-out tail
VARIANTS = ("gqe", "hard_concat", "weighted_concat")
UMASK = os.umask(0)
os.umask(UMASK)


# gqe-train's upper limits of the flags passed on to it.
GQE_TRAIN_LIMITS = {"seeds": 1000, "steps": 10_000_000, "hidden": 1 << 16, "layers": 1024, "kv_heads": 1024,
                    "head_dim": 2048, "intermediate": 1 << 18, "seq_len": 1 << 20, "batch": 65536, "threads": 1024,
                    "lr": 10, "weight_decay": 1}


class UsageError(Exception):
    """A condition the user can fix: one line on stderr, exit status 2."""


class Interrupted(Exception):
    """Ctrl-C: the child saved what it had; the same command continues."""


# ---- small helpers -------------------------------------------------------------------------------
def say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def duration(seconds: float) -> str:
    s = int(round(max(0.0, seconds)))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def write_atomically(path: str, data) -> None:
    """Writes a file by a temporary file in the same folder and a rename: never half-written."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes it 0600; the file gets a new file's usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, value) -> None:
    write_atomically(path, json.dumps(value, indent=2) + "\n")


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def int_list(flag: str, text: str, low: int = 1):
    items = text.split(",")
    values = []
    for item in items:
        if not item.isdigit() or int(item) < low:
            raise UsageError(f"{flag} is \"{text}\"; expected comma-separated whole numbers >= {low}, like 2,4,8")
        if int(item) in values:
            raise UsageError(f"{flag} is \"{text}\"; {item} appears twice")
        values.append(int(item))
    return values


def positive(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"\"{text}\" is not a whole number >= 1")
    return int(text)


def non_negative(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"\"{text}\" is not a whole number >= 0")
    return int(text)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"\"{text}\" is not a positive number")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"\"{text}\" is not a number >= 0")
    return value


# ---- the FLOP model of one attention layer's prefill (docs/flop-model.md; AttentionConfig::prefill_flops) ----
def layer_flops(T: int, d: int, dh: int, n: int, g: int, k: int = 0, variant: str = "") -> float:
    """Dense GQA when variant is empty, else GQE computing only the kept experts' queries."""
    if not variant:
        active, outputs, router = n, n, 0.0
    else:
        hard = g * k
        extra = 1 if variant == "gqe" else 0  # the shared head (active) and the weighted slot
        active, outputs, router = hard + extra, hard + 2 * extra, 2.0 * T * d * n
    return 2.0 * T * d * (active + 2 * g + outputs) * dh + router + 4.0 * active * dh * T * (T + 1) / 2


# ---- configurations ------------------------------------------------------------------------------
class Config:
    def __init__(self, kind: str, heads: int, experts: int = 0, top_k: int = 0, variant: str = ""):
        self.kind, self.heads, self.experts, self.top_k, self.variant = kind, heads, experts, top_k, variant
        self.name = f"gqa-n{heads}" if kind == "gqa" else f"gqe-m{experts}-k{top_k}-{variant}"
        self.label = f"GQA N={heads}" if kind == "gqa" else f"M={experts} k={top_k}" + (
            "" if variant == "gqe" else f" {variant}")

    def flops(self, a, T: int = TOKENS) -> float:
        return layer_flops(T, a.hidden, a.head_dim, self.heads, a.kv_heads, self.top_k, self.variant)

    def bench_command(self, a, bench: str):
        # gqe-bench always times a dense layer of the same N beside the GQE one; for the baseline's
        # own process any valid GQE shape will do (k = 1 of its M).
        return [bench, "--layer-speedup", "--hidden", str(a.hidden), "--heads", str(self.heads), "--kv-heads",
                str(a.kv_heads), "--head-dim", str(a.head_dim), "--top-k", str(self.top_k or 1), "--variant",
                self.variant or "gqe", "--tokens", str(TOKENS), "--rounds", str(BENCH_INNER_ROUNDS), "--threads",
                str(a.threads)]


def configurations(a):
    configs = [Config("gqa", a.dense_heads)]
    for variant in a.variant_list:
        for m in a.expert_list:
            for k in a.top_k_list:
                if k <= m:
                    configs.append(Config("gqe", a.kv_heads * m, m, k, variant))
    if len(configs) == 1:
        raise UsageError(f"no configuration has k <= M (--experts {a.experts}, --top-k {a.top_k}); "
                         "expected at least one top-k no larger than an expert count")
    return configs


# ---- options -------------------------------------------------------------------------------------
def parse_args(argv):
    parts = (__doc__ or "").split("\n\n")
    p = Parser(prog=PROG, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
               description="\n\n".join([parts[0]] + parts[2:4]) if len(parts) > 4 else None,
               epilog="\n\n".join(parts[4:]) if len(parts) > 4 else None)
    p.add_argument("--text", metavar="FILE", required=True, help="byte-level training text (its last 10%% is held out)")
    p.add_argument("--out", metavar="DIR", required=True, help="output folder (an existing one is continued)")
    p.add_argument("--seeds", metavar="S", type=positive, default=3,
                   help="seeds 0..S-1 of every configuration (default 3)")
    p.add_argument("--steps", metavar="N", type=positive, default=1200, help="optimiser steps per run (default 1200)")
    p.add_argument("--experts", metavar="M,M,...", default="2,4,8", help="experts per group M to sweep (default 2,4,8)")
    p.add_argument("--top-k", metavar="K,K,...", default="1,2",
                   help="experts kept per group k to sweep, k <= M only (default 1,2)")
    p.add_argument("--variants", metavar="V,V,...", default="gqe",
                   help="GQE variants: gqe,hard_concat,weighted_concat (default gqe)")
    p.add_argument("--dense-heads", metavar="N", type=positive, default=None,
                   help="query heads N of the dense GQA baseline, a multiple of G (default 2G: the paper's M = 2)")
    g = p.add_argument_group("model and training (as gqe-train; defaults are gqe-train's)")
    g.add_argument("--hidden", metavar="D", type=positive, default=64, help="hidden size d (default 64)")
    g.add_argument("--layers", metavar="L", type=positive, default=2, help="transformer blocks (default 2)")
    g.add_argument("--kv-heads", metavar="G", type=positive, default=4,
                   help="KV heads G, fixed across the sweep (default 4)")
    g.add_argument("--head-dim", metavar="DH", type=positive, default=16, help="head dimension d_h, even (default 16)")
    g.add_argument("--intermediate", metavar="I", type=positive, default=128, help="feed-forward size (default 128)")
    g.add_argument("--seq-len", metavar="T", type=positive, default=64, help="training sequence length T (default 64)")
    g.add_argument("--batch", metavar="B", type=positive, default=32, help="sequences per step (default 32)")
    g.add_argument("--lr", metavar="LR", type=positive_float, default=3e-3, help="peak learning rate (default 0.003)")
    g.add_argument("--warmup", metavar="N", type=non_negative, default=0,
                   help="warm-up steps (default 0: 5%% of the steps)")
    g.add_argument("--schedule", choices=("cosine", "wsd"), default="cosine", help="cosine or wsd (default cosine)")
    g.add_argument("--aux-coef", metavar="C", type=non_negative_float, default=0.01,
                   help="load-balancing loss coefficient")
    g.add_argument("--weight-decay", metavar="W", type=non_negative_float, default=0.1,
                   help="AdamW weight decay (default 0.1)")
    g.add_argument("--eval-every", metavar="N", type=non_negative, default=0,
                   help="gqe-train's evaluation interval (0: a tenth)")
    g.add_argument("--save-every", metavar="N", type=non_negative, default=200,
                   help="steps between checkpoints (default 200)")
    r = p.add_argument_group("running")
    r.add_argument("--threads", metavar="N", type=positive, default=len(os.sched_getaffinity(0)) or 1,
                   help="threads of every program it runs (default: the CPUs the process may use)")
    r.add_argument("--bench-rounds", metavar="R", type=positive, default=15,
                   help="interleaved timing rounds of the speed-up at T=4096 (default 15)")
    r.add_argument("--build", metavar="DIR", default=os.path.join(ROOT, "build"),
                   help="build folder holding examples/gqe-train, examples/gqe-run, bench/gqe-bench")
    r.add_argument("--gqe-train", metavar="PATH", default=None,
                   help="path of gqe-train (default: BUILD/examples/gqe-train)")
    r.add_argument("--gqe-run", metavar="PATH", default=None, help="path of gqe-run (default: BUILD/examples/gqe-run)")
    r.add_argument("--gqe-bench", metavar="PATH", default=None,
                   help="path of gqe-bench (default: BUILD/bench/gqe-bench)")
    a = p.parse_args(argv)

    a.expert_list = int_list("--experts", a.experts)
    a.top_k_list = int_list("--top-k", a.top_k)
    a.variant_list = a.variants.split(",")
    for v in a.variant_list:
        if v not in VARIANTS:
            raise UsageError(f"--variants is \"{a.variants}\"; expected a comma-separated list of "
                             "gqe, hard_concat and weighted_concat")
    if len(set(a.variant_list)) != len(a.variant_list):
        raise UsageError(f"--variants is \"{a.variants}\"; a variant appears twice")
    for name, most in GQE_TRAIN_LIMITS.items():  # refused here, not by the first gqe-train after the timing
        if getattr(a, name) > most:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} is {getattr(a, name)}; expected at most {most} (gqe-train's limit)")
    if a.head_dim % 2:
        raise UsageError(f"--head-dim is {a.head_dim}; expected an even number (RoPE pairs)")
    if a.dense_heads is None:
        a.dense_heads = 2 * a.kv_heads
    if a.dense_heads % a.kv_heads:
        raise UsageError(f"--dense-heads is {a.dense_heads}; expected a multiple of --kv-heads {a.kv_heads}")
    for m in a.expert_list + [a.dense_heads // a.kv_heads]:
        if a.kv_heads * m > 1024:
            raise UsageError(f"G x M = {a.kv_heads} x {m} = {a.kv_heads * m} query heads; expected at most 1024")
    if a.bench_rounds > 1000:
        raise UsageError(f"--bench-rounds is {a.bench_rounds}; expected at most 1000")
    a.gqe_train = a.gqe_train or os.path.join(a.build, "examples", "gqe-train")
    a.gqe_run = a.gqe_run or os.path.join(a.build, "examples", "gqe-run")
    a.gqe_bench = a.gqe_bench or os.path.join(a.build, "bench", "gqe-bench")
    for flag, path in (("--gqe-train", a.gqe_train), ("--gqe-run", a.gqe_run), ("--gqe-bench", a.gqe_bench)):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise UsageError(f"{path} is not an executable ({flag}); build it: cmake --build build -j2 "
                             "--target gqe-train gqe-run gqe-bench")
    a.text = os.path.abspath(a.text)
    a.out = os.path.abspath(a.out)
    return a


def check_text(a):
    """The held-out range [start, end) gqe-train uses, after checking that the text is long enough."""
    if not os.path.isfile(a.text):
        raise UsageError(f"--text {a.text} does not exist or is not a file")
    try:
        with open(a.text, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsageError(f"cannot read --text {a.text}: {e.strerror}") from None
    size = len(data)
    need = a.seq_len + 1  # a window of T inputs and the byte after them, in the head and in the tail
    start = size - int(size * HELDOUT_FRACTION)  # as gqe-train's TextData splits it
    if start < need or size - start < need:
        least = max(need, 10 * need - 20)  # the tail int(size * 0.1) needs size >= about 10 x need
        while least - int(least * HELDOUT_FRACTION) < need or int(least * HELDOUT_FRACTION) < need:
            least += 1
        raise UsageError(f"--text {a.text} has {size} bytes; with --seq-len {a.seq_len} it needs at least "
                         f"{least} (its last 10% is held out and must hold a window of {need} bytes)")
    return start, size, hashlib.sha256(data).hexdigest()


# Options that decide the results: a folder continues only under the same ones.
RESULT_OPTIONS = ("text", "seeds", "steps", "dense_heads", "hidden", "layers", "kv_heads", "head_dim",
                  "intermediate", "seq_len", "batch", "lr", "warmup", "schedule", "aux_coef", "weight_decay",
                  "eval_every")


def check_options(a, text_size: int, text_sha256: str):
    saved_path = os.path.join(a.out, "sweep_options.json")
    current = {k: getattr(a, k) for k in RESULT_OPTIONS}
    current["text_bytes"], current["text_sha256"] = text_size, text_sha256
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise UsageError(f"--out {a.out} is a file; expected a folder")
    saved = read_json(saved_path) if os.path.exists(saved_path) else None
    if os.path.exists(saved_path) and not isinstance(saved, dict):
        raise UsageError(f"{saved_path} is damaged; expected the options of a sweep (remove the folder to start anew)")
    if saved is not None:
        for key, value in current.items():
            if saved.get(key) != value:
                what = "the text file's contents" if key.startswith("text_") else "--" + key.replace("_", "-")
                raise UsageError(f"--out {a.out} holds a sweep made with other options ({what}: {saved.get(key)} "
                                 f"there, {value} now); expected the same ones, or a new --out")
    elif os.path.isdir(a.out) and os.listdir(a.out):
        raise UsageError(f"--out {a.out} is a folder that holds no sweep; expected a new or empty folder")
    try:
        os.makedirs(os.path.join(a.out, "runs"), exist_ok=True)
        os.makedirs(os.path.join(a.out, "logs"), exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot make --out {a.out}: {e.strerror}") from None
    if saved is None:
        write_json(saved_path, current)


# ---- running the programs ------------------------------------------------------------------------
def run_child(cmd, stdout=None) -> int:
    """Runs a program in the foreground; Ctrl-C reaches it too, and it is waited for (gqe-train
    saves its run before it exits). Raises Interrupted after a Ctrl-C."""
    proc = subprocess.Popen(cmd, stdout=stdout)
    interrupted = False
    while True:
        try:
            rc = proc.wait()
            break
        except KeyboardInterrupt:
            interrupted = True
    if interrupted or rc in (130, -2):
        raise Interrupted()
    return rc


def capture(cmd, what: str) -> str:
    """A program's stdout; its failure is this script's (one line, the program's own message)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    interrupted = False
    while True:
        try:
            out, err = proc.communicate()
            break
        except KeyboardInterrupt:
            interrupted = True
    if interrupted or proc.returncode in (130, -2):
        raise Interrupted()
    if proc.returncode != 0:
        last = (err.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise UsageError(f"{what} failed: {last}")
    return out


class Timing:
    """Wall time spent in each phase, summed over the invocations that built the folder."""

    def __init__(self, out: str):
        self.path = os.path.join(out, "timing.json")
        saved = read_json(self.path)
        self.seconds = saved if isinstance(saved, dict) else {}

    def add(self, phase: str, seconds: float):
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        write_json(self.path, self.seconds)


def run_state(folder: str, kind: str, seed: int):
    """'done', 'partial' or 'none' for gqe-train's run <kind>-seed<seed> in a configuration's folder."""
    run = os.path.join(folder, f"{kind}-seed{seed}")
    state = read_json(os.path.join(run, "train_state.json"))
    if os.path.exists(run + ".old") or (state is None and os.path.exists(run)):
        return "partial"
    if state is None:
        return "none"
    done = state.get("step") == state.get("run", {}).get("optimizer", {}).get("total_steps") and \
        state.get("final_eval") is not None and os.path.isfile(os.path.join(run, "model.safetensors"))
    return "done" if done else "partial"


def train(a, config: Config, index: int, count: int, timing: Timing, eta) -> None:
    folder = os.path.join(a.out, "runs", config.name)
    states = [run_state(folder, config.kind, s) for s in range(a.seeds)]
    head = f"[{index}/{count}] {config.name}"
    if all(s == "done" for s in states):
        say(f"{head}: trained ({a.seeds} seed{'s' * (a.seeds > 1)}), not redone")
        return
    resume = os.path.isfile(os.path.join(folder, "comparison.json"))
    say(f"{head}: {'continuing' if resume else 'training'} {config.label}, seeds 0..{a.seeds - 1} "
        f"({sum(s == 'done' for s in states)} done){eta()}")
    if resume:
        cmd = [a.gqe_train, "--resume", folder, "--threads", str(a.threads)]
    else:
        cmd = [a.gqe_train, "--task", "text", "--text", a.text, "--models", config.kind, "--seeds", str(a.seeds),
               "--out", folder, "--steps", str(a.steps), "--batch", str(a.batch), "--seq-len", str(a.seq_len),
               "--lr", repr(a.lr), "--warmup", str(a.warmup), "--schedule", a.schedule, "--aux-coef", repr(a.aux_coef),
               "--weight-decay", repr(a.weight_decay), "--eval-every", str(a.eval_every), "--save-every",
               str(a.save_every), "--hidden", str(a.hidden), "--layers", str(a.layers), "--heads", str(config.heads),
               "--kv-heads", str(a.kv_heads), "--head-dim", str(a.head_dim), "--intermediate", str(a.intermediate),
               "--top-k", str(config.top_k or 1), "--variant", config.variant or "gqe", "--threads", str(a.threads)]
    log = os.path.join(a.out, "logs", config.name + ".log")
    started = time.monotonic()
    try:
        with open(log, "a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            rc = run_child(cmd, stdout=f)
    finally:
        timing.add("training", time.monotonic() - started)
    if rc != 0:
        raise UsageError(f"gqe-train exited with status {rc} on {config.name} (its message is above; log {log})")
    states = [run_state(folder, config.kind, s) for s in range(a.seeds)]
    if not all(s == "done" for s in states):
        raise UsageError(f"gqe-train finished {config.name} but its runs are not all complete ({states})")


def heldout_loss(a, config: Config, seed: int, start: int, end: int, timing: Timing):
    """(nats per byte, T, the run's train_state) of one checkpoint on [start, end), cached."""
    folder = os.path.join(a.out, "runs", config.name)
    run = os.path.join(folder, f"{config.kind}-seed{seed}")
    state = read_json(os.path.join(run, "train_state.json"))
    if state is None:
        raise UsageError(f"{run}/train_state.json is missing or damaged")
    saved = state["run"]
    if os.path.abspath(saved["text_path"]) != a.text or saved["heldout_fraction"] != HELDOUT_FRACTION:
        raise UsageError(f"{run} was trained on {saved['text_path']} with held-out fraction "
                         f"{saved['heldout_fraction']}; expected {a.text} and {HELDOUT_FRACTION}")
    T = int(saved["seq_len"])
    cache_path = os.path.join(folder, f"heldout-seed{seed}.json")
    cached = read_json(cache_path)
    key = {"window": T, "range": [start, end], "step": state["step"]}
    if isinstance(cached, dict) and all(cached.get(k) == v for k, v in key.items()):
        return cached["nats_per_byte"], T, state
    started = time.monotonic()
    out = capture([a.gqe_run, "--model", run, "--perplexity", a.text, "--window", str(T), "--range",
                   f"{start}:{end}", "--threads", str(a.threads)], f"gqe-run on {run}")
    timing.add("heldout", time.monotonic() - started)
    marker = " bytes predicted, "
    try:
        head, tail = out.split(marker, 1)
        predicted = int(head.rsplit(" ", 1)[-1])
        nats = float(tail.split(" nats per byte", 1)[0])
    except (ValueError, IndexError):
        raise UsageError(f"unexpected gqe-run output on {run}: {out.strip()[:200]}") from None
    if predicted != ((end - start - 1) // T) * T:
        raise UsageError(f"gqe-run predicted {predicted} bytes on {run}; expected {((end - start - 1) // T) * T}")
    write_json(cache_path, dict(key, nats_per_byte=nats, bytes_predicted=predicted))
    return nats, T, state


def measure_speedups(a, configs, timing: Timing):
    """Per configuration: the per-round ratio dense baseline / GQE layer at T = 4096, with both
    timed in the same round (separate gqe-bench processes, each giving the median of its own
    BENCH_INNER_ROUNDS rounds, in a shuffled order each round), and gqe-bench's own ratio against a
    dense layer of the configuration's N (timed in one process: the steadier figure)."""
    path = os.path.join(a.out, "speedup.json")
    settings = {"tokens": TOKENS, "rounds": a.bench_rounds, "inner_rounds": BENCH_INNER_ROUNDS,
                "threads": a.threads, "hidden": a.hidden,
                "kv_heads": a.kv_heads, "head_dim": a.head_dim, "dense_heads": a.dense_heads}
    saved = read_json(path)
    names = [c.name for c in configs[1:]]
    if isinstance(saved, dict) and saved.get("settings") == settings and all(n in saved["configs"] for n in names):
        say(f"speed-up at T={TOKENS}: measured before ({a.bench_rounds} rounds), not redone")
        return saved
    base = configs[0]
    results = {c.name: {"gqe_ms": [], "own_dense_ms": [], "own_speedup": [], "own_flop_ceiling": None}
               for c in configs[1:]}
    dense_ms = []
    tty = sys.stderr.isatty()
    started = time.monotonic()
    for r in range(a.bench_rounds):
        order = list(configs)
        random.Random(r).shuffle(order)
        for c in order:
            out = capture(c.bench_command(a, a.gqe_bench), "gqe-bench --layer-speedup")
            try:
                j = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                raise UsageError(f"unexpected gqe-bench output: {out.strip()[:200]}") from None
            if c is base:
                dense_ms.append(j["dense_ms"])
                continue
            res = results[c.name]
            res["gqe_ms"].append(j["gqe_ms"])
            res["own_dense_ms"].append(j["dense_ms"])
            res["own_speedup"].append(j["speedup"])
            res["own_flop_ceiling"] = j["flop_ceiling"]
            own = layer_flops(TOKENS, a.hidden, a.head_dim, c.heads, a.kv_heads) / c.flops(a)
            if abs(own - j["flop_ceiling"]) > 1e-3 * own:  # this script's FLOP model is gqe-bench's
                raise UsageError(f"FLOP ceiling of {c.name}: gqe-bench says {j['flop_ceiling']}, "
                                 f"this script {own:.4f}")
        elapsed = time.monotonic() - started
        left = elapsed / (r + 1) * (a.bench_rounds - r - 1)
        sys.stderr.write(f"{chr(13) if tty else ''}speed-up at T={TOKENS}: round {r + 1}/{a.bench_rounds} of "
                         f"{len(configs)} layer shapes, left {duration(left)}{chr(27) + '[K' if tty else chr(10)}")
        sys.stderr.flush()
    if tty:
        sys.stderr.write("\n")
    timing.add("speedup", time.monotonic() - started)
    for c in configs[1:]:
        res = results[c.name]
        res["speedup"] = [d / g for d, g in zip(dense_ms, res["gqe_ms"])]
    saved = {"settings": settings, "dense_ms": dense_ms, "configs": results}
    write_json(path, saved)
    return saved


# ---- outputs -------------------------------------------------------------------------------------
def quartiles(values):
    v = sorted(values)
    if len(v) < 4:
        return v[0], v[-1]
    q = statistics.quantiles(v, n=4)
    return q[0], q[2]


def pareto_front(points):
    """Points (x, y, ...) not beaten by another with x >= and y <= (one strictly), by increasing x."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1])
                                          for q in points)]
    return sorted(front)


def write_outputs(a, configs, rows, heldout, speed, text_sha256, timing: Timing):
    start, end = heldout
    runs = []
    for c, row in zip(configs, rows):
        entry = {"attention_type": c.kind}
        if c.kind == "gqe":
            entry["experts_per_group"] = c.experts
            entry["top_k"] = c.top_k
        entry["variant"] = c.variant or None
        entry["active_query_heads"] = row["active"]
        entry["parameters"] = row["parameters"]
        entry["seeds"] = list(range(a.seeds))
        entry["checkpoints"] = [f"runs/{c.name}/{c.kind}-seed{s}" for s in range(a.seeds)]
        entry["heldout_nats_per_byte"] = row["nats"]
        entry["mean"] = statistics.fmean(row["nats"])
        if len(row["nats"]) >= 2:
            entry["sd"] = statistics.stdev(row["nats"])
        entry["prefill_speedup_4096"] = row["speedup"]
        entry["flop_ceiling_4096"] = row["ceiling"]
        runs.append(entry)
    write_json(os.path.join(a.out, "sweep.json"), {"heldout": [start, end], "runs": runs})

    # The table.
    T = rows[0]["T"]
    base = runs[0]
    lines = [
        "# GQE sweep: held-out loss and prefill speed-up against dense GQA",
        "",
        f"Text: `{a.text}` ({end} bytes, sha256 {text_sha256[:16]}...); held out: bytes [{start}, {end}), judged in "
        f"{(end - start - 1) // T} whole windows of T = {T} bytes (the trained length).",
        f"Shape: d = {a.hidden}, layers {a.layers}, G = {a.kv_heads} KV heads, d_h = {a.head_dim}, feed-forward "
        f"{a.intermediate}; dense baseline GQA with N = {a.dense_heads} query heads; GQE with N = G x M experts.",
        f"Training: {a.steps} steps x {a.batch} sequences x {a.seq_len} bytes, lr {a.lr:g}, {a.schedule}, "
        f"seeds 0..{a.seeds - 1}.",
        f"Speed-up: one attention layer's prefill at T = {TOKENS}, dense GQA N = {a.dense_heads} / GQE, median of "
        f"{speed['settings']['rounds']} interleaved rounds (interquartile range; in each round every layer shape "
        f"is one gqe-bench --layer-speedup process giving the median of {speed['settings']['inner_rounds']}), "
        f"{speed['settings']['threads']} thread(s); FLOP ceiling from the FLOP model of docs/flop-model.md.",
        "",
        "| model | M | k | variant | active q-heads | parameters | held-out nats/byte | per seed | vs GQA, same seed "
        f"| prefill speed-up T={TOKENS} (IQR) | FLOP ceiling | of ceiling | vs dense of same N |",
        "|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for c, row, entry in zip(configs, rows, runs):
        loss = f"{entry['mean']:.4f}" + (f" ± {entry['sd']:.4f}" if "sd" in entry else "")
        seeds = " / ".join(f"{x:.4f}" for x in row["nats"])
        if c.kind == "gqa":
            lines.append(f"| GQA | - | - | - | {row['active']} of {c.heads} | {row['parameters']} | {loss} | {seeds} | "
                         f"- | 1 (baseline) | 1 | - | - |")
            continue
        lo, hi = row["speedup_iqr"]
        own = statistics.median(speed["configs"][c.name]["own_speedup"])
        # Runs of one seed saw the same batches in the same order: the per-seed difference is paired.
        diffs = [x - y for x, y in zip(row["nats"], rows[0]["nats"])]
        paired = f"{statistics.fmean(diffs):+.4f}" + (f" ± {statistics.stdev(diffs):.4f}" if len(diffs) >= 2 else "")
        lines.append(
            f"| GQE | {c.experts} | {c.top_k} | {c.variant} | {row['active']} of {c.heads} | {row['parameters']} | "
            f"{loss} | {seeds} | {paired} | {row['speedup']:.2f} ({lo:.2f}-{hi:.2f}) | "
            f"{row['ceiling']:.2f} | {100 * row['speedup'] / row['ceiling']:.0f}% | {own:.2f} |")
    seconds = timing.seconds
    total = sum(seconds.values())
    lines += [
        "",
        "mean ± sample standard deviation over seeds. \"vs GQA, same seed\": the GQE run's held-out loss minus "
        "the GQA run's of the same seed (the two saw the same batches), mean ± sd over seeds; negative is better. "
        "\"vs dense of same N\": gqe-bench's own ratio against a dense GQA layer with as many query heads as the "
        "configuration's experts (N = G x M), both timed in one process.",
        "",
        f"Wall time: {duration(total)} (training {duration(seconds.get('training', 0))}, held-out evaluation "
        f"{duration(seconds.get('heldout', 0))}, speed-up timing {duration(seconds.get('speedup', 0))}), summed over "
        "the invocations that built this folder.",
        "",
    ]
    write_atomically(os.path.join(a.out, "sweep.md"), "\n".join(lines))
    return runs


def plot(a, configs, rows):
    """pareto.png: held-out loss against prefill speed-up, error bars over seeds, GQA marked."""
    if shutil.which("gnuplot") is None:
        say("warning: gnuplot is not installed; no pareto.png (apt-get install gnuplot-nox, then run again)")
        return
    points = [(row["speedup"], statistics.fmean(row["nats"]), c) for c, row in zip(configs, rows)]
    data = ["# speedup mean sd label variant_index speedup_q1 speedup_q3"]
    for (x, y, c), row in zip(points, rows):
        sd = statistics.stdev(row["nats"]) if len(row["nats"]) >= 2 else 0.0
        index = -1 if c.kind == "gqa" else VARIANTS.index(c.variant)
        lo, hi = row["speedup_iqr"]
        data.append(f"{x:.6f} {y:.6f} {sd:.6f} \"{c.label}\" {index} {lo:.6f} {hi:.6f}")
    front = pareto_front([(x, y) for x, y, _ in points])
    data += ["", "", "# Pareto front"] + [f"{x:.6f} {y:.6f}" for x, y in front]
    dat = os.path.join(a.out, "pareto.dat")
    write_atomically(dat, "\n".join(data) + "\n")
    png_tmp = os.path.join(a.out, ".pareto.png.tmp")
    colours = {0: "#1f77b4", 1: "#2ca02c", 2: "#9467bd"}
    styles = []
    for i, v in enumerate(VARIANTS):
        if any(c.variant == v for c in configs):
            styles.append(f"'{dat}' index 0 using ($5=={i} ? $1 : 1/0):2:6:7:($2-$3):($2+$3) with xyerrorbars "
                          f"pt 7 ps 1.3 "
                          f"lc rgb '{colours[i]}' title 'GQE ({v})'")
            styles.append(f"'' index 0 using ($5=={i} ? $1 : 1/0):2:4 with labels boxed offset char 1,0.9 "
                          f"left font ',9' tc rgb '{colours[i]}' notitle")
    script = "\n".join([
        "set terminal pngcairo size 1000,640 font ',11'",
        f"set output '{png_tmp}'",
        f"set title 'Held-out loss vs prefill speed-up, G={a.kv_heads}, d={a.hidden}, d_h={a.head_dim} "
        f"(loss: mean ± sd over {a.seeds} seed(s))' noenhanced",
        f"set xlabel 'prefill speed-up of one layer over dense GQA (N={a.dense_heads}) at T={TOKENS} "
        "(median, bars: interquartile range of the rounds)'",
        "set ylabel 'held-out loss (nats/byte; lower is better)'",
        "set grid", "set key top right", "set style textbox opaque noborder margins 0.5,0.5",
        "set offsets graph 0.08, graph 0.25, graph 0.08, graph 0.08",
        "plot " + ", \\\n     ".join(
            [f"'{dat}' index 0 using ($5==-1 ? $1 : 1/0):2:3 with yerrorbars pt 5 ps 1.8 lc rgb '#d62728' "
             f"title 'dense GQA (N={a.dense_heads})'",
             f"'' index 0 using ($5==-1 ? $1 : 1/0):2:4 with labels boxed offset char 1,-0.9 left font ',9' "
             "tc rgb '#d62728' notitle"] + styles +
            [f"'{dat}' index 1 using 1:2 with lines dt 2 lw 1.5 lc rgb 'gray40' title 'Pareto front'"]),
        "unset output", ""])
    gp = os.path.join(a.out, "pareto.gnuplot")
    write_atomically(gp, script)
    log = os.path.join(a.out, "logs", "gnuplot.log")
    with open(log, "w") as f:
        rc = subprocess.run(["gnuplot", gp], stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not os.path.isfile(png_tmp):
        if os.path.exists(png_tmp):
            os.remove(png_tmp)
        say(f"warning: gnuplot failed (see {log}); no pareto.png")
        return
    os.replace(png_tmp, os.path.join(a.out, "pareto.png"))


# ---- main ----------------------------------------------------------------------------------------
def sweep(a) -> int:
    wall = time.monotonic()
    start, end, text_sha256 = check_text(a)
    configs = configurations(a)
    check_options(a, end, text_sha256)
    timing = Timing(a.out)
    say(f"sweep: {len(configs)} configurations x {a.seeds} seed(s) on {a.text} (held out: bytes [{start}, {end})); "
        f"output {a.out}")
    speed = measure_speedups(a, configs, timing)

    trained_here = []  # (seconds, runs) of configurations trained by this invocation, for the estimate
    todo = [c for c in configs if not all(run_state(os.path.join(a.out, "runs", c.name), c.kind, s) == "done"
                                          for s in range(a.seeds))]

    def eta() -> str:
        if not trained_here:
            return ""
        per = sum(t for t, _ in trained_here) / len(trained_here)
        left = per * (len(todo) - len(trained_here))
        return f"; elapsed {duration(time.monotonic() - wall)}, about {duration(left)} left"

    for i, c in enumerate(configs, 1):
        began = time.monotonic()
        was_todo = c in todo
        train(a, c, i, len(configs), timing, eta)
        if was_todo:
            trained_here.append((time.monotonic() - began, a.seeds))

    say("held-out loss: gqe-run --perplexity on every checkpoint ...")
    rows = []
    for c in configs:
        nats, states = [], []
        for s in range(a.seeds):
            value, T, state = heldout_loss(a, c, s, start, end, timing)
            nats.append(value)
            states.append(state)
        params = {st["parameters"] for st in states}
        active = {st["active_query_heads"] for st in states}
        if len(params) != 1 or len(active) != 1:
            raise UsageError(f"the seeds of {c.name} disagree on their shape ({params}, {active})")
        row = {"nats": nats, "T": T, "parameters": params.pop(), "active": active.pop()}
        if c.kind == "gqa":
            row["speedup"], row["ceiling"], row["speedup_iqr"] = 1.0, 1.0, (1.0, 1.0)
        else:
            ratios = speed["configs"][c.name]["speedup"]
            row["speedup"] = statistics.median(ratios)
            row["speedup_iqr"] = quartiles(ratios)
            row["ceiling"] = configs[0].flops(a) / c.flops(a)
        rows.append(row)
        say(f"  {c.name}: " + ", ".join(f"{x:.4f}" for x in nats) + " nats/byte")

    runs = write_outputs(a, configs, rows, (start, end), speed, text_sha256, timing)
    plot(a, configs, rows)
    with open(os.path.join(a.out, "sweep.md"), encoding="utf-8") as f:
        print(f.read(), end="")
    say(f"sweep: {len(runs)} configurations; {os.path.join(a.out, 'sweep.json')}, sweep.md, pareto.png "
        f"(this invocation: {duration(time.monotonic() - wall)})")
    return 0


def main(argv=None) -> int:
    try:
        a = parse_args(sys.argv[1:] if argv is None else argv)
        return sweep(a)
    except UsageError as e:
        refuse(PROG, str(e))
    except (Interrupted, KeyboardInterrupt):
        sys.stderr.write(f"\n{PROG}: interrupted; what was trained is saved: run the same command again to continue\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
