"""Converts a PyTorch state_dict to a gqe checkpoint folder, and back.

    python -m gqe_torch.convert SRC DST [--config FILE] [--dtype F32|BF16]

torch -> gqe: SRC is a file saved with torch.save (a state_dict of tensors, e.g. pytorch_model.bin)
  or a folder holding pytorch_model.bin; its config.json is --config, else the one beside it. DST is
  the gqe folder to write (config.json, model.safetensors), which must not hold a checkpoint yet.
gqe -> torch: SRC is a gqe checkpoint folder (single file or sharded); DST is the state_dict file
  to write, with config.json beside it.

Names are gqe's, which are Hugging Face Llama's plus the GQE layer's router and q_shared: a
model built on the authors' GQE module (use_rope=True, bias=False) inside a Llama-style decoder
maps as it is. Prefixes "module." (DistributedDataParallel) and "_orig_mod." (torch.compile) are
dropped, and so are rotary_emb.inv_freq buffers once checked against rope_theta. What gqe cannot
run is refused, naming the key: biases, use_rope false, rope scaling, sliding windows, an
activation other than SiLU.
"""

import io
import json
import os
import pickle
import sys

import torch

from . import cli
from .checkpoint import CONFIG, INDEX, SINGLE, check_weights, load_pretrained, save_pretrained, weight_shapes
from .config import load_config
from .errors import BadInput
from .model import GQEForCausalLM
from .safetensors_io import write_atomically

TORCH_FILE = "pytorch_model.bin"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path):
    """A flat {name: tensor} from a torch.save'd file (tensors only: loaded with weights_only)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BadInput(f"cannot read {path}: no such file") from None
    except pickle.UnpicklingError:  # torch's own words advise loading it unsafely: not ours to pass on
        raise BadInput(f"{path} is not a torch.save'd state_dict of tensors (it holds other objects, or is "
                       "not a torch file)") from None
    except Exception as e:  # zip and torch errors alike: not a state_dict of tensors
        raise BadInput(f"{path} is not a torch.save'd state_dict of tensors ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for wrapper in ("state_dict", "model"):  # {"state_dict": {...}, "optimizer": ...} and alike
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise BadInput(f"{path} does not hold a state_dict (a dict of tensor names to tensors)")
    out = {}
    for name, t in obj.items():
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        if name in out:
            raise BadInput(f"{path}: tensor {name} is given twice (with and without a wrapper prefix)")
        if t.layout != torch.strided:
            raise BadInput(f"{path}: tensor {name} is stored as {t.layout}; expected a dense tensor")
        out[name] = t
    return out


def to_gqe_tensors(state, config, source):
    """The state_dict's tensors under gqe's names, after refusing what gqe cannot run."""
    state = dict(state)
    for name in state:
        if name.endswith(".bias"):
            what = "attention biases" if ".self_attn." in name else "MLP biases" if ".mlp." in name else "biases"
            raise BadInput(f"{source}: tensor {name} is a bias; gqe does not implement {what}")
    for name in [n for n in state if n.endswith("rotary_emb.inv_freq")]:
        # A derived buffer some Llama versions save: it must be plain RoPE with this rope_theta.
        dh = config.head_dim
        want = config.rope_theta ** (-(2.0 * torch.arange(dh // 2, dtype=torch.float64)) / dh)
        got = state.pop(name).double()
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=0.0):
            raise BadInput(f"{source}: tensor {name} is not rope_theta = {config.rope_theta}'s plain RoPE "
                           "frequencies; gqe does not implement scaled or other rotary embeddings")
    if config.tie_word_embeddings and "lm_head.weight" in state:
        # torch's state_dict lists a tied head under its own name too: equal is fine, different is not.
        if not torch.equal(state["lm_head.weight"], state.get("model.embed_tokens.weight", torch.empty(0))):
            raise BadInput(f"{source}: tensor lm_head.weight differs from model.embed_tokens.weight, "
                           "but config.json sets tie_word_embeddings")
        del state["lm_head.weight"]
    check_weights(config, state, source)
    return state


def torch_to_gqe(src, dst, config_path, dtype):
    src_file = os.path.join(src, TORCH_FILE) if os.path.isdir(src) else src
    if os.path.isdir(src) and not os.path.exists(src_file):
        raise BadInput(f"{src} holds neither {SINGLE} or {INDEX} (a gqe folder) nor {TORCH_FILE} (a state_dict); "
                       "expected one of them")
    if config_path is None:
        config_path = os.path.join(os.path.dirname(os.path.abspath(src_file)), CONFIG)
    if not os.path.isfile(config_path):
        raise BadInput(f"no config.json at {config_path}; give its path with --config")
    if any(os.path.exists(os.path.join(dst, n)) for n in (CONFIG, SINGLE, INDEX)):
        raise BadInput(f"{dst} already holds a checkpoint; expected a new folder")
    config = load_config(config_path)
    state = to_gqe_tensors(read_state_dict(src_file), config, src_file)
    model = GQEForCausalLM(config)
    with torch.no_grad():
        model.load_state_dict({n: t.float() for n, t in state.items()}, strict=True)
    save_pretrained(model, dst, dtype=dtype)
    print(f"wrote {dst} ({config.attention_type}, {len(state)} tensors, {dtype}); run it with gqe-run --model {dst}")


def gqe_to_torch(src, dst, dtype):
    if os.path.isdir(dst):
        raise BadInput(f"{dst} is a folder; expected the path of the state_dict file to write")
    if os.path.exists(dst):
        raise BadInput(f"{dst} exists; expected a new file")
    cli.require_creatable(dst, "the state_dict")
    config_dst = os.path.join(os.path.dirname(os.path.abspath(dst)), CONFIG)
    if os.path.exists(config_dst) and not os.path.isfile(config_dst):
        raise BadInput(f"{config_dst} exists and is not a file; expected a folder without a config.json")
    model = load_pretrained(src)
    config_text = json.dumps(model.config.to_dict(), indent=2) + "\n"
    if os.path.exists(config_dst):
        with open(config_dst, "r", encoding="utf-8", errors="replace") as f:
            if f.read() != config_text:
                raise BadInput(f"{config_dst} exists with other contents; expected a folder without a config.json")
    cast = torch.bfloat16 if dtype == "BF16" else torch.float32
    state = {name: t.detach().to(cast).contiguous() for name, t in model.state_dict().items()}
    assert list(state) == list(weight_shapes(model.config))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    write_atomically(dst, buffer.getvalue())
    try:
        write_atomically(config_dst, config_text.encode("utf-8"))
    except BaseException:  # nothing written: the state_dict goes too
        os.remove(dst)
        raise
    print(f"wrote {dst} ({len(state)} tensors, {dtype}) and {config_dst}")


def main(argv):
    p = cli.Parser(prog="python -m gqe_torch.convert", description=__doc__.split("\n\n")[0],
                   epilog="Direction: SRC a gqe checkpoint folder -> DST a state_dict file; otherwise -> DST a gqe "
                          "folder. Exit status 2 on bad input, with nothing written.")
    p.add_argument("src", metavar="SRC", help="a state_dict file (or a folder with pytorch_model.bin), or a gqe folder")
    p.add_argument("dst", metavar="DST", help="the gqe folder, or the state_dict file, to write")
    p.add_argument("--config", help="config.json of a state_dict (default: the one beside SRC)")
    p.add_argument("--dtype", choices=("F32", "BF16"), default="F32", help="dtype written (default F32)")
    args = p.parse_args(argv)
    if not args.dst:
        raise BadInput("DST is empty; expected the path of the folder or file to write")
    if not os.path.exists(args.src):
        raise BadInput(f"{args.src} does not exist")
    is_gqe = os.path.isdir(args.src) and any(os.path.exists(os.path.join(args.src, n)) for n in (SINGLE, INDEX))
    if is_gqe:
        if args.config is not None:
            raise BadInput("--config is for a state_dict; a gqe folder has its own config.json")
        gqe_to_torch(args.src, args.dst, args.dtype)
    else:
        torch_to_gqe(args.src, args.dst, args.config, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("gqe_torch.convert", main))
