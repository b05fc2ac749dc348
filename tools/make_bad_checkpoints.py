#!/usr/bin/env python3
"""Writes tests/bad_checkpoints/: small checkpoint folders, each broken in exactly one way.

Every folder must make `gqe-run --model DIR ...` print one line on stderr and exit with status 2
(tests/cli/check_cli.cmake runs them), and load_checkpoint must throw a gqe::Error whose message holds
what tests/bad_checkpoints/README.md lists (tests/test_io.cpp reads that table).

    /usr/bin/python3 tools/make_bad_checkpoints.py

replaces the whole folder with freshly written cases; it takes no other arguments.
"""

import argparse
import json
import os
import shutil
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gqe_reference as ref  # noqa: E402
from tool_cli import Parser  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "bad_checkpoints")

BASE_CONFIG = {
    "attention_type": "gqe", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4,
    "gqe_top_k": 1, "gqe_variant": "gqe", "max_position_embeddings": 64,
}


def base_tensors():
    """The valid model's tensors as (name, float32 array), in docs/checkpoints.md's order."""
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


def write_case(name, what, says, config=BASE_CONFIG, model_bytes=None, config_text=None):
    """One folder; `says` lists what the refusal's message must contain (tests/test_io.cpp checks)."""
    folder = os.path.join(ROOT, name)
    os.makedirs(folder)
    if config_text is not None or config is not None:
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            f.write(config_text if config_text is not None else json.dumps(config, indent=1))
    if model_bytes is not None:
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(model_bytes)
    CASES.append((name, what, [says] if isinstance(says, str) else says))


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
    Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    shutil.rmtree(ROOT, ignore_errors=True)
    os.makedirs(ROOT)
    good = valid_model_bytes()
    tensors = base_tensors()
    header, data = header_and_data(tensors)
    text = json.dumps(header).encode()
    first, second = tensors[0][0], tensors[1][0]
    b0, e0 = header[first]["data_offsets"]

    def edited(name, **fields):
        """The valid header with one tensor's entry changed (a field set to ... is dropped)."""
        bad = dict(header)
        entry = dict(header[name], **fields)
        bad[name] = {k: v for k, v in entry.items() if v is not ...}
        return pack(json.dumps(bad).encode(), data)

    # --- files missing or unreadable -------------------------------------------------------
    write_case("no_config", "config.json is missing", "config.json does not exist", config=None, model_bytes=good)
    write_case("config_empty", "config.json is empty", "config.json is not valid JSON", config_text="", model_bytes=good)
    write_case("no_model", "model.safetensors is missing", "model.safetensors does not exist")
    write_case("model_is_folder", "model.safetensors is a folder", "model.safetensors does not exist or is not a file")
    os.makedirs(os.path.join(ROOT, "model_is_folder", "model.safetensors"))
    with open(os.path.join(ROOT, "model_is_folder", "model.safetensors", "README"), "w") as f:
        f.write("model.safetensors is a folder here on purpose.\n")
    write_case("empty_model", "model.safetensors is empty (shorter than 8 bytes)", "expected at least 8", model_bytes=b"")
    write_case("seven_bytes", "model.safetensors is 7 bytes", "is 7 bytes long", model_bytes=b"\x10\x00\x00\x00\x00\x00\x00")
    write_case("truncated_data", "the data area is cut short", ["lm_head.weight", "outside the"], model_bytes=good[:-10])
    write_case("truncated_header", "the header length runs past the end", "runs past the end of the file", model_bytes=good[:40])
    write_case("header_over_limit", "the header length exceeds 100,000,000", "exceeds the format's limit",
               model_bytes=pack(text, data, 100_000_001))
    write_case("header_length_huge", "the header length is 2^63", "header length 9223372036854775808",
               model_bytes=pack(text, data, 1 << 63))
    write_case("header_length_zero", "the header length is 0 (an empty header)", "not valid JSON", model_bytes=pack(b"", data))

    # --- header JSON ---------------------------------------------------------------------------
    write_case("header_not_json", "the header is not JSON", "not valid JSON", model_bytes=pack(b"{not json" + b" " * 7, data))
    write_case("header_trailing_garbage", "the header object is followed by more text", "not valid JSON",
               model_bytes=pack(text + b" {}", data))
    write_case("header_nul_padded", "the header padded with NUL bytes (JSON text holds none)", ["the header", "is NUL"],
               model_bytes=pack(text + b"\0" * 8, data))
    write_case("header_bom", "the header begins with a UTF-8 byte-order mark", ["the header", "byte-order mark"],
               model_bytes=pack(b"\xef\xbb\xbf" + text, data))
    write_case("header_not_object", "the header is a JSON array", "not an object", model_bytes=pack(b"[1, 2, 3]       ", data))
    entry = json.dumps(header[first])
    dup = text.decode().replace("{", "{\"%s\": %s, " % (first, entry), 1).encode()
    write_case("duplicate_name", "a tensor name appears twice in the header", f'"{first}" twice', model_bytes=pack(dup, data))
    bad = dict(header)
    bad[first] = 5
    write_case("entry_not_object", "a tensor described by a number", f"tensor {first} is described by 5",
               model_bytes=pack(json.dumps(bad).encode(), data))
    write_case("unknown_dtype", "a dtype no reader knows", [first, "dtype Q8"], model_bytes=edited(first, dtype="Q8"))
    write_case("integer_weights", "weights stored as I64 (not a dtype gqe reads)", [first, "dtype I64"],
               model_bytes=edited(first, dtype="I64"))
    write_case("dtype_not_string", "a dtype given as a number", [first, "dtype 32"], model_bytes=edited(first, dtype=32))
    write_case("no_dtype", "a tensor entry without dtype", [first, 'has no "dtype"'], model_bytes=edited(first, dtype=...))
    write_case("no_shape", "a tensor entry without shape", [first, 'has no "shape"'], model_bytes=edited(first, shape=...))
    write_case("no_offsets", "a tensor entry without data_offsets", [first, 'has no "data_offsets"'],
               model_bytes=edited(first, data_offsets=...))
    write_case("shape_not_array", "a shape given as a string", [first, 'has shape "16x8"'], model_bytes=edited(first, shape="16x8"))
    write_case("negative_shape", "negative dimensions", [first, "shape entry -16"], model_bytes=edited(first, shape=[-16, -8]))
    write_case("shape_overflow", "a shape whose element count overflows 64 bits", [first, "overflows"],
               model_bytes=edited(first, shape=[1 << 40, 1 << 40]))
    nested = b"[" * 20000 + b"]" * 20000
    deep = text.replace(json.dumps(header[first]["shape"]).encode(), nested, 1)
    write_case("shape_deeply_nested", "a shape of arrays nested 20000 deep", [first, "inside its shape"],
               model_bytes=pack(deep, data))
    write_case("shape_vs_bytes", "a shape that disagrees with its byte range", [first, "has shape [16, 9]"],
               model_bytes=edited(first, shape=[16, 9]))
    write_case("offsets_out_of_range", "data_offsets beyond the data", [first, "outside the"],
               model_bytes=edited(first, data_offsets=[b0 + len(data), e0 + len(data)]))
    write_case("offsets_three_values", "data_offsets with three values", [first, "more than 2 values"],
               model_bytes=edited(first, data_offsets=[b0, e0, e0]))
    write_case("offsets_not_integers", "data_offsets given as floats", [first, "data_offsets entry 0.0"],
               model_bytes=edited(first, data_offsets=[float(b0), float(e0)]))
    bad = dict(header)
    b1, e1 = header[second]["data_offsets"]
    bad[second] = dict(header[second], data_offsets=[b1 - 4, e1 - 4])
    write_case("offsets_overlap", "two tensors share bytes", "overlaps",
               model_bytes=pack(json.dumps(bad).encode(), data + b"\0" * 4))
    bad = {k: (dict(v, data_offsets=[v["data_offsets"][0] + 4, v["data_offsets"][1] + 4])
               if k != "__metadata__" and v["data_offsets"][0] > 0 else v) for k, v in header.items()}
    write_case("offsets_hole", "4 bytes between two tensors belong to neither", "belong to no tensor",
               model_bytes=pack(json.dumps(bad).encode(), data[:e0] + b"\0" * 4 + data[e0:]))
    write_case("offsets_gap", "bytes after the last tensor belong to no tensor", "the tensors cover",
               model_bytes=pack(text, data + b"\0" * 12))
    write_case("offsets_reversed", "end before begin", [first, "end before they begin"],
               model_bytes=edited(first, data_offsets=[e0, b0]))
    bad = dict(header)
    bad["__metadata__"] = {"format": 1}
    write_case("metadata_not_strings", "__metadata__ with a number value", '__metadata__ value of "format" is 1',
               model_bytes=pack(json.dumps(bad).encode(), data))
    bad = dict(header)
    bad["__metadata__"] = "pt"
    write_case("metadata_not_object", "__metadata__ given as a string", '__metadata__ is "pt"',
               model_bytes=pack(json.dumps(bad).encode(), data))

    # --- tensors against config.json -----------------------------------------------------------
    write_case("missing_tensor", "model.layers.0.self_attn.router.weight is absent",
               ["model.layers.0.self_attn.router.weight is missing", "[4, 8]"],
               model_bytes=valid_model_bytes([t for t in tensors if "router" not in t[0]]))
    write_case("lm_head_missing", "an untied model without lm_head.weight", "lm_head.weight is missing",
               model_bytes=valid_model_bytes([t for t in tensors if t[0] != "lm_head.weight"]))
    write_case("extra_tensor", "a tensor the config does not have", ["model.layers.0.self_attn.q_bias", "not part of"],
               model_bytes=valid_model_bytes(tensors + [("model.layers.0.self_attn.q_bias", np.zeros(16, np.float32))]))
    write_case("name_with_newline", "an extra tensor whose name holds a newline (the message stays one line)",
               "bad\\x0aname", model_bytes=valid_model_bytes(tensors + [("bad\nname", np.zeros(2, np.float32))]))
    misshapen = [(n, a.T.copy() if n.endswith("q_proj.weight") else a) for n, a in tensors]
    write_case("misshapen_tensor", "q_proj stored transposed",
               ["model.layers.0.self_attn.q_proj.weight", "[8, 16]", "[16, 8]"], model_bytes=valid_model_bytes(misshapen))
    wrong_rank = [(n, a.reshape(1, -1) if n == "model.norm.weight" else a) for n, a in tensors]
    write_case("wrong_rank", "model.norm.weight stored as [1, 8]", ["model.norm.weight", "[1, 8]", "[8]"],
               model_bytes=valid_model_bytes(wrong_rank))
    write_case("weights_as_i32", "a weight stored as I32 (a dtype gqe writes, but not for weights)",
               [first, "dtype I32"], model_bytes=edited(first, dtype="I32"))
    write_case("tied_with_lm_head", "tie_word_embeddings true but lm_head.weight present",
               ["lm_head.weight", "tie_word_embeddings"], config=with_config(tie_word_embeddings=True), model_bytes=good)
    write_case("gqa_config_gqe_weights", "a gqa config over a GQE checkpoint (router is extra)",
               ["router.weight", "not part of a gqa model"], config=with_config(attention_type="gqa"), model_bytes=good)
    write_case("variant_mismatch", "hard_concat config over a gqe-variant checkpoint", ["o_proj.weight", "[8, 16]", "[8, 8]"],
               config=with_config(gqe_variant="hard_concat"), model_bytes=good)

    # --- config.json ---------------------------------------------------------------------------
    write_case("config_not_json", "config.json is not JSON", "not valid JSON", config_text="{\"vocab_size\": 16,", model_bytes=good)
    write_case("config_nul_then_text", "config.json says more after a NUL byte", ["config.json", "is NUL"],
               config_text=json.dumps(BASE_CONFIG) + "\0{\"vocab_size\": 32}", model_bytes=good)
    write_case("config_bom", "config.json begins with a UTF-8 byte-order mark", ["config.json", "byte-order mark"],
               config_text="\ufeff" + json.dumps(BASE_CONFIG), model_bytes=good)
    write_case("config_not_object", "config.json is a list", "not an object", config_text="[16, 8]", model_bytes=good)
    dup_config = json.dumps(BASE_CONFIG, indent=1).replace("{", "{\n \"vocab_size\": 32,", 1)
    write_case("config_duplicate_key", "config.json gives vocab_size twice", '"vocab_size" twice',
               config_text=dup_config, model_bytes=good)
    write_case("heads_not_divisible", "num_attention_heads 4 over 3 KV heads", "num_attention_heads is 4",
               config=with_config(num_key_value_heads=3), model_bytes=good)
    write_case("kv_heads_zero", "num_key_value_heads 0", "num_key_value_heads is 0",
               config=with_config(num_key_value_heads=0), model_bytes=good)
    write_case("top_k_above_m", "gqe_top_k 3 with M = 2", "gqe_top_k is 3", config=with_config(gqe_top_k=3), model_bytes=good)
    write_case("top_k_zero", "gqe_top_k 0", "gqe_top_k is 0", config=with_config(gqe_top_k=0), model_bytes=good)
    write_case("top_k_missing", "a gqe config without gqe_top_k", '"gqe_top_k" is required',
               config=with_config(gqe_top_k=...), model_bytes=good)
    write_case("odd_head_dim", "head_dim 3 (RoPE pairs need an even one)", "head_dim is 3",
               config=with_config(head_dim=3), model_bytes=good)
    write_case("head_dim_not_derivable", "no head_dim, and hidden_size 10 is not a multiple of 4 heads", '"head_dim" is absent',
               config=with_config(head_dim=..., hidden_size=10), model_bytes=good)
    write_case("zero_hidden", "hidden_size 0", "hidden_size is 0", config=with_config(hidden_size=0), model_bytes=good)
    write_case("zero_layers", "num_hidden_layers 0", "num_hidden_layers is 0", config=with_config(num_hidden_layers=0),
               model_bytes=good)
    write_case("layers_negative", "num_hidden_layers -1", "num_hidden_layers is -1", config=with_config(num_hidden_layers=-1),
               model_bytes=good)
    write_case("huge_vocab", "vocab_size beyond any sane model", "vocab_size is 1099511627776",
               config=with_config(vocab_size=1 << 40), model_bytes=good)
    write_case("vocab_beyond_64_bits", "vocab_size 2^64 - 1", ['"vocab_size"', "fits in 64 bits"],
               config=with_config(vocab_size=(1 << 64) - 1), model_bytes=good)
    write_case("huge_but_sane_sizes", "sizes within limits that the file cannot hold (no huge allocation)",
               "config.json implies", config=with_config(vocab_size=1 << 20, hidden_size=1 << 14), model_bytes=good)
    write_case("missing_vocab", "vocab_size absent", '"vocab_size" is required', config=with_config(vocab_size=...),
               model_bytes=good)
    write_case("vocab_as_string", "vocab_size given as a string", '"vocab_size" is "16"', config=with_config(vocab_size="16"),
               model_bytes=good)
    write_case("hidden_as_bool", "hidden_size given as true", '"hidden_size" is true', config=with_config(hidden_size=True),
               model_bytes=good)
    write_case("layers_fractional", "num_hidden_layers 1.5", '"num_hidden_layers" is 1.5',
               config=with_config(num_hidden_layers=1.5), model_bytes=good)
    write_case("tie_as_number", "tie_word_embeddings given as 1", '"tie_word_embeddings" is 1',
               config=with_config(tie_word_embeddings=1), model_bytes=good)
    write_case("eps_as_string", "rms_norm_eps given as a string", '"rms_norm_eps" is "1e-5"',
               config=with_config(rms_norm_eps="1e-5"), model_bytes=good)
    write_case("eps_zero", "rms_norm_eps 0", "rms_norm_eps is 0", config=with_config(rms_norm_eps=0.0), model_bytes=good)
    write_case("theta_negative", "rope_theta -1", "rope_theta is -1", config=with_config(rope_theta=-1.0), model_bytes=good)
    write_case("positions_zero", "max_position_embeddings 0", "max_position_embeddings is 0",
               config=with_config(max_position_embeddings=0), model_bytes=good)
    write_case("rope_scaling", "rope_scaling set (not implemented)", ['"rope_scaling"', "does not implement"],
               config=with_config(rope_scaling={"type": "linear", "factor": 2.0}), model_bytes=good)
    write_case("attention_bias", "attention_bias true (not implemented)", ['"attention_bias" is true', "does not implement"],
               config=with_config(attention_bias=True), model_bytes=good)
    write_case("mlp_bias", "mlp_bias true (not implemented)", ['"mlp_bias" is true', "does not implement"],
               config=with_config(mlp_bias=True), model_bytes=good)
    write_case("hidden_act_gelu", "hidden_act gelu (SwiGLU is computed with SiLU)", ['"hidden_act" is "gelu"', "SiLU"],
               config=with_config(hidden_act="gelu"), model_bytes=good)
    write_case("sliding_window", "a sliding window switched on (not implemented)", ['"sliding_window" is 8', "sliding-window"],
               config=with_config(sliding_window=8), model_bytes=good)
    write_case("rope_parameters_llama3", "RoPE scaling given the newer way, in rope_parameters",
               ['"rope_parameters" sets "factor"'],
               config=with_config(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0}),
               model_bytes=good)
    write_case("eos_out_of_vocab", "eos_token_id 16 with vocab_size 16", ["eos_token_id 16", "vocab_size - 1 = 15"],
               config=with_config(eos_token_id=16), model_bytes=good)
    write_case("eos_not_ids", "eos_token_id a list holding a string", ['"eos_token_id" is [1, "2"]', "token ids"],
               config=with_config(eos_token_id=[1, "2"]), model_bytes=good)
    write_case("unknown_attention_type", "attention_type \"mla\"", 'attention_type is "mla"',
               config=with_config(attention_type="mla"), model_bytes=good)
    write_case("unknown_variant", "gqe_variant \"soft\"", 'gqe_variant is "soft"', config=with_config(gqe_variant="soft"),
               model_bytes=good)

    with open(os.path.join(ROOT, "README.md"), "w") as f:
        f.write("# Malformed checkpoints\n\n"
                "Each folder is a small checkpoint (vocabulary 16, hidden size 8, one GQE layer) broken in one way. "
                "`gqe-run` must refuse each with one line on stderr and exit status 2 (tests/cli/check_cli.cmake), "
                "and `load_checkpoint` must throw a `gqe::Error` whose message contains every quoted piece of the "
                "last column (tests/test_io.cpp reads this table). Non-finite weights are not malformed and are not "
                "here. Regenerate with `/usr/bin/python3 tools/make_bad_checkpoints.py`.\n\n"
                "| folder | what is wrong | the message says |\n|---|---|---|\n")
        for name, what, says in CASES:
            f.write(f"| {name} | {what} | {', '.join('`' + s + '`' for s in says)} |\n")
    print(f"wrote {len(CASES)} malformed checkpoints to {os.path.normpath(ROOT)}")


if __name__ == "__main__":
    main()
