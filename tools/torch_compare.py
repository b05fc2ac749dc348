#!/usr/bin/env python3
"""Times the same attention layer in PyTorch eager, dense GQA and GQE, as a point of comparison.

    /usr/bin/python3 tools/torch_compare.py [--tokens 4096] [--threads 2] [--repeats 5] [--gqe-json bench.json]

Outside CI. Needs Debian's python3-torch (1.13, which has no fused attention): attention is computed
as Hugging Face's eager attention does it (matmul, causal mask, softmax, matmul; repeat_kv for GQA),
and GQE as the authors' module does it (every query projected, then the kept ones gathered), plus the
weighted slot and the shared head on the mean K/V. The layer has the paper's shape: d=1024, d_h=64,
N=16, G=8, k=1, float32, no gradients. With --gqe-json (gqe-bench's JSON for the same T) it also prints
gqe's speed against PyTorch's dense layer.
"""

import argparse
import json
import statistics
import sys
import time

try:
    import torch
except ImportError:
    sys.exit("torch_compare: PyTorch is missing; on Debian: apt-get install python3-torch")

D, DH, N, G, K = 1024, 64, 16, 8, 1
M = N // G


def rope(x, positions):
    """Rotate-half RoPE over the last axis; x: [T, H, DH]."""
    inv = 1.0 / (10000.0 ** (torch.arange(0, DH, 2, dtype=torch.float64) / DH))
    angles = positions[:, None].double() * inv[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], -1).float()[:, None, :]
    sin = torch.cat([angles.sin(), angles.sin()], -1).float()[:, None, :]
    x1, x2 = x[..., : DH // 2], x[..., DH // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def eager_attention(q, k, v):
    """q: [H, T, DH], k, v: [H, T, DH] -> [H, T, DH]; scores held whole, as HF eager does."""
    T = q.shape[1]
    scores = q @ k.transpose(1, 2) / DH ** 0.5
    mask = torch.full((T, T), float("-inf")).triu(1)
    return torch.softmax(scores + mask, dim=-1) @ v


class Layer:
    def __init__(self, gqe: bool):
        g = torch.Generator().manual_seed(0)
        w = lambda o, i: torch.randn(o, i, generator=g) / i ** 0.5
        self.gqe = gqe
        self.wq, self.wk, self.wv = w(N * DH, D), w(G * DH, D), w(G * DH, D)
        self.wr, self.ws = w(G * M, D), w(DH, D)
        self.wo = w(D, (K * G + 2) * DH if gqe else N * DH)

    def __call__(self, x):
        T = x.shape[0]
        pos = torch.arange(T)
        q = rope((x @ self.wq.T).view(T, N, DH), pos)
        k = rope((x @ self.wk.T).view(T, G, DH), pos)
        v = (x @ self.wv.T).view(T, G, DH)
        if not self.gqe:
            kr = k.repeat_interleave(M, dim=1)  # repeat_kv
            vr = v.repeat_interleave(M, dim=1)
            o = eager_attention(q.transpose(0, 1), kr.transpose(0, 1), vr.transpose(0, 1))
            return o.transpose(0, 1).reshape(T, N * DH) @ self.wo.T
        probs = torch.softmax((x @ self.wr.T).view(T, G, M), dim=-1)
        top_p, top_i = torch.topk(probs, K, dim=-1)
        sel = torch.gather(q.view(T, G, M, DH), 2, top_i[..., None].expand(T, G, K, DH)).reshape(T, G * K, DH)
        kk = k.repeat_interleave(K, dim=1)
        vv = v.repeat_interleave(K, dim=1)
        slots = eager_attention(sel.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1)).transpose(0, 1)
        weights = (top_p / top_p.sum(dim=(1, 2), keepdim=True).clamp_min(1e-9)).reshape(T, G * K, 1)
        weighted = (slots * weights).sum(1)
        qs = rope((x @ self.ws.T).view(T, 1, DH), pos)
        shared = eager_attention(qs.transpose(0, 1), k.mean(1, keepdim=True).transpose(0, 1),
                                 v.mean(1, keepdim=True).transpose(0, 1))[0]
        return torch.cat([slots.reshape(T, G * K * DH), weighted, shared], -1) @ self.wo.T


def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gqe-json", help="gqe-bench JSON holding prefill_gqa/T and prefill_gqe/T")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.tokens, D)
    dense, routed = Layer(False), Layer(True)
    with torch.no_grad():
        dense(x), routed(x)  # warm-up
        # Interleaved, so that a shared machine's load weighs on both alike.
        t_dense, t_gqe = [], []
        for _ in range(args.repeats):
            t_dense.append(median_seconds(lambda: dense(x), 1))
            t_gqe.append(median_seconds(lambda: routed(x), 1))
    td, tg = statistics.median(t_dense), statistics.median(t_gqe)
    print(f"PyTorch {torch.__version__} eager, T={args.tokens}, {args.threads} threads: "
          f"dense {1e3 * td:.0f} ms, GQE {1e3 * tg:.0f} ms (GQE/dense speed-up {td / tg:.2f})")
    if args.gqe_json:
        with open(args.gqe_json) as f:
            data = json.load(f)
        unit = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
        ours = {}
        for b in data["benchmarks"]:
            name = b.get("run_name", b["name"])
            if b.get("run_type") == "iteration" and name.split("/")[1:2] == [str(args.tokens)]:
                ours.setdefault(name.split("/")[0], []).append(b["real_time"] * unit[b.get("time_unit", "ns")])
        if "prefill_gqa" in ours and "prefill_gqe" in ours:
            gd, gg = statistics.median(ours["prefill_gqa"]), statistics.median(ours["prefill_gqe"])
            print(f"gqe: dense {1e3 * gd:.0f} ms, GQE {1e3 * gg:.0f} ms; against PyTorch's dense layer: "
                  f"gqe dense {td / gd:.1f}x faster, gqe GQE {td / gg:.1f}x faster")
        else:
            print(f"no prefill figures at T={args.tokens} in {args.gqe_json}")


if __name__ == "__main__":
    main()
