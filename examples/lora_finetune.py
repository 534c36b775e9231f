"""LoRA fine-tuning of an hf_vq-quantized model with peft + the transformers Trainer; adapter save and exact reload.

    python examples/lora_finetune.py                                  # SmolLM2-135M-Instruct + Emma (cached)
    python examples/lora_finetune.py --model DIR --data train.txt --out OUT --steps 5

The model is quantized at load (RTN 4-bit g32, or GPTQ with --method gptq) and saved; the quantized weights stay
frozen (integer buffers are never modified) and only the LoRA matrices train, on windows of --seq-len tokens of
--data. Perplexity on the first --eval-tokens tokens of --data is measured before and after training, after loading
the saved adapter (on its own, a few MB) onto a freshly loaded quantized checkpoint with ``hf_vq.load_lora``, and
after folding the adapter into a plain float model (``hf_vq.merge_and_dequantize``).

Measured with the defaults on SmolLM2-135M-Instruct and Emma: perplexity 81.77 -> 60.07 in 5 steps (8 windows of 64
tokens of the training text), 60.07 with the reloaded adapter and 59.85 merged into a float model (the float model
skips the int8-activation kernels of the quantized layers). On a 2-core x86 CPU (AMD EPYC) running other jobs (load
average 8): 19 CPU-seconds (user + system) with one thread (OMP_NUM_THREADS=1), 49 s wall.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import hf_vq
from hf_vq import assets
from hf_vq.pipeline.data import build_calibration


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="float checkpoint folder, or 'smollm2' (cached by hf_vq.assets)")
    ap.add_argument("--data", default="austen", help="training text file, or 'austen' (Emma)")
    ap.add_argument("--out", help="where to save the quantized model and the adapter (default: a temporary folder)")
    ap.add_argument("--method", choices=("rtn", "gptq"), default="rtn")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-tokens", type=int, default=512)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        return run(args, Path(args.out) if args.out else Path(tmp), t0)


def run(args, out: Path, t0: float):
    model_dir = str(assets.ensure_smollm2()) if args.model == "smollm2" else args.model
    text = (assets.austen_calibration_text() if args.data == "austen"
            else Path(args.data).read_text(encoding="utf-8"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    if args.method == "rtn":
        qcfg = hf_vq.RTNConfig(bits=4, group_size=32)
    else:
        qcfg = hf_vq.GPTQConfig(bits=4, group_size=32, dataset=[text], tokenizer=tok, num_samples=4,
                                seq_len=args.seq_len)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=qcfg, dtype=torch.float32)
    model.save_pretrained(out / "quantized")
    tok.save_pretrained(out / "quantized")

    # Tokenize only the start of the text (English runs at ~4 characters per token).
    eval_ids = tok(text[: 16 * args.eval_tokens], return_tensors="pt", add_special_tokens=False)["input_ids"][0]

    def ppl(m):
        return hf_vq.evaluate_perplexity(m, tok, eval_ids, seq_len=args.seq_len, max_tokens=args.eval_tokens)

    before = ppl(model)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    peft_model = hf_vq.prepare_lora(model, lora)
    ids = build_calibration([text], tok, num_samples=32, seq_len=args.seq_len, seed=1)
    train = [{"input_ids": r, "labels": r} for r in ids]
    targs = TrainingArguments(output_dir=str(out / "trainer"), max_steps=args.steps,
                              per_device_train_batch_size=args.batch_size, learning_rate=args.lr, report_to=[],
                              save_strategy="no", logging_steps=5,
                              use_cpu=True, disable_tqdm=True)
    Trainer(model=peft_model, args=targs, train_dataset=train).train()
    after = ppl(peft_model)
    peft_model.save_pretrained(out / "adapter")

    fresh = hf_vq.load_lora(AutoModelForCausalLM.from_pretrained(out / "quantized"), out / "adapter")
    reload_ppl = ppl(fresh)
    merged_ppl = ppl(hf_vq.merge_and_dequantize(fresh))  # a plain fp model with the adapter folded in
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    result = {"ppl_before": before, "ppl_after": after, "reload_ppl": reload_ppl, "merged_ppl": merged_ppl,
              "trainable_params": trainable,
              "seconds": round(time.perf_counter() - t0, 1)}
    print(f"\nLoRA (rank {args.rank}) on {args.method} 4-bit {model_dir}: {args.steps} steps of {args.batch_size} x "
          f"{args.seq_len} tokens, {trainable} trainable parameters; perplexity {before:.2f} -> {after:.2f} "
          f"(reloaded adapter {reload_ppl:.2f}, merged into a float model {merged_ppl:.2f}); saved to "
          f"{args.out or 'a temporary folder (pass --out to keep it)'}; total {result['seconds']} s")
    return result


if __name__ == "__main__":
    main()
