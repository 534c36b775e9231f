"""Export a saved hf_vq model's AIMET encodings (and optionally ONNX with the encodings beside it).

    python examples/export_encodings.py --model QUANTIZED_DIR --out OUT [--version 1.0.0] [--onnx]
"""

from __future__ import annotations

import argparse
import json

from transformers import AutoModelForCausalLM

import hf_vq


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--version", default="1.0.0", choices=["1.0.0", "0.6.1"])
    ap.add_argument("--onnx", action="store_true")
    args = ap.parse_args(argv)

    model = AutoModelForCausalLM.from_pretrained(args.model)
    path = hf_vq.export_encodings(model, args.out, version=args.version)
    result = {"encodings": str(path)}
    if args.onnx:
        result["onnx"] = str(hf_vq.export_onnx(model, args.out))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
