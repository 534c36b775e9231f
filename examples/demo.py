"""Main job: quantize the bundled real model (SmolLM2-135M-Instruct) with GPTQ 4-bit at load, report its quality.

    make demo            # or: python examples/demo.py [--bits 4] [--group-size 128] [--num-samples 32] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_vq
from hf_vq import assets


def dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-seq-len", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=32)
    args = ap.parse_args(argv)

    model_dir = assets.ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(model_dir)
    test_text = assets.austen_test_text()
    evaluate = lambda m: hf_vq.evaluate_perplexity(m, tok, test_text, seq_len=args.eval_seq_len,  # noqa: E731
                                                   max_tokens=65536, max_windows=args.eval_windows)

    fp = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    t0 = time.perf_counter()
    fp_ppl = evaluate(fp)
    eval_s = time.perf_counter() - t0
    del fp

    cfg = hf_vq.GPTQConfig(bits=args.bits, group_size=args.group_size, dataset=[assets.austen_calibration_text()],
                           tokenizer=tok, num_samples=args.num_samples, seq_len=args.seq_len)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg, dtype=torch.float32)
    quant_s = time.perf_counter() - t0
    run = model.hf_quantizer.last_run
    q_ppl = evaluate(model)
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)
        q_size = dir_size_mb(Path(out))
    fp_size = dir_size_mb(Path(model_dir))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    calib = f"Emma, {args.num_samples} x {args.seq_len} tokens"
    evald = f"Pride and Prejudice + Persuasion, {args.eval_windows} x {args.eval_seq_len} tokens"
    print(f"\nSmolLM2-135M-Instruct, GPTQ {args.bits}-bit g{args.group_size} (calibration: {calib}; eval: {evald})")
    print("| model | perplexity | ppl / FP | weights on disk |")
    print("|---|---|---|---|")
    print(f"| FP32 | {fp_ppl:.2f} | 1.000 | {fp_size:.0f} MB |")
    print(f"| GPTQ {args.bits}-bit | {q_ppl:.2f} | {q_ppl / fp_ppl:.3f} | {q_size:.0f} MB (embeddings stay fp32) |")
    print(f"quantization: {quant_s:.1f} s total (forward passes {run['forward_s']:.1f} s, GPTQ math "
          f"{run['quantize_s']:.1f} s); one FP eval {eval_s:.1f} s; peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
