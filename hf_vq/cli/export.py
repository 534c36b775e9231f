"""``hf-vq export``: write an hf_vq checkpoint in another format (compressed-tensors, GPTQ, GGUF)."""

from __future__ import annotations

import argparse
import json

from hf_vq.cli.common import use_help_format

HELP = "write an hf_vq checkpoint as compressed-tensors, GPTQ or GGUF"


def add_export_args(x: argparse.ArgumentParser) -> None:
    use_help_format(x, HELP)
    x.add_argument("model", help="folder of an hf_vq checkpoint (save_pretrained output)")
    x.add_argument("--format", required=True, choices=["compressed-tensors", "gptq", "gguf"],
                   help="format to write")
    x.add_argument("--out", required=True, help="folder to write the exported checkpoint to")
    x.add_argument("--requantize", action="store_true",
                   help="round layers the format can't hold exactly onto its grid (GGUF); the report gives the error")
    x.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="dtype of the float tensors (default: as in the model; GGUF: F16 matrices)")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    x.add_argument("--gguf-pre-tokenizer", default="default", help="llama.cpp pre-tokenizer name, e.g. smollm")


def cmd_export(args):
    from transformers import AutoModelForCausalLM

    import hf_vq

    model = AutoModelForCausalLM.from_pretrained(args.model)   # an hf_vq checkpoint: import hf_vq registers it
    if getattr(getattr(model, "hf_quantizer", None), "quantization_config", None) is None:
        raise ValueError(f"{args.model} is not an hf_vq checkpoint (no hf_vq quantization_config)")
    report = hf_vq.export_checkpoint(model, args.out, args.format, requantize=args.requantize, dtype=args.dtype,
                                     overwrite=args.overwrite, gguf_pre_tokenizer=args.gguf_pre_tokenizer)
    print(json.dumps(report.to_dict(), indent=2))
    return 0
