#!/usr/bin/env python3
"""gqe-run --perplexity with --window T and --range START:END against the float64 NumPy reference.

    /usr/bin/python3 tests/scripts/test_perplexity_window.py build/examples/gqe-run

Window i of the range feeds bytes START + iT .. START + iT + T - 1 from an empty cache and predicts
each next byte; it counts when its last target byte, START + iT + T, lies before END. The expected
nats per byte are computed here window by window with tools/gqe_reference.py (its own forward pass
in float64, every window from position 0), for a GQE, a GQA and a hard_concat model. The default
(overlapping windows of up to min(max_position_embeddings, 1024) bytes) is checked the same way, and
every bad --window/--range gives exit status 2 and one line on stderr.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import tempfile
import unittest

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import gqe_reference as ref  # noqa: E402

GQE_RUN = os.environ.get("GQE_RUN", "")
DATA = os.path.join(ROOT, "tests", "data")

# English with a few bytes above 127 (UTF-8) and a control byte, 600 bytes.
TEXT = (
    "Grouped query experts keep, in every group of query heads that share one key and value head, "
    "only the heads a router picks for each token. The keys and values stay those of grouped-query "
    "attention, so the cache does not grow; what shrinks is the work of the queries.\n"
    "Caf\u00e9 na\u00efve \u00fcber \u2014 bytes above 127 are tokens too.\t"
).encode("utf-8")
TEXT = (TEXT * 3)[:600]

LINE = re.compile(r": (\d+) bytes predicted, ([0-9.]+) nats per byte \(([0-9.]+) bits per byte\), perplexity ([0-9.]+)")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([GQE_RUN, *args], capture_output=True, text=True, timeout=120)


def nats_of(cfg: ref.Config, weights, ids: np.ndarray) -> float:
    """Sum over positions t < len-1 of -log p(ids[t+1] | ids[..t]), one forward from position 0."""
    logits = ref.forward(cfg, weights, ids[:-1]).logits  # [len-1, V]
    top = logits.max(axis=1, keepdims=True)
    lse = (top[:, 0] + np.log(np.exp(logits - top).sum(axis=1)))
    return float((lse - logits[np.arange(len(ids) - 1), ids[1:]]).sum())


def tiled_expected(cfg, weights, ids: np.ndarray, window: int, start: int, end: int):
    """(nats per byte, windows) by the definition, with an explicit loop over i."""
    total, count, i = 0.0, 0, 0
    while start + i * window + window < end:  # the last target byte lies before end
        first = start + i * window
        total += nats_of(cfg, weights, ids[first:first + window + 1])
        count += 1
        i += 1
    return total / (count * window), count


def default_expected(cfg, weights, ids: np.ndarray) -> float:
    """Windows of up to W = min(max_position_embeddings, 1024) bytes overlapping by one byte."""
    W = min(cfg.max_position_embeddings, 1024)
    total, first = 0.0, 0
    while first + 1 < len(ids):
        total += nats_of(cfg, weights, ids[first:first + W])
        first += W - 1
    return total / (len(ids) - 1)


class PerplexityWindow(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="gqe-ppl-window-")
        cls.text = os.path.join(cls.tmp.name, "text.bin")
        with open(cls.text, "wb") as f:
            f.write(TEXT)
        cls.ids = np.frombuffer(TEXT, dtype=np.uint8).astype(np.int64)
        cls.models = {}
        for name in ("gqe_k2_m3", "llama_defaults"):
            cls.models[name] = ref.load_model(os.path.join(DATA, name))
        # A byte-level hard_concat model with a short context, so that the default windows overlap.
        small = os.path.join(cls.tmp.name, "hard_concat_short")
        cls.models[small] = ref.make_random_checkpoint(small, {
            "attention_type": "gqe", "gqe_variant": "hard_concat", "vocab_size": 256, "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
            "head_dim": 4, "gqe_top_k": 2, "max_position_embeddings": 40}, seed=11)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def folder(self, name: str) -> str:
        return name if os.path.isabs(name) else os.path.join(DATA, name)

    def check(self, name: str, flags, want: float, predicted: int, windows=None):
        out = run("--model", self.folder(name), "--perplexity", self.text, *flags)
        self.assertEqual(out.returncode, 0, out.stderr)
        m = LINE.search(out.stdout)
        self.assertIsNotNone(m, out.stdout)
        self.assertEqual(int(m.group(1)), predicted, out.stdout)
        nats = float(m.group(2))
        self.assertLess(abs(nats - want), 2e-6 + 1e-6 * want, f"{name} {flags}: gqe-run {nats}, reference {want}")
        self.assertLess(abs(float(m.group(3)) - want / math.log(2)), 2e-6 + 1e-6 * want)
        if windows is not None:
            self.assertIn(f"; {windows} window{'' if windows == 1 else 's'} of ", out.stdout)

    def test_window_and_range_match_the_reference(self):
        n = len(TEXT)
        for name, (cfg, weights) in self.models.items():
            cases = [
                (7, 5, 83),     # (83-5-1)//7 = 11 windows, bytes 82 left over
                (7, 5, 82),     # 82 = 5 + 11*7: window 10's last target would be byte 82, not before 82: 10 windows
                (7, 5, 81),     # 10 windows
                (1, 10, 20),    # windows of one byte: 9 predictions
                (16, 0, n),     # the whole file
                (33, 101, 400),
            ]
            for window, start, end in cases:
                with self.subTest(model=name, window=window, range=(start, end)):
                    want, count = tiled_expected(cfg, weights, self.ids, window, start, end)
                    self.check(name, ["--window", str(window), "--range", f"{start}:{end}"], want, count * window, count)
            # --window alone tiles the whole file; --range alone uses min(max_position_embeddings, 1024).
            with self.subTest(model=name, flags="window only"):
                want, count = tiled_expected(cfg, weights, self.ids, 24, 0, n)
                self.check(name, ["--window", "24"], want, count * 24, count)
            if cfg.max_position_embeddings < 200:
                with self.subTest(model=name, flags="range only"):
                    W = cfg.max_position_embeddings
                    want, count = tiled_expected(cfg, weights, self.ids, W, 50, 450)
                    self.check(name, ["--range", "50:450"], want, count * W, count)

    def test_boundary_counts(self):
        # Exactly one whole window needs T + 1 bytes in the range; T bytes give none (an error).
        cfg, weights = self.models["gqe_k2_m3"]
        want, count = tiled_expected(cfg, weights, self.ids, 10, 3, 14)
        self.assertEqual(count, 1)
        self.check("gqe_k2_m3", ["--window", "10", "--range", "3:14"], want, 10, 1)
        out = run("--model", self.folder("gqe_k2_m3"), "--perplexity", self.text, "--window", "10", "--range", "3:13")
        self.assertEqual(out.returncode, 2, out.stdout)

    def test_default_unchanged(self):
        for name, (cfg, weights) in self.models.items():
            with self.subTest(model=name):
                out = run("--model", self.folder(name), "--perplexity", self.text)
                self.assertEqual(out.returncode, 0, out.stderr)
                self.assertNotIn("windows of", out.stdout)
                self.check(name, [], default_expected(cfg, weights, self.ids), len(TEXT) - 1)

    def test_bad_values(self):
        model = self.folder("gqe_k2_m3")
        short = [k for k in self.models if os.path.isabs(k)][0]
        n = len(TEXT)
        bad = [
            (model, ["--perplexity", self.text, "--window", "0"], "--window"),
            (model, ["--perplexity", self.text, "--window", "-3"], "--window"),
            (model, ["--perplexity", self.text, "--window", "ten"], "--window"),
            (short, ["--perplexity", self.text, "--window", "41"], "max_position_embeddings"),
            (model, ["--perplexity", self.text, "--range", "5"], "--range"),
            (model, ["--perplexity", self.text, "--range", "5:"], "--range"),
            (model, ["--perplexity", self.text, "--range", ":5"], "--range"),
            (model, ["--perplexity", self.text, "--range", "9:9"], "--range"),
            (model, ["--perplexity", self.text, "--range", "9:3"], "--range"),
            (model, ["--perplexity", self.text, "--range", "-1:5"], "--range"),
            (model, ["--perplexity", self.text, "--range", "1:2:3"], "--range"),
            (model, ["--perplexity", self.text, "--range", f"0:{n + 1}"], "--range"),
            (model, ["--perplexity", self.text, "--range", "0:99999999999999999999"], "--range"),
            (model, ["--perplexity", self.text, "--range", "0:8", "--window", "8"], "--range"),
            (model, ["--prompt", "hi", "--window", "8"], "--window"),
            (model, ["--prompt", "hi", "--range", "0:8"], "--range"),
        ]
        for folder, flags, word in bad:
            with self.subTest(flags=flags):
                out = run("--model", folder, *flags)
                self.assertEqual(out.returncode, 2, out.stdout + out.stderr)
                self.assertEqual(out.stdout, "")
                lines = out.stderr.splitlines()
                self.assertEqual(len(lines), 1, out.stderr)
                self.assertIn(word, lines[0])


if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        GQE_RUN = sys.argv.pop(1)
    if not GQE_RUN or not os.access(GQE_RUN, os.X_OK):
        sys.exit("usage: test_perplexity_window.py PATH/TO/gqe-run (or GQE_RUN=...)")
    unittest.main()
