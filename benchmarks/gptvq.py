"""GPTVQ quality benchmark on SmolLM2-135M.

  python benchmarks/gptvq.py quality --rows vq2d_3,gptq3 # perplexity rows (see ROWS); --iters sets kmeans_iterations
  python benchmarks/gptvq.py quality --rows vq4d_2 --iters 25 --finetune 50   # + codebook fine-tuning, 50 it / block

Decode speed (VQ kernel vs fp32 / int4) is benchmarks/vq_kernel.py.

Quality protocol (shared 2-core CPU, so small calibration): 32 x 512 tokens of Emma, ppl@2048 over 32 windows of
P&P + Persuasion (fp32 by default, --eval-dtype). Every row prints as it finishes and is appended to --out (JSON lines).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from common import first_blocks_only


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


def quality_part(names, iters, out, eval_seq_len=2048, max_windows=None, blocks=None, eval_dtype=torch.float32,
                 finetune=(0, 1e-4), calibration=(32, 512)):
    import hf_vq
    from hf_vq import assets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    cal, test = assets.austen_calibration_text(), assets.austen_test_text()
    print("| row | method | bits/weight (stored, decoder linears) | ppl | quantize s |\n|---|---|---|---|---|")
    for name in names:
        method, kw = ROWS[name]
        common = dict(dataset=[cal], tokenizer=tok, num_samples=calibration[0], seq_len=calibration[1])
        if blocks is not None:  # quantize only decoder blocks < blocks (quick comparisons on a loaded machine)
            common["module_overrides"] = first_blocks_only(blocks)
        if method == "gptq":
            cfg = hf_vq.GPTQConfig(**kw, **common)
        else:
            cfg = hf_vq.GPTVQConfig(kmeans_iterations=iters, finetune_iterations=finetune[0], finetune_lr=finetune[1],
                                    **{**kw, **common})
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
        if method == "gptvq":
            kw = {**kw, "finetune_iterations": finetune[0], "finetune_lr": finetune[1]}
        row = {"row": name, "method": method, **kw, "kmeans_iterations": iters if method == "gptvq" else None,
               "calibration": f"{calibration[0]}x{calibration[1]}",
               "bpv": bits / n, "ppl": ppl, "eval_seq_len": eval_seq_len, "max_windows": max_windows,
               "blocks": blocks, "quantize_s": qs}
        print(f"| {name} | {method} {kw} | {bits / n:.3f} | {ppl:.2f} | {qs:.0f} |", flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        del model


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["quality"])
    ap.add_argument("--rows", default="gptq3,vq2d_3,vq2d_2,vq2d_4,vq2d_3_nohwl,vq2d_3_noupd,vq1d_3,vq1d_2,vq4d_2")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="gptvq_quality.jsonl")
    ap.add_argument("--eval-seq-len", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--blocks", type=int, default=None, help="quantize only the first N decoder blocks")
    # bf16 matmuls are ~10x slower than fp32 on CPUs without bf16 units (AVX2): evaluate in fp32 unless asked
    ap.add_argument("--eval-dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--finetune", type=int, default=0, help="GPTVQ codebook fine-tuning iterations per block")
    ap.add_argument("--finetune-lr", type=float, default=1e-4)
    ap.add_argument("--calibration", default="32x512", help="num_samples x seq_len of Emma windows")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    quality_part(args.rows.split(","), args.iters, args.out, args.eval_seq_len, args.max_windows, args.blocks,
                 getattr(torch, args.eval_dtype), (args.finetune, args.finetune_lr),
                 tuple(int(v) for v in args.calibration.split("x")))


if __name__ == "__main__":
    sys.exit(main())
