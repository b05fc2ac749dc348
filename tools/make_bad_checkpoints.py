#!/usr/bin/env python3
"""Writes tests/bad_checkpoints/: small checkpoint folders, each broken in exactly one way.

Every folder must make `gqe-run --model DIR ...` print one line on stderr and exit with status 2
(tests/cli/check_cli.cmake runs them). Regenerate with: /usr/bin/python3 tools/make_bad_checkpoints.py
"""

import json
import os
import shutil
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gqe_reference as ref  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "bad_checkpoints")

BASE_CONFIG = {
    "attention_type": "gqe", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4,
    "gqe_top_k": 1, "gqe_variant": "gqe", "max_position_embeddings": 64,
}


def base_tensors():
    """The valid model's tensors as (name, float32 array), in the spec's order."""
    cfg = ref.config_from_dict(BASE_CONFIG)
    weights = ref.random_weights(cfg, seed=3)
    return [(name, weights[name].astype(np.float32)) for name in ref.weight_shapes(cfg)]


def header_and_data(tensors, dtype="F32"):
    """A safetensors header dict and data bytes for [(name, array)], packed back to back."""
    header, data, offset = {"__metadata__": {"format": "pt"}}, b"", 0
    for name, array in tensors:
        raw = array.astype("<f4" if dtype == "F32" else "<f8").tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    return header, data


def pack(header_text: bytes, data: bytes, declared_length=None) -> bytes:
    length = len(header_text) if declared_length is None else declared_length
    return struct.pack("<Q", length) + header_text + data


def write_case(name, what, config=BASE_CONFIG, model_bytes=None, config_text=None):
    folder = os.path.join(ROOT, name)
    os.makedirs(folder)
    if config_text is not None or config is not None:
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write(config_text if config_text is not None else json.dumps(config, indent=1))
    if model_bytes is not None:
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(model_bytes)
    CASES.append((name, what))


CASES = []


def valid_model_bytes(tensors=None, dtype="F32"):
    header, data = header_and_data(tensors if tensors is not None else base_tensors(), dtype)
    return pack(json.dumps(header).encode(), data)


def with_config(**changes):
    c = dict(BASE_CONFIG)
    for key, value in changes.items():
        if value is ...:
            c.pop(key, None)
        else:
            c[key] = value
    return c


def main():
    shutil.rmtree(ROOT, ignore_errors=True)
    os.makedirs(ROOT)
    good = valid_model_bytes()
    tensors = base_tensors()
    header, data = header_and_data(tensors)

    # --- files missing or unreadable -------------------------------------------------------
    write_case("no_config", "config.json is missing", config=None, model_bytes=good)
    write_case("no_model", "model.safetensors is missing")
    write_case("empty_model", "model.safetensors is empty (shorter than 8 bytes)", model_bytes=b"")
    write_case("seven_bytes", "model.safetensors is 7 bytes", model_bytes=b"\x10\x00\x00\x00\x00\x00\x00")
    write_case("truncated_data", "the data area is cut short", model_bytes=good[:-10])
    write_case("truncated_header", "the header length runs past the end", model_bytes=good[:40])
    text = json.dumps(header).encode()
    write_case("header_over_limit", "the header length exceeds 100,000,000", model_bytes=pack(text, data, 100_000_001))
    write_case("header_length_huge", "the header length is 2^63", model_bytes=pack(text, data, 1 << 63))

    # --- header JSON ---------------------------------------------------------------------------
    write_case("header_not_json", "the header is not JSON", model_bytes=pack(b"{not json" + b" " * 7, data))
    write_case("header_not_object", "the header is a JSON array", model_bytes=pack(b"[1, 2, 3]       ", data))
    first = tensors[0][0]
    entry = json.dumps(header[first])
    dup = text.decode().replace("{", "{\"%s\": %s, " % (first, entry), 1).encode()
    write_case("duplicate_name", "a tensor name appears twice in the header", model_bytes=pack(dup, data))
    bad = dict(header)
    bad[first] = dict(header[first], dtype="Q8")
    write_case("unknown_dtype", "a dtype no reader knows", model_bytes=pack(json.dumps(bad).encode(), data))
    bad = dict(header)
    bad[first] = dict(header[first], dtype="I64")
    write_case("integer_weights", "weights stored as I64", model_bytes=pack(json.dumps(bad).encode(), data))
    bad = dict(header)
    bad[first] = {"dtype": "F32", "shape": header[first]["shape"]}
    write_case("no_offsets", "a tensor entry without data_offsets", model_bytes=pack(json.dumps(bad).encode(), data))
    bad = dict(header)
    bad[first] = dict(header[first], shape="16x8")
    write_case("shape_not_array", "a shape given as a string", model_bytes=pack(json.dumps(bad).encode(), data))
    bad = dict(header)
    bad[first] = dict(header[first], shape=[-16, -8])
    write_case("negative_shape", "negative dimensions", model_bytes=pack(json.dumps(bad).encode(), data))
    bad = dict(header)
    bad[first] = dict(header[first], shape=[1 << 40, 1 << 40])
    write_case("shape_overflow", "a shape whose element count overflows 64 bits", model_bytes=pack(json.dumps(bad).encode(), data))
    bad = dict(header)
    bad[first] = dict(header[first], shape=[16, 9])
    write_case("shape_vs_bytes", "a shape that disagrees with its byte range", model_bytes=pack(json.dumps(bad).encode(), data))
    bad = dict(header)
    b0, e0 = header[first]["data_offsets"]
    bad[first] = dict(header[first], data_offsets=[b0 + len(data), e0 + len(data)])
    write_case("offsets_out_of_range", "data_offsets beyond the data", model_bytes=pack(json.dumps(bad).encode(), data))
    second = tensors[1][0]
    bad = dict(header)
    b1, e1 = header[second]["data_offsets"]
    bad[second] = dict(header[second], data_offsets=[b1 - 4, e1 - 4])
    write_case("offsets_overlap", "two tensors share bytes", model_bytes=pack(json.dumps(bad).encode(), data + b"\0" * 4))
    write_case("offsets_gap", "bytes that belong to no tensor", model_bytes=pack(text, data + b"\0" * 12))
    bad = dict(header)
    bad[first] = dict(header[first], data_offsets=[e0, b0])
    write_case("offsets_reversed", "end before begin", model_bytes=pack(json.dumps(bad).encode(), data))
    bad = dict(header)
    bad["__metadata__"] = {"format": 1}
    write_case("metadata_not_strings", "__metadata__ with a number value", model_bytes=pack(json.dumps(bad).encode(), data))

    # --- tensors against config.json -----------------------------------------------------------
    write_case("missing_tensor", "model.layers.0.self_attn.router.weight is absent",
               model_bytes=valid_model_bytes([t for t in tensors if "router" not in t[0]]))
    write_case("extra_tensor", "a tensor the config does not have",
               model_bytes=valid_model_bytes(tensors + [("model.layers.0.self_attn.q_bias", np.zeros(16, np.float32))]))
    misshapen = [(n, a.T.copy() if n.endswith("q_proj.weight") else a) for n, a in tensors]
    write_case("misshapen_tensor", "q_proj stored transposed", model_bytes=valid_model_bytes(misshapen))
    write_case("tied_with_lm_head", "tie_word_embeddings true but lm_head.weight present",
               config=with_config(tie_word_embeddings=True), model_bytes=good)
    write_case("gqa_config_gqe_weights", "a gqa config over a GQE checkpoint (router is extra)",
               config=with_config(attention_type="gqa"), model_bytes=good)
    write_case("variant_mismatch", "hard_concat config over a gqe-variant checkpoint",
               config=with_config(gqe_variant="hard_concat"), model_bytes=good)

    # --- config.json ---------------------------------------------------------------------------
    write_case("config_not_json", "config.json is not JSON", config_text="{\"vocab_size\": 16,", model_bytes=good)
    write_case("config_not_object", "config.json is a list", config_text="[16, 8]", model_bytes=good)
    write_case("heads_not_divisible", "num_attention_heads 4 over 3 KV heads",
               config=with_config(num_key_value_heads=3), model_bytes=good)
    write_case("top_k_above_m", "gqe_top_k 3 with M = 2", config=with_config(gqe_top_k=3), model_bytes=good)
    write_case("top_k_zero", "gqe_top_k 0", config=with_config(gqe_top_k=0), model_bytes=good)
    write_case("top_k_missing", "a gqe config without gqe_top_k", config=with_config(gqe_top_k=...), model_bytes=good)
    write_case("odd_head_dim", "head_dim 3 (RoPE pairs need an even one)", config=with_config(head_dim=3), model_bytes=good)
    write_case("zero_hidden", "hidden_size 0", config=with_config(hidden_size=0), model_bytes=good)
    write_case("huge_vocab", "vocab_size beyond any sane model", config=with_config(vocab_size=1 << 40), model_bytes=good)
    write_case("huge_but_sane_sizes", "sizes within limits that the file cannot hold (no huge allocation)",
               config=with_config(vocab_size=1 << 20, hidden_size=1 << 14), model_bytes=good)
    write_case("missing_vocab", "vocab_size absent", config=with_config(vocab_size=...), model_bytes=good)
    write_case("vocab_as_string", "vocab_size given as a string", config=with_config(vocab_size="16"), model_bytes=good)
    write_case("layers_fractional", "num_hidden_layers 1.5", config=with_config(num_hidden_layers=1.5), model_bytes=good)
    write_case("tie_as_number", "tie_word_embeddings given as 1", config=with_config(tie_word_embeddings=1), model_bytes=good)
    write_case("eps_as_string", "rms_norm_eps given as a string", config=with_config(rms_norm_eps="1e-5"), model_bytes=good)
    write_case("rope_scaling", "rope_scaling set (not implemented)",
               config=with_config(rope_scaling={"type": "linear", "factor": 2.0}), model_bytes=good)
    write_case("attention_bias", "attention_bias true (not implemented)", config=with_config(attention_bias=True), model_bytes=good)
    write_case("unknown_attention_type", "attention_type \"mla\"", config=with_config(attention_type="mla"), model_bytes=good)
    write_case("unknown_variant", "gqe_variant \"soft\"", config=with_config(gqe_variant="soft"), model_bytes=good)

    with open(os.path.join(ROOT, "README.md"), "w") as f:
        f.write("# Malformed checkpoints\n\nEach folder is a small checkpoint broken in one way; `gqe-run` must refuse it "
                "with one line on stderr and exit status 2 (tests/cli/check_cli.cmake), and `load_checkpoint` must throw "
                "a `gqe::Error`. Regenerate with `/usr/bin/python3 tools/make_bad_checkpoints.py`.\n\n"
                "| folder | what is wrong |\n|---|---|\n")
        for name, what in CASES:
            f.write(f"| {name} | {what} |\n")
    print(f"wrote {len(CASES)} malformed checkpoints to {os.path.normpath(ROOT)}")


if __name__ == "__main__":
    main()
