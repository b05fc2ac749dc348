"""Byte-level language-model training of a gqe model, on one process or under torchrun.

    python -m gqe_torch.train --text FILE --out DIR [options]
    torchrun --redirects 2 --tee 2 --nproc_per_node N -m gqe_torch.train --text FILE --out DIR ...

The defaults are gqe-train's: a GQE model (d=64, 2 layers, 8 heads, 4 KV heads, head_dim 16,
intermediate 128, k=1, variant gqe), 1200 steps of 32 sequences of 64 bytes per process, AdamW
(lr 3e-3, betas 0.9/0.95, weight decay 0.1 on matrices only), linear warm-up over 5% of the steps
then cosine down to a tenth, gradient clipping at norm 1, load-balancing coefficient 0.01. The
last 10% of the file is held out.

Under torchrun each process trains on its own slice of one global batch of N x --batch windows,
drawn from (--seed, step) alone, so N processes with batch B see exactly the windows of one
process with batch N x B, and the loss is that of the global batch: DistributedDataParallel
averages the gradients, and the load-balancing loss uses the expert loads of the whole global
batch. Rank 0 writes DIR (config.json, model.safetensors: a folder gqe-run loads, and
train_log.csv) at the end and every --save-every steps.
"""

import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import cli
from .checkpoint import CONFIG, INDEX, SINGLE, load_pretrained, save_pretrained, weight_shapes
from .config import GQEConfig, load_config
from .errors import BadInput
from .model import GQEForCausalLM
from .safetensors_io import write_atomically

HELDOUT_FRACTION = 0.1
MAX_EVAL_WINDOWS = 256
# Model flags, which --init takes from the checkpoint instead.
SHAPE_FLAGS = ("attention", "hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "top_k", "variant")


def parse_args(argv):
    p = cli.Parser(prog="python -m gqe_torch.train", description=__doc__.split("\n\n")[0],
                   epilog="Under torchrun, --batch is per process. Exit status 2 on bad input.")
    p.add_argument("--text", required=True, help="training text file (bytes are tokens; its last 10%% is held out)")
    p.add_argument("--out", required=True, help="folder to write the checkpoint to (must not hold one yet)")
    p.add_argument("--steps", type=cli.int_in(1, 10_000_000), default=1200, help="optimiser steps (default 1200)")
    p.add_argument("--batch", type=cli.int_in(1, 65536), default=32, help="sequences per step and process (default 32)")
    p.add_argument("--seq-len", type=cli.int_in(1, 1 << 20), default=64, help="bytes per sequence (default 64)")
    p.add_argument("--attention", choices=("gqe", "gqa"), default=None, help="attention type (default gqe)")
    p.add_argument("--hidden", type=cli.int_in(1, 1 << 16), default=None, help="hidden size d (default 64)")
    p.add_argument("--layers", type=cli.int_in(1, 1024), default=None, help="transformer blocks (default 2)")
    p.add_argument("--heads", type=cli.int_in(1, 1024), default=None, help="query heads N (default 8)")
    p.add_argument("--kv-heads", type=cli.int_in(1, 1024), default=None, help="KV heads G (default 4)")
    p.add_argument("--head-dim", type=cli.int_in(2, 2048), default=None, help="head dimension d_h (default 16)")
    p.add_argument("--intermediate", type=cli.int_in(1, 1 << 18), default=None, help="feed-forward size (default 128)")
    p.add_argument("--top-k", type=cli.int_in(1, 1024), default=None, help="GQE experts kept per group (default 1)")
    p.add_argument("--variant", choices=("gqe", "hard_concat", "weighted_concat"), default=None,
                   help="GQE variant (default gqe)")
    p.add_argument("--init", metavar="DIR", help="start from this gqe checkpoint folder (e.g. gqe-train's "
                   "out/gqe-seed0) instead of a fresh model; its config.json gives the shape")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--warmup", type=cli.non_negative_int, default=0, help="warm-up steps (default 0: 5%% of the steps)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (default 0.1)")
    p.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing loss coefficient (default 0.01)")
    p.add_argument("--seed", type=cli.non_negative_int, default=0, help="initialisation and data seed (default 0)")
    p.add_argument("--log-every", type=cli.non_negative_int, default=0,
                   help="steps between progress lines (default 0: a tenth of the run)")
    p.add_argument("--save-every", type=cli.non_negative_int, default=0,
                   help="steps between checkpoints (default 0: at the end only)")
    p.add_argument("--dtype", choices=("F32", "BF16"), default="F32", help="checkpoint dtype (default F32)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default): CUDA when available, else CPU")
    args = p.parse_args(argv)
    if not (0 < args.lr <= 10) or not math.isfinite(args.lr):
        raise BadInput(f"--lr {args.lr}; expected a number in (0, 10]")
    if not (0 <= args.weight_decay <= 1):
        raise BadInput(f"--weight-decay {args.weight_decay}; expected a number in [0, 1]")
    if not (0 <= args.aux_coef) or not math.isfinite(args.aux_coef):
        raise BadInput(f"--aux-coef {args.aux_coef}; expected a finite number >= 0")
    if args.warmup > args.steps:
        raise BadInput(f"--warmup {args.warmup}; expected at most --steps {args.steps}")
    return args


def model_config(args):
    """The config of a fresh model from the flags, gqe-train's defaults for those not given."""
    def flag(name, default):
        v = getattr(args, name)
        return default if v is None else v

    attention = flag("attention", "gqe")
    d = {"attention_type": attention, "vocab_size": 256, "hidden_size": flag("hidden", 64),
         "intermediate_size": flag("intermediate", 128), "num_hidden_layers": flag("layers", 2),
         "num_attention_heads": flag("heads", 8), "num_key_value_heads": flag("kv_heads", 4),
         "head_dim": flag("head_dim", 16), "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
         "tie_word_embeddings": False, "max_position_embeddings": max(4096, args.seq_len)}
    if attention == "gqe":
        d["gqe_top_k"] = flag("top_k", 1)
        d["gqe_variant"] = flag("variant", "gqe")
    try:
        return GQEConfig(**d)
    except BadInput as e:
        raise BadInput(f"the flags give no valid model: {e}") from None


def launcher_number(name, default):
    """A whole number from the environment that torchrun sets (the default when it is not set)."""
    text = os.environ.get(name)
    if text is None:
        return default
    if not text.isascii() or not text.isdigit():
        raise BadInput(f"{name} is {text!r}; expected a whole number, as torchrun sets it")
    return int(text)


class TextData:
    """The file's bytes; training windows at random offsets of the head, held-out ones tiling the tail."""

    def __init__(self, path, seq_len):
        try:
            with open(path, "rb") as f:
                self.bytes = np.frombuffer(f.read(), dtype=np.uint8)
        except OSError as e:
            raise BadInput(f"cannot read --text {path}: {e.strerror}") from None
        size = len(self.bytes)
        self.seq_len = seq_len
        self.split = size - int(size * HELDOUT_FRACTION)
        need = seq_len + 1
        if self.split < need or size - self.split < need:
            raise BadInput(f"--text {path} has {size} bytes; with --seq-len {seq_len} and a held-out tail of 10% "
                           f"it needs at least {self.least_size(need)} bytes")

    @staticmethod
    def least_size(need):
        """The smallest file whose head and held-out tail both hold `need` bytes."""
        size = max(math.ceil(need / HELDOUT_FRACTION), math.ceil(need / (1 - HELDOUT_FRACTION)))
        while int(size * HELDOUT_FRACTION) < need or size - int(size * HELDOUT_FRACTION) < need:
            size += 1  # past the rounding of the products above
        return size

    def windows(self, offsets):
        """Token and target ids [B, T] of the windows starting at offsets [B]."""
        idx = offsets[:, None] + np.arange(self.seq_len + 1)[None, :]  # [B, T+1]
        w = torch.from_numpy(self.bytes[idx].astype(np.int64))
        return w[:, :-1], w[:, 1:]

    def train_batch(self, seed, step, rank, batch, world):
        """This rank's rows of the global batch of step `step`: a function of (seed, step) only."""
        rng = np.random.default_rng([seed, step])
        offsets = rng.integers(0, self.split - self.seq_len, size=batch * world)  # [world*B]
        return self.windows(offsets[rank * batch:(rank + 1) * batch])

    def heldout_offsets(self):
        count = min((len(self.bytes) - self.split - 1) // self.seq_len, MAX_EVAL_WINDOWS)
        return self.split + self.seq_len * np.arange(count)


def learning_rate(step, peak, warmup, total):
    """gqe-train's schedule at 0-based `step`: linear warm-up, then cosine down to peak / 10."""
    low = 0.1 * peak
    if step < warmup:
        return peak * (step + 1) / warmup
    last = max(total - 1, 1)
    t = min(1.0, (step - warmup) / max(1.0, last - warmup))
    return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * t))


def out_holds_checkpoint(out):
    return any(os.path.exists(os.path.join(out, name)) for name in ("config.json", SINGLE, INDEX))


def write_log(out, history):
    lines = ["step,loss,lm_loss,aux_loss,lr,grad_norm"]
    lines += [f"{h[0]},{h[1]!r},{h[2]!r},{h[3]!r},{h[4]!r},{h[5]!r}" for h in history]
    write_atomically(os.path.join(out, "train_log.csv"), ("\n".join(lines) + "\n").encode("utf-8"))


def evaluate(model, data, batch, device):
    """Mean held-out cross-entropy (nats per byte) of the unwrapped model."""
    offsets = data.heldout_offsets()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(offsets), batch):
            x, y = data.windows(offsets[i:i + batch])
            logits = model(x.to(device))  # [B, T, V]
            total += float(F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum"))
            count += y.numel()
    return total / count


def require_fits_in_memory(config):
    """Refuses, before the model is built, a model whose float32 weights, gradients and AdamW's two
    moments alone (16 bytes a parameter) exceed the machine's memory, as gqe-train does: memory is
    overcommitted, so building it would start and the process be killed later."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # the system does not say
        return
    parameters = sum(math.prod(shape) for shape in weight_shapes(config).values())
    needed = 16 * parameters

    def gib(n):
        return f"{math.ceil(n / 2 ** 30 * 10) / 10:.1f}"

    if memory > 0 and needed > memory:
        raise BadInput(f"training a model of {parameters} parameters needs at least {gib(needed)} GiB (its weights, "
                       f"gradients and AdamW's two moments, 16 bytes a parameter); this machine has {gib(memory)} GiB "
                       "of memory")


def main(argv):
    args = parse_args(argv)
    # Everything is checked before the processes connect, so that all of them fail alike.
    if args.init is not None:
        given = [f"--{n.replace('_', '-')}" for n in SHAPE_FLAGS if getattr(args, n) is not None]
        if given:
            raise BadInput(f"{', '.join(given)} cannot be combined with --init (the shape comes from its config.json)")
    if out_holds_checkpoint(args.out):
        raise BadInput(f"--out {args.out} already holds a checkpoint; expected a new folder")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise BadInput(f"--out {args.out} exists and is not a folder")
    cli.require_creatable(args.out, "--out")
    data = TextData(args.text, args.seq_len)
    config = None if args.init is not None else model_config(args)

    world, rank, local_rank = (launcher_number(name, default) for name, default in
                               (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    if world < 1 or rank >= world:
        raise BadInput(f"WORLD_SIZE is {world} and RANK {rank}; expected RANK below WORLD_SIZE >= 1 (as torchrun sets them)")
    if world > 1 and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise BadInput(f"WORLD_SIZE is {world} but MASTER_ADDR or MASTER_PORT is not set; expected a run under torchrun")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise BadInput("--device cuda, but CUDA is not available")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        require_fits_in_memory(config if config is not None else load_config(os.path.join(args.init, CONFIG)))

    torch.manual_seed(args.seed)
    if args.init is not None:
        model = load_pretrained(args.init).to(device)
        config = model.config
        if config.vocab_size < 256:
            raise BadInput(f"--init {args.init} has vocab_size {config.vocab_size}; byte-level text needs at least 256")
        if args.seq_len > config.max_position_embeddings:
            raise BadInput(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
                           f"{config.max_position_embeddings}")
    else:
        model = GQEForCausalLM(config).to(device)

    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")

        def average_over_ranks(f):  # [G, M] expert loads of this rank -> of the global batch
            f = f.clone()
            dist.all_reduce(f)
            return f / world

        model.set_load_reduce(average_over_ranks)
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
    else:
        trained = model

    # Weight decay on matrices only: the RMSNorm weights start at one and must not shrink.
    params = [p for p in model.parameters()]
    groups = [{"params": [p for p in params if p.dim() == 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() != 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    warmup = args.warmup if args.warmup > 0 else max(1, args.steps // 20)
    log_every = args.log_every if args.log_every > 0 else max(1, args.steps // 10)

    if rank == 0:
        n_params = sum(p.numel() for p in params)
        what = config.attention_type + (f" (variant {config.gqe_variant}, k={config.gqe_top_k})" if config.is_gqe else "")
        print(f"training a {what} model of {n_params} parameters on {world} process(es) ({device.type}), "
              f"global batch {world} x {args.batch} x {args.seq_len} bytes, {args.steps} steps", file=sys.stderr)

    history = []
    start = time.time()
    for step in range(args.steps):
        lr = learning_rate(step, args.lr, warmup, args.steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        x, y = data.train_batch(args.seed, step, rank, args.batch, world)
        logits = trained(x.to(device))  # [B, T, V]
        lm_loss = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten())
        loss = lm_loss + args.aux_coef * model.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        if not math.isfinite(grad_norm) or not math.isfinite(float(loss)):
            raise BadInput(f"training diverged at step {step} (loss {float(loss)}, gradient norm {grad_norm}); "
                           "lower --lr?")
        optimizer.step()

        # The global batch's losses: the mean of the ranks' (equal token counts).
        figures = torch.stack([loss.detach(), lm_loss.detach(), model.aux_loss.detach()]).double()
        if world > 1:
            dist.all_reduce(figures)
            figures /= world
        history.append((step + 1, float(figures[0]), float(figures[1]), float(figures[2]), lr, grad_norm))
        done = step + 1
        if rank == 0 and (done % log_every == 0 or done == args.steps):
            rate = done * world * args.batch * args.seq_len / max(time.time() - start, 1e-9)
            print(f"step {done:6d}/{args.steps}  loss {figures[0]:.4f}  lm {figures[1]:.4f}  aux {figures[2]:.4f}  "
                  f"lr {lr:.2e}  grad {grad_norm:.3f}  {rate / 1000:.1f}k tok/s", file=sys.stderr, flush=True)
        if rank == 0 and ((args.save_every and done % args.save_every == 0) or done == args.steps):
            save_pretrained(model, args.out, dtype=args.dtype)
            write_log(args.out, history)

    if rank == 0:
        model.set_load_reduce(None)  # rank 0 alone: no averaging with the others
        model.eval()
        heldout = evaluate(model, data, args.batch, device)
        print(f"held-out loss {heldout:.4f} nats/byte ({heldout / math.log(2):.4f} bits/byte); "
              f"checkpoint {args.out} (gqe-run --model {args.out})")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("gqe_torch.train", main))
