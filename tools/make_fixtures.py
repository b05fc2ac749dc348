#!/usr/bin/env python3
"""Regenerate the golden fixtures in tests/data/ from the float64 reference.

    /usr/bin/python3 tools/make_fixtures.py [--out tests/data]

Each fixture folder holds a small random checkpoint (config.json, model.safetensors) and
expected.safetensors with the reference's answers for one prompt. Everything is seeded, so
running this again rewrites the same checkpoints; the float64 answers may differ in their last bit
(NumPy's matrix products may add in another order), far below the tests' tolerances.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gqe_reference as ref  # noqa: E402
from tool_cli import Parser  # noqa: E402

# Router logits that close are treated as a tie risk: float32 rounding in the C++ run could
# swap the ranking, so the fixture is re-drawn until every ranking that matters is clear.
MIN_ROUTER_GAP = 1e-3
MAX_ATTEMPTS = 50


def _gqe(**kw):
    base = {"attention_type": "gqe", "vocab_size": 37, "hidden_size": 24, "intermediate_size": 45,
            "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 8,
            "gqe_top_k": 1, "gqe_variant": "gqe"}
    base.update(kw)
    return base


# (name, config.json contents, storage dtype, prompt length T or prompt text, base seed[, shard bytes])
FIXTURES = [
    ("gqa_small",
     {"attention_type": "gqa", "vocab_size": 37, "hidden_size": 24, "intermediate_size": 45,
      "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 8},
     "F32", 13, 101),
    # A plain Hugging Face Llama config: no attention_type, num_key_value_heads, head_dim,
    # rms_norm_eps or rope_theta, so every default applies; extra keys must be ignored.
    ("llama_defaults",
     {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
      "torch_dtype": "float32", "vocab_size": 256, "hidden_size": 24, "intermediate_size": 48,
      "num_hidden_layers": 1, "num_attention_heads": 4, "rope_scaling": None,
      "attention_bias": False, "mlp_bias": False},
     "F32", "Hello, grouped query!", 102),
    ("gqe_k1_m2", _gqe(), "F32", 17, 103),
    ("gqe_k2_m3",
     _gqe(vocab_size=256, num_attention_heads=12, num_key_value_heads=4, head_dim=6,
          gqe_top_k=2),
     "F32", "Grouped query experts attend.", 104),
    ("gqe_k3_m3", _gqe(num_attention_heads=6, num_key_value_heads=2, gqe_top_k=3, num_hidden_layers=3),
     "F32", 15, 105),
    ("gqe_k2_m4", _gqe(num_attention_heads=8, num_key_value_heads=2, head_dim=6, gqe_top_k=2,
                       num_hidden_layers=1), "F32", 13, 106),
    ("gqe_m1", _gqe(num_attention_heads=4, num_key_value_heads=4, head_dim=6, num_hidden_layers=1),
     "F32", 13, 107),
    ("hard_concat_k1", _gqe(gqe_variant="hard_concat"), "F32", 19, 108),
    ("hard_concat_k3_m3",
     _gqe(gqe_variant="hard_concat", hidden_size=40, num_attention_heads=6, num_key_value_heads=2,
          head_dim=6, gqe_top_k=3),
     "F32", 13, 109),
    ("weighted_concat_k2_m3",
     _gqe(gqe_variant="weighted_concat", hidden_size=40, num_attention_heads=12, num_key_value_heads=4,
          head_dim=6, gqe_top_k=2),
     "F32", 23, 110),
    ("weighted_concat_k1_m4",
     _gqe(gqe_variant="weighted_concat", num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=1),
     "F32", 27, 111),
    ("gqe_tied", _gqe(tie_word_embeddings=True), "F32", 13, 112),
    ("gqe_f64", _gqe(num_attention_heads=6, num_key_value_heads=2, gqe_top_k=2), "F64", 17, 113),
    ("gqe_f16", _gqe(), "F16", 19, 114),
    ("gqe_bf16",
     _gqe(hidden_size=40, num_attention_heads=12, num_key_value_heads=4, head_dim=6, gqe_top_k=2),
     "BF16", 21, 115),
    ("gqe_eps_theta",
     _gqe(num_attention_heads=8, num_key_value_heads=4, head_dim=6, rms_norm_eps=0.01, rope_theta=500.0,
          max_position_embeddings=64),
     "F32", 25, 116),
    # Hugging Face's sharded layout: an index and three shards of BF16 weights.
    ("gqe_bf16_sharded", _gqe(num_hidden_layers=3, gqe_top_k=1), "BF16", 15, 117, 16000),
]


def min_router_gap(result: ref.ForwardResult, k: int) -> float:
    """Smallest gap between consecutive ranked logits that decides the kept set or slot order."""
    logits = result.router_logits  # [L, T, G, M]
    M = logits.shape[-1]
    if M == 1:
        return np.inf
    ranked = -np.sort(-logits, axis=-1)  # [L, T, G, M], descending
    gaps = ranked[..., :-1] - ranked[..., 1:]  # [L, T, G, M-1]
    return float(gaps[..., : min(k, M - 1)].min())


def make_fixture(out_dir: str, name: str, config: dict, dtype: str, prompt, seed: int, shard_bytes=None) -> dict:
    folder = os.path.join(out_dir, name)
    for attempt in range(MAX_ATTEMPTS):
        s = seed + 1000 * attempt
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        cfg, _ = ref.make_random_checkpoint(folder, config, s, dtype, shard_bytes)
        if isinstance(prompt, str):
            ids = np.frombuffer(prompt.encode("utf-8"), dtype=np.uint8).astype(np.int32)
        else:
            ids = np.random.default_rng(s + 7).integers(0, cfg.vocab_size, size=prompt).astype(np.int32)
        assert len(ids) % 2 == 1 and 13 <= len(ids) <= 29
        # Run from the files, exactly as a consumer of the fixture would.
        cfg, weights = ref.load_model(folder)
        result = ref.forward(cfg, weights, ids)
        if cfg.attention_type == "gqe" and min_router_gap(result, cfg.gqe_top_k) <= MIN_ROUTER_GAP:
            continue
        expected = {"prompt_ids": ids, "logits": result.logits}
        dtypes = {"prompt_ids": "I32", "logits": "F64"}
        if cfg.attention_type == "gqe":
            expected["expert_indices"] = result.expert_indices
            expected["router_probs"] = result.router_probs
            expected["aux_loss"] = result.aux_loss
            dtypes.update(expert_indices="I32", router_probs="F64", aux_loss="F64")
        ref.write_safetensors(os.path.join(folder, "expected.safetensors"), expected, dtypes)
        return {"name": name, "cfg": cfg, "dtype": dtype, "T": len(ids), "text": isinstance(prompt, str),
                "seed": s, "shards": shard_bytes is not None}
    raise RuntimeError(f"{name}: no seed without a near-tie router choice in {MAX_ATTEMPTS} attempts")


README_HEAD = """\
# Golden fixtures

Generated by `tools/make_fixtures.py` from the float64 NumPy reference `tools/gqe_reference.py`.
Do not edit by hand; regenerate with

    /usr/bin/python3 tools/make_fixtures.py

(deterministic: seeded weights and prompts); `/usr/bin/python3 -m unittest tools/test_reference.py`
checks that these files still match the reference. Each folder `<name>/` holds:

- `config.json`, `model.safetensors`: a small random checkpoint (weights stored in the listed dtype;
  a sharded one has `model.safetensors.index.json` and its shards instead).
- `expected.safetensors`, the reference's answers (float64, from the stored weights):
  - `prompt_ids` I32 [T]: the prompt, positions 0..T-1.
  - `logits` F64 [T, V]: logits at every prompt position.
  - gqe models only:
    - `expert_indices` I32 [L, T, G, k]: kept expert m (0..M-1) inside each group, in slot order
      (descending router logit, ties to the lower index).
    - `router_probs` F64 [L, T, G, M]: softmax of the router logits inside each group.
    - `aux_loss` F64 [L]: each layer's load-balancing loss L_aux over these T tokens.

In every gqe fixture the router logits that decide the kept set and slot order are more than
1e-3 apart, so the expert indices are unambiguous in float as well.

| name | type | variant | V | d | I | L | N | G | M | k | d_h | other | dtype | T |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def write_readme(out_dir: str, rows) -> None:
    lines = [README_HEAD]
    for r in rows:
        c = r["cfg"]
        gqe = c.attention_type == "gqe"
        other = []
        if c.tie_word_embeddings:
            other.append("tied embeddings")
        if c.rms_norm_eps != 1e-6:
            other.append(f"rms_norm_eps {c.rms_norm_eps:g}")
        if c.rope_theta != 10000.0:
            other.append(f"rope_theta {c.rope_theta:g}")
        if c.max_position_embeddings != 4096:
            other.append(f"max_position_embeddings {c.max_position_embeddings}")
        if r["name"] == "llama_defaults":
            other.append("Llama config, defaults")
        if r["text"]:
            other.append("text prompt")
        if r["shards"]:
            other.append("sharded (index + shards)")
        lines.append(
            f"| {r['name']} | {c.attention_type} | {c.gqe_variant if gqe else '-'} | {c.vocab_size} | "
            f"{c.hidden_size} | {c.intermediate_size} | {c.num_hidden_layers} | {c.num_attention_heads} | "
            f"{c.num_key_value_heads} | {c.experts_per_group} | {c.gqe_top_k if gqe else '-'} | {c.head_dim} | "
            f"{', '.join(other) or '-'} | {r['dtype']} | {r['T']} |\n"
        )
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.writelines(lines)


def main() -> int:
    default_out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data")
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=default_out, help="output folder (default: tests/data)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name, config, dtype, prompt, seed, *shards in FIXTURES:
        rows.append(make_fixture(args.out, name, config, dtype, prompt, seed, *shards))
        print(f"{name}: seed {rows[-1]['seed']}, T = {rows[-1]['T']}")
    write_readme(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
