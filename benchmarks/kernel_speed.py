"""Per-layer speed of the native CPU kernels (affine, GPTVQ) against dense layers, and the share of memory bandwidth
they reach.

    python benchmarks/kernel_speed.py [--threads 1,2] [--shapes 576x576,1536x576,576x1536,4096x4096] [--groups 32,128]

Decode (M=1) is cold-cache, like real decoding: each call uses another copy of the layer (more than --pool MB of
weights in rotation, so every call streams from DRAM). GB/s counts the bytes the kernel reads: its packed weight
layout (affine: codes, scales, zero-points; GPTVQ: its tile records of scales, codebooks and indices); "% BW"
divides that by the read bandwidth measured at the same thread count (torch.sum over a 1 GiB fp32 tensor, best of
3). That reference reads one long stream; a small layer's bytes cannot be read that fast (each call starts its
stream cold), so "% plain read" compares the C call with a plain read (no arithmetic, the same prefetch) of the
same buffers: the copies the C call just read, each layer's one allocation, in the same order, split across the
threads as one row is (`benchmarks/read_stream.c`). Prefill (M=512) is cache-hot and compute bound: tokens/s, and
the ratio to torch's bf16 GEMM on the same shape. Each native row runs the instruction-set path in its name
(HF_VQ_NATIVE_ISA), where this CPU has it.

Native rows have two decode columns:
- "C call": the kernel's one-row projection entry point, called from C in a loop (the rotation of copies timed
  inside C), as the decoder layer's C step calls it during decode;
- "Python call": ``run(state, x, bias)`` from Python (ctypes call, tensor checks, output allocation), as a single
  layer outside the layer step is called.
The GPTVQ rows are 2D vectors, 6-bit indices, 8-bit codebooks, 32 x 256 blocks (GPTVQ's defaults), random codes.

The float layers hf_vq leaves in float (the output head: ``--dense-shapes``, SmolLM2's 49152 x 576 by default) are
timed the same way: torch's ``F.linear`` against the native dense kernel, decode only.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_vq.algorithms.rtn import rtn_weight
from hf_vq.formats.vq import VQLayout, VQWeight
from hf_vq.nn import kernel_native_affine as native
from hf_vq.nn import kernel_native_dense
from hf_vq.nn import kernel_native_layer
from hf_vq.nn import kernel_native_vq as native_vq
from hf_vq.nn import kernel_torch_int4
from hf_vq.nn.vqlinear import VQLinear
from hf_vq.utils.cbuild import CLibrary


def bench(fn, n_iter, repeats=3):
    fn(0)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(n_iter):
            fn(i)
        best = min(best, (time.perf_counter() - t) / n_iter)
    return best


def c_call(projections: list, x: torch.Tensor, n: int, repeats=3) -> float:
    """Seconds per one-row call through the projection ABI, timed in C over the rotation of copies."""
    kernel_native_layer.time_projection(projections[:1], x, n, 1)
    return min(kernel_native_layer.time_projection(projections, x, n, len(projections)) for _ in range(repeats))


def _bind_read(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.read_stream.restype = ctypes.c_longlong
    lib.read_stream.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_int, ctypes.c_int]
    return lib


READ = CLibrary(Path(__file__).with_name("read_stream.c"), _bind_read, "read benchmark")


def plain_read(buffers: list[int], span: int, repeats=3) -> float | None:
    """Seconds to read the ``span`` bytes at each address of ``buffers`` (the copies of a layer that the C call
    reads, each its one allocation, in the same order) with a plain read (no arithmetic), split across the threads
    like one row."""
    lib = READ.load()
    if lib is None:
        return None
    ptrs = (ctypes.c_void_p * len(buffers))(*buffers)
    lib.read_stream(ptrs, 1, span, 1, torch.get_num_threads())
    return min(lib.read_stream(ptrs, len(buffers), span, len(buffers), torch.get_num_threads())
               for _ in range(repeats)) / 1e9 / len(buffers)


def affine_buffers(states: list) -> tuple[list[int], int]:
    """The one allocation of each prepared affine layer (scales, zero-points, then codes) and its length."""
    st = states[0]
    span = st.codes.data_ptr() + st.codes.numel() * st.codes.element_size() - st.scales.data_ptr()
    return [s.scales.data_ptr() for s in states], span


def random_vq(n: int, k: int, seed=0) -> VQWeight:
    """A GPTVQ layer with GPTVQ's default layout and random codes (speed does not depend on their values)."""
    g = torch.Generator().manual_seed(seed)
    mod = VQLinear(VQLayout(n, k, 2, 6, 8, 32, 256), bias=False)
    mod.vq_indices.copy_(torch.randint(0, 256, mod.vq_indices.shape, generator=g, dtype=torch.uint8))
    mod.vq_codebook.copy_(torch.randint(0, 256, mod.vq_codebook.shape, generator=g, dtype=torch.uint8))
    mod.vq_codebook_scales.copy_(torch.full((mod.layout.num_codebooks,), 1e-3).half().view(torch.int16))
    return VQWeight(mod.layout, mod.stored_tensors())


def read_bandwidth() -> float:
    a = torch.ones(256 * 1024 * 1024)
    t = min(bench(lambda _i: a.sum(), 1, 1) for _ in range(3))
    return a.numel() * 4 / t / 1e9


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--shapes", default="576x576,1536x576,576x1536,4096x4096")
    ap.add_argument("--groups", default="32,128")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--pool", type=int, default=400, help="MB of weight copies in rotation for cold decode")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--dense-shapes", default="49152x576", help="float layers (the output head): torch vs native")
    args = ap.parse_args(argv)
    isas = [i for i in ("avx512vnni", "avxvnni", "avx2") if native.isa_supported(i)]
    vq_isas = [i for i in ("avx512vbmi", "avx512vnni", "avxvnni", "avx2") if native_vq.isa_supported(i)]
    print(f"{cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; native kernel paths here: affine {isas}, "
          f"GPTVQ {vq_isas}")
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        bw = read_bandwidth()
        print(f"\n{threads} thread(s), read bandwidth {bw:.1f} GB/s; {args.bits}-bit symmetric codes; decode: C call "
              "(as the decoder layer step calls it) and Python call (run() on one layer)\n")
        print("| shape (out x in) | group | kernel | C call us | GB/s | % BW | % plain read | Python call us | GB/s "
              "| % BW | prefill tok/s | prefill x dense bf16 |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for shape in args.shapes.split(","):
            n, k = map(int, shape.split("x"))
            x1 = torch.randn(1, k).bfloat16()
            xp = torch.randn(args.prefill, k).bfloat16()
            for group in map(int, args.groups.split(",")):
                aw = rtn_weight(torch.randn(n, k) * 0.02, args.bits, group, sym=True)
                copies = max(2, int(args.pool * 1e6 / (n * k * args.bits / 8)))
                rows = []
                states = [native.prepare(aw) for _ in range(copies)]
                size = nbytes(states[0].codes, states[0].scales, states[0].zeros)
                for isa in isas:
                    os.environ["HF_VQ_NATIVE_ISA"] = isa
                    tc = c_call([native.projection(st) for st in states], x1[0], n)
                    tr = plain_read(*affine_buffers(states))
                    t = bench(lambda i: native.run(states[i % copies], x1, None), copies)
                    tp = bench(lambda i: native.run(states[0], xp, None), 1)
                    rows.append((f"native {isa}", tc, tr, t, size, tp))
                os.environ.pop("HF_VQ_NATIVE_ISA", None)
                del states
                if args.bits <= 4:
                    tstates = [kernel_torch_int4.prepare(aw) for _ in range(copies)]
                    if tstates[0] is not None:
                        t = bench(lambda i: kernel_torch_int4.run(tstates[i % copies], x1, None), copies)
                        rows.append(("torch int4 (bf16)", None, None, t,
                                     nbytes(tstates[0]["packed"], tstates[0][torch.bfloat16]), None))
                    del tstates
                w = aw.dequantize()
                for dtype in (torch.bfloat16, torch.float32):
                    dcopies = max(2, int(args.pool * 1e6 / (n * k * (2 if dtype == torch.bfloat16 else 4))))
                    ws = [w.to(dtype).clone() for _ in range(dcopies)]  # .to() of an fp32 w returns w itself
                    xd, xpd = x1.to(dtype), xp.to(dtype)
                    t = bench(lambda i: F.linear(xd, ws[i % dcopies]), dcopies)
                    tp = bench(lambda i: F.linear(xpd, ws[0]), 1)
                    rows.append((f"dense {str(dtype)[6:]}", None, None, t, nbytes(ws[0]), tp))
                    if dtype == torch.bfloat16:
                        dense_tp = tp
                    del ws
                print_rows(f"{n}x{k}", str(group), rows, bw, args.prefill, dense_tp)
            print_rows(f"{n}x{k}", "GPTVQ 2D, 6-bit index", vq_rows(n, k, vq_isas, args.pool, x1, xp), bw,
                       args.prefill, dense_tp)
        for shape in filter(None, args.dense_shapes.split(",")):
            dense_rows(shape, args.pool, bw)


def vq_rows(n: int, k: int, isas: list[str], pool: int, x1: torch.Tensor, xp: torch.Tensor) -> list[tuple]:
    """The native GPTVQ kernel on each of its paths, each on the layout it prepares for that path (packed 6-bit
    indices where it is AVX512-VBMI): (name, C call s, plain read s, Python call s, bytes read, prefill s)."""
    vq = random_vq(n, k)
    rows = []
    for isa in isas:
        os.environ["HF_VQ_NATIVE_ISA"] = isa
        first = native_vq.prepare(vq)
        if first is None:
            break
        size = nbytes(first.data)
        states = [first] + [native_vq.prepare(vq) for _ in range(max(2, int(pool * 1e6 / size)) - 1)]
        tc = c_call([native_vq.projection(st) for st in states], x1[0], n)
        tr = plain_read([st.data.data_ptr() for st in states], size)
        t = bench(lambda i: native_vq.run(states[i % len(states)], x1, None), len(states))
        tp = bench(lambda i: native_vq.run(states[0], xp, None), 1)
        rows.append((f"native GPTVQ {isa}" + (", packed indices" if first.packed else ""), tc, tr, t, size, tp))
        del states
    os.environ.pop("HF_VQ_NATIVE_ISA", None)
    return rows


def print_rows(shape: str, group: str, rows: list[tuple], bw: float, prefill: int, dense_tp: float) -> None:
    """One table line per (name, C call s or None, plain read s or None, Python call s, bytes read, prefill s or
    None); the C call also as a share of the speed of a plain read of the same buffers (measured right after it);
    the prefill speed also as a ratio to torch's bf16 GEMM on this shape (``dense_tp`` seconds)."""
    for name, tc, tr, t, size, tp in rows:
        cols = []
        for sec in (tc, t):
            cols += ["-"] * 3 if sec is None else [f"{sec * 1e6:.1f}", f"{size / sec / 1e9:.1f}",
                                                   f"{100 * size / sec / 1e9 / bw:.0f}%"]
            if sec is tc:
                cols.append(f"{100 * tr / tc:.0f}%" if tc and tr else "-")
        pre = f"{prefill / tp:,.0f} | {dense_tp / tp:.2f}" if tp else "- | -"
        print(f"| {shape} | {group} | {name} | {' | '.join(cols)} | {pre} |", flush=True)


def dense_rows(shape: str, pool: int, bw: float) -> None:
    n, k = map(int, shape.split("x"))
    for dtype in (torch.bfloat16, torch.float32):
        size = n * k * (2 if dtype == torch.bfloat16 else 4)
        copies = max(2, int(pool * 1e6 / size))
        ws = [torch.randn(n, k).to(dtype) for _ in range(copies)]
        x = torch.randn(1, k).to(dtype)
        rows = [("dense " + str(dtype)[6:] + ", torch F.linear", bench(lambda i: F.linear(x, ws[i % copies]), copies))]
        if kernel_native_dense.prepare(ws[0]) is not None:
            rows.append(("dense " + str(dtype)[6:] + ", native", bench(
                lambda i: kernel_native_dense.run(ws[i % copies], x, None), copies)))
        for name, t in rows:
            gbs = size / t / 1e9
            print(f"| {n}x{k} | - | {name} | - | - | - | - | {t * 1e6:.1f} | {gbs:.1f} | {100 * gbs / bw:.0f}% | - "
                  "| - |", flush=True)
        del ws


if __name__ == "__main__":
    main()
