"""Quantize a model inside from_pretrained with any hf_vq method, evaluate it, save it.

    python examples/quantize_at_load.py --model DIR --method gptq --dataset calib.txt --eval test.txt --out OUT
Methods: rtn, gptq, gptvq, adascale, quantsim. Small defaults so it also runs quickly on a laptop CPU.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_vq


def make_config(method: str, calib: dict):
    if method == "rtn":
        return hf_vq.RTNConfig(bits=4, group_size=32)
    if method == "gptq":
        return hf_vq.GPTQConfig(bits=4, group_size=32, **calib)
    if method == "gptvq":
        return hf_vq.GPTVQConfig(vector_dim=2, index_bits=4, rows_per_block=16, cols_per_block=32,
                                 kmeans_iterations=5, **calib)
    if method == "adascale":
        return hf_vq.AdaScaleConfig(bits=4, group_size=32, num_iterations=5, **calib)
    if method == "quantsim":
        return hf_vq.QuantSimConfig(weight_bits=8, weight_granularity="per_channel", activation_bits=16, **calib)
    raise SystemExit(f"unknown method {method!r}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--method", default="gptq", choices=["rtn", "gptq", "gptvq", "adascale", "quantsim"])
    ap.add_argument("--dataset", required=True, help="calibration text file or folder")
    ap.add_argument("--eval", required=True, help="evaluation text file")
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    tok = AutoTokenizer.from_pretrained(args.model)
    calib = dict(dataset=args.dataset, tokenizer=tok, num_samples=args.num_samples, seq_len=args.seq_len)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=make_config(args.method, calib),
                                                 dtype=torch.float32)
    text = open(args.eval, encoding="utf-8").read()
    ppl = hf_vq.evaluate_perplexity(model, tok, text, seq_len=args.seq_len, max_tokens=None)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    again = AutoModelForCausalLM.from_pretrained(args.out)
    reload_ppl = hf_vq.evaluate_perplexity(again, tok, text, seq_len=args.seq_len, max_tokens=None)
    result = {"method": args.method, "ppl": ppl, "reload_ppl": reload_ppl, "out": args.out}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
