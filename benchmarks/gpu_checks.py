"""The device checks of the scale path, as one script for a machine with a CUDA GPU (CI has none).

1. SmolLM2-135M with the model in CPU RAM and ``quantization_device`` on the GPU, against the all-CPU run: wall time,
   peak GPU memory (vs the size of one block), perplexity of both (Austen protocol, 8 x 2048 tokens).
2. A random-init Llama with 8B shapes (hidden 4096, MLP 14336, 32 heads, 8 KV heads; only ``--blocks`` blocks, the
   rest of an 8B model is the same block repeated): GPTQ 4-bit g128 time per block and peak GPU memory.
3. AdaScale (defaults, except ``--adascale-iterations``) time per block on one 8B-shaped block.

    python benchmarks/gpu_checks.py --device cuda:0            # on the GPU machine
    python benchmarks/gpu_checks.py --device cpu --small        # smoke test of the script itself on a CPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import hf_vq
from hf_vq import assets


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def smollm2(device: torch.device, args) -> dict:
    model_dir = assets.ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib, test = assets.austen_calibration_text(), assets.austen_test_text()
    out = {}
    for where in dict.fromkeys(("cpu", str(device))):
        cfg = hf_vq.GPTQConfig(bits=4, group_size=128, dataset=[calib], tokenizer=tok, num_samples=args.num_samples,
                               seq_len=args.seq_len, quantization_device=where)
        _reset(device)
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg, dtype=torch.float32)
        secs = time.perf_counter() - t0
        peak = _peak(device)
        ppl = hf_vq.evaluate_perplexity(model, tok, test, seq_len=args.eval_len, max_windows=args.eval_windows)
        block = sum(p.numel() * p.element_size() for p in
                    AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).model.layers[0].parameters())
        out[f"smollm2 quantization_device={where}"] = dict(quantize_s=round(secs, 1), ppl=round(ppl, 4),
                                                          peak_gpu_gib=peak, one_block_gib=block / 2**30)
        del model
    return out


def llama8b_blocks(device: torch.device, args) -> dict:
    shape = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
    if args.small:
        shape = dict(hidden_size=256, intermediate_size=896, num_attention_heads=8, num_key_value_heads=2)
    cfg = LlamaConfig(vocab_size=49152, num_hidden_layers=args.blocks, max_position_embeddings=4096,
                      tie_word_embeddings=False, **shape)
    tok = AutoTokenizer.from_pretrained(assets.ensure_smollm2())
    calib = assets.austen_calibration_text()
    out = {}
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
        for method, qcfg in (
            ("gptq", hf_vq.GPTQConfig(bits=4, group_size=128, dataset=[calib], tokenizer=tok,
                                      num_samples=args.num_samples, seq_len=args.seq_len)),
            ("adascale", hf_vq.AdaScaleConfig(bits=4, group_size=128, dataset=[calib], tokenizer=tok,
                                              num_samples=args.num_samples, seq_len=args.seq_len,
                                              num_iterations=args.adascale_iterations)),
        ):
            _reset(device)
            t0 = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(d, quantization_config=qcfg, dtype=torch.bfloat16,
                                                         device_map={"": str(device)})
            secs = time.perf_counter() - t0
            run = model.hf_quantizer.last_run
            out[f"8B-shaped {method}, {args.blocks} blocks"] = dict(
                s_per_block=round(secs / args.blocks, 2), forward_s=round(run["forward_s"], 1),
                quantize_s=round(run["quantize_s"], 1), peak_gpu_gib=_peak(device))
            del model
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--small", action="store_true", help="tiny shapes and calibration (a CPU smoke test)")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--eval-len", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--adascale-iterations", type=int, default=None, help="default: AdaScaleConfig's")
    p.add_argument("--skip-smollm2", action="store_true")
    args = p.parse_args()
    if args.small:
        args.num_samples, args.seq_len, args.eval_len, args.eval_windows = 4, 64, 128, 2
        args.adascale_iterations = args.adascale_iterations or 2
    if args.adascale_iterations is None:
        args.adascale_iterations = hf_vq.AdaScaleConfig().num_iterations
    device = torch.device(args.device)
    rows = {} if args.skip_smollm2 else smollm2(device, args)
    rows.update(llama8b_blocks(device, args))
    for keys in dict.fromkeys(tuple(r) for r in rows.values()):  # one table per kind of row
        print("\n| run | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
        for name, row in rows.items():
            if tuple(row) == keys:
                print(f"| {name} | " + " | ".join(str(v) for v in row.values()) + " |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
