"""Quantize a model inside from_pretrained with any hf_vq method, evaluate it, save it and reload it.

    python examples/quantize_at_load.py --method gptq          # SmolLM2-135M-Instruct + Jane Austen (cached)
    python examples/quantize_at_load.py --model DIR --method gptvq --dataset calib.txt --eval test.txt --out OUT

Methods: rtn, gptq, gptvq, adascale, quantsim. Each has small calibration defaults (--num-samples x --seq-len) that
finish within 2 minutes on a 2-core CPU. Perplexity is measured on the first --eval-windows windows of --eval-seq-len
tokens of the evaluation text (4 x 512 by default), then the saved checkpoint is reloaded and its logits compared
with the quantized model's. At the end it prints what it did and how long each step took.

Measured with the defaults on SmolLM2-135M-Instruct (calibration on the first 200 KB of Emma, evaluation on the first
4 x 512 tokens of Pride and Prejudice, where the float model scores 20.83), on a 2-core x86 CPU (AMD EPYC) that was
running other jobs at the same time (load average 7.5-9.5). CPU: user + system seconds of the whole run with one
thread (OMP_NUM_THREADS=1), about the wall time of the run on one idle core; wall: the wall time of that run on the
loaded machine.

    method    what                                          calibration   ppl (/ float)    CPU     wall (loaded)
    rtn       4-bit, group 32, round to nearest             none          25.13 (1.21)     13 s     19 s
    gptq      4-bit, group 128, asym, act-order             8 x 512       22.54 (1.08)     38 s     76 s
    gptvq     2D vectors, 6-bit index, 32 x 256 blocks      8 x 512       25.54 (1.23)     94 s    144 s
              (3.2 bits/weight), 25 k-means iterations
    adascale  4-bit, group 128, GPTQ start, 10 Adam steps   8 x 256       23.16 (1.11)     72 s    108 s
              per block
    quantsim  8-bit per-channel weights, 16-bit activations 8 x 256       20.87 (1.00)     24 s     38 s

GPTVQ and AdaScale cost the most: k-means per codebook and error feedback for GPTVQ, a GPTQ start plus Adam steps on
every block for AdaScale. Larger calibration sets (--num-samples 32 --seq-len 512), more k-means iterations
(--kmeans-iterations 100) or AdaScale steps (--adascale-iterations 300) give better models and take proportionally
longer. On a machine whose cores are busy with other work, run with OMP_NUM_THREADS=1: threads that wait for each other
on shared cores can multiply the CPU time several-fold.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_vq
from hf_vq import assets

METHODS = ("rtn", "gptq", "gptvq", "adascale", "quantsim")
# method -> (calibration windows, tokens per window); RTN needs no calibration data.
CALIBRATION = {"rtn": (0, 0), "gptq": (8, 512), "gptvq": (8, 512), "adascale": (8, 256), "quantsim": (8, 256)}


def make_config(method: str, calib: dict, kmeans_iterations: int = 25, adascale_iterations: int = 10):
    if method == "rtn":
        return hf_vq.RTNConfig(bits=4, group_size=32)
    if method == "gptq":
        return hf_vq.GPTQConfig(bits=4, group_size=128, **calib)
    if method == "gptvq":
        return hf_vq.GPTVQConfig(vector_dim=2, index_bits=6, rows_per_block=32, cols_per_block=256,
                                 kmeans_iterations=kmeans_iterations, **calib)
    if method == "adascale":
        return hf_vq.AdaScaleConfig(bits=4, group_size=128, num_iterations=adascale_iterations, **calib)
    if method == "quantsim":
        return hf_vq.QuantSimConfig(weight_bits=8, weight_granularity="per_channel", activation_bits=16, **calib)
    raise SystemExit(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="float checkpoint folder, or 'smollm2' (cached by hf_vq.assets)")
    ap.add_argument("--method", default="gptq", choices=METHODS)
    ap.add_argument("--dataset", default="austen", help="calibration text file or folder, or 'austen' (Emma)")
    ap.add_argument("--eval", default="austen",
                    help="evaluation text file, or 'austen' (Pride and Prejudice + Persuasion)")
    ap.add_argument("--num-samples", type=int, help="calibration windows (default: the method's, see above)")
    ap.add_argument("--seq-len", type=int, help="tokens per calibration window (default: the method's)")
    ap.add_argument("--kmeans-iterations", type=int, default=25, help="GPTVQ k-means (EM) iterations per codebook")
    ap.add_argument("--adascale-iterations", type=int, default=10, help="AdaScale Adam steps per decoder block")
    ap.add_argument("--eval-seq-len", type=int, default=512, help="tokens per evaluation window")
    ap.add_argument("--eval-windows", type=int, default=4, help="evaluation windows (0: the whole text)")
    ap.add_argument("--out", help="where to save the quantized model (default: a temporary folder, removed at exit)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    times = {}

    model_dir = str(assets.ensure_smollm2()) if args.model == "smollm2" else args.model
    dataset = [assets.austen_calibration_text()] if args.dataset == "austen" else args.dataset
    text = assets.austen_test_text() if args.eval == "austen" else Path(args.eval).read_text(encoding="utf-8")
    n_default, len_default = CALIBRATION[args.method]
    num_samples = args.num_samples or n_default
    seq_len = args.seq_len or len_default
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib = dict(dataset=dataset, tokenizer=tok, num_samples=num_samples, seq_len=seq_len)
    config = make_config(args.method, {} if args.method == "rtn" else calib, args.kmeans_iterations,
                         args.adascale_iterations)

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=torch.float32)
    times["quantize"] = time.perf_counter() - t

    # Evaluation: a fixed number of windows, so its cost does not grow with the size of the text.
    windows = args.eval_windows or None
    if windows:  # tokenize only the start of a long text (English runs at ~4 characters per token)
        text = text[: 16 * windows * args.eval_seq_len]
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    t = time.perf_counter()
    ppl = hf_vq.evaluate_perplexity(model, tok, ids, seq_len=args.eval_seq_len, max_tokens=None, max_windows=windows)
    times["evaluate"] = time.perf_counter() - t
    n_eval = min(ids.numel() // args.eval_seq_len, windows or ids.numel())

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "quantized"
        t = time.perf_counter()
        model.save_pretrained(out)
        tok.save_pretrained(out)
        again = AutoModelForCausalLM.from_pretrained(out)
        probe = ids[: args.eval_seq_len][None]
        with torch.no_grad():
            diff = (again(probe).logits - model(probe).logits).abs().max().item()
        times["save + reload"] = time.perf_counter() - t

    total = time.perf_counter() - t_start
    calib_note = "no calibration" if args.method == "rtn" else f"calibration {num_samples} x {seq_len} tokens"
    print(f"\n{args.method} on {model_dir} ({calib_note}): perplexity {ppl:.2f} over {n_eval} x {args.eval_seq_len} "
          f"tokens; reloaded checkpoint's logits differ by at most {diff:.2e}; saved to "
          f"{args.out or 'a temporary folder (pass --out to keep it)'}")
    print("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) + f"; total {total:.1f} s")
    return {"method": args.method, "ppl": ppl, "reload_max_logit_diff": diff, "eval_tokens": n_eval * args.eval_seq_len,
            "num_samples": num_samples, "seq_len": seq_len, "seconds": round(total, 1), "out": args.out}


if __name__ == "__main__":
    main()
