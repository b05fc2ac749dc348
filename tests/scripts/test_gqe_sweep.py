#!/usr/bin/env python3
"""tools/gqe_sweep.py at tiny sizes: sweep.json's schema and figures, checkpoints that gqe-run loads,
held-out losses recomputed with the float64 NumPy reference, nothing redone on a second run, Ctrl-C
and continue giving the uninterrupted result, and one-line refusals of bad flags.

    /usr/bin/python3 tests/scripts/test_gqe_sweep.py BUILD/examples/gqe-train BUILD/examples/gqe-run \\
        BUILD/bench/gqe-bench
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import gqe_reference as ref  # noqa: E402

SWEEP = os.path.join(ROOT, "tools", "gqe_sweep.py")
PROGRAMS = {}

# d, L, G, d_h, FFN, T, batch: small enough that a run takes a fraction of a second.
TINY = ["--hidden", "16", "--layers", "1", "--kv-heads", "2", "--head-dim", "4", "--intermediate", "16",
        "--seq-len", "16", "--batch", "4", "--bench-rounds", "1", "--threads", "2"]
G, D, DH, T = 2, 16, 4, 16

GQA_KEYS = ["attention_type", "variant", "active_query_heads", "parameters", "seeds", "checkpoints",
            "heldout_nats_per_byte", "mean", "sd", "prefill_speedup_4096", "flop_ceiling_4096"]
GQE_KEYS = GQA_KEYS[:1] + ["experts_per_group", "top_k"] + GQA_KEYS[1:]


def make_text(path: str, size: int) -> bytes:
    words = ("the of a router keeps experts in every group query heads share one key value cache prefill "
             "tokens attention dense sparse model loss held out bytes window seed train speed").split()
    rng = random.Random(7)
    out = []
    while sum(len(w) + 1 for w in out) < size:
        out.append(rng.choice(words) + ("." if rng.random() < 0.1 else ""))
    data = " ".join(out).encode()[:size]
    with open(path, "wb") as f:
        f.write(data)
    return data


def sweep(*args: str, session: bool = False):
    cmd = [sys.executable, SWEEP, "--gqe-train", PROGRAMS["train"], "--gqe-run", PROGRAMS["run"],
           "--gqe-bench", PROGRAMS["bench"], *args]
    if session:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def tensor_elements(path: str) -> int:
    """Parameters of a checkpoint: the element counts in model.safetensors' header."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def heldout_reference(model_dir: str, data: bytes, start: int, end: int) -> float:
    """The issue's definition, in float64 with the NumPy reference: windows of T inputs from start."""
    cfg, weights = ref.load_model(model_dir)
    ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    total, count, i = 0.0, 0, 0
    while start + i * T + T < end:
        window = ids[start + i * T: start + i * T + T + 1]
        logits = ref.forward(cfg, weights, window[:-1]).logits
        top = logits.max(axis=1)
        lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        total += float((lse - logits[np.arange(T), window[1:]]).sum())
        count += T
        i += 1
    return total / count


def flops(n: int, k: int = 0, routed: bool = False, t: int = 4096) -> float:
    """The FLOP model of docs/flop-model.md: dense GQA with n heads, or GQE (variant gqe) with n experts, k kept."""
    pairs = t * (t + 1) / 2
    if not routed:
        return 2 * t * D * (n + 2 * G + n) * DH + 4 * n * DH * pairs
    return 2 * t * D * ((k * G + 1) + 2 * G + (k * G + 2)) * DH + 2 * t * D * n + 4 * (k * G + 1) * DH * pairs


class Sweep(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="gqe-sweep-test-")
        cls.text = os.path.join(cls.tmp.name, "text.txt")
        cls.data = make_text(cls.text, 3000)
        cls.out = os.path.join(cls.tmp.name, "sweep")
        cls.args = ["--text", cls.text, "--out", cls.out, "--steps", "3", "--seeds", "2", "--experts", "2",
                    "--top-k", "1", "--variants", "gqe", *TINY]
        cls.first = sweep(*cls.args)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_1_sweep_json(self):
        self.assertEqual(self.first.returncode, 0, self.first.stderr)
        with open(os.path.join(self.out, "sweep.json")) as f:
            s = json.load(f)
        self.assertEqual(list(s), ["heldout", "runs"])
        size = len(self.data)
        start, end = size - int(size * 0.1), size
        self.assertEqual(s["heldout"], [start, end])
        self.assertEqual(len(s["runs"]), 2)
        gqa, gqe = s["runs"]
        self.assertEqual(list(gqa), GQA_KEYS)
        self.assertEqual(list(gqe), GQE_KEYS)
        self.assertEqual((gqa["attention_type"], gqa["variant"]), ("gqa", None))
        self.assertEqual((gqe["attention_type"], gqe["experts_per_group"], gqe["top_k"], gqe["variant"]),
                         ("gqe", 2, 1, "gqe"))
        self.assertEqual(gqa["active_query_heads"], 2 * G)  # the baseline: N = 2G heads, all active
        self.assertEqual(gqe["active_query_heads"], 1 * G + 1)
        self.assertEqual((gqa["prefill_speedup_4096"], gqa["flop_ceiling_4096"]), (1.0, 1.0))
        self.assertAlmostEqual(gqe["flop_ceiling_4096"], flops(2 * G) / flops(2 * G, 1, routed=True), places=9)
        self.assertTrue(0.2 < gqe["prefill_speedup_4096"] < 10, gqe["prefill_speedup_4096"])
        for run in (gqa, gqe):
            self.assertEqual(run["seeds"], [0, 1])
            self.assertEqual(len(run["checkpoints"]), 2)
            self.assertEqual(len(run["heldout_nats_per_byte"]), 2)
            self.assertAlmostEqual(run["mean"], statistics.fmean(run["heldout_nats_per_byte"]), places=12)
            self.assertAlmostEqual(run["sd"], statistics.stdev(run["heldout_nats_per_byte"]), places=12)
            for seed, (folder, nats) in enumerate(zip(run["checkpoints"], run["heldout_nats_per_byte"])):
                self.assertFalse(os.path.isabs(folder), folder)
                path = os.path.join(self.out, folder)
                with open(os.path.join(path, "train_state.json")) as f:
                    state = json.load(f)
                self.assertEqual(state["run"]["seq_len"], T)
                self.assertEqual(state["run"]["seed"], seed)
                self.assertEqual(tensor_elements(os.path.join(path, "model.safetensors")), run["parameters"])
                # Loadable by gqe-run, and the figure is the definition's, in float64.
                want = heldout_reference(path, self.data, start, end)
                self.assertLess(abs(nats - want), 1e-5 * want, f"{folder}: sweep {nats}, reference {want}")
                out = subprocess.run([PROGRAMS["run"], "--model", path, "--prompt", "the", "--generate", "4"],
                                     capture_output=True, timeout=60)
                self.assertEqual(out.returncode, 0, out.stderr)
                self.assertEqual(len(out.stdout), 4)

    def test_2_table_and_chart(self):
        self.assertEqual(self.first.returncode, 0, self.first.stderr)
        with open(os.path.join(self.out, "sweep.md")) as f:
            table = f.read()
        self.assertIn("| GQA |", table)
        self.assertIn("| GQE | 2 | 1 | gqe |", table)
        self.assertIn(table.strip(), self.first.stdout)
        if subprocess.run(["sh", "-c", "command -v gnuplot"], capture_output=True).returncode == 0:
            with open(os.path.join(self.out, "pareto.png"), "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    def test_3_second_run_redoes_nothing(self):
        self.assertEqual(self.first.returncode, 0, self.first.stderr)
        model = os.path.join(self.out, "runs", "gqe-m2-k1-gqe", "gqe-seed1", "model.safetensors")
        before = os.stat(model).st_mtime_ns
        with open(os.path.join(self.out, "sweep.json")) as f:
            first = json.load(f)
        again = sweep(*self.args)
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertIn("gqa-n4: trained (2 seeds), not redone", again.stderr)
        self.assertIn("gqe-m2-k1-gqe: trained (2 seeds), not redone", again.stderr)
        self.assertIn("not redone", again.stderr.split("\n")[1])  # the speed-up too
        self.assertEqual(os.stat(model).st_mtime_ns, before)
        with open(os.path.join(self.out, "sweep.json")) as f:
            self.assertEqual(json.load(f), first)
        # Other training options on the same folder are refused.
        other = sweep(*self.args, "--steps", "4")
        self.assertEqual(other.returncode, 2)
        self.assertEqual(len(other.stderr.splitlines()), 1, other.stderr)

    def test_4_interrupt_and_continue(self):
        args = ["--text", self.text, "--steps", "150", "--save-every", "5", "--seeds", "1", "--experts", "2",
                "--top-k", "1", "--variants", "gqe", *TINY]
        out_a, out_b = os.path.join(self.tmp.name, "interrupted"), os.path.join(self.tmp.name, "straight")
        proc = sweep("--out", out_a, *args, session=True)
        state = os.path.join(out_a, "runs", "gqa-n4", "gqa-seed0", "train_state.json")
        deadline = time.monotonic() + 60
        while not os.path.exists(state) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 130, err)
        self.assertIn("run the same command again to continue", err.splitlines()[-1])
        with open(state) as f:
            self.assertLess(json.load(f)["step"], 150)
        self.assertFalse(os.path.exists(os.path.join(out_a, "sweep.json")))
        done = sweep("--out", out_a, *args)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("continuing GQA", done.stderr)
        straight = sweep("--out", out_b, *args)
        self.assertEqual(straight.returncode, 0, straight.stderr)
        with open(os.path.join(out_a, "sweep.json")) as f, open(os.path.join(out_b, "sweep.json")) as g:
            a, b = json.load(f), json.load(g)
        self.assertEqual([r["heldout_nats_per_byte"] for r in a["runs"]], [r["heldout_nats_per_byte"] for r in b["runs"]])

    def test_5_bad_flags(self):
        short = os.path.join(self.tmp.name, "short.txt")
        make_text(short, 150)  # T = 16 needs 17 held-out bytes: at least 170
        fresh = os.path.join(self.tmp.name, "never")
        base = ["--out", fresh, *TINY]
        bad = [
            (["--text", self.text, "--experts", "0"], "--experts"),
            (["--text", self.text, "--experts", "2,2"], "--experts"),
            (["--text", self.text, "--experts", "2,x"], "--experts"),
            (["--text", self.text, "--experts", "2", "--top-k", "3"], "k <= M"),
            (["--text", self.text, "--variants", "gqe,dense"], "--variants"),
            (["--text", self.text, "--seeds", "0"], "--seeds"),
            (["--text", self.text, "--head-dim", "3"], "--head-dim"),
            (["--text", self.text, "--dense-heads", "3"], "--dense-heads"),
            (["--text", self.text, "--lr", "-1"], "--lr"),
            (["--text", self.text, "--fast"], "--fast"),
            (["--text", short], "at least 170"),
            (["--text", os.path.join(self.tmp.name, "missing.txt")], "does not exist"),
            (["--text", self.text, "--gqe-bench", os.path.join(self.tmp.name, "nothing")], "--gqe-bench"),
            # gqe-train's limits, refused before anything runs (not by gqe-train after the timing)
            (["--text", self.text, "--batch", "100000"], "--batch is 100000; expected at most 65536"),
            (["--text", self.text, "--hidden", "100000"], "--hidden is 100000"),
            (["--text", self.text, "--lr", "20"], "--lr is 20.0"),
            (["--text", self.text, "--steps", "\u0662"], "--steps"),
            (["--text", self.text, "--out", os.path.join(self.text, "sweep")], "cannot make --out"),
        ]
        for flags, word in bad:
            with self.subTest(flags=flags):
                out = sweep(*base, *flags)
                self.assertEqual(out.returncode, 2, out.stderr)
                self.assertEqual(len(out.stderr.splitlines()), 1, out.stderr)
                self.assertIn(word, out.stderr)
                self.assertFalse(os.path.exists(fresh), "a refused sweep created its folder")
        out = sweep("--text", self.text, *TINY)  # no --out
        self.assertEqual(out.returncode, 2)
        self.assertEqual(len(out.stderr.splitlines()), 1, out.stderr)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and not sys.argv[1].startswith("-"):
        PROGRAMS.update(train=sys.argv.pop(1), run=sys.argv.pop(1), bench=sys.argv.pop(1))
    if not all(os.access(p, os.X_OK) for p in PROGRAMS.values()) or len(PROGRAMS) != 3:
        sys.exit("usage: test_gqe_sweep.py PATH/gqe-train PATH/gqe-run PATH/gqe-bench")
    unittest.main()
