"""Export a saved hf_vq model's AIMET encodings (and optionally ONNX with the encodings beside it).

    python examples/export_encodings.py --model QUANTIZED_DIR --out OUT [--version 1.0.0] [--onnx]

QUANTIZED_DIR is a checkpoint saved by hf_vq (for example by examples/quantize_at_load.py --out). Writes OUT/
model.encodings (AIMET's JSON: one entry per quantized weight, plus activation encodings for QuantSim models) and,
with --onnx, OUT/model.onnx whose tensor names match the encodings. For SmolLM2-135M (GPTQ 4-bit) on a 2-core x86
CPU (AMD EPYC) running other jobs (load average 7.5), the run with --onnx took 19 CPU-seconds (user + system) with one
thread (OMP_NUM_THREADS=1), 51 s wall.
"""

from __future__ import annotations

import argparse
import time

from transformers import AutoModelForCausalLM

import hf_vq


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--version", default="1.0.0", choices=["1.0.0", "0.6.1"])
    ap.add_argument("--onnx", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    model = AutoModelForCausalLM.from_pretrained(args.model)
    path = hf_vq.export_encodings(model, args.out, version=args.version)
    result = {"encodings": str(path)}
    if args.onnx:
        result["onnx"] = str(hf_vq.export_onnx(model, args.out))
    print(f"\nexported {args.model}: " + ", ".join(f"{k} -> {v}" for k, v in result.items())
          + f" in {time.perf_counter() - t0:.1f} s")
    return result


if __name__ == "__main__":
    main()
