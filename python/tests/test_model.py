"""gqe_torch's pieces: the tie rule, the load-balancing loss, initialisation, names, config."""

import itertools
import math
import os
import tempfile
import unittest

import torch

from common import config, gt, random_model


def tie_rule_order(logits):
    """The slot order of docs/model.md for one group, by plain Python: descending logit, lower index first."""
    return sorted(range(len(logits)), key=lambda m: (-logits[m], m))


class Selection(unittest.TestCase):
    def test_matches_the_tie_rule_on_every_tie_pattern(self):
        # Logits drawn from {0, 1, 2} over M = 4 experts: every pattern of ties, in every order.
        patterns = torch.tensor(list(itertools.product([0.0, 1.0, 2.0], repeat=4)))  # [81, 4]
        for k in range(1, 5):
            got = gt.select_experts(patterns, k)
            for row, logits in enumerate(patterns.tolist()):
                self.assertEqual(got[row].tolist(), tie_rule_order(logits)[:k], msg=f"logits {logits}, k={k}")

    def test_ranks_on_logits_not_probabilities(self):
        # Logits 1e-9 apart: exp rounds both to the same float32, so the probabilities tie, but the
        # logits do not, and gqe ranks on the logits: expert 1 first.
        logits = torch.tensor([[0.0, 1e-9]], dtype=torch.float32)
        probs = torch.softmax(logits, dim=-1)
        self.assertEqual(probs[0, 0].item(), probs[0, 1].item())
        self.assertEqual(gt.select_experts(logits, 1).tolist(), [[1]])
        self.assertEqual(gt.select_experts(logits, 2).tolist(), [[1, 0]])

    def test_nan_logit_keeps_a_valid_choice_and_poisons_the_output(self):
        logits = torch.tensor([[float("nan"), 0.5, 0.5]])
        self.assertEqual(gt.select_experts(logits, 3).tolist(), [[1, 2, 0]])
        cfg = config()
        model = random_model(cfg, 0)
        with torch.no_grad():
            model.model.layers[0].self_attn.router.weight[0, 0] = float("nan")
            logits = model(torch.arange(6).view(1, 6))
        self.assertTrue(torch.isnan(logits).all())  # every token's router logits hold the NaN

    def test_random_logits_match_a_sort(self):
        torch.manual_seed(0)
        logits = torch.randn(200, 3, 5)
        for k in (1, 3, 5):
            expected = torch.sort(logits, dim=-1, descending=True).indices[..., :k]  # no ties here
            self.assertTrue(torch.equal(gt.select_experts(logits, k), expected))


class LoadBalancing(unittest.TestCase):
    def test_uniform_routing_gives_k(self):
        for k in (1, 2, 3):
            probs = torch.full((2, 5, 4, 3), 1 / 3)  # [B, T, G, M], uniform
            # Every token keeps the same k of 3: f = 1 for those, P = 1/3.
            idx = torch.arange(k).expand(2, 5, 4, k)
            self.assertAlmostEqual(gt.load_balancing_loss(probs, idx).item(), k, places=6)

    def test_by_hand(self):
        # One group, M = 2, two tokens: p = (0.9, 0.1) keeps 0, p = (0.3, 0.7) keeps 1.
        probs = torch.tensor([[[[0.9, 0.1]], [[0.3, 0.7]]]])  # [1, 2, 1, 2]
        idx = torch.tensor([[[[0]], [[1]]]])  # [1, 2, 1, 1]
        # f = (0.5, 0.5), P = (0.6, 0.4): 2 * (0.5*0.6 + 0.5*0.4) = 1.0
        self.assertAlmostEqual(gt.load_balancing_loss(probs, idx).item(), 1.0, places=6)
        probs = torch.tensor([[[[0.9, 0.1]], [[0.8, 0.2]]]])
        idx = torch.tensor([[[[0]], [[0]]]])
        # f = (1, 0), P = (0.85, 0.15): 2 * 0.85 = 1.7
        self.assertAlmostEqual(gt.load_balancing_loss(probs, idx).item(), 1.7, places=6)

    def test_model_sums_layers_and_the_gradient_reaches_the_router(self):
        for variant in ("gqe", "hard_concat", "weighted_concat"):
            with self.subTest(variant=variant):
                model = random_model(config(gqe_variant=variant, num_hidden_layers=3), 1)
                model(torch.arange(20).view(2, 10))
                layers = [l.self_attn.last_aux_loss for l in model.model.layers]
                self.assertAlmostEqual(model.aux_loss.item(), sum(x.item() for x in layers), places=5)
                model.aux_loss.backward()
                for l in model.model.layers:
                    self.assertGreater(l.self_attn.router.weight.grad.abs().sum().item(), 0)

    def test_language_loss_reaches_the_router_only_through_probabilities(self):
        # gqe (renormalised slot) and weighted_concat use p in the output; hard_concat does not.
        ids = torch.arange(20).view(2, 10)
        for variant, reaches in (("gqe", True), ("weighted_concat", True), ("hard_concat", False)):
            with self.subTest(variant=variant):
                model = random_model(config(gqe_variant=variant), 2)
                model(ids).sum().backward()
                grads = [l.self_attn.router.weight.grad for l in model.model.layers]
                grad = sum(0.0 if g is None else g.abs().sum().item() for g in grads)  # None: not in the graph
                self.assertEqual(grad > 0, reaches)


class Parameters(unittest.TestCase):
    def test_names_and_shapes_are_the_spec_list(self):
        for cfg in (config(), config(gqe_variant="hard_concat", gqe_top_k=3), config(tie_word_embeddings=True),
                    config(attention_type="gqa", gqe_top_k=None, gqe_variant=None)):
            with self.subTest(cfg=cfg.to_dict()):
                model = gt.GQEForCausalLM(cfg)
                got = {n: tuple(t.shape) for n, t in model.state_dict().items()}
                self.assertEqual(list(got.items()), list(gt.weight_shapes(cfg).items()))

    def test_initialisation(self):
        torch.manual_seed(0)
        cfg = config()
        model = gt.GQEForCausalLM(cfg)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                self.assertTrue(torch.equal(p, torch.ones_like(p)), name)
            elif name.endswith("router.weight"):
                self.assertTrue(torch.equal(p, torch.zeros_like(p)), name)
            elif name == "model.embed_tokens.weight":
                self.assertAlmostEqual(p.std().item(), 1.0, delta=0.1)  # N(0, 1), 1696 draws
            else:
                bound = math.sqrt(6.0 / (p.shape[0] + p.shape[1]))  # Xavier-uniform
                self.assertLessEqual(p.abs().max().item(), bound, name)
                # Uniform on [-b, b] has standard deviation b / sqrt(3); n >= 256 draws here.
                self.assertAlmostEqual(p.std().item() / (bound / math.sqrt(3)), 1.0, delta=0.2, msg=name)

    def test_batch_rows_are_independent(self):
        # Each sequence routes and attends on its own: a batch equals its rows run one by one.
        model = random_model(config(gqe_top_k=2), 3)
        ids = torch.randint(0, 53, (3, 11), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            together = model(ids)
            for b in range(3):
                alone = model(ids[b:b + 1])
                self.assertLess((together[b] - alone[0]).abs().max().item(), 1e-5)

    def test_causal(self):
        # Position t's logits depend on tokens 0..t only.
        model = random_model(config(), 4)
        ids = torch.randint(0, 53, (1, 12), generator=torch.Generator().manual_seed(2))
        changed = ids.clone()
        changed[0, 7:] = (changed[0, 7:] + 1) % 53
        with torch.no_grad():
            a, b = model(ids), model(changed)
        self.assertLess((a[0, :7] - b[0, :7]).abs().max().item(), 1e-6)
        self.assertGreater((a[0, 7:] - b[0, 7:]).abs().max().item(), 1e-3)

    def test_input_checks(self):
        model = gt.GQEForCausalLM(config(max_position_embeddings=8))
        for bad in (torch.zeros(1, 9, dtype=torch.int64), torch.zeros(4, dtype=torch.int64),
                    torch.zeros(1, 3, dtype=torch.int32), torch.full((1, 3), 53), torch.full((1, 3), -1),
                    torch.zeros(0, 3, dtype=torch.int64)):
            with self.assertRaises(gt.BadInput):
                model(bad)
        for bad in (None, "config.json"):
            with self.assertRaisesRegex(gt.BadInput, "expected a GQEConfig"):
                gt.GQEForCausalLM(bad)


class Config(unittest.TestCase):
    def test_defaults_as_documented(self):
        c = gt.GQEConfig(vocab_size=10, hidden_size=24, intermediate_size=7, num_hidden_layers=1,
                         num_attention_heads=4, model_type="llama", eos_token_id=2)
        self.assertEqual((c.attention_type, c.num_key_value_heads, c.head_dim, c.gqe_variant, c.rms_norm_eps,
                          c.rope_theta, c.tie_word_embeddings, c.max_position_embeddings),
                         ("gqa", 4, 6, "gqe", 1e-6, 10000.0, False, 4096))
        self.assertEqual(c.extra, {"model_type": "llama", "eos_token_id": 2})  # kept, ignored
        self.assertEqual(c.eos_token_id, 2)
        self.assertEqual(c.to_dict()["eos_token_id"], 2)
        self.assertEqual(gt.GQEConfig(**c.to_dict()).to_dict(), c.to_dict())

    def test_config_files_read_as_gqe_reads_them(self):
        good = '"vocab_size": 10, "hidden_size": 24, "intermediate_size": 7, "num_hidden_layers": 1, "num_attention_heads": 4'
        cases = {  # file text -> what the refusal says
            "{" + good + ', "rope_theta": NaN}': "not valid JSON",
            "{" + good + ', "rope_theta": 1e400}': "not valid JSON",
            "{" + good + ', "rope_theta": 1e13}': "expected a positive number up to 1e12",
            "{" + good + ', "vocab_size": 12}': "given twice",
            "{" + good + ', "model_type": "\\udc00"}': "lone surrogate",
            "[" * 5000 + "]" * 5000: "not valid JSON",
        }
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "config.json")
            for text, words in cases.items():
                with self.subTest(text=text[:60]):
                    with open(path, "w") as f:
                        f.write(text)
                    with self.assertRaises(gt.BadInput) as e:
                        gt.load_config(path)
                    self.assertIn(words, str(e.exception))
            with open(path, "w") as f:
                f.write("{" + good + "}" + " " * (16 << 20))
            with self.assertRaises(gt.BadInput) as e:
                gt.load_config(path)
            self.assertIn("of at most 16777216", str(e.exception))

    def test_refusals_name_the_key(self):
        base = dict(vocab_size=10, hidden_size=24, intermediate_size=7, num_hidden_layers=1, num_attention_heads=4)
        cases = {
            "rope_scaling": dict(rope_scaling={"type": "linear", "factor": 2.0}),
            "attention_bias": dict(attention_bias=True),
            "mlp_bias": dict(mlp_bias=True),
            "gqe_top_k": dict(attention_type="gqe", num_key_value_heads=2),  # required for gqe
            "gqe_top_k ": dict(attention_type="gqe", num_key_value_heads=2, gqe_top_k=3),  # > M
            "num_attention_heads": dict(num_key_value_heads=3),
            "head_dim": dict(head_dim=5),
            "vocab_size": dict(vocab_size=True),
            "hidden_size": dict(hidden_size=2.5),
            "attention_type": dict(attention_type="mha"),
            "gqe_variant": dict(gqe_variant="soft"),
            "rms_norm_eps": dict(rms_norm_eps=0),
            "tie_word_embeddings": dict(tie_word_embeddings="yes"),
            "hidden_act": dict(hidden_act="gelu"),
            "use_rope": dict(use_rope=False),
            "use_rope ": dict(use_rope=1),  # JSON's 1 is not true, as the C++ reader has it
            "attention_bias ": dict(attention_bias=0),
            "sliding_window ": dict(sliding_window=0),
            "eos_token_id": dict(eos_token_id=[1, "2"]),
            "eos_token_id ": dict(eos_token_id=True),
            "sliding_window": dict(sliding_window=4096),
            "use_sliding_window": dict(use_sliding_window=True, sliding_window=64),
            "layer_types": dict(layer_types=["full_attention", "sliding_attention"]),
            "rope_parameters": dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}),
            "rope_type": dict(rope_parameters={"rope_type": "yarn"}),
            "rope_theta": dict(rope_theta=1e4, rope_parameters={"rope_theta": 5e5}),
        }
        for key, override in cases.items():
            with self.subTest(key=key):
                with self.assertRaises(gt.BadInput) as e:
                    gt.GQEConfig(**dict(base, **override))
                self.assertIn(f'"{key.strip()}"', str(e.exception))
        # eos ids must be tokens of the model (gqe-run refuses the others, so a converter must not write them)
        for eos in (10, -1, [3, 10]):
            with self.subTest(eos=eos):
                with self.assertRaises(gt.BadInput) as e:
                    gt.GQEConfig(**dict(base, eos_token_id=eos))
                self.assertIn("is not a token of this model", str(e.exception))
        self.assertEqual(gt.GQEConfig(**dict(base, eos_token_id=[9, 2.0])).eos_token_id, [9, 2.0])
        # null and false are fine; 256.0 is an integer
        gt.GQEConfig(**dict(base, rope_scaling=None, attention_bias=False, mlp_bias=None, vocab_size=256.0))
        # What gqe computes anyway loads, RoPE's base given inside "rope_parameters" included.
        c = gt.GQEConfig(**dict(base, hidden_act="silu", use_rope=True, use_sliding_window=False, sliding_window=32768,
                                layer_types=["full_attention"], rope_parameters={"rope_type": "default", "rope_theta": 5e5}))
        self.assertEqual(c.rope_theta, 5e5)
        self.assertEqual(c.to_dict()["rope_theta"], 5e5)
        self.assertNotIn("rope_parameters", c.to_dict())  # the base is written where every reader looks


if __name__ == "__main__":
    unittest.main()
