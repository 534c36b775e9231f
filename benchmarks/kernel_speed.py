"""Decode / prefill speed of QuantLinear against dense layers on this CPU.

    python benchmarks/kernel_speed.py [--threads 1] [--shapes 576x576,1536x576,4096x4096]
Cold-cache decode: each call uses another copy of the layer (> 256 MB of weights in rotation), like real decoding.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from hf_vq.algorithms.rtn import rtn_weight
from hf_vq.nn.qlinear import QuantLinear


def bench(fn, n_iter):
    fn(0)
    t = time.perf_counter()
    for i in range(n_iter):
        fn(i)
    return (time.perf_counter() - t) / n_iter * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shapes", default="576x576,1536x576,4096x4096")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s); "
          f"QuantLinear {args.bits}-bit g{args.group_size}; times in ms (speedup vs fp32)")
    print("| shape (out x in) | M | fp32 F.linear | bf16 F.linear | QuantLinear bf16 x | QuantLinear fp32 x |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        copies = max(1, (256 << 20) // (n * k * 4))
        ws = [torch.randn(n, k) * 0.02 for _ in range(min(copies, 8))]
        reps = copies // len(ws) + 1
        ws = (ws * reps)[:copies]
        wb = [w.bfloat16() for w in ws]
        qs = [QuantLinear.from_affine(rtn_weight(w, args.bits, args.group_size, False), None) for w in ws[:8]]
        qs = (qs * reps)[:copies]
        for m in (1, 512):
            x = torch.randn(m, k)
            xb = x.bfloat16()
            iters = 30 if m == 1 else 3
            t_fp = bench(lambda i: F.linear(x, ws[i % copies]), iters)
            t_bf = bench(lambda i: F.linear(xb, wb[i % copies]), iters)
            t_qb = bench(lambda i: qs[i % copies](xb), iters)
            t_qf = bench(lambda i: qs[i % copies](x), iters)
            print(f"| {n}x{k} | {m} | {t_fp:.3f} | {t_bf:.3f} ({t_fp / t_bf:.2f}x) | {t_qb:.3f} ({t_fp / t_qb:.2f}x) | "
                  f"{t_qf:.3f} ({t_fp / t_qf:.2f}x) |", flush=True)


if __name__ == "__main__":
    main()
