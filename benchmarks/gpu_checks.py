"""The device checks of the scale path, as one script for a machine with a CUDA GPU (CI has none).

1. SmolLM2-135M with the model in CPU RAM and ``quantization_device`` on the GPU, against the all-CPU run: wall time,
   peak GPU memory (vs the size of one block), perplexity of both (Austen protocol, 8 x 2048 tokens).
2. A random-init Llama with 8B shapes (hidden 4096, MLP 14336, 32 heads, 8 KV heads; only ``--blocks`` blocks, the
   rest of an 8B model is the same block repeated): GPTQ 4-bit g128 time per block and peak GPU memory.
3. AdaScale (defaults, except ``--adascale-iterations``) time per block on one 8B-shaped block.
4. Decode (batch 1) and prefill tokens/s of one 8B-shaped layer (4096 in, 14336 out) and of SmolLM2-135M, per path:
   dense fp16, the Triton kernels (``HF_VQ_KERNELS=triton``), dequantize-per-call (``HF_VQ_KERNELS=exact``, VQ
   layers without their cached decoded weight) and torch's int4 kernel where it runs (the layer: CUDA
   ``aten._weight_int4pack_mm`` in bf16; on CPU hf_vq's "torch" family), for affine 4-bit g128 and GPTVQ 2D
   (6-bit indices, 8-bit codebooks). Each row also gives its largest error against the fp32 product with the
   dequantized weight, relative to the largest output (a check that the path computes the right thing).

    python benchmarks/gpu_checks.py --device cuda:0            # on the GPU machine
    python benchmarks/gpu_checks.py --device cpu --small        # smoke test of the script itself on a CPU

``--small`` shrinks everything (SmolLM2 cut to its first block, tiny 8B-shaped blocks and layer, a few tokens, no
GPTVQ SmolLM2). On CPU the layer's Triton rows run through Triton's interpreter (``TRITON_INTERPRET=1``, set by the
script): they show that the path computes the right thing, not its speed; SmolLM2 then runs in fp32 without Triton
rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import hf_vq
from hf_vq import assets
from hf_vq.algorithms.rtn import rtn_weight
from hf_vq.formats.vq import VQLayout
from hf_vq.nn.qlinear import QuantLinear
from hf_vq.nn.vqlinear import VQLinear


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
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg, dtype=torch.float32,
                                                     **_smollm2_cut(args))
        secs = time.perf_counter() - t0
        peak = _peak(device)
        ppl = hf_vq.evaluate_perplexity(model, tok, test, seq_len=args.eval_len, max_windows=args.eval_windows)
        block = sum(p.numel() * p.element_size() for p in AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, **_smollm2_cut(args)).model.layers[0].parameters())
        out[f"smollm2 quantization_device={where}"] = dict(quantize_s=round(secs, 1), ppl=round(ppl, 4),
                                                          peak_gpu_gib=peak, one_block_gib=block / 2**30)
        del model
    return out


def llama8b_blocks(device: torch.device, args) -> dict:
    shape = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
    if args.small:
        shape = dict(hidden_size=64, intermediate_size=224, num_attention_heads=4, num_key_value_heads=2)
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


def _smollm2_cut(args) -> dict:
    return {"num_hidden_layers": 1} if args.small else {}


# ---------------------------------------------------------------------------------------------- decode / prefill
PATHS = (("triton", "triton"), ("dequantize per call", "exact"))


@contextmanager
def kernel_path(selection: str):
    """HF_VQ_KERNELS=selection; under "exact" VQ layers also drop their cached decoded weight (decode every call)."""
    old_env, old_cache = os.environ.get("HF_VQ_KERNELS"), VQLinear.cache_decoded
    os.environ["HF_VQ_KERNELS"] = selection
    VQLinear.cache_decoded = selection != "exact"
    try:
        yield
    finally:
        VQLinear.cache_decoded = old_cache
        if old_env is None:
            os.environ.pop("HF_VQ_KERNELS", None)
        else:
            os.environ["HF_VQ_KERNELS"] = old_env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _seconds(fn, device: torch.device, reps: int) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls, after one warm-up call (compiles, prepares kernels)."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_vq_layer(n: int, k: int, device: torch.device, seed: int = 0) -> VQLinear:
    """A GPTVQ 2D layer (6-bit indices, 8-bit codebooks, 32 x 256 blocks) with random codes: speed only."""
    lay = VQLayout(n, k, 2, 6, 8, 32, 256, False)
    mod = VQLinear(lay, bias=False)
    g = torch.Generator().manual_seed(seed)
    for name in ("vq_indices", "vq_codebook"):
        buf = getattr(mod, name)
        buf.copy_(torch.randint(0, 256, buf.shape, generator=g, dtype=torch.uint8))
    mod.vq_codebook_scales.copy_(((torch.rand(lay.num_codebooks, generator=g) + 0.5) * 1e-3).half().view(torch.int16))
    return mod.to(device)


def aten_int4(aw, device: torch.device):
    """torch's CUDA int4 kernel on ``aw`` (4-bit): (fn(x bf16) -> y, None), or (None, why it does not run)."""
    if device.type != "cuda":
        return None, "CUDA only (on CPU: hf_vq's torch family)"
    try:
        q = aw.codes.to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), 8)
        s, z = aw.scales.float().t(), aw.zeros.float().t()                       # [G, N]
        sz = torch.stack([s, (8 - z) * s], -1).to(torch.bfloat16).contiguous()    # w = (q - 8) * s + (8 - z) * s
        gs = aw.group_size

        def fn(x):
            return torch.ops.aten._weight_int4pack_mm(x, packed, gs, sz)

        fn(torch.zeros(1, aw.shape[1], dtype=torch.bfloat16, device=device))
        return fn, None
    except Exception as exc:  # noqa: BLE001  (an op this torch build or GPU lacks)
        return None, f"{type(exc).__name__}: {str(exc)[:80]}"


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).abs().max() / ref.abs().max())


def layer_speed(device: torch.device, args) -> dict:
    """One 8B-shaped layer: decode (1 row) and prefill tokens/s per path, and the speed-up over dense fp16."""
    n, k = (512, 256) if args.small else (14336, 4096)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=g) * 0.02).to(device)
    aw = rtn_weight(w, 4, 128, False)
    layers = {"affine 4-bit g128": QuantLinear.from_affine(aw, None), "GPTVQ 2D": random_vq_layer(n, k, device)}
    xs = {rows: torch.randn(rows, k, generator=g).to(device) for rows in (1, args.prefill_tokens)}
    dtype = torch.float16
    dense = w.to(dtype)
    out, base = {}, {}

    def row(name, fn, x_dtype, ref_w):
        entry = {}
        for rows, x in xs.items():
            xx = x.to(x_dtype)
            with torch.no_grad():
                err = _rel_err(fn(xx), xx.float() @ ref_w.T)
            tps = rows / _seconds(lambda: fn(xx), device, args.reps)
            what = "decode" if rows == 1 else f"prefill {rows}"
            entry[f"{what} tok/s"] = round(tps, 1)
            base.setdefault(rows, tps)   # the first row is dense fp16
            entry[f"{what} x dense"] = round(tps / base[rows], 2)
            entry[f"{what} rel err"] = f"{err:.1e}"
        out[f"{n}x{k} {name}"] = entry

    row("dense fp16", lambda x: F.linear(x, dense), dtype, w.float())
    for lname, layer in layers.items():
        ref_w = layer.dequantize_weight(torch.float32)
        for pname, sel in PATHS:
            with kernel_path(sel):
                row(f"{lname}, {pname}", layer, dtype, ref_w)
        if lname.startswith("affine"):
            fn, why = aten_int4(aw, device)
            if fn is not None:
                row(f"{lname}, torch int4 (bf16)", fn, torch.bfloat16, ref_w)
            elif device.type == "cpu":
                with kernel_path("torch"):
                    row(f"{lname}, torch int4 (hf_vq torch family)", layer, dtype, ref_w)
            else:
                out[f"{n}x{k} {lname}, torch int4"] = {"decode tok/s": f"n/a: {why}"}
    return out


@torch.no_grad()
def _decode_tps(model, device: torch.device, tokens: int, reps: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)

    def steps():
        o = model(input_ids=ids, use_cache=True)
        past, nxt = o.cache, o.logits[:, -1:].argmax(-1)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(tokens):
            o = model(input_ids=nxt, cache=past, use_cache=True)
            past, nxt = o.cache, o.logits[:, -1:].argmax(-1)
        _sync(device)
        return time.perf_counter() - t0

    steps()   # warm-up: kernels prepared and compiled
    return tokens / statistics.median(steps() for _ in range(reps))


def model_speed(device: torch.device, args) -> dict:
    """SmolLM2-135M (fp16 on a GPU): decode (batch 1, KV cache) and prefill tokens/s per path and quantization."""
    model_dir = assets.ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib = assets.austen_calibration_text()
    # CPU: fp32 (no fast fp16 GEMM there) and no Triton rows (the interpreter runs a model at well under a token
    # per second; tests/test_triton_models.py checks the Triton path of whole models)
    cpu = device.type == "cpu"
    dtype = torch.float32 if cpu else torch.float16
    load = dict(dtype=dtype, device_map={"": str(device)}, **_smollm2_cut(args))
    quants = {"dense": None, "RTN 4-bit g128": hf_vq.RTNConfig(bits=4, group_size=128)}
    if not args.small:
        quants["GPTVQ 2D"] = hf_vq.GPTVQConfig(vector_dim=2, index_bits=6, dataset=[calib], tokenizer=tok,
                                               num_samples=min(args.num_samples, 16), seq_len=min(args.seq_len, 512),
                                               kmeans_iterations=10, codebook_update=False)
    ids = torch.randint(0, 49152, (1, args.prefill_tokens), generator=torch.Generator().manual_seed(1)).to(device)
    out = {}
    for qname, qcfg in quants.items():
        with kernel_path("exact"):   # quantize on the exact path
            model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=qcfg, **load)
        paths = [("dense", "exact")] if qcfg is None else [p for p in PATHS if not (cpu and p[1] == "triton")]
        if qcfg is not None and cpu and isinstance(qcfg, hf_vq.RTNConfig):
            paths.append(("torch int4 (hf_vq torch family)", "torch"))
        for pname, sel in paths:
            with kernel_path(sel):
                decode = _decode_tps(model, device, args.decode_tokens, args.reps)
                prefill = args.prefill_tokens / _seconds(lambda: model(input_ids=ids), device, args.reps)
            name = f"smollm2 {qname} {str(dtype)[6:]}" if qcfg is None else f"smollm2 {qname}, {pname}"
            out[name] = {"decode tok/s": round(decode, 1), f"prefill {args.prefill_tokens} tok/s": round(prefill, 1)}
        del model
    dense = out[f"smollm2 dense {str(dtype)[6:]}"]
    for entry in out.values():
        entry["decode x dense"] = round(entry["decode tok/s"] / dense["decode tok/s"], 2)
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
    p.add_argument("--decode-tokens", type=int, default=64, help="decode steps timed per run")
    p.add_argument("--prefill-tokens", type=int, default=512, help="prompt length (and layer rows) of prefill")
    p.add_argument("--reps", type=int, default=5, help="timed runs per row (the median is reported)")
    p.add_argument("--skip-speed", action="store_true", help="no decode / prefill tokens/s")
    args = p.parse_args()
    if args.small:
        args.num_samples, args.seq_len, args.eval_len, args.eval_windows = 2, 32, 64, 1
        args.adascale_iterations = args.adascale_iterations or 2
        args.blocks, args.decode_tokens, args.prefill_tokens, args.reps = 1, 3, 20, 1
    if args.adascale_iterations is None:
        args.adascale_iterations = hf_vq.AdaScaleConfig().num_iterations
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"   # the Triton rows on CPU: the interpreter (before any kernel is built)
    parts = [] if args.skip_smollm2 else [smollm2]
    parts.append(llama8b_blocks)
    if not args.skip_speed:
        parts += [layer_speed] + ([] if args.skip_smollm2 else [model_speed])
    rows = {}
    for part in parts:
        t0 = time.perf_counter()
        rows.update(part(device, args))
        print(f"[gpu_checks] {part.__name__}: {time.perf_counter() - t0:.1f} s", flush=True)
    for keys in dict.fromkeys(tuple(r) for r in rows.values()):  # one table per kind of row
        print("\n| run | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
        for name, row in rows.items():
            if tuple(row) == keys:
                print(f"| {name} | " + " | ".join(str(v) for v in row.values()) + " |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
