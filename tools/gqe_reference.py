#!/usr/bin/env python3
"""Float64 NumPy reference of the whole GQE model described in docs/model.md.

Deliberately slow and literal: every step follows docs/model.md's wording so that the
C++ library can be checked against it. Nothing here is optimised; loops are kept
where they make the maths easier to read.

Python API
----------
Safetensors:
    read_safetensors(path) -> dict[str, np.ndarray]
    read_safetensors_full(path) -> (tensors, dtypes, metadata)
    write_safetensors(path, tensors, dtypes=None, metadata=None)
    float_to_bf16_bits(x) -> np.ndarray[uint16]      (round to nearest even)
    bf16_bits_to_float(bits) -> np.ndarray[float32]   (exact)
Config and checkpoint:
    Config (dataclass), config_from_dict(d) -> Config, load_config(path) -> Config
    weight_shapes(cfg) -> dict[str, tuple]
    check_weights(cfg, weights)
    load_model(model_dir) -> (Config, dict[str, float64 array])
    random_weights(cfg, seed) -> dict[str, float64 array]
    make_random_checkpoint(model_dir, config_dict, seed, dtype="F32") -> (Config, weights as stored, float64)
Model pieces (all float64):
    rms_norm(x, weight, eps)
    rope_cos_sin(positions, head_dim, theta) -> (cos, sin), apply_rope(x, cos, sin)
    causal_attention(q, k, v)
    gqa_attention(x, lw, cfg, positions) -> y
    route(x, router_weight, cfg) -> (logits, probs, indices)
    load_balancing_loss(probs, indices) -> float
    gqe_attention(x, lw, cfg, positions) -> (y, info)
    swiglu_mlp(x, lw)
    layer_weights(weights, i) -> dict
    forward(cfg, weights, ids) -> ForwardResult
CLI:
    python3 tools/gqe_reference.py --model DIR (--prompt-ids 1,2,3 | --prompt TEXT) [--logits-out FILE]
    python3 tools/gqe_reference.py --make-random DIR --config-json '{...}' --seed S [--dtype F32]
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

# --------------------------------------------------------------------------------------------
# Safetensors
# --------------------------------------------------------------------------------------------

# Storage dtype name -> (numpy dtype of the raw little-endian words, bytes per element).
# BF16 has no numpy dtype: it is read and written as raw uint16 words.
_ST_DTYPES = {
    "F64": (np.dtype("<f8"), 8),
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "I32": (np.dtype("<i4"), 4),
}

_MAX_HEADER_BYTES = 100_000_000


class BadInput(Exception):
    """Anything the user can fix: malformed files, bad config, bad prompt (CLI exit status 2)."""


def bf16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    """BF16 is the top half of a float32, so widening is exact."""
    bits = np.asarray(bits, dtype=np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32/float64 values to BF16 (nearest, ties to even), returned as uint16 words.

    Rounds once, straight from the input precision: going through float32 first would
    round twice and can differ from a correctly rounded result for float64 inputs.
    """
    x = np.asarray(x, dtype=np.float64)
    out = np.empty(x.shape, dtype=np.uint16)
    flat_x = x.reshape(-1)
    flat_out = out.reshape(-1)
    for i, v in enumerate(flat_x):
        if math.isnan(v):
            flat_out[i] = 0x7FC0
            continue
        if math.isinf(v) or v == 0.0:
            # float32 keeps the sign of zero and infinity; its top half is the BF16 word.
            flat_out[i] = int(np.array(v, dtype=np.float32).view(np.uint32)) >> 16
            continue
        _, e = math.frexp(v)  # |v| = mant * 2^e, mant in [0.5, 1)
        # BF16 keeps 8 significant bits; below the normal range the spacing is fixed at
        # 2^-133 (the smallest subnormal). Python's round() is round-half-even and the
        # scaling by powers of two is exact, so this is a single correct rounding.
        shift = max(e - 8, -133)
        r = math.copysign(math.ldexp(round(math.ldexp(v, -shift)), shift), v)  # a tiny negative rounds to -0
        if abs(r) >= 2.0 ** 128:  # rounded past the largest finite BF16
            r = math.copysign(math.inf, v)
        # r has at most 8 significant bits, so float32 holds it exactly.
        flat_out[i] = int(np.array(r, dtype=np.float32).view(np.uint32)) >> 16
    return out


def read_safetensors_full(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str], Dict[str, str]]:
    """Read every tensor of a safetensors file.

    Returns (tensors, dtypes, metadata). Floats come back as float64 (exact for every
    supported float dtype), I32 as int32; dtypes gives each tensor's stored dtype name.
    """
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror}") from None
    if len(blob) < 8:
        raise BadInput(f"{path}: too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > len(blob):
        raise BadInput(f"{path}: header length {header_len} is out of range")
    try:
        header = json.loads(blob[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise BadInput(f"{path}: header is not a JSON object")
    data = memoryview(blob)[8 + header_len :]

    metadata = header.pop("__metadata__", None) or {}
    tensors: Dict[str, np.ndarray] = {}
    dtypes: Dict[str, str] = {}
    for name, info in header.items():
        try:
            dtype_name = info["dtype"]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise BadInput(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype_name not in _ST_DTYPES:
            raise BadInput(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
        np_dtype, size = _ST_DTYPES[dtype_name]
        count = int(np.prod(shape, dtype=np.int64))
        if any(s < 0 for s in shape) or not (0 <= begin <= end <= len(data)) or end - begin != count * size:
            raise BadInput(f"{path}: tensor {name!r} has offsets that disagree with its shape")
        raw = np.frombuffer(data[begin:end], dtype=np_dtype).reshape(shape)
        if dtype_name == "BF16":
            arr = bf16_bits_to_float(raw).astype(np.float64)
        elif dtype_name == "I32":
            arr = raw.astype(np.int32)
        else:
            arr = raw.astype(np.float64)
        tensors[name] = arr
        dtypes[name] = dtype_name
    return tensors, dtypes, metadata


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Tensors only; floats as float64, I32 as int32."""
    return read_safetensors_full(path)[0]


def _default_st_dtype(arr: np.ndarray) -> str:
    if arr.dtype == np.float64:
        return "F64"
    if arr.dtype == np.float32:
        return "F32"
    if arr.dtype == np.float16:
        return "F16"
    if np.issubdtype(arr.dtype, np.integer):
        return "I32"
    raise ValueError(f"no default safetensors dtype for numpy dtype {arr.dtype}")


def write_safetensors(
    path: str,
    tensors: Dict[str, np.ndarray],
    dtypes: Optional[Dict[str, str]] = None,
    metadata: Optional[Dict[str, str]] = None,
) -> None:
    """Write tensors (in dict order) to a safetensors file.

    dtypes maps a name to "F64" | "F32" | "F16" | "BF16" | "I32"; by default it follows the
    array's numpy dtype (float64 -> F64, float32 -> F32, float16 -> F16, integers -> I32).
    Values are rounded to the storage dtype to nearest even. Adds "__metadata__":
    {"format": "pt"} (plus any given metadata).
    """
    dtypes = dict(dtypes or {})
    header: Dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    chunks: List[bytes] = []
    offset = 0
    for name, value in tensors.items():
        arr = np.asarray(value)
        dtype_name = dtypes.get(name) or _default_st_dtype(arr)
        if dtype_name not in _ST_DTYPES:
            raise ValueError(f"unsupported dtype {dtype_name}")
        if dtype_name == "BF16":
            raw = float_to_bf16_bits(arr).astype("<u2")
        elif dtype_name == "I32":
            if not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"tensor {name!r}: I32 needs integer values")
            if arr.size and (arr.min() < -(2**31) or arr.max() >= 2**31):
                raise ValueError(f"tensor {name!r}: value out of int32 range")
            raw = arr.astype("<i4")
        else:
            raw = arr.astype(_ST_DTYPES[dtype_name][0])  # numpy casts round to nearest even
        b = np.ascontiguousarray(raw).tobytes()
        header[name] = {"dtype": dtype_name, "shape": list(arr.shape), "data_offsets": [offset, offset + len(b)]}
        chunks.append(b)
        offset += len(b)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Pad with spaces so the data starts 8-byte aligned, as the Rust safetensors writer does.
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for b in chunks:
            f.write(b)


# --------------------------------------------------------------------------------------------
# Config and checkpoint
# --------------------------------------------------------------------------------------------


@dataclass
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    attention_type: str = "gqa"
    gqe_top_k: int = 1
    gqe_variant: str = "gqe"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096

    @property
    def experts_per_group(self) -> int:  # M
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def num_slots(self) -> int:  # S: number of d_h-wide slots entering o_proj
        if self.attention_type == "gqa":
            return self.num_attention_heads
        kg = self.gqe_top_k * self.num_key_value_heads
        return kg + 2 if self.gqe_variant == "gqe" else kg


def _get_int(d: dict, key: str, default: Optional[int] = None) -> int:
    v = d.get(key)
    if v is None:
        if default is None:
            raise BadInput(f"config.json: missing required key {key!r}")
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise BadInput(f"config.json: {key} must be a positive integer, got {v!r}")
    return v


def _get_float(d: dict, key: str, default: float) -> float:
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0) or not math.isfinite(v):
        raise BadInput(f"config.json: {key} must be a positive number, got {v!r}")
    return float(v)


def config_from_dict(d: dict) -> Config:
    """Apply docs/checkpoints.md's defaults and checks to a parsed config.json (unknown keys ignored)."""
    if not isinstance(d, dict):
        raise BadInput("config.json: not a JSON object")
    for key in ("rope_scaling", "attention_bias", "mlp_bias"):
        if d.get(key) not in (None, False):
            raise BadInput(f"config.json: {key} = {d[key]!r} is not supported (must be null or false)")
    if d.get("hidden_act") not in (None, "silu"):
        raise BadInput(f"config.json: hidden_act = {d['hidden_act']!r} is not supported (this model is SwiGLU with SiLU)")
    rope_theta = _get_float(d, "rope_theta", 10000.0)
    rope = d.get("rope_parameters")  # newer Hugging Face configs: {"rope_type": "default", "rope_theta": ...}
    if rope is not None:
        if not isinstance(rope, dict) or any(k not in ("rope_type", "type", "rope_theta") for k in rope) \
                or any(rope.get(k) not in (None, "default") for k in ("rope_type", "type")):
            raise BadInput(f"config.json: rope_parameters = {rope!r} is not supported (plain RoPE only)")
        if rope.get("rope_theta") is not None:
            rope_theta = _get_float(rope, "rope_theta", rope_theta)

    attention_type = d.get("attention_type") or "gqa"
    if attention_type not in ("gqa", "gqe"):
        raise BadInput(f"config.json: attention_type must be 'gqa' or 'gqe', got {attention_type!r}")
    variant = d.get("gqe_variant") or "gqe"
    if variant not in ("gqe", "hard_concat", "weighted_concat"):
        raise BadInput(f"config.json: unknown gqe_variant {variant!r}")

    d_model = _get_int(d, "hidden_size")
    n_heads = _get_int(d, "num_attention_heads")
    n_kv = _get_int(d, "num_key_value_heads", n_heads)
    if d.get("head_dim") is None and d_model % n_heads != 0:
        raise BadInput("config.json: hidden_size is not a multiple of num_attention_heads; give head_dim")
    head_dim = _get_int(d, "head_dim", d_model // n_heads)
    if n_heads % n_kv != 0:
        raise BadInput("config.json: num_attention_heads must be a multiple of num_key_value_heads")
    if head_dim % 2 != 0:
        raise BadInput("config.json: head_dim must be even for RoPE")
    top_k = 1
    if attention_type == "gqe":
        top_k = _get_int(d, "gqe_top_k")
        if top_k > n_heads // n_kv:
            raise BadInput(f"config.json: gqe_top_k = {top_k} exceeds experts per group {n_heads // n_kv}")
    tie = d.get("tie_word_embeddings", False)
    if tie is None:
        tie = False
    if not isinstance(tie, bool):
        raise BadInput("config.json: tie_word_embeddings must be true or false")

    return Config(
        vocab_size=_get_int(d, "vocab_size"),
        hidden_size=d_model,
        intermediate_size=_get_int(d, "intermediate_size"),
        num_hidden_layers=_get_int(d, "num_hidden_layers"),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        attention_type=attention_type,
        gqe_top_k=top_k,
        gqe_variant=variant,
        rms_norm_eps=_get_float(d, "rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        tie_word_embeddings=tie,
        max_position_embeddings=_get_int(d, "max_position_embeddings", 4096),
    )


def load_config(path: str) -> Config:
    try:
        with open(path, "r", encoding="utf-8") as f:
            d = json.load(f)
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: not valid JSON ({e})") from None
    return config_from_dict(d)


def weight_shapes(cfg: Config) -> Dict[str, Tuple[int, ...]]:
    """Every tensor the checkpoint must hold, in docs/checkpoints.md's order, with its [out, in] shape."""
    V, d, I = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
    N, G, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    shapes: Dict[str, Tuple[int, ...]] = {"model.embed_tokens.weight": (V, d)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (N * dh, d)
        shapes[p + "self_attn.k_proj.weight"] = (G * dh, d)
        shapes[p + "self_attn.v_proj.weight"] = (G * dh, d)
        if cfg.attention_type == "gqe":
            shapes[p + "self_attn.router.weight"] = (N, d)  # G*M rows
            if cfg.gqe_variant == "gqe":
                shapes[p + "self_attn.q_shared.weight"] = (dh, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, cfg.num_slots * dh)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (I, d)
        shapes[p + "mlp.up_proj.weight"] = (I, d)
        shapes[p + "mlp.down_proj.weight"] = (d, I)
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, d)
    return shapes


def check_weights(cfg: Config, weights: Dict[str, np.ndarray]) -> None:
    """Refuse a missing, extra or misshapen tensor, as the loader must."""
    want = weight_shapes(cfg)
    for name, shape in want.items():
        if name not in weights:
            raise BadInput(f"model.safetensors: missing tensor {name}")
        if tuple(weights[name].shape) != shape:
            got = list(weights[name].shape)
            raise BadInput(f"model.safetensors: {name} has shape {got}, expected {list(shape)}")
    for name in weights:
        if name not in want:
            raise BadInput(f"model.safetensors: unexpected tensor {name}")
    for name, w in weights.items():
        if not np.issubdtype(w.dtype, np.floating):
            raise BadInput(f"model.safetensors: {name} is not a float tensor")


INDEX_FILE = "model.safetensors.index.json"


def read_sharded(model_dir: str) -> Dict[str, np.ndarray]:
    """The tensors of a sharded folder: every tensor in the shard the index names, exactly once."""
    path = os.path.join(model_dir, INDEX_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        weight_map = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{path}: not a safetensors index ({e})") from None
    weights: Dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        if "/" in shard or shard in ("", ".", ".."):
            raise BadInput(f"{path}: shard name {shard!r} is not a file beside the index")
        for name, value in read_safetensors(os.path.join(model_dir, shard)).items():
            if weight_map.get(name) != shard or name in weights:
                raise BadInput(f"tensor {name} is in {shard}, which the index does not name for it")
            weights[name] = value
    missing = sorted(set(weight_map) - set(weights))
    if missing:
        raise BadInput(f"tensor {missing[0]} is missing from the shard the index names")
    return weights


def load_model(model_dir: str) -> Tuple[Config, Dict[str, np.ndarray]]:
    """Read config.json and the weights (model.safetensors, or the shards of an index, which wins);
    weights come back as float64."""
    cfg = load_config(os.path.join(model_dir, "config.json"))
    if os.path.exists(os.path.join(model_dir, INDEX_FILE)):
        weights = read_sharded(model_dir)
    else:
        weights = read_safetensors(os.path.join(model_dir, "model.safetensors"))
    check_weights(cfg, weights)
    return cfg, weights


def write_weights(model_dir: str, weights: Dict[str, np.ndarray], dtype: str, shard_bytes: Optional[int] = None) -> None:
    """model.safetensors, or with shard_bytes shards of about that many bytes (in the weights'
    order) named model-0000i-of-0000K.safetensors and the index naming each tensor's shard."""
    if not shard_bytes:
        write_safetensors(os.path.join(model_dir, "model.safetensors"), weights, {name: dtype for name in weights})
        return
    size = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}[dtype]
    shards: List[Dict[str, np.ndarray]] = [{}]
    used = 0
    for name, w in weights.items():
        nbytes = w.size * size
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = w
        used += nbytes
    weight_map: Dict[str, str] = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(model_dir, file), shard, {name: dtype for name in shard})
        weight_map.update({name: file for name in shard})
    total = sum(w.size * size for w in weights.values())
    with open(os.path.join(model_dir, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    # x: [T, d], weight: [d]
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope_cos_sin(positions: np.ndarray, head_dim: int, theta: float) -> Tuple[np.ndarray, np.ndarray]:
    """cos and sin of the rotary angles, each [T, d_h/2], computed in float64."""
    half = head_dim // 2
    inv_freq = theta ** (-(2.0 * np.arange(half, dtype=np.float64)) / head_dim)  # [d_h/2]
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # [T, d_h/2]
    return np.cos(angles), np.sin(angles)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE: element i pairs with element i + d_h/2.

    x: [T, H, d_h] or [T, d_h]; cos, sin: [T, d_h/2].
    """
    half = x.shape[-1] // 2
    if x.ndim == 3:
        cos, sin = cos[:, None, :], sin[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    # x*cos + rotate_half(x)*sin with rotate_half(x) = concat(-x2, x1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """One attention head, causal mask aligned bottom-right, scale 1/sqrt(d_h).

    q: [C, d_h] (the last C positions), k, v: [P + C, d_h]. Query i sees keys 0 .. P + i.
    """
    C, dh = q.shape
    P = k.shape[0] - C
    scores = (q @ k.T) / math.sqrt(dh)  # [C, P + C]
    visible = np.arange(k.shape[0])[None, :] <= (P + np.arange(C))[:, None]  # [C, P + C]
    scores = np.where(visible, scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(scores)
    probs = e / e.sum(axis=-1, keepdims=True)  # [C, P + C]
    return probs @ v  # [C, d_h]


def gqa_attention(x: np.ndarray, lw: Dict[str, np.ndarray], cfg: Config, positions: np.ndarray) -> np.ndarray:
    """Dense grouped-query attention. x: [T, d] (already normed) -> [T, d]."""
    T = x.shape[0]
    N, G, dh, M = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.experts_per_group
    cos, sin = rope_cos_sin(positions, dh, cfg.rope_theta)
    q = apply_rope((x @ lw["q_proj"].T).reshape(T, N, dh), cos, sin)  # [T, N, d_h]
    k = apply_rope((x @ lw["k_proj"].T).reshape(T, G, dh), cos, sin)  # [T, G, d_h]
    v = (x @ lw["v_proj"].T).reshape(T, G, dh)  # [T, G, d_h]
    heads = [causal_attention(q[:, e], k[:, e // M], v[:, e // M]) for e in range(N)]  # N x [T, d_h]
    return np.concatenate(heads, axis=-1) @ lw["o_proj"].T  # [T, N*d_h] -> [T, d]


def route(x: np.ndarray, router_weight: np.ndarray, cfg: Config) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Router logits [T, G, M], probabilities [T, G, M] and kept experts [T, G, k].

    Kept experts are ranked on the logits (same order as p inside a group), descending,
    equal logits going to the lower expert index: a stable sort of the negated logits
    gives exactly that.
    """
    T = x.shape[0]
    G, M, k = cfg.num_key_value_heads, cfg.experts_per_group, cfg.gqe_top_k
    logits = (x @ router_weight.T).reshape(T, G, M)  # [T, G, M]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    probs = e / e.sum(axis=-1, keepdims=True)  # [T, G, M]
    order = np.argsort(-logits, axis=-1, kind="stable")  # [T, G, M]
    return logits, probs, order[..., :k].astype(np.int64)  # indices: [T, G, k]


def load_balancing_loss(probs: np.ndarray, indices: np.ndarray) -> float:
    """L_aux = mean_g [ M * sum_m f[g, m] * P[g, m] ].

    probs: [T, G, M]; indices: [T, G, k]. f = fraction of tokens whose kept set contains m.
    """
    T, G, M = probs.shape
    kept = np.zeros((T, G, M))  # [T, G, M]
    for t in range(T):
        for g in range(G):
            for m in indices[t, g]:
                kept[t, g, m] = 1.0
    f = kept.mean(axis=0)  # [G, M]
    P = probs.mean(axis=0)  # [G, M]
    return float(np.mean(M * np.sum(f * P, axis=-1)))


def gqe_attention(
    x: np.ndarray, lw: Dict[str, np.ndarray], cfg: Config, positions: np.ndarray
) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """Grouped Query Experts attention. x: [T, d] (already normed) -> ([T, d], info).

    info holds router_logits / router_probs [T, G, M], expert_indices [T, G, k],
    slot_probs [T, G, k] (p of each kept expert), slots [T, G, k, d_h] (hard slot outputs,
    unweighted), renorm_weights [T, G, k] and renorm_slot / shared [T, d_h] (variant gqe),
    concat [T, S*d_h] (o_proj input) and aux_loss (float).
    """
    T = x.shape[0]
    N, G, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    M, k, variant = cfg.experts_per_group, cfg.gqe_top_k, cfg.gqe_variant
    cos, sin = rope_cos_sin(positions, dh, cfg.rope_theta)
    q = apply_rope((x @ lw["q_proj"].T).reshape(T, N, dh), cos, sin)  # [T, N, d_h], expert e = g*M + m
    key = apply_rope((x @ lw["k_proj"].T).reshape(T, G, dh), cos, sin)  # [T, G, d_h]
    val = (x @ lw["v_proj"].T).reshape(T, G, dh)  # [T, G, d_h]

    logits, probs, idx = route(x, lw["router"], cfg)  # [T, G, M], [T, G, M], [T, G, k]

    # Row t of an attention output depends only on query row t, so computing every expert
    # over every token and then picking row t of the chosen expert is the same as running
    # each slot (g, j) as one head whose query row t comes from the expert token t chose.
    expert_out = np.stack([causal_attention(q[:, e], key[:, e // M], val[:, e // M]) for e in range(N)], axis=1)
    # expert_out: [T, N, d_h]

    slots = np.zeros((T, G, k, dh))  # [T, G, k, d_h]
    slot_probs = np.zeros((T, G, k))  # [T, G, k]
    for t in range(T):
        for g in range(G):
            for j in range(k):
                m = idx[t, g, j]
                slots[t, g, j] = expert_out[t, g * M + m]
                slot_probs[t, g, j] = probs[t, g, m]

    info: Dict[str, np.ndarray] = {
        "router_logits": logits,
        "router_probs": probs,
        "expert_indices": idx,
        "slot_probs": slot_probs,
        "slots": slots,
    }

    if variant == "weighted_concat":
        parts = [(slots * slot_probs[..., None]).reshape(T, G * k * dh)]  # [T, G*k*d_h]
    else:
        parts = [slots.reshape(T, G * k * dh)]  # [T, G*k*d_h], slot order (g, j)

    if variant == "gqe":
        # Renormalised across all groups, not per group.
        total = slot_probs.sum(axis=(1, 2))  # [T]
        w = slot_probs / np.maximum(1e-9, total)[:, None, None]  # [T, G, k]
        renorm = np.einsum("tgj,tgjd->td", w, slots)  # [T, d_h]

        q_sh = apply_rope(x @ lw["q_shared"].T, cos, sin)  # [T, d_h]
        shared = causal_attention(q_sh, key.mean(axis=1), val.mean(axis=1))  # [T, d_h]
        parts += [renorm, shared]
        info["renorm_weights"] = w
        info["renorm_slot"] = renorm
        info["shared"] = shared

    concat = np.concatenate(parts, axis=-1)  # [T, S*d_h]
    info["concat"] = concat
    info["aux_loss"] = load_balancing_loss(probs, idx)
    return concat @ lw["o_proj"].T, info  # [T, d]


def swiglu_mlp(x: np.ndarray, lw: Dict[str, np.ndarray]) -> np.ndarray:
    # x: [T, d] -> [T, d]
    gate = x @ lw["gate_proj"].T  # [T, I]
    up = x @ lw["up_proj"].T  # [T, I]
    silu = gate / (1.0 + np.exp(-gate))
    return (silu * up) @ lw["down_proj"].T


def layer_weights(weights: Dict[str, np.ndarray], i: int) -> Dict[str, np.ndarray]:
    """Layer i's tensors under short names (q_proj, router, gate_proj, input_layernorm, ...)."""
    p = f"model.layers.{i}."
    out = {}
    for name, w in weights.items():
        if name.startswith(p):
            out[name[len(p) :].split(".")[-2]] = w
    return out


@dataclass
class ForwardResult:
    logits: np.ndarray  # [T, V]
    expert_indices: Optional[np.ndarray] = None  # [L, T, G, k] (gqe only)
    router_logits: Optional[np.ndarray] = None  # [L, T, G, M] (gqe only)
    router_probs: Optional[np.ndarray] = None  # [L, T, G, M] (gqe only)
    aux_loss: Optional[np.ndarray] = None  # [L] (gqe only)
    layer_info: List[Dict[str, np.ndarray]] = field(default_factory=list)  # gqe_attention's info per layer


def forward(cfg: Config, weights: Dict[str, np.ndarray], ids) -> ForwardResult:
    """Full-sequence forward from position 0. ids: T token ids."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    T = ids.shape[0]
    if T == 0:
        raise BadInput("empty prompt")
    if T > cfg.max_position_embeddings:
        raise BadInput(f"prompt of {T} tokens exceeds max_position_embeddings {cfg.max_position_embeddings}")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise BadInput(f"token id out of range 0..{cfg.vocab_size - 1}")
    w = {name: np.asarray(a, dtype=np.float64) for name, a in weights.items()}
    positions = np.arange(T)

    h = w["model.embed_tokens.weight"][ids]  # [T, d]
    infos = []
    for i in range(cfg.num_hidden_layers):
        lw = layer_weights(w, i)
        a_in = rms_norm(h, lw["input_layernorm"], cfg.rms_norm_eps)
        if cfg.attention_type == "gqe":
            a_out, info = gqe_attention(a_in, lw, cfg, positions)
            infos.append(info)
        else:
            a_out = gqa_attention(a_in, lw, cfg, positions)
        h = h + a_out
        h = h + swiglu_mlp(rms_norm(h, lw["post_attention_layernorm"], cfg.rms_norm_eps), lw)
    h = rms_norm(h, w["model.norm.weight"], cfg.rms_norm_eps)
    head = w["model.embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]  # [V, d]
    result = ForwardResult(logits=h @ head.T)  # [T, V]
    if infos:
        result.expert_indices = np.stack([inf["expert_indices"] for inf in infos])  # [L, T, G, k]
        result.router_logits = np.stack([inf["router_logits"] for inf in infos])  # [L, T, G, M]
        result.router_probs = np.stack([inf["router_probs"] for inf in infos])  # [L, T, G, M]
        result.aux_loss = np.array([inf["aux_loss"] for inf in infos])  # [L]
        result.layer_info = infos
    return result


# --------------------------------------------------------------------------------------------
# Random checkpoints
# --------------------------------------------------------------------------------------------


def random_weights(cfg: Config, seed: int) -> Dict[str, np.ndarray]:
    """Seeded random float64 weights, scaled so activations and logits stay O(1).

    Router weights are random and large enough (logit std ~3) that the experts of a group
    are usually far apart, so routing varies per token and is unambiguous in float.
    """
    rng = np.random.default_rng(seed)
    d = cfg.hidden_size
    weights: Dict[str, np.ndarray] = {}
    for name, shape in weight_shapes(cfg).items():
        if len(shape) == 1:  # norm weights: near 1, but not 1, so a missing multiply shows
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight":
            # Tied: the embedding is also the output head, so scale it like one.
            std = 1.0 / math.sqrt(d) if cfg.tie_word_embeddings else 1.0
            w = std * rng.standard_normal(shape)
        elif name.endswith("router.weight"):
            w = 3.0 / math.sqrt(d) * rng.standard_normal(shape)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            # Residual branches: smaller, so that no single layer swamps the stream.
            w = 0.5 / math.sqrt(shape[1]) * rng.standard_normal(shape)
        else:
            w = 1.0 / math.sqrt(shape[1]) * rng.standard_normal(shape)
        weights[name] = w
    return weights


def make_random_checkpoint(
    model_dir: str, config_dict: dict, seed: int, dtype: str = "F32", shard_bytes: Optional[int] = None
) -> Tuple[Config, Dict[str, np.ndarray]]:
    """Write config.json (config_dict verbatim) and the weights (given dtype; in shards of about
    shard_bytes when given) to model_dir.

    Returns the config and the weights as stored (float64 holding the rounded values).
    """
    if dtype not in ("F32", "F64", "F16", "BF16"):
        raise BadInput(f"unsupported checkpoint dtype {dtype}")
    cfg = config_from_dict(config_dict)
    if seed < 0:
        raise BadInput(f"seed {seed} is negative; expected a non-negative integer")
    weights = random_weights(cfg, seed)
    try:
        os.makedirs(model_dir, exist_ok=True)
    except OSError as e:
        raise BadInput(f"cannot make {model_dir}: {e.strerror}") from None
    with open(os.path.join(model_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_dict, f, indent=2)
        f.write("\n")
    write_weights(model_dir, weights, dtype, shard_bytes)
    return cfg, load_model(model_dir)[1]


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def write_logits_out(path: str, result: ForwardResult) -> None:
    """The gqe-run --logits-out file: logits F32 [T, V], expert_indices I32 [L, T, G, k] for gqe."""
    tensors = {"logits": result.logits}
    dtypes = {"logits": "F32"}
    if result.expert_indices is not None:
        tensors["expert_indices"] = result.expert_indices
        dtypes["expert_indices"] = "I32"
    tmp = path + ".tmp"
    try:
        write_safetensors(tmp, tensors, dtypes)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise BadInput(f"cannot write {path}: {e.strerror}") from None


def _parse_ids(text: str) -> List[int]:
    try:
        ids = [int(s) for s in text.split(",")]
    except ValueError:
        raise BadInput(f"--prompt-ids: expected comma-separated integers, got {text!r}") from None
    return ids


def main(argv: Optional[List[str]] = None) -> int:
    from tool_cli import Parser  # here, so that importing the reference needs nothing beside numpy

    parser = Parser(prog="gqe_reference.py", description="Float64 NumPy reference of the GQE model.")
    parser.add_argument("--model", help="checkpoint folder to run")
    parser.add_argument("--prompt-ids", help="comma-separated token ids")
    parser.add_argument("--prompt", help="text; its UTF-8 bytes are the token ids")
    parser.add_argument("--logits-out", help="write logits (and expert indices) as safetensors")
    parser.add_argument("--make-random", metavar="DIR", help="write a random checkpoint folder")
    parser.add_argument("--config-json", help="config for --make-random, as a JSON string")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="F32", choices=["F32", "F64", "F16", "BF16"])
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return 0 if e.code == 0 else 2

    try:
        if args.make_random:
            if not args.config_json:
                raise BadInput("--make-random needs --config-json")
            try:
                config_dict = json.loads(args.config_json)
            except json.JSONDecodeError as e:
                raise BadInput(f"--config-json: not valid JSON ({e})") from None
            make_random_checkpoint(args.make_random, config_dict, args.seed, args.dtype)
            return 0
        if not args.model:
            raise BadInput("give --model DIR or --make-random DIR")
        if (args.prompt_ids is None) == (args.prompt is None):
            raise BadInput("give exactly one of --prompt-ids and --prompt")
        ids = _parse_ids(args.prompt_ids) if args.prompt_ids is not None else list(args.prompt.encode("utf-8"))
        cfg, weights = load_model(args.model)
        result = forward(cfg, weights, ids)
        if args.logits_out:
            write_logits_out(args.logits_out, result)
        else:
            np.set_printoptions(precision=6, suppress=True, linewidth=120)
            print("last-position logits:", result.logits[-1])
            print("argmax per position:", " ".join(str(int(i)) for i in result.logits.argmax(axis=-1)))
            if result.expert_indices is not None:
                print("aux_loss per layer:", result.aux_loss)
        return 0
    except BadInput as e:
        print(f"gqe_reference: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
