"""Quantization-aware training with the plain transformers Trainer (no PEFT), then save with latents folded.

    python examples/qat_trainer.py --model DIR --data train.txt --out OUT --steps 20
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import hf_vq
from hf_vq.pipeline.data import build_calibration


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=64)
    args = ap.parse_args(argv)

    tok = AutoTokenizer.from_pretrained(args.model)
    cfg = hf_vq.QuantSimConfig(weight_bits=4, weight_granularity="blockwise", block_size=32, activation_bits=None,
                               dataset=args.data, tokenizer=tok, num_samples=4, seq_len=args.seq_len)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=cfg, dtype=torch.float32)
    ids = build_calibration(args.data, tok, num_samples=32, seq_len=args.seq_len, seed=1)
    train = [{"input_ids": r, "labels": r} for r in ids]
    text = open(args.data, encoding="utf-8").read()
    before = hf_vq.evaluate_perplexity(model, tok, text, seq_len=args.seq_len, max_tokens=None)
    targs = TrainingArguments(output_dir=args.out + "-trainer", max_steps=args.steps, per_device_train_batch_size=4,
                              learning_rate=1e-4, report_to=[], save_strategy="no", logging_steps=5,
                              use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=targs, train_dataset=train).train()
    after = hf_vq.evaluate_perplexity(model, tok, text, seq_len=args.seq_len, max_tokens=None)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    again = AutoModelForCausalLM.from_pretrained(args.out)
    reload_ppl = hf_vq.evaluate_perplexity(again, tok, text, seq_len=args.seq_len, max_tokens=None)
    result = {"ppl_before": before, "ppl_after": after, "reload_ppl": reload_ppl}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
