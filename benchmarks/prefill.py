"""Whole-model prefill of several saved models in one process, turn by turn, against the dense model.

    python benchmarks/prefill.py [--threads 1,2] [--rows bf16,gptq4-sym-g128,gptq4-sym-g32,gptvq2d] [--tokens 512]

``benchmarks/decode.py`` runs every row in its own process, so two rows' prefill numbers also differ by what each
process met (the allocator's state, the other core's load). Here all models are loaded into one process and each
timed forward alternates between them (best of --repeats per model), so the ratios compare like with like. Rows:
``bf16`` (transformers, SmolLM2 in bf16) and the hf_vq models ``benchmarks/decode.py`` saved under --cache, loaded
in bf16. One forward of --tokens random tokens, logits of every position, as decode.py's prefill column.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import hf_vq  # noqa: F401  (registers the quantizer)
from hf_vq import assets


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rows", default="bf16,gptq4-sym-g128,gptq4-sym-g32,gptvq2d")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache", default=".cache/bench/decode", help="where benchmarks/decode.py saved its models")
    args = ap.parse_args(argv)
    rows = args.rows.split(",")
    for name in rows:
        if name != "bf16" and not (Path(args.cache) / name / "config.json").exists():
            raise SystemExit(f"{args.cache}/{name}: not found; `python benchmarks/decode.py --rows {name}-bf16` "
                             "saves it")
    models = {name: AutoModelForCausalLM.from_pretrained(
        assets.ensure_smollm2() if name == "bf16" else Path(args.cache) / name, dtype=torch.bfloat16).eval()
        for name in rows}
    ids = torch.randint(0, models[rows[0]].config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    print(f"SmolLM2-135M, one forward of {args.tokens} tokens, bf16, best of {args.repeats}, models alternating in one "
          f"process; {os.cpu_count()} CPUs, torch {torch.__version__}, load average at start {os.getloadavg()[0]:.1f}\n")
    print("| row | threads | prefill tok/s | x " + rows[0] + " |")
    print("|---|---|---|---|")
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        best = dict.fromkeys(rows, float("inf"))
        with torch.no_grad():
            for name in rows:   # warm-up: kernels pack on the first call
                models[name](input_ids=ids)
            for _ in range(args.repeats):
                for name in rows:
                    t = time.perf_counter()
                    models[name](input_ids=ids)
                    best[name] = min(best[name], time.perf_counter() - t)
        for name in rows:
            print(f"| {name} | {threads} | {args.tokens / best[name]:.0f} | {best[rows[0]] / best[name]:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
