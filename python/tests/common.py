"""What the gqe_torch tests share: paths, the reference, random models, gqe-run and the CLIs."""

import os
import subprocess
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON_DIR = os.path.dirname(HERE)
ROOT = os.path.dirname(PYTHON_DIR)
FIXTURES = os.path.join(ROOT, "tests", "data")
sys.path.insert(0, PYTHON_DIR)
sys.path.append(os.path.join(ROOT, "tools"))  # after tests/: tools/ has a test_reference.py too

import gqe_reference as ref  # noqa: E402
import gqe_torch as gt  # noqa: E402

# The agreement bound: norm-wise relative error of the logits, float32 against float64.
# Measured errors are about 2e-7 (float32 rounding through a few layers), 50x below it.
LOGITS_RTOL = 1e-5


def rel_err(ours, reference):
    """||ours - reference|| / ||reference|| over whole arrays (the norm-wise measure of docs/gqe-run.md)."""
    ours, reference = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def program(env_name, relative):
    """A built C++ program: $env_name, else the default build folder's. Missing is a failure,
    not a skip: run_tests.sh always passes them."""
    path = os.environ.get(env_name) or os.path.join(ROOT, relative)
    if not os.access(path, os.X_OK):
        raise AssertionError(f"{path} is not an executable; build it or set {env_name}")
    return path


def gqe_run():
    return program("GQE_RUN", "build/examples/gqe-run")


def gqe_train():
    return program("GQE_TRAIN", "build/examples/gqe-train")


def run_gqe_run(model_dir, ids, out_file):
    """gqe-run --logits-out on a prompt; returns (logits [T, V], expert_indices [L, T, G, k] or None)."""
    r = subprocess.run([gqe_run(), "--model", model_dir, "--prompt-ids", ",".join(str(i) for i in ids),
                        "--logits-out", out_file, "--threads", "1"], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise AssertionError(f"gqe-run failed ({r.returncode}): {r.stderr.strip()}")
    out = ref.read_safetensors(out_file)
    return out["logits"], out.get("expert_indices")


def run_module(module, args, env=None, timeout=240):
    """python -m gqe_torch.<module> args; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONPATH=PYTHON_DIR, **(env or {}))
    return subprocess.run([sys.executable, "-m", f"gqe_torch.{module}"] + list(args), capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=PYTHON_DIR)


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def call_module(module, args):
    """gqe_torch.<module>'s command line run in this process (as `python -m` runs it, without
    the cost of starting Python and torch again); returns returncode, stdout and stderr."""
    import contextlib
    import importlib
    import io

    from gqe_torch import cli
    main = importlib.import_module(f"gqe_torch.{module}").main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.run(f"gqe_torch.{module}", main, list(args))
    return Result(code, out.getvalue(), err.getvalue())


def config(**kw):
    """A small GQE config; keyword arguments override."""
    d = {"attention_type": "gqe", "vocab_size": 53, "hidden_size": 32, "intermediate_size": 40,
         "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8,
         "gqe_top_k": 1, "gqe_variant": "gqe", "rms_norm_eps": 1e-5}
    d.update(kw)
    return gt.GQEConfig(**{k: v for k, v in d.items() if v is not None})


def random_model(cfg, seed):
    """A gqe_torch model with gqe's initialisation, then a random router (logit std about 3,
    so that routing varies per token) and norm weights away from one, so both matter."""
    torch.manual_seed(seed)
    model = gt.GQEForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(0.0, 3.0 / cfg.hidden_size ** 0.5)
            elif p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def min_router_gap(router_logits, k):
    """Smallest gap between ranked router logits that decides a kept set or slot order
    (router_logits [..., M]); inf when there is nothing to decide."""
    M = router_logits.shape[-1]
    if M == 1:
        return np.inf
    ranked = -np.sort(-router_logits, axis=-1)
    return float((ranked[..., :-1] - ranked[..., 1:])[..., :min(k, M - 1)].min())


def write_text(path, size=12000, seed=0):
    """A text file of English-like words, deterministic, for the training tests."""
    words = ("grouped query experts route each token to the heads of its group while keys and values "
             "stay shared so the cache is that of grouped query attention and the router learns which "
             "head fits").split()
    rng = np.random.default_rng(seed)
    text, n = [], 0
    while n < size:
        w = words[int(rng.integers(len(words)))]
        text.append(w)
        n += len(w) + 1
    with open(path, "w") as f:
        f.write(" ".join(text)[:size])
    return path
