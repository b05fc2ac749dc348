#!/usr/bin/env python3
"""Independent checks of the float64 reference (tools/gqe_reference.py).

    /usr/bin/python3 -m unittest tools/test_reference.py
    /usr/bin/python3 tools/test_reference.py

The hand-computed cases below use explicit loops and scalar maths, not the reference's own
helpers, so that a shared mistake is unlikely.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
import sys
import tempfile
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gqe_reference as ref  # noqa: E402


def small_config(**kw) -> ref.Config:
    d = {"attention_type": "gqe", "vocab_size": 19, "hidden_size": 12, "intermediate_size": 15,
         "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 4,
         "gqe_top_k": 2, "gqe_variant": "gqe"}
    d.update(kw)
    return ref.config_from_dict(d)


def naive_rope(x: np.ndarray, theta: float) -> np.ndarray:
    """Rotate each pair (i, i + d_h/2) of row t by angle t * theta^(-2i/d_h), one scalar at a time."""
    T, dh = x.shape
    half = dh // 2
    out = np.empty_like(x)
    for t in range(T):
        for i in range(half):
            a = t * theta ** (-2.0 * i / dh)
            c, s = math.cos(a), math.sin(a)
            out[t, i] = x[t, i] * c - x[t, i + half] * s
            out[t, i + half] = x[t, i + half] * c + x[t, i] * s
    return out


def naive_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal softmax attention with scalar loops (query t sees keys 0..t)."""
    T, dh = q.shape
    out = np.zeros((T, v.shape[1]))
    for t in range(T):
        scores = [sum(q[t, c] * k[s, c] for c in range(dh)) / math.sqrt(dh) for s in range(t + 1)]
        top = max(scores)
        e = [math.exp(x - top) for x in scores]
        z = sum(e)
        for s in range(t + 1):
            out[t] += e[s] / z * v[s]
    return out


class TestSafetensors(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.tmp.name, "t.safetensors")

    def tearDown(self):
        self.tmp.cleanup()

    def test_round_trip_each_dtype(self):
        rng = np.random.default_rng(0)
        tensors = {
            "f64": rng.standard_normal((3, 5)),
            "f32": rng.standard_normal((4,)).astype(np.float32),
            "f16": rng.standard_normal((2, 3)).astype(np.float16),
            "bf16": ref.bf16_bits_to_float(rng.integers(0, 0x7F00, size=(2, 2, 2)).astype(np.uint16)),
            "i32": rng.integers(-(2**31), 2**31 - 1, size=(7,)).astype(np.int32),
            "scalar": np.array(2.5),
            "empty": np.zeros((0, 3), dtype=np.float32),
        }
        dtypes = {"bf16": "BF16"}
        ref.write_safetensors(self.path, tensors, dtypes)
        back, stored, meta = ref.read_safetensors_full(self.path)
        self.assertEqual(meta, {"format": "pt"})
        self.assertEqual(stored, {"f64": "F64", "f32": "F32", "f16": "F16", "bf16": "BF16", "i32": "I32",
                                  "scalar": "F64", "empty": "F32"})
        for name, arr in tensors.items():
            self.assertEqual(back[name].shape, arr.shape, name)
            np.testing.assert_array_equal(back[name], arr.astype(back[name].dtype), err_msg=name)
        self.assertEqual(back["i32"].dtype, np.int32)

    def test_layout(self):
        ref.write_safetensors(self.path, {"a": np.arange(3, dtype=np.float32), "b": np.ones(2)})
        with open(self.path, "rb") as f:
            blob = f.read()
        (n,) = struct.unpack("<Q", blob[:8])
        self.assertEqual((8 + n) % 8, 0)  # data starts aligned
        header = json.loads(blob[8 : 8 + n])
        self.assertEqual(header["__metadata__"], {"format": "pt"})
        # Offsets count from the end of the header, not from the start of the file.
        self.assertEqual(header["a"], {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]})
        self.assertEqual(header["b"], {"dtype": "F64", "shape": [2], "data_offsets": [12, 28]})
        self.assertEqual(np.frombuffer(blob[8 + n : 8 + n + 12], "<f4").tolist(), [0.0, 1.0, 2.0])
        self.assertEqual(len(blob), 8 + n + 28)

    def test_bf16_round_to_nearest_even(self):
        cases = [
            (1.0, 0x3F80),
            (1.0 + 2**-8, 0x3F80),  # halfway, down to even
            (1.0 + 3 * 2**-8, 0x3F82),  # halfway, up to even
            (1.0 + 2**-8 + 2**-20, 0x3F81),  # just above halfway
            (-(1.0 + 2**-8 + 2**-20), 0xBF81),
            (1.0 + 2**-8 + 2**-40, 0x3F81),  # float64 only: rounding via float32 would give 0x3F80
            (0.0, 0x0000),
            (-0.0, 0x8000),
            (math.inf, 0x7F80),
            (-math.inf, 0xFF80),
            (3.5e38, 0x7F80),  # above the largest BF16: overflows to infinity
            (2.0**-133, 0x0001),  # smallest subnormal
            (2.0**-134, 0x0000),  # halfway to zero: down to even
            (-(2.0**-134), 0x8000),  # the same, negative: -0, as IEEE rounding (and torch) give
            (-(2.0**-140), 0x8000),
            (3 * 2.0**-134, 0x0002),  # halfway between 1 and 2 ulps: up to even
        ]
        got = ref.float_to_bf16_bits(np.array([c[0] for c in cases]))
        for (value, want), g in zip(cases, got):
            self.assertEqual(int(g), want, f"{value!r}: got {int(g):#06x}, want {want:#06x}")
        self.assertEqual(int(ref.float_to_bf16_bits(np.array([math.nan]))[0]) & 0x7FC0, 0x7FC0)

    def test_bf16_matches_float32_bit_trick(self):
        # For float32 inputs the classic integer rounding is exact; compare on many values.
        rng = np.random.default_rng(1)
        bits = rng.integers(0, 2**32, size=4000, dtype=np.uint64).astype(np.uint32)
        x = bits.view(np.float32)
        x = x[np.isfinite(x) & (np.abs(x) < 3.0e38)]
        b = x.view(np.uint32).astype(np.uint64)
        want = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
        np.testing.assert_array_equal(ref.float_to_bf16_bits(x), want)

    def test_bf16_file_stores_rounded_values(self):
        x = np.array([1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.0], dtype=np.float32)
        ref.write_safetensors(self.path, {"w": x}, {"w": "BF16"})
        back = ref.read_safetensors(self.path)["w"]
        np.testing.assert_array_equal(back, [1.0, 1.0 + 2**-6, -2.0])

    def test_malformed_files_refused(self):
        with open(self.path, "wb") as f:
            f.write(struct.pack("<Q", 1000) + b"{}")
        with self.assertRaises(ref.BadInput):
            ref.read_safetensors(self.path)
        header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
        with open(self.path, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header + b"\0" * 12)
        with self.assertRaises(ref.BadInput):
            ref.read_safetensors(self.path)


class TestConfigAndCheckpoint(unittest.TestCase):
    def test_llama_defaults(self):
        cfg = ref.config_from_dict({"vocab_size": 10, "hidden_size": 16, "intermediate_size": 7,
                                    "num_hidden_layers": 1, "num_attention_heads": 4, "rope_scaling": None,
                                    "model_type": "llama"})
        self.assertEqual((cfg.attention_type, cfg.num_key_value_heads, cfg.head_dim), ("gqa", 4, 4))
        self.assertEqual((cfg.rms_norm_eps, cfg.rope_theta, cfg.tie_word_embeddings), (1e-6, 10000.0, False))
        self.assertEqual((cfg.gqe_variant, cfg.max_position_embeddings), ("gqe", 4096))

    def test_refused_configs(self):
        base = {"attention_type": "gqe", "vocab_size": 10, "hidden_size": 16, "intermediate_size": 7,
                "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "gqe_top_k": 1}
        for change in ({"gqe_top_k": None}, {"gqe_top_k": 3}, {"rope_scaling": {"type": "linear"}},
                       {"attention_bias": True}, {"mlp_bias": True}, {"num_key_value_heads": 3},
                       {"gqe_variant": "soft"}, {"head_dim": 5}, {"vocab_size": 0}):
            with self.subTest(change=change), self.assertRaises(ref.BadInput):
                ref.config_from_dict({**base, **change})

    def test_slot_counts(self):
        self.assertEqual(small_config().num_slots, 2 * 2 + 2)
        self.assertEqual(small_config(gqe_variant="hard_concat").num_slots, 4)
        self.assertEqual(small_config(attention_type="gqa").num_slots, 6)

    def test_checkpoint_round_trip_each_dtype(self):
        config = {"attention_type": "gqe", "vocab_size": 11, "hidden_size": 8, "intermediate_size": 5,
                  "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "gqe_top_k": 1, "tie_word_embeddings": True}
        with tempfile.TemporaryDirectory() as tmp:
            for dtype in ("F64", "F32", "F16", "BF16"):
                folder = os.path.join(tmp, dtype)
                cfg, stored = ref.make_random_checkpoint(folder, config, 3, dtype)
                cfg2, loaded = ref.load_model(folder)
                self.assertEqual(cfg, cfg2)
                self.assertNotIn("lm_head.weight", loaded)
                exact = ref.random_weights(cfg, 3)
                for name in exact:
                    np.testing.assert_array_equal(loaded[name], stored[name])
                    rel = {"F64": 0, "F32": 2**-24, "F16": 2**-11, "BF16": 2**-8}[dtype]
                    np.testing.assert_allclose(loaded[name], exact[name], rtol=rel, atol=0)
                stored_dtypes = ref.read_safetensors_full(os.path.join(folder, "model.safetensors"))[1]
                self.assertEqual(set(stored_dtypes.values()), {dtype})

    def test_command_line_refusals(self):
        config = json.dumps({"vocab_size": 11, "hidden_size": 8, "intermediate_size": 5, "num_hidden_layers": 1,
                             "num_attention_heads": 2})
        with tempfile.TemporaryDirectory() as tmp:
            a_file = os.path.join(tmp, "a-file")
            with open(a_file, "w") as f:
                f.write("x")
            for args, words in ((["--make-random", os.path.join(tmp, "m"), "--seed", "-5"], "seed -5 is negative"),
                                (["--make-random", os.path.join(a_file, "m")], "cannot make")):
                with self.subTest(args=args):
                    err = io.StringIO()
                    with contextlib.redirect_stderr(err):
                        self.assertEqual(ref.main(args + ["--config-json", config]), 2)
                    self.assertTrue(err.getvalue().startswith("gqe_reference: error: "), err.getvalue())
                    self.assertIn(words, err.getvalue())
            self.assertEqual(os.listdir(tmp), ["a-file"])

    def test_check_weights_refuses_bad_sets(self):
        cfg = small_config()
        w = ref.random_weights(cfg, 0)
        ref.check_weights(cfg, w)
        for mutate in (lambda d: d.pop("model.norm.weight"),
                       lambda d: d.__setitem__("extra.weight", np.zeros(3)),
                       lambda d: d.__setitem__("lm_head.weight", np.zeros((19, 11)))):
            bad = dict(w)
            mutate(bad)
            with self.assertRaises(ref.BadInput):
                ref.check_weights(cfg, bad)


class TestPieces(unittest.TestCase):
    def test_rms_norm(self):
        x = np.array([[3.0, 4.0]])
        w = np.array([2.0, 0.5])
        scale = 1.0 / math.sqrt((9 + 16) / 2 + 0.1)
        np.testing.assert_allclose(ref.rms_norm(x, w, 0.1), [[3 * scale * 2, 4 * scale * 0.5]], rtol=1e-15)

    def test_rope(self):
        rng = np.random.default_rng(2)
        x = rng.standard_normal((9, 6))
        cos, sin = ref.rope_cos_sin(np.arange(9), 6, 300.0)
        y = ref.apply_rope(x, cos, sin)
        np.testing.assert_allclose(y, naive_rope(x, 300.0), rtol=0, atol=1e-14)
        np.testing.assert_array_equal(y[0], x[0])  # position 0 is the identity
        np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-14)
        # q(m) . k(n) depends only on m - n.
        q, k = rng.standard_normal(6), rng.standard_normal(6)
        rq = ref.apply_rope(np.tile(q, (9, 1)), cos, sin)
        rk = ref.apply_rope(np.tile(k, (9, 1)), cos, sin)
        self.assertAlmostEqual(rq[5] @ rk[2], rq[7] @ rk[4], places=12)
        self.assertAlmostEqual(rq[3] @ rk[3], q @ k, places=12)

    def test_attention_matches_loops_and_bottom_right_chunks(self):
        rng = np.random.default_rng(3)
        q, k, v = (rng.standard_normal((7, 4)) for _ in range(3))
        full = ref.causal_attention(q, k, v)
        np.testing.assert_allclose(full, naive_attention(q, k, v), rtol=0, atol=1e-14)
        # A chunk of the last C queries against all keys (P cached) gives the same rows.
        for P in (0, 3, 6):
            np.testing.assert_allclose(ref.causal_attention(q[P:], k, v), full[P:], rtol=0, atol=1e-15)

    def test_route_order_and_ties(self):
        cfg = small_config(num_attention_heads=6, num_key_value_heads=2, gqe_top_k=2)
        x = np.eye(12)[:3]  # token t reads router column t
        wr = np.zeros((6, 12))  # [G*M, d]
        wr[:, 0] = [0.1, 0.5, 0.5, 3.0, 2.0, 1.0]  # token 0: group 0 ties experts 1 and 2
        wr[:, 1] = [1.0, 2.0, 3.0, 0.0, 0.0, 0.0]  # token 1: group 1 all equal
        wr[:, 2] = [-1.0, -2.0, -0.5, 7.0, 9.0, 8.0]
        logits, probs, idx = ref.route(x, wr, cfg)
        self.assertEqual(idx.shape, (3, 2, 2))
        self.assertEqual(idx[0].tolist(), [[1, 2], [0, 1]])
        self.assertEqual(idx[1].tolist(), [[2, 1], [0, 1]])
        self.assertEqual(idx[2].tolist(), [[2, 0], [1, 2]])
        np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-15)
        np.testing.assert_allclose(probs[1, 1], [1 / 3] * 3, rtol=1e-15)

    def test_load_balancing_loss_by_hand(self):
        probs = np.array([[[0.7, 0.3]], [[0.4, 0.6]], [[0.9, 0.1]]])  # [T=3, G=1, M=2]
        idx = np.array([[[0]], [[1]], [[0]]])  # [T, G, k=1]
        f = [2 / 3, 1 / 3]
        P = [(0.7 + 0.4 + 0.9) / 3, (0.3 + 0.6 + 0.1) / 3]
        self.assertAlmostEqual(ref.load_balancing_loss(probs, idx), 2 * (f[0] * P[0] + f[1] * P[1]), places=15)


class TestGqe(unittest.TestCase):
    def layer(self, cfg, seed=4, T=9):
        w = ref.random_weights(cfg, seed)
        lw = ref.layer_weights(w, 0)
        x = np.random.default_rng(seed).standard_normal((T, cfg.hidden_size))
        return x, lw

    def test_uniform_router_k_equals_m_by_hand(self):
        cfg = small_config(num_attention_heads=6, num_key_value_heads=2, gqe_top_k=3, head_dim=4,
                           rope_theta=50.0)
        x, lw = self.layer(cfg)
        lw["router"] = np.zeros_like(lw["router"])
        y, info = ref.gqe_attention(x, lw, cfg, np.arange(x.shape[0]))
        dh, G, M = 4, 2, 3

        # Equal p: every token keeps all experts in index order, p = 1/M, w = 1/(G*M).
        self.assertTrue((info["expert_indices"] == np.arange(3)).all())
        np.testing.assert_allclose(info["renorm_weights"], 1 / 6, rtol=1e-15)
        self.assertAlmostEqual(info["aux_loss"], 3.0, places=14)

        wq, wk, wv = lw["q_proj"], lw["k_proj"], lw["v_proj"]
        keys = [naive_rope(x @ wk[g * dh : (g + 1) * dh].T, 50.0) for g in range(G)]
        vals = [x @ wv[g * dh : (g + 1) * dh].T for g in range(G)]
        heads = []
        for e in range(G * M):
            q = naive_rope(x @ wq[e * dh : (e + 1) * dh].T, 50.0)
            heads.append(naive_attention(q, keys[e // M], vals[e // M]))
        mean_head = sum(heads) / 6
        q_sh = naive_rope(x @ lw["q_shared"].T, 50.0)
        shared = naive_attention(q_sh, (keys[0] + keys[1]) / 2, (vals[0] + vals[1]) / 2)
        want = np.concatenate(heads + [mean_head, shared], axis=1) @ lw["o_proj"].T
        np.testing.assert_allclose(y, want, rtol=0, atol=1e-12)

    def test_uniform_router_aux_is_k(self):
        for k in (1, 2, 3):
            cfg = small_config(gqe_top_k=k)
            x, lw = self.layer(cfg)
            lw["router"] = np.zeros_like(lw["router"])
            _, info = ref.gqe_attention(x, lw, cfg, np.arange(x.shape[0]))
            self.assertAlmostEqual(info["aux_loss"], float(k), places=14)
            self.assertTrue((info["expert_indices"] == np.arange(k)).all())

    def test_hard_concat_k_equals_m_is_permuted_gqa(self):
        # With o_proj = identity the output is the slot concat itself; undoing each token's
        # slot order must give exactly the dense GQA heads.
        cfg = small_config(gqe_variant="hard_concat", num_attention_heads=6, num_key_value_heads=3,
                           gqe_top_k=2, head_dim=4, hidden_size=24)
        gqa_cfg = small_config(attention_type="gqa", num_attention_heads=6, num_key_value_heads=3,
                               head_dim=4, hidden_size=24)
        x, lw = self.layer(cfg, T=11)
        lw["o_proj"] = np.eye(24)
        y, info = ref.gqe_attention(x, lw, cfg, np.arange(11))
        dense = ref.gqa_attention(x, lw, gqa_cfg, np.arange(11)).reshape(11, 3, 2, 4)  # [T, G, M, d_h]
        idx = info["expert_indices"]  # [T, G, k]
        self.assertTrue((idx[..., 0] == 1).any() and (idx[..., 0] == 0).any(), "routing should vary")
        slots = y.reshape(11, 3, 2, 4)
        for t in range(11):
            for g in range(3):
                for j in range(2):
                    np.testing.assert_allclose(slots[t, g, j], dense[t, g, idx[t, g, j]], rtol=0, atol=1e-14)
        self.assertFalse(np.allclose(slots, dense))  # some token really had its slots swapped

    def test_weighted_concat_scales_slots_by_p(self):
        cfg = small_config(gqe_variant="weighted_concat", gqe_top_k=2)
        x, lw = self.layer(cfg)
        _, info = ref.gqe_attention(x, lw, cfg, np.arange(x.shape[0]))
        T = x.shape[0]
        want = (info["slots"] * info["slot_probs"][..., None]).reshape(T, -1)
        np.testing.assert_allclose(info["concat"], want, rtol=0, atol=0)
        self.assertEqual(info["concat"].shape, (T, cfg.num_slots * cfg.head_dim))

    def test_probabilities_and_renormalised_weights(self):
        cfg = small_config(gqe_top_k=2, num_hidden_layers=2)
        w = ref.random_weights(cfg, 5)
        res = ref.forward(cfg, w, [1, 5, 2, 18, 0, 7, 7, 3, 11])
        np.testing.assert_allclose(res.router_probs.sum(axis=-1), 1.0, rtol=1e-14)
        for info in res.layer_info:
            wts = info["renorm_weights"]  # [T, G, k]
            self.assertTrue((wts > 0).all())
            np.testing.assert_allclose(wts.sum(axis=(1, 2)), 1.0, rtol=1e-14)
            # Selected experts come in descending probability.
            self.assertTrue((np.diff(info["slot_probs"], axis=-1) <= 0).all())
        self.assertEqual(res.expert_indices.shape, (2, 9, 2, 2))
        self.assertEqual(res.aux_loss.shape, (2,))

    def test_causality(self):
        rng = np.random.default_rng(6)
        configs = (small_config(attention_type="gqa"), small_config(), small_config(gqe_variant="hard_concat"),
                   small_config(gqe_variant="weighted_concat", gqe_top_k=1), small_config(tie_word_embeddings=True))
        for cfg in configs:
            w = ref.random_weights(cfg, 7)
            ids = rng.integers(0, cfg.vocab_size, size=12)
            base = ref.forward(cfg, w, ids)
            for pos in (11, 6):
                changed = ids.copy()
                changed[pos] = (changed[pos] + 1) % cfg.vocab_size
                other = ref.forward(cfg, w, changed)
                with self.subTest(cfg=cfg, pos=pos):
                    np.testing.assert_allclose(other.logits[:pos], base.logits[:pos], rtol=0, atol=1e-12)
                    self.assertFalse(np.allclose(other.logits[pos], base.logits[pos]))
                    if base.expert_indices is not None:
                        np.testing.assert_array_equal(other.expert_indices[:, :pos], base.expert_indices[:, :pos])


class TestCli(unittest.TestCase):
    def test_run_and_make_random(self):
        config = {"attention_type": "gqe", "vocab_size": 13, "hidden_size": 8, "intermediate_size": 5,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "gqe_top_k": 2}
        with tempfile.TemporaryDirectory() as tmp:
            model = os.path.join(tmp, "m")
            out = os.path.join(tmp, "out.safetensors")
            self.assertEqual(ref.main(["--make-random", model, "--config-json", json.dumps(config),
                                       "--seed", "9", "--dtype", "BF16"]), 0)
            self.assertEqual(ref.main(["--model", model, "--prompt-ids", "1,2,3,12,0", "--logits-out", out]), 0)
            got, dtypes, meta = ref.read_safetensors_full(out)
            self.assertEqual(dtypes, {"logits": "F32", "expert_indices": "I32"})
            self.assertEqual(meta, {"format": "pt"})
            want = ref.forward(*ref.load_model(model), [1, 2, 3, 12, 0])
            np.testing.assert_allclose(got["logits"], want.logits, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(got["expert_indices"], want.expert_indices)
            self.assertEqual(got["expert_indices"].shape, (2, 5, 2, 2))

            bad_out = os.path.join(tmp, "bad.safetensors")
            devnull = open(os.devnull, "w")
            saved, sys.stderr = sys.stderr, devnull
            try:
                for args in (["--prompt-ids", "1,13"], ["--prompt-ids", "1,x"], ["--prompt-ids", ""]):
                    self.assertEqual(ref.main(["--model", model, *args, "--logits-out", bad_out]), 2)
                self.assertEqual(ref.main(["--model", os.path.join(tmp, "none"), "--prompt-ids", "1"]), 2)
            finally:
                sys.stderr = saved
                devnull.close()
            self.assertFalse(os.path.exists(bad_out))


class TestFixtures(unittest.TestCase):
    """tests/data must be what tools/make_fixtures.py writes from the current reference."""

    DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data")

    def test_fixtures_match_reference(self):
        names = sorted(n for n in os.listdir(self.DATA)
                       if os.path.isfile(os.path.join(self.DATA, n, "expected.safetensors")))
        self.assertGreater(len(names), 0)
        for name in names:
            folder = os.path.join(self.DATA, name)
            with self.subTest(fixture=name):
                cfg, weights = ref.load_model(folder)
                expected, dtypes, _ = ref.read_safetensors_full(os.path.join(folder, "expected.safetensors"))
                res = ref.forward(cfg, weights, expected["prompt_ids"])
                self.assertEqual(dtypes["logits"], "F64")
                np.testing.assert_allclose(res.logits, expected["logits"], rtol=0, atol=1e-12)
                if cfg.attention_type == "gqe":
                    np.testing.assert_array_equal(res.expert_indices, expected["expert_indices"])
                    np.testing.assert_allclose(res.router_probs, expected["router_probs"], rtol=0, atol=1e-14)
                    np.testing.assert_allclose(res.aux_loss, expected["aux_loss"], rtol=1e-13)
                    M, k = cfg.experts_per_group, cfg.gqe_top_k
                    if M > 1:
                        ranked = -np.sort(-res.router_logits, axis=-1)  # [L, T, G, M]
                        self.assertGreater((ranked[..., :-1] - ranked[..., 1:])[..., : min(k, M - 1)].min(), 1e-3)
                else:
                    self.assertEqual(set(expected), {"prompt_ids", "logits"})


if __name__ == "__main__":
    unittest.main()
