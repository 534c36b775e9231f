"""Push a saved hf_vq model (weights, config, model card, encodings) to the Hub and load it back.

    HF_ENDPOINT=... python examples/push_and_reload.py --model QUANTIZED_DIR --repo-id org/name
"""

from __future__ import annotations

import argparse
import json
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
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
