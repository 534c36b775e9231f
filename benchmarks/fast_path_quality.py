"""Quality of the CPU kernels against the exact dequantized forward, on the real model: perplexity on Austen@2048
and greedy continuations, for saved hf_vq checkpoints.

    python benchmarks/fast_path_quality.py .cache/bench/decode/gptq4-sym-g32 .cache/bench/decode/gptvq2d \\
        --max-windows 8 --prompts 16 --new-tokens 32

For each checkpoint (loaded in --dtype) it prints one row: ppl with ``HF_VQ_KERNELS=exact`` (every layer dequantized,
the reference) and with the default kernels (``auto``), their relative difference, and how many of --prompts greedy
continuations of --new-tokens tokens agree token for token, with the first position where each one differs.
Prompts are --prompt-tokens tokens taken at evenly spaced places in the test text (Pride and Prejudice +
Persuasion). For scale, the last column compares the exact path in --dtype with the exact path in float32: how often
greedy decoding already diverges between two roundings of the same weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_vq
from hf_vq import assets


def continuations(model, prompts, new_tokens):
    outs = []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(p[None], attention_mask=torch.ones_like(p[None]), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            outs.append(out[0, p.numel():])
    return outs


def first_differences(a_runs, b_runs) -> list[int]:
    out = []
    for a, b in zip(a_runs, b_runs):
        diff = (a != b).nonzero()
        if diff.numel():
            out.append(int(diff[0]))
    return sorted(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=32,
                    help="windows of --seq-len (32 = the first 65,536 tokens; 0: greedy continuations only)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    text = assets.austen_test_text()
    print(f"# {args.dtype}, ppl@{args.seq_len} over {args.max_windows} windows, {args.prompts} prompts of "
          f"{args.prompt_tokens} tokens + {args.new_tokens} greedy tokens, {args.threads} threads\n")
    print("| checkpoint | ppl exact | ppl kernels | diff | greedy agree | first difference at | exact vs exact fp32 |")
    print("|---|---|---|---|---|---|---|")
    for ckpt in args.checkpoints:
        tok = AutoTokenizer.from_pretrained(ckpt)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        step = (ids.numel() - args.prompt_tokens) // args.prompts
        prompts = [ids[i * step:i * step + args.prompt_tokens] for i in range(args.prompts)]
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, args.dtype)).eval()
        res = {}
        for mode in ("exact", "auto"):
            os.environ["HF_VQ_KERNELS"] = mode   # read by hf_vq at every call
            t0 = time.perf_counter()
            ppl = float("nan") if not args.max_windows else hf_vq.evaluate_perplexity(
                model, tok, ids, seq_len=args.seq_len, max_tokens=None, max_windows=args.max_windows)
            res[mode] = (ppl, continuations(model, prompts, args.new_tokens))
            print(f"  {ckpt} {mode}: ppl {ppl:.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        (pe, ce), (pk, ck) = res["exact"], res["auto"]
        firsts = first_differences(ce, ck)
        os.environ["HF_VQ_KERNELS"] = "exact"
        ref = "-"
        if args.dtype != "float32":
            model32 = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
            ref_firsts = first_differences(ce, continuations(model32, prompts, args.new_tokens))
            ref = f"{args.prompts - len(ref_firsts)}/{args.prompts} agree"
            del model32
        print(f"| {os.path.basename(os.path.normpath(ckpt))} | {pe:.4f} | {pk:.4f} | {100 * (pk / pe - 1):+.2f}% | "
              f"{args.prompts - len(firsts)}/{args.prompts} | {', '.join(map(str, firsts)) or '-'} | {ref} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
