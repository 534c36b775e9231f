"""Decode speed of the int8 VQ kernel (hf_vq/nn/kernel_native_vq.py) against the older fp32 VQ kernel
(hf_vq/nn/vq_kernel.py) and the affine int8 kernel (hf_vq/nn/kernel_native_affine.py, RTN 4-bit g32 asym) on the
same shapes, one thread. Prints a markdown table of microseconds per call (the whole `run`, Python included).

  python benchmarks/vq_int8_speed.py                          # SmolLM2 shapes + 4096x4096, 1..4 rows
  python benchmarks/vq_int8_speed.py --rows 1 8 32 128 --dense  # larger batches, with F.linear on the dense weight

VQ layers: 2D vectors, 6-bit indices, 8-bit codebooks, 32x256 blocks (GPTVQ's defaults), random codes (speed does
not depend on their values). Times are CPU time (time.process_time) per call, the median of --trials trials of
enough calls to fill --min-ms each: the machine may be shared, and CPU time is less disturbed by other processes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hf_vq.algorithms.rtn import rtn_weight  # noqa: E402
from hf_vq.formats.vq import VQLayout, VQWeight  # noqa: E402
from hf_vq.nn import kernel_native_affine as affine  # noqa: E402
from hf_vq.nn import kernel_native_vq as vq8  # noqa: E402
from hf_vq.nn import vq_kernel  # noqa: E402
from hf_vq.nn.vqlinear import VQLinear  # noqa: E402

SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096)]   # (out_features, in_features)


def cpu_us(fn, trials: int, min_ms: float) -> float:
    fn()
    n, t0 = 1, time.process_time()
    fn()
    once = max(time.process_time() - t0, 1e-6)
    n = max(1, int(min_ms / 1e3 / once))
    res = []
    for _ in range(trials):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        res.append((time.process_time() - t0) / n * 1e6)
    return statistics.median(res)


def random_vq(n: int, k: int, d=2, ib=6, rpb=32, cpb=256, seed=0) -> VQWeight:
    g = torch.Generator().manual_seed(seed)
    lay = VQLayout(n, k, d, ib, 8, rpb, cpb)
    mod = VQLinear(lay, bias=False)
    mod.vq_indices.copy_(torch.randint(0, 256, mod.vq_indices.shape, generator=g, dtype=torch.uint8))
    mod.vq_codebook.copy_(torch.randint(0, 256, mod.vq_codebook.shape, generator=g, dtype=torch.uint8))
    mod.vq_codebook_scales.copy_(torch.full((lay.num_codebooks,), 1e-3).half().view(torch.int16))
    return VQWeight(lay, mod.stored_tensors())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--min-ms", type=float, default=20.0)
    ap.add_argument("--dense", action="store_true", help="also F.linear on the dense fp32 weight")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.pop("HF_VQ_NATIVE_ISA", None)
    cols = ["vq-int8", "vq fp32 (old)", "affine int4 g32"] + (["dense fp32"] if args.dense else [])
    print(f"one thread, us per call (CPU time); vq-int8 ISA: {vq8.best_isa()}, affine ISA: {affine.best_isa()}\n")
    print("| out x in | rows | " + " | ".join(cols) + " | old / int8 | int8 / affine |")
    print("|---|---|" + "---|" * (len(cols) + 2))
    for n, k in SHAPES:
        vq = random_vq(n, k)
        st8 = vq8.prepare(vq)
        old = vq_kernel.KERNEL.prepare(vq)
        aw = rtn_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(1)), 4, 32, sym=False)
        sta = affine.prepare(aw)
        w = vq.dequantize()
        for m in args.rows:
            x = torch.randn(m, k)
            t = [cpu_us(lambda: vq8.run(st8, x, None), args.trials, args.min_ms)]
            if m <= vq_kernel.MAX_ROWS:
                t.append(cpu_us(lambda: vq_kernel.KERNEL.run(old, x, None), args.trials, args.min_ms))
            else:
                t.append(float("nan"))
            t.append(cpu_us(lambda: affine.run(sta, x, None), args.trials, args.min_ms))
            if args.dense:
                t.append(cpu_us(lambda: F.linear(x, w), args.trials, args.min_ms))
            cells = " | ".join("-" if v != v else f"{v:.1f}" for v in t)
            ratio = "-" if t[1] != t[1] else f"{t[1] / t[0]:.2f}"
            print(f"| {n}x{k} | {m} | {cells} | {ratio} | {t[0] / t[2]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
