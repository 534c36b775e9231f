"""Push a saved hf_vq model (weights, config, model card, encodings) to the Hub and load it back.

    HF_ENDPOINT=... python examples/push_and_reload.py --model QUANTIZED_DIR --repo-id org/name

QUANTIZED_DIR is a checkpoint saved by hf_vq (for example by examples/quantize_at_load.py --out). One commit uploads
the weights, config, a model card (method, bits, layers kept in float; --base-model links the float model) and the
AIMET encodings; the repo is then loaded back with hf_vq.AutoQuantizedModelForCausalLM, and its logits must equal the
local model's. Needs a Hub token with write access (or HF_ENDPOINT pointing at a private Hub). For SmolLM2-135M the
time is the upload of ~170 MB (GPTQ 4-bit) plus a few seconds.
"""

from __future__ import annotations

import argparse
import time
import tempfile

import torch
from transformers import AutoModelForCausalLM

import hf_vq


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--repo-id", required=True)
    ap.add_argument("--base-model")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    model = AutoModelForCausalLM.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as enc_dir:
        hf_vq.export_encodings(model, enc_dir)
        card = hf_vq.render_model_card(model, base_model=args.base_model)
        hf_vq.push_quantized(model, args.repo_id, card=card, encodings_dir=enc_dir)
    again = hf_vq.AutoQuantizedModelForCausalLM.from_pretrained(args.repo_id)
    ids = torch.arange(16)[None] % model.config.vocab_size
    with torch.no_grad():
        same = torch.equal(again(ids).logits, model(ids).logits)
    encodings = hf_vq.load_encodings_from_hub(args.repo_id)
    result = {"identical_logits": same, "encodings_files": sorted(encodings)}
    print(f"\npushed {args.model} to {args.repo_id} and loaded it back: logits "
          f"{'identical' if same else 'DIFFERENT'}, encodings {', '.join(result['encodings_files'])}; "
          f"{time.perf_counter() - t0:.1f} s")
    return result


if __name__ == "__main__":
    main()
