"""Batch-1 decode of one 4096x4096 layer on CPU: VQLinear's C kernel against fp32, int4 and VQ's other paths.

  python benchmarks/vq_kernel.py                       # standard layout 2D / 6-bit / 32x256 blocks
  python benchmarks/vq_kernel.py --layouts 2,6,32 2,8,256 4,8,256 1,3,32 --threads 1 --reps 200

Times are medians over --reps calls after warm-up (the machine is shared: also compare runs, and see the load
average printed before and after). "weight MiB in RAM" counts what the path keeps resident: stored buffers plus any
cache it builds (dense fp32 weight, int4pack repack or the VQ kernel layout).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def bench(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def _mib(*ts) -> float:
    return sum(t.numel() * t.element_size() for t in ts if t is not None) / 2 ** 20


def random_vq(n, k, d, ib, rpb, cpb=256):
    from hf_vq.formats.vq import VQLayout
    from hf_vq.nn.vqlinear import VQLinear

    lay = VQLayout(n, k, d, ib, 8, rpb, cpb)
    mod = VQLinear(lay, bias=False)
    mod.vq_indices.random_(0, 256)
    mod.vq_codebook.random_(0, 256)
    mod.vq_codebook_scales.copy_(torch.full((lay.num_codebooks,), 1e-3).half().view(torch.int16))
    return mod


def random_int4(n, k):
    from hf_vq.nn.qlinear import QuantLinear

    mod = QuantLinear(k, n, 4, 128, bias=False)
    mod.qweight.random_(0, 256)
    mod.scales.copy_((torch.rand(n, k // 128) * 1e-2).half())
    mod.qzeros.fill_(8)
    mod.g_idx.copy_(torch.arange(k, dtype=torch.int32) // 128)
    return mod


@torch.no_grad()
def run(n, k, layouts, warmup, reps):
    from hf_vq.nn import vq_kernel
    from hf_vq.nn.vqlinear import VQLinear

    torch.manual_seed(0)
    x = torch.randn(1, k)
    rows = []
    lin = torch.nn.Linear(k, n, bias=False)
    rows.append(("fp32 nn.Linear", bench(lambda: lin(x), warmup, reps), _mib(lin.weight)))
    from hf_vq.nn import kernel_native_affine, kernel_torch_int4

    q4 = random_int4(n, k)
    for kernel, what in ((kernel_torch_int4.KERNEL, "int4pack, bf16 inside"),
                         (kernel_native_affine.KERNEL, "native, int8 activations")):
        state = q4.kernel_state(kernel)
        extra = (state["packed"], state[torch.bfloat16]) if isinstance(state, dict) else (state.codes, state.scales)
        rows.append((f"int4 g128 QuantLinear ({what})", bench(lambda: kernel.run(state, x, None), warmup, reps),
                     _mib(*q4.stored_tensors().values(), *extra)))
    for d, ib, rpb in layouts:
        mod = random_vq(n, k, d, ib, rpb)
        tag = f"VQ {d}D idx{ib} {rpb}x256 ({mod.bits_per_value():.2f} bpv)"
        stored = _mib(*mod.stored_tensors().values())
        VQLinear.fast_decode, VQLinear.cache_decoded = False, False
        rows.append((f"{tag} gather-then-matmul", bench(lambda: mod(x), 1, max(3, reps // 20)), stored))
        VQLinear.cache_decoded = True
        mod(x)
        rows.append((f"{tag} cached dense fp32", bench(lambda: mod(x), warmup, reps), stored + _mib(mod._cache[1])))
        mod._cache = None
        VQLinear.fast_decode = True
        if mod.kernel_weights() is None:
            rows.append((f"{tag} fast kernel: UNAVAILABLE", float("nan"), stored))
            continue
        y = mod(x)
        assert mod._cache is None
        err = (y - F.linear(x, mod.dequantize_weight())).abs().max().item()
        rows.append((f"{tag} fast kernel (max err {err:.1e})", bench(lambda: mod(x), warmup, reps),
                     stored + mod.kernel_weights().nbytes() / 2 ** 20))
    fp32, int4 = rows[0][1], rows[1][1]
    print(f"\nM=1 decode, {n}x{k}, torch threads = {torch.get_num_threads()}, median of {reps} calls, "
          f"VQ kernel simd width {vq_kernel.simd_width()}")
    print("| path | us/call | fp32 time / this | int4 time / this | weight MiB in RAM |\n|---|---|---|---|---|")
    for name, us, mib in rows:
        print(f"| {name} | {us:.0f} | {fp32 / us:.2f} | {int4 / us:.2f} | {mib:.1f} |")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", nargs="+", default=["2,6,32"], help="vector_dim,index_bits,rows_per_block")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--size", type=int, default=4096)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("load average before:", " ".join(f"{v:.2f}" for v in os.getloadavg()))
    layouts = [tuple(int(v) for v in s.split(",")) for s in args.layouts]
    run(args.size, args.size, layouts, args.warmup, args.reps)
    print("load average after:", " ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    sys.exit(main())
