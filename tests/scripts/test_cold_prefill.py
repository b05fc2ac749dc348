#!/usr/bin/env python3
"""tools/cold_prefill.py over a stand-in for gqe-run, so that its table can be checked exactly.

    /usr/bin/python3 tests/scripts/test_cold_prefill.py

The stand-in records its command line and takes a fixed time per model (dense 0.5 s, GQE 0.1 s).
Checked: every T gets its row; each process is given its model, a prompt of T letters and spaces
(the same prompt for both models of a T), --stats and the flags asked for; dense and GQE take turns
in alternating order; the times and the speed-up agree with the stand-in's; the ceiling is the
whole-model ceiling computed here from docs/flop-model.md (the layer, the feed-forward block of
every token, one row of logits), and the share of it is the speed-up over it. A failing process
fails the tool, naming its status; counts below one and prompts past the models' positions are
refused; nothing is written to a stderr that is not a terminal but the tool's own messages.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "cold_prefill.py")
SECONDS = {"gqa": 0.5, "gqe": 0.1}

STAND_IN = f"""#!{sys.executable}
import json, os, sys, time
with open(os.environ["COLD_PREFILL_CALLS"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
model = sys.argv[sys.argv.index("-m") + 1]
if os.path.exists(os.path.join(model, "fail")):
    sys.exit("stand-in: told to fail")
time.sleep({SECONDS["gqa"]} if model.endswith("gqa") else {SECONDS["gqe"]})
"""


def whole_model_ceiling(T: int) -> float:
    """docs/flop-model.md for the paper's layer, plus what both models share (SwiGLU I = 256, V = 256)."""
    d, dh, n, g, k, m, inter, vocab = 1024, 64, 16, 8, 1, 2, 256, 256
    pairs = T * (T + 1) // 2
    dense = 2 * T * d * (n + 2 * g + n) * dh + 4 * n * dh * pairs
    sparse = 2 * T * d * ((k * g + 1) + 2 * g + (k * g + 2)) * dh + 2 * T * d * g * m + 4 * (k * g + 1) * dh * pairs
    shared = 2 * T * 3 * d * inter + 2 * d * vocab
    return (dense + shared) / (sparse + shared)


class ColdPrefill(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="gqe-cold-prefill-")
        self.addCleanup(self.tmp.cleanup)
        self.run_path = os.path.join(self.tmp.name, "gqe-run")
        with open(self.run_path, "w") as f:
            f.write(STAND_IN)
        os.chmod(self.run_path, 0o755)
        self.models = os.path.join(self.tmp.name, "models")
        for name in SECONDS:  # present already: the tool writes no model
            os.makedirs(os.path.join(self.models, f"one-layer-{name}"))
            with open(os.path.join(self.models, f"one-layer-{name}", "config.json"), "w") as f:
                f.write("{}")
        self.calls = os.path.join(self.tmp.name, "calls.jsonl")

    def tool(self, *flags: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, COLD_PREFILL_CALLS=self.calls)
        return subprocess.run([sys.executable, TOOL, "--run", self.run_path, "--models", self.models, *flags],
                              capture_output=True, text=True, env=env, timeout=120)

    def recorded(self) -> list:
        with open(self.calls) as f:
            return [json.loads(line) for line in f]

    def test_the_table_and_the_processes(self):
        done = self.tool("--tokens", "7", "300", "--pairs", "3", "--threads", "2", "--chunk", "64")
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertEqual(done.stderr, "")  # no progress line where stderr is not a terminal
        calls = self.recorded()
        self.assertEqual(len(calls), 2 * 2 * 3)
        for T, block in ((7, calls[:6]), (300, calls[6:])):
            models = [os.path.basename(c[c.index("-m") + 1]) for c in block]
            self.assertEqual(models, ["one-layer-gqa", "one-layer-gqe", "one-layer-gqe", "one-layer-gqa",
                                      "one-layer-gqa", "one-layer-gqe"])
            prompts = {c[c.index("-p") + 1] for c in block}
            self.assertEqual(len(prompts), 1)
            prompt = prompts.pop()
            self.assertEqual(len(prompt), T)
            self.assertRegex(prompt, r"^[a-z ]+$")
            for c in block:
                self.assertIn("--stats", c)
                self.assertEqual(c[c.index("-t") + 1], "2")
                self.assertEqual(c[c.index("--chunk") + 1], "64")

            row = re.search(rf"^\| {T} \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \(([0-9.]+)-([0-9.]+)\) \| ([0-9.]+) \| "
                            rf"([0-9]+)% \| ([0-9]+) / ([0-9]+) \|$", done.stdout, re.M)
            self.assertIsNotNone(row, done.stdout)
            dense, sparse, speedup, low, high, ceiling, share = (float(row.group(i)) for i in range(1, 8))
            # A process takes the stand-in's sleep plus its start, never less.
            self.assertGreaterEqual(dense, SECONDS["gqa"])
            self.assertGreaterEqual(sparse, SECONDS["gqe"])
            self.assertLessEqual(low, speedup)
            self.assertLessEqual(speedup, high)
            self.assertGreater(speedup, 1.0)  # unless a start took 0.4 s longer than the other's
            exact = whole_model_ceiling(T)
            self.assertEqual(f"{ceiling:.2f}", f"{exact:.2f}")
            # The share is the unrounded speed-up over the ceiling, rounded: within half a point of the
            # printed speed-up's share, and that speed-up's own rounding.
            self.assertLessEqual(abs(share - 100 * speedup / exact), 0.5 + 100 * 0.005 / exact + 1e-9)

    def test_a_failing_process_fails_the_tool(self):
        open(os.path.join(self.models, "one-layer-gqe", "fail"), "w").close()
        done = self.tool("--tokens", "5", "--pairs", "1")
        self.assertEqual(done.returncode, 1)  # the stand-in's own status
        self.assertIn("cold_prefill: error: ", done.stderr)
        self.assertIn("failed with status 1: stand-in: told to fail", done.stderr)

    def test_counts_below_one_are_refused(self):
        for flags in (["--pairs", "0"], ["--tokens", "0"], ["--threads", "0"], ["--chunk", "0"]):
            with self.subTest(flags=flags):
                done = self.tool(*flags)
                self.assertEqual(done.returncode, 2)
                self.assertIn("cold_prefill: error: ", done.stderr)
                self.assertIn("must be at least 1", done.stderr)
        done = self.tool("--pairs", "many")
        self.assertEqual(done.returncode, 2)
        self.assertEqual(len(done.stderr.strip().splitlines()), 1, done.stderr)
        self.assertIn("cold_prefill: error: argument --pairs: invalid int value", done.stderr)
        done = self.tool("--tokens", "2048", "5000")  # past the models' positions: refused before anything runs
        self.assertEqual(done.returncode, 2)
        self.assertIn("--tokens 5000 is more than the models' 4096 positions", done.stderr)
        self.assertFalse(os.path.exists(self.calls))


if __name__ == "__main__":
    unittest.main()
