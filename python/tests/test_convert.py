"""python -m gqe_torch.convert: state_dict -> gqe folder -> state_dict, and its refusals; the
programs' --help and bad-input behaviour."""

import collections
import contextlib
import io
import json
import os
import tempfile
import unittest

import numpy as np
import torch

from common import LOGITS_RTOL, call_module, config, gt, random_model, rel_err, run_gqe_run, run_module


def hf_style_config(cfg, **extra):
    """A config.json as a Hugging Face Llama-style model built on the GQE layer might write it."""
    d = dict(cfg.to_dict(), architectures=["MyGQEForCausalLM"], model_type="my-gqe", torch_dtype="float32",
             use_cache=True, bos_token_id=1, eos_token_id=2, use_rope=True)
    d.update(extra)
    return d


class Convert(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.ids = [5, 17, 2, 40, 40, 8, 13, 21, 34, 1]

    def tearDown(self):
        self.tmp.cleanup()

    def path(self, *parts):
        return os.path.join(self.tmp.name, *parts)

    def write_source(self, name, state, cfg_dict):
        folder = self.path(name)
        os.makedirs(folder)
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(cfg_dict, f)
        return folder

    def convert(self, *args):
        return call_module("convert", args)

    def assertRefused(self, result, *words, absent=None):
        self.assertEqual(result.returncode, 2, result.stderr)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        for w in words:
            self.assertIn(w, lines[0])
        if absent is not None:
            self.assertFalse(os.path.exists(absent), f"{absent} was written")

    def test_round_trip_through_gqe_run(self):
        cfg = config(gqe_top_k=2, tie_word_embeddings=True)
        model = random_model(cfg, 0)
        state = model.state_dict()
        # What torch.save(ddp_model.state_dict()) of such a model holds: a "module." prefix, the tied
        # head under its own name too, and the rotary frequencies some Llama versions keep.
        saved = {"module." + n: t for n, t in state.items()}
        saved["module.lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        for i in range(cfg.num_hidden_layers):
            saved[f"module.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = \
                1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)
        src = self.write_source("src", saved, hf_style_config(cfg))
        r = self.convert(os.path.join(src, "pytorch_model.bin"), self.path("gqe"))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(sorted(os.listdir(self.path("gqe"))), ["config.json", "model.safetensors"])
        with open(self.path("gqe", "config.json")) as f:
            written = json.load(f)
        self.assertEqual(written["eos_token_id"], 2)  # unknown keys travel along
        self.assertEqual(written["architectures"], ["GQEForCausalLM"])

        with torch.no_grad():
            ours = model(torch.tensor([self.ids]))[0].double().numpy()
        logits, experts = run_gqe_run(self.path("gqe"), self.ids, self.path("out.safetensors"))
        self.assertLess(rel_err(logits, ours), LOGITS_RTOL)
        np.testing.assert_array_equal(experts, torch.stack(model.expert_indices)[:, 0].numpy())

        # And back: gqe's names, the same values, config.json beside the file.
        r = self.convert(self.path("gqe"), self.path("back", "model.pt"))
        self.assertEqual(r.returncode, 0, r.stderr)
        back = torch.load(self.path("back", "model.pt"), weights_only=True)
        self.assertEqual(list(back), list(state))
        for n in state:
            self.assertTrue(torch.equal(back[n], state[n]), n)
        reloaded = gt.GQEForCausalLM(gt.load_config(self.path("back", "config.json")))
        reloaded.load_state_dict(back, strict=True)

    def test_bf16_and_a_plain_file(self):
        cfg = config(attention_type="gqa", gqe_top_k=None, gqe_variant=None)
        model = random_model(cfg, 1)
        src = self.write_source("plain", model.state_dict(), cfg.to_dict())
        r = self.convert(src, self.path("gqe"), "--dtype", "BF16")  # a folder with pytorch_model.bin
        self.assertEqual(r.returncode, 0, r.stderr)
        loaded = gt.load_pretrained(self.path("gqe"))
        for (n, w), back in zip(model.state_dict().items(), loaded.state_dict().values()):
            self.assertTrue(torch.equal(back, w.bfloat16().float()), n)

    def test_refusals_name_the_key_and_write_nothing(self):
        cfg = config()
        state = random_model(cfg, 2).state_dict()
        good = hf_style_config(cfg)
        cases = [
            ("attention bias", dict(state, **{"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}), good,
             ["model.layers.0.self_attn.q_proj.bias", "attention biases"]),
            ("mlp bias", dict(state, **{"model.layers.1.mlp.down_proj.bias": torch.zeros(32)}), good,
             ["model.layers.1.mlp.down_proj.bias", "MLP biases"]),
            ("use_rope", state, dict(good, use_rope=False), ['"use_rope"']),
            ("rope_scaling", state, dict(good, rope_scaling={"rope_type": "linear", "factor": 4.0}),
             ['"rope_scaling"']),
            ("sliding_window", state, dict(good, sliding_window=4096), ['"sliding_window"']),
            ("use_sliding_window", state, dict(good, use_sliding_window=True, sliding_window=64),
             ['"use_sliding_window"']),
            ("attention_bias", state, dict(good, attention_bias=True), ['"attention_bias"']),
            ("hidden_act", state, dict(good, hidden_act="gelu"), ['"hidden_act"']),
            ("scaled rotary", dict(state, **{"model.layers.0.self_attn.rotary_emb.inv_freq":
                                              1.0 / 500000.0 ** (torch.arange(0, 8, 2).float() / 8)}), good,
             ["model.layers.0.self_attn.rotary_emb.inv_freq"]),
            ("missing", {n: t for n, t in state.items() if "router" not in n}, good,
             ["model.layers.0.self_attn.router.weight", "missing"]),
            ("untied head", dict(state), dict(good, tie_word_embeddings=True), ["lm_head.weight"]),
            ("sparse", dict(state, **{"model.norm.weight": state["model.norm.weight"].to_sparse()}), good,
             ["model.norm.weight", "expected a dense tensor"]),
            ("objects", dict(state, extra=collections.Counter()), good, ["holds other objects"]),
        ]
        for i, (name, sd, cfg_dict, words) in enumerate(cases):
            with self.subTest(case=name):
                src = self.write_source(f"case{i}", sd, cfg_dict)
                dst = self.path(f"out{i}")
                self.assertRefused(self.convert(src, dst), *words, absent=dst)
        # Not a state_dict at all, no config, an occupied destination.
        with open(self.path("junk.bin"), "wb") as f:
            f.write(b"\x00not a pickle")
        with open(self.path("config.json"), "w") as f:
            json.dump(good, f)
        self.assertRefused(self.convert(self.path("junk.bin"), self.path("o1")), "junk.bin", absent=self.path("o1"))
        os.makedirs(self.path("lonely"))
        torch.save(state, self.path("lonely", "sd.pt"))
        self.assertRefused(self.convert(self.path("lonely", "sd.pt"), self.path("o2")), "config.json",
                           absent=self.path("o2"))
        os.makedirs(self.path("config_only"))
        with open(self.path("config_only", "config.json"), "w") as f:
            json.dump(good, f)
        self.assertRefused(self.convert(self.path("config_only"), self.path("o3")), "holds neither model.safetensors",
                           absent=self.path("o3"))
        src = self.write_source("fine", state, good)
        self.assertEqual(self.convert(src, self.path("taken")).returncode, 0)
        self.assertRefused(self.convert(src, self.path("taken")), "already holds a checkpoint")
        self.assertRefused(self.convert(self.path("taken"), self.path("taken")), "is a folder")
        os.makedirs(self.path("x"))
        with open(self.path("x", "config.json"), "w") as f:  # someone else's config beside DST
            f.write("{}")
        self.assertRefused(self.convert(self.path("taken"), self.path("x", "sd.pt")), "config.json",
                           absent=self.path("x", "sd.pt"))


class Programs(unittest.TestCase):
    """Each program's command line as a user runs it: python -m, a new process."""

    def test_help(self):
        for module in ("train", "convert"):
            with self.subTest(program=module):
                r = run_module(module, ["--help"])
                self.assertEqual(r.returncode, 0, r.stderr)
                self.assertIn("usage:", r.stdout)
                self.assertEqual(r.stderr, "")

    def test_bad_command_lines(self):
        cases = [("convert", ["a", "b", "c"]), ("train", ["--text", "t", "--out", "o", "--steps", "many"])]
        for module, args in cases:
            with self.subTest(program=module, args=args):
                r = run_module(module, args)
                self.assertEqual(r.returncode, 2, r.stderr)
                self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
                self.assertTrue(r.stderr.startswith(f"gqe_torch.{module}: error: "), r.stderr)

    def test_unwritable_destinations_are_refused_before_reading(self):
        fixture = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                               "tests", "data", "gqe_k1_m2")
        with tempfile.TemporaryDirectory() as tmp:
            a_file = os.path.join(tmp, "a-file")
            with open(a_file, "w") as f:
                f.write("x")
            os.makedirs(os.path.join(tmp, "dst", "config.json"))  # a folder where config.json would go
            for dst, words in ((os.path.join(a_file, "x.bin"), "not a writable folder"),
                               (os.path.join(tmp, "dst", "model.bin"), "is not a file")):
                with self.subTest(dst=dst):
                    r = call_module("convert", [fixture, dst])
                    self.assertEqual(r.returncode, 2, r.stderr)
                    self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
                    self.assertIn(words, r.stderr)
            self.assertEqual(os.listdir(os.path.join(tmp, "dst")), ["config.json"])

    def test_an_empty_destination_is_refused(self):
        fixture = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                               "tests", "data", "gqe_k1_m2")
        r = call_module("convert", [fixture, ""])
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
        self.assertIn("DST is empty", r.stderr)

    def test_out_of_memory_is_one_line(self):
        from gqe_torch import cli

        def runs_out(argv):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:75] DefaultCPUAllocator: not enough memory: you tried "
                               "to allocate 1099511627776 bytes.")

        def fails(argv):
            raise RuntimeError("a bug, not the user's input")

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            self.assertEqual(cli.run("gqe_torch.train", runs_out, []), 2)
            self.assertEqual(cli.run("gqe_torch.train", lambda argv: (_ for _ in ()).throw(MemoryError()), []), 2)
            with self.assertRaises(RuntimeError):  # anything else stays a traceback, to be reported
                cli.run("gqe_torch.train", fails, [])
        lines = err.getvalue().splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(all(l.startswith("gqe_torch.train: error: out of memory") for l in lines), lines)

    def test_more_bad_command_lines(self):
        cases = [("convert", []), ("convert", ["/nonexistent", "x"]), ("convert", ["a", "b", "--dtype", "F8"]),
                 ("train", []), ("train", ["--text", "t", "--out", "o", "--bogus"]),
                 ("train", ["--text", "/nonexistent", "--out", "o"]), ("train", ["--text", "t", "--out", "o", "--lr", "-1"])]
        for module, args in cases:
            with self.subTest(program=module, args=args):
                r = call_module(module, args)
                self.assertEqual(r.returncode, 2, r.stderr)
                self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
                self.assertTrue(r.stderr.startswith(f"gqe_torch.{module}: error: "), r.stderr)
        # An option of one value given twice is refused, as gqe-train and gqe-run refuse it.
        for module, args, words in (("train", ["--text", "t", "--out", "o", "--steps", "1", "--steps=2"], "--steps: given 2 times"),
                                    ("convert", ["a", "b", "--dtype", "F32", "--dtype", "BF16"], "--dtype: given 2 times")):
            with self.subTest(program=module, args=args):
                r = call_module(module, args)
                self.assertEqual(r.returncode, 2, r.stderr)
                self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
                self.assertIn(words, r.stderr)
        # gqe-train's integers: plain decimal, in its ranges (refused before --text is read)
        for flag, value, words in (("--steps", "1_0", "not a decimal integer"), ("--seq-len", " 16 ", "not a decimal integer"),
                                   ("--batch", "\u0662", "not a decimal integer"),
                                   ("--batch", "1000000000000", "expected 1 to 65536"), ("--head-dim", "1", "expected 2 to 2048")):
            with self.subTest(flag=flag, value=value):
                r = call_module("train", ["--text", "t", "--out", "o", flag, value])
                self.assertEqual(r.returncode, 2, r.stderr)
                self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
                self.assertIn(f"argument {flag}: ", r.stderr)
                self.assertIn(words, r.stderr)


if __name__ == "__main__":
    unittest.main()
