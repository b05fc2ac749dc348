#!/usr/bin/env python3
"""Write a large random checkpoint folder for timing gqe on a realistic model size.

The default shape is a 1.26 GB (F32) GQE model: d = 2048, 4 layers, V = 32000, N = 16 query
experts in G = 8 groups, k = 1, d_h = 128, intermediate 5632. Weights are random (N(0, 1/in),
norms 1): fit for timing loading, prefill and decode, meaningless as a language model. Nothing
of this size belongs in the repository; write it to a scratch folder:

    /usr/bin/python3 tools/make_large_checkpoint.py --out /tmp/gqe-large-f32
    /usr/bin/python3 tools/make_large_checkpoint.py --out /tmp/gqe-large-bf16 --dtype BF16
    /usr/bin/python3 tools/make_large_checkpoint.py --out /tmp/gqe-large-shards --shard-mb 400
    build/bench/gqe-bench --model /tmp/gqe-large-f32

Tensors are generated and written one at a time, so memory stays near the largest tensor.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gqe_reference as ref  # noqa: E402
from tool_cli import Parser  # noqa: E402

SIZES = {"F32": 4, "BF16": 2, "F16": 2}


def encode(values: np.ndarray, dtype: str) -> bytes:
    if dtype == "F32":
        return values.astype("<f4").tobytes()
    if dtype == "F16":
        return values.astype("<f2").tobytes()
    # BF16: float32 rounded to nearest even on its top 16 bits (random values: no NaN).
    bits = values.astype(np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def write_file(path: str, names, shapes, dtype: str, rng: np.random.Generator) -> int:
    """One safetensors file of the named tensors, written tensor by tensor; returns its data bytes."""
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        nbytes = int(np.prod(shapes[name])) * SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 64)  # the data on a 64-byte boundary, as gqe writes it
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in names:
            shape = shapes[name]
            if len(shape) == 1:
                values = np.ones(shape, dtype=np.float32)
            else:
                values = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[1]))
            f.write(encode(values, dtype))
    os.replace(tmp, path)
    return offset


MAX_POSITIONS = 4096  # max_position_embeddings of the models written

# The weight files this tool writes (and a folder's previous ones it replaces).
WEIGHT_FILE = re.compile(r"model\.safetensors(\.index\.json)?|model-[0-9]{5}-of-[0-9]{5}\.safetensors")


def main() -> int:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created; existing weight files replaced)")
    p.add_argument("--dtype", choices=sorted(SIZES), default="F32")
    p.add_argument("--shard-mb", type=int, default=0, help="shards of about this many MB (0: one file)")
    p.add_argument("--attention", choices=["gqa", "gqe"], default="gqe")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.shard_mb < 0 or min(a.hidden, a.layers, a.vocab, a.heads, a.kv_heads, a.head_dim, a.intermediate, a.top_k) < 1:
        p.error("sizes must be positive and --shard-mb at least 0")
    if not 0 <= a.seed < 2**63:
        p.error(f"--seed {a.seed} is out of range; expected 0 to 2^63 - 1")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"--out {a.out} exists and is not a folder")
    config = {"attention_type": a.attention, "vocab_size": a.vocab, "hidden_size": a.hidden,
              "intermediate_size": a.intermediate, "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
              "num_key_value_heads": a.kv_heads, "head_dim": a.head_dim, "rms_norm_eps": 1e-5,
              "max_position_embeddings": MAX_POSITIONS}
    if a.attention == "gqe":
        config.update(gqe_top_k=a.top_k, gqe_variant="gqe")
    try:
        shapes = ref.weight_shapes(ref.config_from_dict(config))
    except ref.BadInput as e:
        p.error(str(e))
    try:
        os.makedirs(a.out, exist_ok=True)
    except OSError as e:
        p.error(f"cannot make --out {a.out}: {e.strerror}")
    groups, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * SIZES[a.dtype]
        if a.shard_mb and groups[-1] and size + nbytes > a.shard_mb << 20:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    rng = np.random.default_rng(a.seed)
    for stale in [f for f in os.listdir(a.out) if WEIGHT_FILE.fullmatch(f)]:  # a previous run's weights only
        os.remove(os.path.join(a.out, stale))
    total, weight_map = 0, {}
    for i, names in enumerate(groups):
        file = "model.safetensors" if not a.shard_mb else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        total += write_file(os.path.join(a.out, file), names, shapes, a.dtype, rng)
        weight_map.update({n: file for n in names})
        print(f"{file}: {len(names)} tensors", flush=True)
    if a.shard_mb:
        with open(os.path.join(a.out, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(a.out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    print(f"{a.out}: {total / 1e9:.3f} GB of {a.dtype} weights, {sum(int(np.prod(s)) for s in shapes.values())} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
