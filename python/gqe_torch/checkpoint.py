"""gqe checkpoint folders: config.json plus model.safetensors, or plus a Hugging Face shard index
(model.safetensors.index.json) and its shards. Loading checks everything docs/checkpoints.md lists and
refuses by name; saving writes every file atomically."""

import json
import os
import shutil

import torch

from . import strict_json
from .config import load_config
from .errors import BadInput
from .model import GQEForCausalLM
from .safetensors_io import FLOAT_DTYPES, read_file_bytes, read_safetensors, serialize, write_atomically

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"


def weight_shapes(c):
    """Every tensor of a checkpoint of config c, in the checkpoint format's order, with its [out, in] shape."""
    V, d, I = c.vocab_size, c.hidden_size, c.intermediate_size
    N, G, dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    shapes = {"model.embed_tokens.weight": (V, d)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (N * dh, d)
        shapes[p + "self_attn.k_proj.weight"] = (G * dh, d)
        shapes[p + "self_attn.v_proj.weight"] = (G * dh, d)
        if c.is_gqe:
            shapes[p + "self_attn.router.weight"] = (N, d)
            if c.gqe_variant == "gqe":
                shapes[p + "self_attn.q_shared.weight"] = (dh, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, c.num_output_slots * dh)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (I, d)
        shapes[p + "mlp.up_proj.weight"] = (I, d)
        shapes[p + "mlp.down_proj.weight"] = (d, I)
    shapes["model.norm.weight"] = (d,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, d)
    return shapes


def check_weights(config, tensors, source):
    """Refuses a missing, extra, misshapen or non-float tensor by name. tensors: name -> tensor."""
    want = weight_shapes(config)
    for name, shape in want.items():
        if name not in tensors:
            raise BadInput(f"tensor {name} is missing from {source}; config.json needs it with shape {list(shape)}")
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise BadInput(f"tensor {name} in {source} has shape {list(t.shape)}; config.json implies {list(shape)}")
        if not t.is_floating_point():
            raise BadInput(f"tensor {name} in {source} has dtype {t.dtype}; expected F32, F16, BF16 or F64")
    for name in tensors:
        if name not in want:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                raise BadInput(f"tensor lm_head.weight in {source} is not expected: config.json sets "
                               "tie_word_embeddings, so the embeddings serve as lm_head")
            raise BadInput(f"tensor {name!r} in {source} is not part of a {config.attention_type} model of this config")


def _read_index(folder):
    """The shard index: {tensor name: shard file name}, checked for shape and safe file names."""
    path = os.path.join(folder, INDEX)
    text = read_file_bytes(path, 64 << 20, "a safetensors index")  # gqe's limit
    try:
        index = strict_json.loads(text.decode("utf-8"))
    except BadInput as e:
        raise BadInput(f"{path}: {e}") from None
    except (UnicodeDecodeError, ValueError):
        raise BadInput(f"{path} is not valid JSON") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise BadInput(f'{path} has no "weight_map" object; expected {{"weight_map": {{tensor: shard file}}}}')
    for name, shard in weight_map.items():
        # A shard is a file beside the index: no folder part, so the index cannot point elsewhere.
        if not isinstance(shard, str) or shard in ("", ".", "..") or os.path.basename(shard) != shard or "\\" in shard:
            raise BadInput(f"{path}: tensor {name} is mapped to {json.dumps(shard)}; expected a shard file name "
                           "in the same folder")
    return weight_map


def read_checkpoint_tensors(folder):
    """(tensors in their stored dtypes, {name: stored dtype name}, source description) of a
    folder, sharded when it has an index (the index wins over a stray model.safetensors)."""
    if not os.path.isdir(folder):
        raise BadInput(f"{folder} is not a folder; expected a checkpoint folder with config.json and model.safetensors")
    if not os.path.exists(os.path.join(folder, INDEX)):
        tensors, dtypes, _ = read_safetensors(os.path.join(folder, SINGLE))
        return tensors, dtypes, os.path.join(folder, SINGLE)
    weight_map = _read_index(folder)
    tensors, dtypes = {}, {}
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(folder, shard)
        found, found_dtypes, _ = read_safetensors(path)
        for name, t in found.items():
            if name not in weight_map:
                raise BadInput(f"tensor {name} in shard {path} is not in {INDEX}")
            if weight_map[name] != shard:
                raise BadInput(f"tensor {name} is in shard {path} but {INDEX} names {weight_map[name]}")
            tensors[name], dtypes[name] = t, found_dtypes[name]
    for name, shard in weight_map.items():
        if name not in tensors:
            raise BadInput(f"tensor {name} is missing from shard {os.path.join(folder, shard)}, where {INDEX} puts it")
    return tensors, dtypes, os.path.join(folder, INDEX)


def _require_path(folder):
    if not isinstance(folder, (str, os.PathLike)) or not os.fspath(folder):
        raise BadInput(f"checkpoint folder {folder!r}; expected a non-empty path")


def load_pretrained(folder, dtype=torch.float32, device="cpu"):
    """A GQEForCausalLM from a gqe checkpoint folder (F32, F16, BF16 or F64 tensors, single file
    or sharded), its parameters converted to `dtype` (a torch floating-point dtype) on `device`.
    Raises BadInput on anything malformed."""
    _require_path(folder)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise BadInput(f"dtype {dtype!r}; expected a torch floating-point dtype such as torch.float32 or torch.bfloat16")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise BadInput(f"device {device!r} is not a torch device; expected \"cpu\" or \"cuda\"") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"device {device}, but CUDA is not available")
    if not os.path.isdir(folder):
        raise BadInput(f"{folder} is not a folder; expected a checkpoint folder with config.json and model.safetensors")
    config = load_config(os.path.join(folder, CONFIG))
    tensors, _, source = read_checkpoint_tensors(folder)
    check_weights(config, tensors, source)
    model = GQEForCausalLM(config).to(dtype=dtype)  # before loading: float32 would round F64 weights
    model.load_state_dict({name: t.to(dtype) for name, t in tensors.items()}, strict=True)
    return model.to(device=device)


def _unwrap(model):
    return model.module if hasattr(model, "module") else model  # DistributedDataParallel


def _config_text(config):
    return json.dumps(config.to_dict(), indent=2) + "\n"


def save_pretrained(model, folder, dtype="F32", shard_bytes=None):
    """Writes config.json and the weights of `model` into `folder`, which gqe-run loads.

    dtype: "F32" (default), "BF16", "F16" or "F64" (rounded to nearest even). shard_bytes: when
    given, the weights go into shards of at most that many bytes (one tensor may exceed it) with
    a Hugging Face index, else into one model.safetensors.

    A new folder is written beside its final name and renamed into place, so it appears whole
    or not at all. In an existing folder each file is replaced atomically (temporary file, then
    rename); other files are left alone, except the previous layout's weight files (a stale
    index, its shards, or a stray model.safetensors), which are removed once the new ones are
    written: a save that fails leaves the previous checkpoint loadable.
    """
    _require_path(folder)
    if dtype not in FLOAT_DTYPES:
        raise BadInput(f"checkpoint dtype {dtype!r}; expected F32, BF16, F16 or F64")
    model = _unwrap(model)
    if not isinstance(model, GQEForCausalLM):
        raise BadInput(f"model is a {type(model).__name__}; expected a GQEForCausalLM")
    config = model.config
    state = {name: t.detach() for name, t in model.state_dict().items()}
    check_weights(config, state, "the model")  # the model's own names: a wrong set is a bug here
    ordered = {name: state[name] for name in weight_shapes(config)}

    folder = os.path.normpath(folder)
    if not os.path.exists(folder):
        # Stage the whole folder and rename it into place.
        parent = os.path.dirname(folder) or "."
        staging = os.path.join(parent, f".{os.path.basename(folder)}.tmp-{os.getpid()}")
        try:
            os.makedirs(parent, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
            os.mkdir(staging)
            _write_files(staging, config, ordered, dtype, shard_bytes)
            os.rename(staging, folder)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise BadInput(f"cannot write {folder}: {e.strerror}") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return
    if not os.path.isdir(folder):
        raise BadInput(f"{folder} exists and is not a folder")
    old_shards = set()
    if os.path.exists(os.path.join(folder, INDEX)):
        try:
            old_shards = set(_read_index(folder).values())
        except BadInput:
            pass  # a broken index is replaced or removed below all the same
    new_shards = _write_files(folder, config, ordered, dtype, shard_bytes)
    if shard_bytes is None:
        _remove(os.path.join(folder, INDEX))  # the index would win over the new single file
    else:
        _remove(os.path.join(folder, SINGLE))
    for shard in old_shards - set(new_shards):
        _remove(os.path.join(folder, shard))


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise BadInput(f"cannot remove {path}: {e.strerror}") from None


def _write_files(folder, config, tensors, dtype, shard_bytes):
    """Weights, then config.json, each atomically; returns the shard file names written."""
    dtypes = {name: dtype for name in tensors}
    if shard_bytes is None:
        write_atomically(os.path.join(folder, SINGLE), serialize(tensors, dtypes))
        write_atomically(os.path.join(folder, CONFIG), _config_text(config).encode("utf-8"))
        return []
    if not isinstance(shard_bytes, int) or shard_bytes < 1:
        raise BadInput(f"shard size {shard_bytes!r}; expected a positive number of bytes")
    width = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}[dtype]
    groups, size = [[]], 0
    for name, t in tensors.items():  # fill shards in order, each up to shard_bytes
        nbytes = t.numel() * width
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    count = len(groups)
    names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    weight_map = {}
    for shard, group in zip(names, groups):
        write_atomically(os.path.join(folder, shard), serialize({n: tensors[n] for n in group}, dtypes))
        weight_map.update({n: shard for n in group})
    total = sum(t.numel() * width for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_atomically(os.path.join(folder, INDEX), (json.dumps(index, indent=2) + "\n").encode("utf-8"))
    write_atomically(os.path.join(folder, CONFIG), _config_text(config).encode("utf-8"))
    return names
