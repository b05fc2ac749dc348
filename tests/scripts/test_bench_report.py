#!/usr/bin/env python3
"""tools/bench_report.py running gqe-bench on a small filter, as its users run it.

    /usr/bin/python3 tests/scripts/test_bench_report.py build/bench/gqe-bench

Every flag it passes on is one gqe-bench accepts (--threads among them), the JSON records the
threads asked for, and the report's figures are the JSON's: each time the median of the rounds,
each speed-up the median of the rounds' ratios, the register tile's rate the median of its rounds.
A gqe-bench that fails makes the report fail, naming the status.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPORT = os.path.join(ROOT, "tools", "bench_report.py")
GQE_BENCH = os.environ.get("GQE_BENCH", "")
ROUNDS = 3


def report(out: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, REPORT, "--bench", GQE_BENCH, "--out", out, *flags],
                          capture_output=True, text=True, timeout=240)


def rounds_of(data: dict, name: str) -> dict:
    """repetition index -> the iteration run of benchmark `name`."""
    return {b["repetition_index"]: b for b in data["benchmarks"]
            if b.get("run_type") == "iteration" and b["run_name"] == name}


class BenchReport(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="gqe-bench-report-")
        cls.done = report(cls.tmp.name, "--repetitions", str(ROUNDS), "--min-time", "0.01", "--threads", "1",
                          "--filter", "^prefill_gq[ae]/512/|^register_tile/64$")
        cls.text = cls.json = None
        if cls.done.returncode == 0:
            with open(os.path.join(cls.tmp.name, "report.md")) as f:
                cls.text = f.read()
            with open(os.path.join(cls.tmp.name, "bench.json")) as f:
                cls.json = json.load(f)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def setUp(self):
        self.assertEqual(self.done.returncode, 0, self.done.stdout + self.done.stderr)

    def test_the_threads_asked_for_reach_gqe_bench(self):
        self.assertEqual(self.json["context"]["gqe_threads"], "1")

    def test_the_prefill_row_gives_the_rounds_medians_and_ratio(self):
        dense = rounds_of(self.json, "prefill_gqa/512/process_time/real_time")
        sparse = rounds_of(self.json, "prefill_gqe/512/process_time/real_time")
        self.assertEqual(sorted(dense), list(range(ROUNDS)))
        self.assertEqual(sorted(sparse), list(range(ROUNDS)))
        for run in list(dense.values()) + list(sparse.values()):
            self.assertEqual(run["time_unit"], "ms")
        ratio = statistics.median(dense[i]["real_time"] / sparse[i]["real_time"] for i in range(ROUNDS))
        row = re.search(r"^\| 512 \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \(", self.text, re.M)
        self.assertIsNotNone(row, self.text)
        self.assertEqual(row.group(1), f"{statistics.median(r['real_time'] for r in dense.values()):.1f}")
        self.assertEqual(row.group(2), f"{statistics.median(r['real_time'] for r in sparse.values()):.1f}")
        self.assertEqual(row.group(3), f"{ratio:.2f}")

    def test_the_register_tile_line_gives_its_median_rate(self):
        tile = rounds_of(self.json, "register_tile/64")
        self.assertEqual(sorted(tile), list(range(ROUNDS)))
        rate = statistics.median(r["GFLOP"] for r in tile.values())  # a rate counter: GFLOP/s
        line = re.search(r"^The register tile .*: ([0-9.]+) GFLOP/s at depth 64", self.text, re.M)
        self.assertIsNotNone(line, self.text)
        self.assertEqual(line.group(1), f"{rate:.1f}")

    def test_a_failing_gqe_bench_fails_the_report(self):
        with tempfile.TemporaryDirectory(prefix="gqe-bench-report-") as out:
            done = report(out, "--repetitions", "1", "--min-time", "0.01", "--threads", "2000", "--filter", "^register_tile/64$")
            self.assertFalse(os.path.exists(os.path.join(out, "report.md")))
        self.assertEqual(done.returncode, 2)  # gqe-bench's own status: it refused --threads 2000
        self.assertIn("bench_report: error: gqe-bench failed with status 2", done.stderr)

    def test_bad_inputs_are_refused_with_their_reason(self):
        with tempfile.TemporaryDirectory(prefix="gqe-bench-report-") as out:
            empty = os.path.join(out, "empty.json")
            with open(empty, "w") as f:
                f.write("{}")
            cases = [(["--min-time", "nan"], "--min-time is nan"), (["--min-time", "0"], "--min-time is 0"),
                     (["--json", os.path.join(out, "missing.json")], "cannot read"),
                     (["--json", empty], "holds no benchmarks"), (["--out", empty], "is not a folder"),
                     (["--repetitions", "1", "--min-time", "0.01", "--filter", "^no_such_benchmark$"],
                      "ran no benchmark")]
            for args, words in cases:
                with self.subTest(args=args):
                    done = report(os.path.join(out, "run"), *args)
                    self.assertEqual(done.returncode, 2)
                    last = done.stderr.strip().splitlines()[-1]  # after the progress lines of a run
                    self.assertTrue(last.startswith("bench_report: error: "), done.stderr)
                    self.assertIn(words, last)
                    self.assertNotIn("Traceback", done.stderr)
                    run = os.path.join(out, "run")
                    self.assertFalse(os.path.exists(os.path.join(run, "bench.json")))
                    self.assertFalse(os.path.exists(os.path.join(run, "report.md")))

    def test_a_malformed_flag_is_refused_in_one_line(self):
        with tempfile.TemporaryDirectory(prefix="gqe-bench-report-") as out:
            done = report(out, "--repetitions", "three")
            self.assertEqual(done.returncode, 2)
            self.assertEqual(len(done.stderr.strip().splitlines()), 1, done.stderr)
            self.assertIn("bench_report: error: argument --repetitions: invalid int value", done.stderr)
            self.assertEqual(os.listdir(out), [])

    def test_counts_below_one_are_refused(self):
        for flag in ("--threads", "--repetitions"):
            with self.subTest(flag=flag), tempfile.TemporaryDirectory(prefix="gqe-bench-report-") as out:
                done = report(out, flag, "0")
                self.assertEqual(done.returncode, 2)
                self.assertEqual(done.stderr, f"bench_report: error: {flag} is 0; expected at least 1\n")
                self.assertEqual(os.listdir(out), [])


if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        GQE_BENCH = sys.argv.pop(1)
    if not GQE_BENCH or not os.access(GQE_BENCH, os.X_OK):
        sys.exit("usage: test_bench_report.py PATH/TO/gqe-bench (or GQE_BENCH=...)")
    unittest.main()
