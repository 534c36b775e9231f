"""Exports read by their real readers, on the real model (SmolLM2-135M-Instruct, Austen protocol).

Quantizes SmolLM2 with GPTQ (symmetric 4-bit, group 32 by default: the grid of GGUF Q4_0), exports it with
``hf_vq.export_checkpoint`` and evaluates each export in its own reader, beside hf_vq on the same model:

- gguf (Q4_0): llama.cpp through llama-cpp-python (``benchmarks/llama_reader.py`` in the reader venv built by
  ``benchmarks/setup_readers.sh llama``), scoring the HF tokenizer's ids so both sides see the same tokens; and the
  baseline: the float model written to Q4_0 by the ``gguf`` library's own round-to-nearest quantizer.
- compressed-tensors: transformers with the compressed-tensors package (a fresh process without hf_vq).
- gptq: transformers + gptqmodel 7.6.0 (``benchmarks/gptq_reader.py`` in ``.cache/readers/gptq``).
- vLLM (not run here, minutes per load): ``.cache/readers/vllm/bin/python benchmarks/vllm_reader.py OUT/gptq
  --token-ids OUT/test_ids.json --seq-len 2048 --max-windows 8`` (same for OUT/compressed-tensors); on a GPU machine
  ``pip install vllm`` and the same script.

Prints a table: format, file size, ppl in the real reader, ppl in hf_vq, batch-1 decode tokens/s in the reader and
in hf_vq's ``generate()`` (same thread count).

    python benchmarks/export.py --out .cache/export_bench --threads 2
    python benchmarks/export.py --seq-len 512 --max-windows 8     # quicker
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_vq
from hf_vq import assets
from hf_vq.export import gguf as gguf_export
from hf_vq.export.common import ExportReport, write_folder

ROOT = Path(__file__).resolve().parents[1]
LLAMA_PY = ROOT / ".cache" / "readers" / "llama" / "bin" / "python"
GPTQ_PY = ROOT / ".cache" / "readers" / "gptq" / "bin" / "python"
CT_READER = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
assert not any(m.startswith("hf_vq") for m in sys.modules)
torch.set_num_threads(int(sys.argv[5]))
ids = torch.tensor(json.load(open(sys.argv[2])))
seq, wins = int(sys.argv[3]), int(sys.argv[4])
nll, n = 0.0, 0
with torch.no_grad():
    for w in range(min(wins, len(ids) // seq)):
        x = ids[w * seq:(w + 1) * seq][None]
        out = model(x, labels=x, use_cache=False)
        nll += float(out.loss) * (seq - 1); n += seq - 1
    t0 = time.perf_counter()
    g = model.generate(ids[None, :32], max_new_tokens=32, min_new_tokens=32, do_sample=False)
    tps = 32 / (time.perf_counter() - t0)
print(json.dumps({"ppl": float(torch.tensor(nll / n).exp()), "decode_tps": tps}))
"""


def size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.suffix in (".gguf", ".safetensors")) / 2**20


def hf_vq_decode_tps(model, ids: torch.Tensor, threads: int) -> float:
    torch.set_num_threads(threads)
    with torch.no_grad():
        model.generate(ids[None, :32], max_new_tokens=4, do_sample=False)        # warm-up (kernel build)
        t0 = time.perf_counter()
        model.generate(ids[None, :32], max_new_tokens=32, min_new_tokens=32, do_sample=False)
    return 32 / (time.perf_counter() - t0)


def llama_cpp(gguf_path: Path, ids_file: Path, args) -> dict:
    if not LLAMA_PY.exists():
        return {"error": "no llama-cpp-python venv: run benchmarks/setup_readers.sh llama"}
    cmd = [str(LLAMA_PY), str(ROOT / "benchmarks" / "llama_reader.py"), str(gguf_path), "--token-ids", str(ids_file),
           "--seq-len", str(args.seq_len), "--max-windows", str(args.max_windows), "--gen-tokens", "32",
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / ".cache" / "export_bench"))
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model_dir = assets.ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(model_dir)
    test_ids = tok(assets.austen_test_text(), return_tensors="pt")["input_ids"][0][:65536]
    ids_file = out / "test_ids.json"
    ids_file.write_text(json.dumps(test_ids.tolist()))
    evaluate = dict(seq_len=args.seq_len, max_tokens=65536, max_windows=args.max_windows)
    rows = []

    # llama.cpp's own baseline: the float model rounded to Q4_0 by the gguf library
    fp = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base = out / "gguf-rtn-q4_0"
    write_folder(base, True, lambda tmp: gguf_export.write(
        fp, {}, tmp, ExportReport("gguf", base), tokenizer=tok, dtype=None, requantize=False,
        pre_tokenizer="smollm", float_linears="Q4_0"))
    r = llama_cpp(base / "model.gguf", ids_file, args)
    rows.append(("gguf Q4_0, gguf-py RTN of the float model", size_mb(base), r.get("ppl"), None,
                 r.get("decode_tokens_per_s", r.get("decode_tps")), None, r.get("error")))

    cfg = hf_vq.GPTQConfig(bits=4, group_size=args.group_size, sym=True, tokenizer=tok,
                           dataset=[assets.austen_calibration_text()], num_samples=args.num_samples,
                           seq_len=args.calib_len)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg, dtype=torch.float32)
    quantize_s = time.perf_counter() - t0
    hf_ppl = hf_vq.evaluate_perplexity(model, tok, assets.austen_test_text(), **evaluate)
    hf_tps = hf_vq_decode_tps(model, test_ids, args.threads)
    model.save_pretrained(out / "hf_vq")

    gg = out / "gguf-gptq-q4_0"
    hf_vq.export_checkpoint(model, gg, "gguf", gguf_pre_tokenizer="smollm", overwrite=True)
    r = llama_cpp(gg / "model.gguf", ids_file, args)
    rows.append((f"gguf Q4_0 from hf_vq GPTQ g{args.group_size}", size_mb(gg), r.get("ppl"), hf_ppl,
                 r.get("decode_tokens_per_s", r.get("decode_tps")), hf_tps, r.get("error")))

    ct = out / "compressed-tensors"
    hf_vq.export_checkpoint(model, ct, "compressed-tensors", overwrite=True)
    proc = subprocess.run([sys.executable, "-c", CT_READER, str(ct), str(ids_file), str(args.seq_len),
                           str(args.max_windows), str(args.threads)], capture_output=True, text=True)
    r = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
        "error": proc.stderr.strip().splitlines()[-1]}
    rows.append(("compressed-tensors (transformers)", size_mb(ct), r.get("ppl"), hf_ppl, r.get("decode_tps"), hf_tps,
                 r.get("error")))

    gq = out / "gptq"
    hf_vq.export_checkpoint(model, gq, "gptq", overwrite=True)
    r = {"error": "no gptq reader venv: run benchmarks/setup_readers.sh gptq"}
    if GPTQ_PY.exists():
        proc = subprocess.run([str(GPTQ_PY), str(ROOT / "benchmarks" / "gptq_reader.py"), "load", str(gq),
                               "--token-ids", str(ids_file), "--seq-len", str(args.seq_len), "--max-windows",
                               str(args.max_windows)], capture_output=True, text=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
            "error": proc.stderr.strip().splitlines()[-1]}
    rows.append(("gptq (transformers + gptqmodel)", size_mb(gq), r.get("ppl"), hf_ppl, None, hf_tps, r.get("error")))

    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"\nSmolLM2-135M GPTQ sym 4-bit g{args.group_size}, {args.num_samples}x{args.calib_len} calibration "
          f"({quantize_s:.0f} s); ppl over {args.max_windows} windows of {args.seq_len}; {args.threads} threads\n")
    print("| export | size MB | ppl (real reader) | ppl (hf_vq) | decode tok/s (reader) | decode tok/s (hf_vq) |")
    print("|---|---|---|---|---|---|")
    for name, size, ppl, hppl, tps, htps, err in rows:
        print(f"| {name} | {size:.1f} | {f(ppl, '.3f') if not err else err} | {f(hppl, '.3f')} | {f(tps, '.1f')} "
              f"| {f(htps, '.1f')} |")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
