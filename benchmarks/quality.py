"""Quality benchmark on the real model (SmolLM2-135M-Instruct, Austen corpus).

Protocol (shared/docs/data-and-models.md): quantize in fp32, evaluate (fp32 by default, --eval-dtype bfloat16 for the
documented bf16 cast), perplexity over the first 32 windows of 2048 tokens of Pride and Prejudice + Persuasion.
Calibration: random windows of Emma (calibration sets above 200k tokens add Sense and Sensibility and Northanger Abbey).

    python benchmarks/quality.py --rows fp,rtn4,gptq4-small,gptq4,gptq3-small
prints a table: method, bits, group, calibration, ppl, ppl/FP, quantize time (forward / math split), peak RSS.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_vq
from hf_vq import assets

ROWS = {
    "fp": None,
    "rtn4": ("rtn", dict(bits=4, group_size=128), None),
    "rtn3": ("rtn", dict(bits=3, group_size=128), None),
    "gptq4-small": ("gptq", dict(bits=4, group_size=128), (32, 512)),
    "gptq4-small-sym": ("gptq", dict(bits=4, group_size=128, sym=True), (32, 512)),
    "gptq4-small-head8": ("gptq", dict(bits=4, group_size=128, lm_head_bits=8), (32, 512)),
    "gptq4-small-head4": ("gptq", dict(bits=4, group_size=128, lm_head_bits=4, lm_head_group_size=128), (32, 512)),
    "rtn4-head8": ("rtn", dict(bits=4, group_size=128, lm_head_bits=8), None),
    "gptq4": ("gptq", dict(bits=4, group_size=128), (128, 2048)),
    "gptq3-small": ("gptq", dict(bits=3, group_size=128), (32, 512)),
    "gptq3": ("gptq", dict(bits=3, group_size=128), (128, 2048)),
    "gptq3-small-clip": ("gptq", dict(bits=3, group_size=128, clip_search=True), (32, 512)),
    "gptq2-small": ("gptq", dict(bits=2, group_size=128), (32, 512)),
}
CONFIGS = {"rtn": hf_vq.RTNConfig, "gptq": hf_vq.GPTQConfig}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _head(params: dict) -> str:
    bits = params.get("lm_head_bits")
    return "float" if bits is None else f"{bits}-bit g{params.get('lm_head_group_size', -1)}"


def run_row(name, model_dir, tok, calib_text, test_text, seq_len, max_windows, eval_dtype):
    spec = ROWS[name]
    t0 = time.perf_counter()
    if spec is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        method, params, calib, split = "fp", {}, None, {}
    else:
        method, params, calib = spec
        kw = dict(params)
        if calib:
            # Emma has ~222k tokens: larger calibration sets add two more novels instead of repeating text
            text = calib_text if calib[0] * calib[1] <= 200_000 else assets.austen_calibration_text(extended=True)
            kw.update(dataset=[text], tokenizer=tok, num_samples=calib[0], seq_len=calib[1])
        cfg = CONFIGS[method](**kw)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg, dtype=torch.float32)
        split = model.hf_quantizer.last_run
    qtime = time.perf_counter() - t0
    model.to(getattr(torch, eval_dtype))
    ppl = hf_vq.evaluate_perplexity(model, tok, test_text, seq_len=seq_len, max_tokens=65536, max_windows=max_windows)
    row = {"row": name, "method": method, "bits": params.get("bits", 32), "group": params.get("group_size", "-"),
           "sym": params.get("sym", False), "lm_head": _head(params) if spec else "-",
           "calibration": f"{calib[0]}x{calib[1]}" if spec and calib else "-",
           "ppl": ppl, "quantize_s": qtime if spec else 0.0, "forward_s": split.get("forward_s", 0.0),
           "math_s": split.get("quantize_s", 0.0), "peak_rss_mb": peak_rss_mb()}
    del model
    gc.collect()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="fp,rtn4,gptq4-small,gptq3-small")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=32)
    # bf16 is the documented protocol on AMX CPUs; on CPUs without bf16 units fp32 is both faster and exact
    ap.add_argument("--eval-dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    model_dir = assets.ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib_text, test_text = assets.austen_calibration_text(), assets.austen_test_text()
    rows = []
    fp = None
    print(f"| row | method | bits | group | sym | lm_head | calibration | ppl@{args.seq_len} | ppl/FP | quantize s "
          "(forward / math) | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.rows.split(","):
        r = run_row(name, model_dir, tok, calib_text, test_text, args.seq_len, args.max_windows, args.eval_dtype)
        fp = r["ppl"] if r["method"] == "fp" else fp
        ratio = f"{r['ppl'] / fp:.4f}" if fp else "-"
        print(f"| {r['row']} | {r['method']} | {r['bits']} | {r['group']} | {r['sym']} | {r['lm_head']} | "
              f"{r['calibration']} | {r['ppl']:.3f} | {ratio} | {r['quantize_s']:.1f} ({r['forward_s']:.1f} / "
              f"{r['math_s']:.1f}) | "
              f"{r['peak_rss_mb']:.0f} |", flush=True)
        rows.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
