"""GPTVQ benchmark: batch-1 decode speed of VQLinear and quality on SmolLM2-135M.

  python benchmarks/gptvq.py kernel                      # 4096x4096 M=1 decode: VQ vs fp32 / bf16 / int4pack
  python benchmarks/gptvq.py quality --rows vq2d_3,gptq3 # perplexity rows (see ROWS); --iters sets kmeans_iterations

Quality protocol (shared 2-core CPU, so small calibration): 32 x 512 tokens of Emma, ppl@2048 over 32 windows of
P&P + Persuasion (fp32 by default, --eval-dtype). Every row prints as it finishes and is appended to --out (JSON lines).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def bench(fn, warmup=3, reps=30):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def kernel_part(n=4096, k=4096):
    from hf_vq.algorithms.gptvq import VQLayout
    from hf_vq.nn.vqlinear import VQLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False)
    x32 = torch.randn(1, k)
    xbf = x32.bfloat16()
    rows = [("fp32 nn.Linear", bench(lambda: lin(x32)), 32.0)]
    wbf = lin.weight.data.bfloat16()
    rows.append(("bf16 F.linear", bench(lambda: F.linear(xbf, wbf)), 16.0))
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.rand(k // 128, n, 2).bfloat16()
    rows.append(("int4pack g128 (bf16 x)",
                 bench(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xbf, packed, 128, sz)), 4 + 32 / 128))
    for d, ib, r in ((2, 6, 32), (2, 8, 256), (4, 8, 256)):
        lay = VQLayout(n, k, d, ib, 8, r, 256)
        mod = VQLinear(lay, bias=False)
        mod.vq_indices.random_(0, 256)
        mod.vq_codebook.random_(0, 256)
        mod.vq_codebook_scales.copy_(torch.full((lay.num_codebooks,), 1e-3).half().view(torch.int16))
        tag = f"VQ {d}D idx{ib} {r}x256"
        rows.append((f"{tag} cached fp32", bench(lambda: mod(x32)), mod.bits_per_value()))
        rows.append((f"{tag} cached bf16", bench(lambda: mod(xbf)), mod.bits_per_value()))
        VQLinear.cache_decoded = False
        rows.append((f"{tag} decode per call (bf16)", bench(lambda: mod(xbf), 1, 5), mod.bits_per_value()))
        VQLinear.cache_decoded = True
    base = rows[0][1]
    print(f"\nM=1 decode, {n}x{k}, 1 thread (cache-hot weights; median ms)")
    print("| method | stored bits/weight | ms | speedup vs fp32 |\n|---|---|---|---|")
    for name, ms, bpv in rows:
        print(f"| {name} | {bpv:.3f} | {ms:.3f} | {base / ms:.2f} |")


ROWS = {
    "gptq3": ("gptq", dict(bits=3, group_size=128)),
    "vq2d_3": ("gptvq", dict(vector_dim=2, index_bits=6, rows_per_block=32, cols_per_block=256)),
    "vq2d_2": ("gptvq", dict(vector_dim=2, index_bits=4, rows_per_block=8, cols_per_block=256)),
    "vq2d_4": ("gptvq", dict(vector_dim=2, index_bits=8, rows_per_block=128, cols_per_block=256)),
    "vq2d_3_nohwl": ("gptvq", dict(vector_dim=2, index_bits=6, hessian_weighted_lookup=False)),
    "vq2d_3_noupd": ("gptvq", dict(vector_dim=2, index_bits=6, codebook_update=False)),
    "vq1d_3": ("gptvq", dict(vector_dim=1, index_bits=3, rows_per_block=32, cols_per_block=256)),
    # 1D / 2D / 4D at ~2.13 bpv (paper Table 7 shapes); 4D cannot reach 3 bits/dim (index_bits <= 8)
    "vq1d_2": ("gptvq", dict(vector_dim=1, index_bits=2, rows_per_block=1, cols_per_block=256)),
    "vq4d_2": ("gptvq", dict(vector_dim=4, index_bits=8, rows_per_block=256, cols_per_block=256)),
    "vq2d_3_norm": ("gptvq", dict(vector_dim=2, index_bits=6, data_normalization=True)),
    "vq2d_3_kpp": ("gptvq", dict(vector_dim=2, index_bits=6, init="kpp")),
}


def quality_part(names, iters, out, eval_seq_len=2048, max_windows=None, blocks=None, eval_dtype=torch.float32):
    import hf_vq
    from hf_vq import assets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    cal, test = assets.austen_calibration_text(), assets.austen_test_text()
    print("| row | method | bits/weight (stored, decoder linears) | ppl | quantize s |\n|---|---|---|---|---|")
    for name in names:
        method, kw = ROWS[name]
        common = dict(dataset=[cal], tokenizer=tok, num_samples=32, seq_len=512)
        if blocks is not None:  # quantize only decoder blocks < blocks (quick comparisons on a loaded machine)
            common["module_overrides"] = {rf"layers\.(?!({'|'.join(map(str, range(blocks)))})\.)": {"skip": True}}
        if method == "gptq":
            cfg = hf_vq.GPTQConfig(**kw, **common)
        else:
            cfg = hf_vq.GPTVQConfig(kmeans_iterations=iters, **kw, **common)
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=cfg)
        qs = time.perf_counter() - t
        bits = n = 0
        for m in model.modules():
            if hasattr(m, "bits_per_value") and hasattr(m, "in_features"):
                w = m.in_features * m.out_features
                bits += m.bits_per_value() * w
                n += w
        model.to(eval_dtype)
        ppl = hf_vq.evaluate_perplexity(model, tok, test, seq_len=eval_seq_len, max_tokens=65536,
                                         max_windows=max_windows)
        row = {"row": name, "method": method, **kw, "kmeans_iterations": iters if method == "gptvq" else None,
               "bpv": bits / n, "ppl": ppl, "eval_seq_len": eval_seq_len, "max_windows": max_windows,
               "blocks": blocks, "quantize_s": qs}
        print(f"| {name} | {method} {kw} | {bits / n:.3f} | {ppl:.2f} | {qs:.0f} |", flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        del model


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["kernel", "quality"])
    ap.add_argument("--rows", default="gptq3,vq2d_3,vq2d_2,vq2d_4,vq2d_3_nohwl,vq2d_3_noupd,vq1d_3,vq1d_2,vq4d_2")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="gptvq_quality.jsonl")
    ap.add_argument("--eval-seq-len", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--blocks", type=int, default=None, help="quantize only the first N decoder blocks")
    # bf16 matmuls are ~10x slower than fp32 on CPUs without bf16 units (AVX2): evaluate in fp32 unless asked
    ap.add_argument("--eval-dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.part == "kernel":
        kernel_part()
    else:
        quality_part(args.rows.split(","), args.iters, args.out, args.eval_seq_len, args.max_windows, args.blocks,
                     getattr(torch, args.eval_dtype))


if __name__ == "__main__":
    sys.exit(main())
