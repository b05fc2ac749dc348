"""gqe_torch against the float64 NumPy reference (tools/gqe_reference.py), both ways:
the reference's fixtures run in gqe_torch, and gqe_torch's own models run in the reference."""

import os
import sys
import tempfile
import unittest

import numpy as np
import torch

from common import FIXTURES, LOGITS_RTOL, config, gt, min_router_gap, random_model, ref, rel_err

FIXTURE_NAMES = sorted(n for n in os.listdir(FIXTURES) if os.path.isdir(os.path.join(FIXTURES, n)))
# Float64 gqe_torch against the float64 reference: the same formulas in another order, so only
# rounding of a few hundred operations separates them (measured up to 6e-16).
F64_RTOL = 1e-12
# Router probabilities and aux losses are O(1) values after a handful of float32 operations.
PROB_ATOL = 1e-6

# (name, config overrides): GQA and every variant, k = 1 and k = M (M = 4 here), tied head.
TORCH_CASES = [
    ("gqa", dict(attention_type="gqa", gqe_top_k=None, gqe_variant=None)),
    ("gqa_tied", dict(attention_type="gqa", gqe_top_k=None, gqe_variant=None, tie_word_embeddings=True)),
    ("gqe_k1", dict(gqe_top_k=1)),
    ("gqe_k4_m4", dict(gqe_top_k=4)),
    ("gqe_k2_m2_tied", dict(num_key_value_heads=4, gqe_top_k=2, tie_word_embeddings=True)),
    ("hard_concat_k1", dict(gqe_variant="hard_concat", gqe_top_k=1)),
    ("hard_concat_k4_m4", dict(gqe_variant="hard_concat", gqe_top_k=4)),
    ("weighted_concat_k1", dict(gqe_variant="weighted_concat", gqe_top_k=1)),
    ("weighted_concat_k4_m4", dict(gqe_variant="weighted_concat", gqe_top_k=4)),
]

FIGURES = []  # (direction, case, relative error): printed at the end for the record


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids], dtype=torch.int64))[0].double().numpy()  # [T, V]


class ReferenceToTorch(unittest.TestCase):
    """Every fixture of tests/data (written by the reference) loads and runs in gqe_torch."""

    def test_fixtures_float32(self):
        for name in FIXTURE_NAMES:
            with self.subTest(fixture=name):
                folder = os.path.join(FIXTURES, name)
                expected = ref.read_safetensors(os.path.join(folder, "expected.safetensors"))
                ids = [int(i) for i in expected["prompt_ids"]]
                model = gt.load_pretrained(folder)
                err = rel_err(torch_logits(model, ids), expected["logits"])
                FIGURES.append(("reference -> gqe_torch (float32)", name, err))
                self.assertLess(err, LOGITS_RTOL)
                if "expert_indices" in expected:
                    got = torch.stack(model.expert_indices)[:, 0].numpy()  # [L, T, G, k]
                    np.testing.assert_array_equal(got, expected["expert_indices"])
                    probs = torch.stack(model.router_probs)[:, 0].double().numpy()  # [L, T, G, M]
                    np.testing.assert_allclose(probs, expected["router_probs"], rtol=0, atol=PROB_ATOL)
                    aux = [float(l.self_attn.last_aux_loss) for l in model.model.layers]
                    np.testing.assert_allclose(aux, expected["aux_loss"], rtol=0, atol=PROB_ATOL)
                    # The model's aux_loss is the sum over layers (the authors' definition).
                    self.assertAlmostEqual(float(model.aux_loss), float(np.sum(expected["aux_loss"])), delta=1e-5)

    def test_fixtures_float64(self):
        for name in FIXTURE_NAMES:
            with self.subTest(fixture=name):
                folder = os.path.join(FIXTURES, name)
                expected = ref.read_safetensors(os.path.join(folder, "expected.safetensors"))
                model = gt.load_pretrained(folder, dtype=torch.float64)
                err = rel_err(torch_logits(model, [int(i) for i in expected["prompt_ids"]]), expected["logits"])
                FIGURES.append(("reference -> gqe_torch (float64)", name, err))
                self.assertLess(err, F64_RTOL)


class TorchToReference(unittest.TestCase):
    """gqe_torch's own models, saved by save_pretrained, run in the reference."""

    def check(self, name, cfg, dtype="F32", randomise=True):
        rng = np.random.default_rng(7)
        ids = [int(i) for i in rng.integers(0, cfg.vocab_size, size=23)]
        with tempfile.TemporaryDirectory() as tmp:
            # Seeds whose router logits leave a ranking within 1e-4 are passed over: float32
            # rounding (about 1e-6 here) could order such experts differently from float64.
            for seed in range(20):
                model = random_model(cfg, seed) if randomise else gt.GQEForCausalLM(cfg).eval()
                folder = os.path.join(tmp, f"{name}-{seed}")
                gt.save_pretrained(model, folder, dtype=dtype)
                rcfg, weights = ref.load_model(folder)
                result = ref.forward(rcfg, weights, ids)
                if not cfg.is_gqe or not randomise or min_router_gap(result.router_logits, cfg.gqe_top_k) > 1e-4:
                    break
            else:
                self.fail(f"{name}: no seed without a near tie in the router")
            # The model as stored (a BF16 file rounds the weights) against the reference on it.
            stored = gt.load_pretrained(folder)
            err = rel_err(torch_logits(stored, ids), result.logits)
            FIGURES.append((f"gqe_torch -> reference ({dtype})", name, err))
            self.assertLess(err, LOGITS_RTOL)
            if cfg.is_gqe:
                got = torch.stack(stored.expert_indices)[:, 0].numpy()
                np.testing.assert_array_equal(got, result.expert_indices)
            if dtype == "F32":
                # F32 storage is exact: the stored model is the model that was saved.
                np.testing.assert_array_equal(torch_logits(stored, ids), torch_logits(model, ids))

    def test_every_variant_and_k(self):
        for name, overrides in TORCH_CASES:
            with self.subTest(case=name):
                self.check(name, config(**overrides))

    def test_bf16_checkpoint(self):
        self.check("gqe_k2_m4_bf16", config(gqe_top_k=2), dtype="BF16")

    def test_spec_initialisation_ties(self):
        # A fresh model's router is zero: every expert ties, and the tie rule keeps the lower indices
        # in order. The reference ranks with a stable sort; gqe_torch counts ranks.
        for k in (1, 4):
            with self.subTest(k=k):
                cfg = config(gqe_top_k=k)
                torch.manual_seed(3)
                self.check(f"fresh_k{k}", cfg, randomise=False)
                model = gt.GQEForCausalLM(cfg)
                model(torch.zeros(1, 5, dtype=torch.int64))
                expected = torch.arange(k).expand(1, 5, cfg.num_key_value_heads, k)
                for got in model.expert_indices:
                    self.assertTrue(torch.equal(got, expected))


def tearDownModule():
    worst = {}
    for direction, case, err in FIGURES:
        worst[direction] = max(worst.get(direction, (0.0, "")), (err, case))
    print("\nlogits, norm-wise relative error against the float64 reference (worst case per direction):",
          file=sys.stderr)
    for direction, (err, case) in sorted(worst.items()):
        print(f"  {direction:40s} {err:.2e}  ({case})", file=sys.stderr)
    if os.environ.get("GQE_TORCH_FIGURES"):
        for direction, case, err in FIGURES:
            print(f"  {direction:40s} {case:24s} {err:.2e}", file=sys.stderr)


if __name__ == "__main__":
    unittest.main()
