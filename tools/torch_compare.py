#!/usr/bin/env python3
"""Times the paper's attention layer in PyTorch eager, dense GQA and GQE, as a point of comparison.

    /usr/bin/python3 tools/torch_compare.py [--tokens 4096] [--threads 2] [--repeats 5]
                                            [--gqe-json build/bench-results/bench.json]

Run outside CI; needs PyTorch (Debian: apt-get install python3-torch, 1.13, no fused attention).
The layer: d=1024, d_h=64, N=16, G=8, k=1, float32, no gradients, one sequence of --tokens tokens.
  dense GQA  as Hugging Face's eager attention computes it: Q, K, V projections, RoPE, repeat_kv,
             scores = Q K^T * scale, + causal mask, softmax, @ V, o_proj.
  GQE        as the authors' module computes it: the router and a softmax per group, top-k, every
             one of the N queries projected and the kept ones gathered; the slots attend (eagerly)
             to their group's K/V; the renormalised weighted slot; the shared head on the mean K/V
             over groups; o_proj over the kG + 2 slots.
Dense and GQE run alternately, --repeats rounds after a warm-up, and the medians are printed.

With --gqe-json (gqe-bench's JSON, e.g. from tools/bench_report.py, holding prefill_gqa/T and
prefill_gqe/T for the same T) it also prints how gqe's times compare with PyTorch's.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tool_cli import Parser, refuse  # noqa: E402

PROG = "torch_compare"

try:
    import torch
except ImportError:
    refuse(PROG, "PyTorch is missing; on Debian: apt-get install python3-torch")

D, DH, N, G, K = 1024, 64, 16, 8, 1
M = N // G
THETA = 10000.0


def rope_tables(T):
    """cos, sin [T, 1, d_h] of rotate-half RoPE, angles in double as docs/model.md asks."""
    inv_freq = THETA ** (-torch.arange(0, DH, 2, dtype=torch.float64) / DH)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], -1)
    return emb.cos().float()[:, None, :], emb.sin().float()[:, None, :]


def apply_rope(x, cos, sin):
    """x [T, H, d_h]: x*cos + rotate_half(x)*sin, rotate_half(x) = concat(-x2, x1)."""
    x1, x2 = x[..., : DH // 2], x[..., DH // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def eager_attention(q, k, v, mask):
    """q, k, v [H, T, d_h] (k, v already repeated to q's heads) -> [H, T, d_h], as HF eager: the whole
    [H, T, T] score matrix, the additive causal mask, softmax in float32, then the values."""
    scores = torch.matmul(q, k.transpose(1, 2)) * DH ** -0.5
    scores = scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32), v)


def causal_mask(T):
    return torch.full((T, T), float("-inf")).triu(1)  # [T, T], -inf above the diagonal


def repeat_kv(x, times):
    """[T, G, d_h] -> [T, G*times, d_h]: KV head g serves query heads g*times .. g*times + times-1."""
    return x if times == 1 else x[:, :, None, :].expand(x.shape[0], x.shape[1], times, DH).reshape(x.shape[0], -1, DH)


class Layer:
    def __init__(self, gqe):
        gen = torch.Generator().manual_seed(0)
        w = lambda rows, cols: torch.randn(rows, cols, generator=gen) / cols ** 0.5  # N(0, 1/in), like gqe-bench
        self.gqe = gqe
        self.q_proj, self.k_proj, self.v_proj = w(N * DH, D), w(G * DH, D), w(G * DH, D)
        if gqe:
            self.router, self.q_shared = w(G * M, D), w(DH, D)
        self.o_proj = w(D, (K * G + 2) * DH if gqe else N * DH)

    def __call__(self, x, cos, sin, mask):
        T = x.shape[0]
        q = apply_rope((x @ self.q_proj.T).view(T, N, DH), cos, sin)  # [T, N, d_h]: every query
        k = apply_rope((x @ self.k_proj.T).view(T, G, DH), cos, sin)  # [T, G, d_h]
        v = (x @ self.v_proj.T).view(T, G, DH)
        if not self.gqe:
            o = eager_attention(q.transpose(0, 1), repeat_kv(k, M).transpose(0, 1), repeat_kv(v, M).transpose(0, 1), mask)
            return o.transpose(0, 1).reshape(T, N * DH) @ self.o_proj.T
        probs = torch.softmax((x @ self.router.T).view(T, G, M), dim=-1)  # [T, G, M]
        top_p, top_i = torch.topk(probs, K, dim=-1)  # [T, G, k]
        kept = torch.gather(q.view(T, G, M, DH), 2, top_i[..., None].expand(T, G, K, DH)).reshape(T, G * K, DH)
        slots = eager_attention(kept.transpose(0, 1), repeat_kv(k, K).transpose(0, 1), repeat_kv(v, K).transpose(0, 1),
                                mask).transpose(0, 1)  # [T, G*k, d_h]
        weights = top_p / top_p.sum(dim=(1, 2), keepdim=True).clamp_min(1e-9)  # renormalised over all slots
        weighted = (slots * weights.reshape(T, G * K, 1)).sum(1)  # [T, d_h]
        qs = apply_rope((x @ self.q_shared.T).view(T, 1, DH), cos, sin)
        shared = eager_attention(qs.transpose(0, 1), k.mean(1, keepdim=True).transpose(0, 1),
                                 v.mean(1, keepdim=True).transpose(0, 1), mask)[0]  # [T, d_h]
        return torch.cat([slots.reshape(T, G * K * DH), weighted, shared], -1) @ self.o_proj.T


MAX_TOKENS = 16384


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def gqe_medians(path, T):
    """Median real time in seconds of prefill_gqa/T and prefill_gqe/T in gqe-bench's JSON."""
    unit = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
    try:
        with open(path) as f:
            data = json.load(f)
        times = {}
        for b in data["benchmarks"]:
            name = b.get("run_name", b["name"]).split("/")
            if b.get("run_type", "iteration") == "iteration" and len(name) > 1 and name[1] == str(T):
                times.setdefault(name[0], []).append(b["real_time"] * unit[b.get("time_unit", "ns")])
    except OSError as e:
        refuse(PROG, f"cannot read --gqe-json {path}: {e.strerror}")
    except (ValueError, KeyError, TypeError, AttributeError):
        refuse(PROG, f"--gqe-json {path} is not gqe-bench's JSON")
    ours = {k: statistics.median(v) for k, v in times.items()}
    if "prefill_gqa" not in ours or "prefill_gqe" not in ours:
        refuse(PROG, f"no prefill_gqa/{T} and prefill_gqe/{T} in {path}")
    return ours, data.get("context", {})


def main():
    ap = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds, each one dense and one GQE call")
    ap.add_argument("--gqe-json", help="gqe-bench JSON holding prefill_gqa/T and prefill_gqe/T")
    args = ap.parse_args()
    if args.tokens < 1 or args.repeats < 1 or args.threads < 1:
        refuse(PROG, "--tokens, --repeats and --threads must be at least 1")
    if args.tokens > MAX_TOKENS:
        refuse(PROG, f"--tokens {args.tokens} is more than {MAX_TOKENS} (the causal mask alone holds T x T "
               "floats)")
    # The JSON is read before the timing, so that a wrong path is found at once.
    ours, ctx = gqe_medians(args.gqe_json, args.tokens) if args.gqe_json else (None, None)

    torch.set_num_threads(args.threads)
    T = args.tokens
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    dense, routed = Layer(False), Layer(True)
    with torch.no_grad():
        cos, sin = rope_tables(T)
        mask = causal_mask(T)  # built once, as HF builds it once per forward for all layers
        dense(x, cos, sin, mask), routed(x, cos, sin, mask)  # warm-up
        t_dense, t_gqe, ratios = [], [], []
        for _ in range(args.repeats):  # alternating: load on a shared machine weighs on both
            a = timed(lambda: dense(x, cos, sin, mask))
            b = timed(lambda: routed(x, cos, sin, mask))
            t_dense.append(a)
            t_gqe.append(b)
            ratios.append(a / b)
    td, tg = statistics.median(t_dense), statistics.median(t_gqe)
    print(f"PyTorch {torch.__version__} eager, T={T}, d={D}, d_h={DH}, N={N}, G={G}, k={K}, float32, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} rounds:")
    print(f"  dense GQA (HF eager):          {1e3 * td:8.1f} ms")
    print(f"  GQE (authors' gather):         {1e3 * tg:8.1f} ms")
    print(f"  GQE speed-up over dense:       {statistics.median(ratios):8.2f}  (per-round range "
          f"{min(ratios):.2f}-{max(ratios):.2f})")

    if ours:
        gd, gg = ours["prefill_gqa"], ours["prefill_gqe"]
        print(f"gqe (from {args.gqe_json}, {ctx.get('gqe_threads', '?')} threads, measured in another run):")
        print(f"  dense GQA:                     {1e3 * gd:8.1f} ms  ({td / gd:.2f}x PyTorch's dense speed)")
        print(f"  GQE:                           {1e3 * gg:8.1f} ms  ({tg / gg:.2f}x PyTorch's GQE speed)")
        print(f"  GQE speed-up over dense:       {gd / gg:8.2f}")
        print(f"  gqe GQE against PyTorch dense: {td / gg:8.2f}x")


if __name__ == "__main__":
    main()
