#!/usr/bin/env python3
"""tools/make_large_checkpoint.py at a tiny size, into a folder that already holds files.

    /usr/bin/python3 tests/scripts/test_make_large_checkpoint.py GQE_RUN

Checked: the previous weight files it replaces are its own kind only (a single file, an index and
its shards); the user's other files, those whose names start with "model" included, stay; the
folder written, sharded or not, runs in gqe-run with the same logits; a bad --out or --seed exits
with status 2 and one line, writing nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "make_large_checkpoint.py")
TINY = ["--hidden", "8", "--layers", "1", "--vocab", "16", "--heads", "4", "--kv-heads", "2", "--head-dim", "4",
        "--intermediate", "8"]
GQE_RUN = ""


def make(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=120)


def logits(folder, tmp):
    out = os.path.join(tmp, "logits.safetensors")
    r = subprocess.run([GQE_RUN, "-m", folder, "--prompt-ids", "1,2,3", "-n", "1", "--logits-out", out],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with open(out, "rb") as f:
        data = f.read()
    os.remove(out)
    return data


class MakeLargeCheckpoint(unittest.TestCase):
    def test_replaces_only_its_own_files(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "m")
            os.makedirs(os.path.join(out, "models_dir"))
            keep = ["model.py", "model_notes.txt", "model-1-of-2.safetensors", "notes.txt"]
            for name in keep:
                with open(os.path.join(out, name), "w") as f:
                    f.write("the user's\n")
            r = make("--out", out, "--shard-mb", "0", *TINY)
            self.assertEqual(r.returncode, 0, r.stderr)
            single = logits(out, tmp)
            # Sharded into the same folder: the single file goes, the shards and index come.
            r = make("--out", out, "--shard-mb", "1", "--dtype", "F32", *TINY)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertFalse(os.path.exists(os.path.join(out, "model.safetensors")))
            self.assertTrue(os.path.exists(os.path.join(out, "model.safetensors.index.json")))
            self.assertEqual(logits(out, tmp), single)
            # And back: the index and its shards go.
            r = make("--out", out, "--shard-mb", "0", *TINY)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(sorted(os.listdir(out)),
                             sorted(keep + ["models_dir", "config.json", "model.safetensors"]))
            self.assertEqual(logits(out, tmp), single)
            for name in keep:
                with open(os.path.join(out, name)) as f:
                    self.assertEqual(f.read(), "the user's\n", name)

    def test_bad_flags(self):
        with tempfile.TemporaryDirectory() as tmp:
            a_file = os.path.join(tmp, "a-file")
            with open(a_file, "w") as f:
                f.write("x")
            for args, words in ((["--out", a_file], "is not a folder"),
                                (["--out", os.path.join(a_file, "m")], "cannot make --out"),
                                (["--out", os.path.join(tmp, "m"), "--seed", "-1"], "--seed -1"),
                                (["--out", os.path.join(tmp, "m"), "--hidden", "0"], "positive")):
                with self.subTest(args=args):
                    r = make(*args, *TINY[2:] if "--hidden" in args else TINY)
                    self.assertEqual(r.returncode, 2, r.stderr)
                    self.assertIn(words, r.stderr)
                    self.assertNotIn("Traceback", r.stderr)
            self.assertEqual(sorted(os.listdir(tmp)), ["a-file"])


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: test_make_large_checkpoint.py GQE_RUN")
    GQE_RUN = sys.argv.pop(1)
    unittest.main()
