"""Models saved by gqe_torch run in gqe-run (the C++ runner) to the same logits and expert choices."""

import os
import sys
import tempfile
import unittest

import numpy as np
import torch

from common import LOGITS_RTOL, config, gt, min_router_gap, random_model, ref, rel_err, run_gqe_run

CASES = [
    ("gqa", dict(attention_type="gqa", gqe_top_k=None, gqe_variant=None)),
    ("gqe_k1", dict(gqe_top_k=1)),
    ("gqe_k4_m4", dict(gqe_top_k=4)),
    ("gqe_k2_tied", dict(gqe_top_k=2, tie_word_embeddings=True)),
    ("hard_concat_k4_m4", dict(gqe_variant="hard_concat", gqe_top_k=4)),
    ("weighted_concat_k1", dict(gqe_variant="weighted_concat", gqe_top_k=1)),
]
# The bound for 16-bit weights (docs/checkpoints.md) (gqe-run may keep them 16-bit and accumulate in float32),
# plus gqe_torch's own distance to the float64 reference.
BF16_RTOL = 1e-2 + LOGITS_RTOL
FIGURES = []


class GqeRun(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        rng = np.random.default_rng(11)
        self.ids = [int(i) for i in rng.integers(0, 53, size=31)]

    def tearDown(self):
        self.tmp.cleanup()

    def saved(self, name, cfg, dtype="F32", min_gap=1e-4):
        """A random model saved to a folder, with a seed whose router rankings are clear by min_gap
        (float32 rounding elsewhere could otherwise order near-equal experts differently)."""
        for seed in range(20):
            model = random_model(cfg, seed)
            folder = os.path.join(self.tmp.name, f"{name}-{seed}")
            gt.save_pretrained(model, folder, dtype=dtype)
            if not cfg.is_gqe:
                return folder
            rcfg, weights = ref.load_model(folder)
            if min_router_gap(ref.forward(rcfg, weights, self.ids).router_logits, cfg.gqe_top_k) > min_gap:
                return folder
        self.fail(f"{name}: no seed without a near tie in the router")

    def compare(self, name, folder, rtol):
        model = gt.load_pretrained(folder)  # the weights as stored
        with torch.no_grad():
            ours = model(torch.tensor([self.ids]))[0].double().numpy()  # [T, V]
        logits, experts = run_gqe_run(folder, self.ids, os.path.join(self.tmp.name, "out.safetensors"))
        err = rel_err(logits, ours)
        FIGURES.append((name, err))
        self.assertLess(err, rtol)
        if model.config.is_gqe:
            np.testing.assert_array_equal(experts, torch.stack(model.expert_indices)[:, 0].numpy())
        else:
            self.assertIsNone(experts)

    def test_f32_models(self):
        for name, overrides in CASES:
            with self.subTest(case=name):
                self.compare(name, self.saved(name, config(**overrides)), LOGITS_RTOL)

    def test_bf16_model(self):
        # docs/checkpoints.md lets 16-bit choices differ where two router logits are within 1e-3.
        folder = self.saved("gqe_k2_bf16", config(gqe_top_k=2), dtype="BF16", min_gap=1e-3)
        self.compare("gqe_k2_bf16 (BF16 file)", folder, BF16_RTOL)


def tearDownModule():
    print("\ngqe-run against gqe_torch, norm-wise relative error of the logits:", file=sys.stderr)
    for name, err in FIGURES:
        print(f"  {name:28s} {err:.2e}", file=sys.stderr)


if __name__ == "__main__":
    unittest.main()
