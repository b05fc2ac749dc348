"""python -m gqe_torch.train: 2 processes under torchrun (gloo) against 1 process with the same
global batch, the result in gqe-run, and a gqe-train checkpoint trained on in PyTorch."""

import csv
import os
import socket
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import numpy as np
import torch

from common import (LOGITS_RTOL, PYTHON_DIR, call_module, gqe_train, gt, rel_err, run_gqe_run, write_text)
from gqe_torch import train as trainer

TINY = ["--hidden", "32", "--intermediate", "48", "--layers", "2", "--heads", "8", "--kv-heads", "4",
        "--head-dim", "8", "--seq-len", "32", "--steps", "6", "--log-every", "1", "--seed", "3"]
# 2 x B against 1 x 2B differ only in float32 summation order (the mean over tokens split in two,
# the all-reduce): the losses agree to about 2e-7 relative; parameters after 6 AdamW steps to
# 3e-7 to 2e-6 per tensor (norm-wise, measured over shapes and seeds), since Adam divides by
# sqrt(v) and so magnifies rounding in the few gradient entries near zero. The bounds leave a margin of 10x to 50x; the control run
# below (another global batch) differs by far more than either.
LOSS_RTOL = 1e-5
PARAM_RTOL = 1e-4


def read_log(folder):
    with open(os.path.join(folder, "train_log.csv")) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def param_errors(a, b):
    """Per-tensor ||a - b|| / ||a|| of two models' parameters, worst first."""
    sa, sb = a.state_dict(), b.state_dict()
    return sorted(((float((sa[n] - sb[n]).norm() / sa[n].norm()), n) for n in sa), reverse=True)


class Train(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.text = write_text(os.path.join(cls.tmp.name, "text.txt"))

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def path(self, *parts):
        return os.path.join(self.tmp.name, *parts)

    def train(self, out, *args):
        r = call_module("train", ["--text", self.text, "--out", out] + list(args))
        self.assertEqual(r.returncode, 0, r.stderr)
        return r

    def test_two_processes_equal_one_with_the_global_batch(self):
        two = self.path("torchrun")
        env = dict(os.environ, PYTHONPATH=PYTHON_DIR, OMP_NUM_THREADS="1")
        # torchrun as a module of this interpreter (the same program as /usr/bin/torchrun);
        # --redirects 2 --tee 2 is needed by Debian's torchrun on Python 3.11.
        command = [sys.executable, "-m", "torch.distributed.run", "--redirects", "2", "--tee", "2",
                   "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                   "--monitor_interval", "1",
                   "-m", "gqe_torch.train", "--text", self.text, "--out", two, "--batch", "4"] + TINY
        r = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240, cwd=self.tmp.name)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("on 2 process(es)", r.stderr)
        self.assertEqual(r.stderr.count("step      6/6"), 1)  # rank 0 alone reports
        self.assertEqual(sorted(os.listdir(two)), ["config.json", "model.safetensors", "train_log.csv"])

        one = self.path("one")
        self.train(one, "--batch", "8", *TINY)
        log1, log2 = read_log(one), read_log(two)
        self.assertEqual(len(log1), 6)
        for a, b in zip(log1, log2):
            for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
                self.assertLess(abs(a[key] - b[key]) / abs(a[key]), LOSS_RTOL, f"step {a['step']} {key}")
        m1, m2 = gt.load_pretrained(one), gt.load_pretrained(two)
        worst, name = param_errors(m1, m2)[0]
        print(f"\n2 x batch 4 against 1 x batch 8, 6 steps: losses within "
              f"{max(abs(a['loss'] - b['loss']) / a['loss'] for a, b in zip(log1, log2)):.1e}, "
              f"parameters within {worst:.1e} ({name})", file=sys.stderr)
        self.assertLess(worst, PARAM_RTOL, name)

        # Control: one process with batch 4 trains on half the global batch: far apart.
        half = self.path("half")
        self.train(half, "--batch", "4", *TINY)
        control = max(abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(log1, read_log(half)))
        self.assertGreater(control, 100 * LOSS_RTOL)
        self.assertGreater(param_errors(m1, gt.load_pretrained(half))[0][0], 100 * PARAM_RTOL)

        # The torchrun folder runs in gqe-run.
        ids = list(b"query experts route")
        with torch.no_grad():
            ours = m2(torch.tensor([ids]))[0].double().numpy()
        logits, experts = run_gqe_run(two, ids, self.path("out.safetensors"))
        self.assertLess(rel_err(logits, ours), LOGITS_RTOL)
        np.testing.assert_array_equal(experts, torch.stack(m2.expert_indices)[:, 0].numpy())

    def test_gqe_train_checkpoint_keeps_training(self):
        runs = self.path("gqe-train")
        r = subprocess.run([gqe_train(), "--task", "text", "--text", self.text, "--out", runs, "--steps", "5",
                            "--seeds", "1", "--hidden", "32", "--intermediate", "48", "--head-dim", "8",
                            "--seq-len", "32", "--batch", "8", "--threads", "1"],
                           capture_output=True, text=True, timeout=240)
        self.assertEqual(r.returncode, 0, r.stderr)
        start = os.path.join(runs, "gqe-seed0")
        self.assertTrue(os.path.exists(os.path.join(start, "optimizer.safetensors")))  # gqe-train's run folder

        # gqe_torch reads it as gqe-run does.
        model = gt.load_pretrained(start)
        ids = list(b"the router learns")
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0].double().numpy()
        logits, experts = run_gqe_run(start, ids, self.path("start.safetensors"))
        self.assertLess(rel_err(logits, ours), LOGITS_RTOL)
        np.testing.assert_array_equal(experts, torch.stack(model.expert_indices)[:, 0].numpy())

        # Training continues from those weights: step 1's loss is the checkpoint's own on batch 0.
        data = trainer.TextData(self.text, 32)
        x, y = data.train_batch(seed=5, step=0, rank=0, batch=8, world=1)
        with torch.no_grad():
            first = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
        more = self.path("continued")
        self.train(more, "--init", start, "--steps", "40", "--batch", "8", "--seq-len", "32", "--seed", "5")
        log = read_log(more)
        self.assertLess(abs(log[0]["lm_loss"] - first) / first, LOSS_RTOL)
        continued = gt.load_pretrained(more)
        before, after = trainer.evaluate(model, data, 8, "cpu"), trainer.evaluate(continued, data, 8, "cpu")
        print(f"\ngqe-train checkpoint, held-out loss {before:.3f} -> {after:.3f} nats/byte after 40 gqe_torch "
              "steps", file=sys.stderr)
        # 40 steps from a 5-step model take the byte loss down by about a nat (log 256 = 5.55 is chance).
        self.assertLess(after, before - 0.3)
        logits, _ = run_gqe_run(more, ids, self.path("more.safetensors"))
        with torch.no_grad():
            self.assertLess(rel_err(logits, continued(torch.tensor([ids]))[0].double().numpy()), LOGITS_RTOL)

    def test_refusals_write_nothing(self):
        short = self.path("short.txt")
        with open(short, "w") as f:
            f.write("too short")
        fixture = os.path.join(os.path.dirname(PYTHON_DIR), "tests", "data", "gqe_k1_m2")  # vocab 37
        cases = [
            (["--text", short], "needs at least"),
            (["--text", self.text, "--init", fixture], "vocab_size 37"),
            (["--text", self.text, "--init", fixture, "--hidden", "64"], "--hidden"),
            (["--text", self.text, "--heads", "6"], "num_attention_heads"),
            (["--text", self.text, "--top-k", "3"], "gqe_top_k"),
            (["--text", self.text, "--warmup", "2000"], "--warmup"),
            # About 760 GiB of weights, gradients and moments: refused before the model is built.
            (["--text", self.text, "--hidden", "65536", "--layers", "1024"], "parameters needs at least"),
        ]
        for i, (args, words) in enumerate(cases):
            with self.subTest(args=args):
                out = self.path(f"refused{i}")
                r = call_module("train", args + ["--out", out])
                self.assertEqual(r.returncode, 2, r.stderr)
                self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
                self.assertIn(words, r.stderr)
                self.assertFalse(os.path.exists(out))
        # The size asked for is the least that trains: with --seq-len 1, 20 bytes (2 in the tail).
        for size, fits in ((19, False), (20, True)):
            text = self.path(f"bytes{size}.txt")
            with open(text, "wb") as f:
                f.write(bytes(range(size)))
            if fits:
                self.assertEqual(trainer.TextData(text, 1).split, 18)
            else:
                with self.assertRaisesRegex(trainer.BadInput, "needs at least 20 bytes"):
                    trainer.TextData(text, 1)
        # torchrun's variables set by hand: refused in one line, not a traceback.
        for env, words in (({"WORLD_SIZE": "two"}, "WORLD_SIZE is 'two'"), ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK below"),
                           ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": ""}, "expected a run under torchrun")):
            with self.subTest(env=env), mock.patch.dict(os.environ, env):
                r = call_module("train", ["--text", self.text, "--out", self.path("by-hand")])
                self.assertEqual(r.returncode, 2, r.stderr)
                self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
                self.assertIn(words, r.stderr)
                self.assertFalse(os.path.exists(self.path("by-hand")))
        # An empty --out is refused, not taken for the current folder.
        r = call_module("train", ["--text", self.text, "--out", ""])
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("--out is empty; expected a path", r.stderr)
        # A folder whose permissions would let root write but that refuses every new file.
        r = call_module("train", ["--text", self.text, "--out", "/proc/gqe-never"])
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("/proc is not a writable folder", r.stderr)
        self.assertEqual(r.stdout, "")  # refused before training
        # An --out that cannot be made is refused before training, not at the first save.
        a_file = self.path("a-file")
        with open(a_file, "w") as f:
            f.write("x")
        r = call_module("train", ["--text", self.text, "--out", os.path.join(a_file, "run")])
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)  # no "training a ..." line first
        self.assertIn("not a writable folder", r.stderr)
        # An existing checkpoint is never overwritten.
        out = self.path("taken")
        self.train(out, "--steps", "1", "--batch", "2", "--seq-len", "16", "--hidden", "16", "--head-dim", "4")
        before = os.path.getmtime(os.path.join(out, "model.safetensors"))
        r = call_module("train", ["--text", self.text, "--out", out])
        self.assertEqual(r.returncode, 2)
        self.assertIn("already holds a checkpoint", r.stderr)
        self.assertEqual(os.path.getmtime(os.path.join(out, "model.safetensors")), before)


if __name__ == "__main__":
    unittest.main()
