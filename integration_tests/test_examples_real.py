"""examples/quantize_at_load.py at its defaults on the real SmolLM2 + Austen: a sensible perplexity.

RTN is the method with no calibration, so this is the cheap one (the example plus one float evaluation). The other
methods' results at their defaults are in the example's docstring; tests/test_examples.py runs every example.
"""

from __future__ import annotations

import math

import torch

# RTN 4-bit g128 costs 35.69 / 27.76 = 1.286x the float perplexity at ppl@512 (docs/data-and-models.md); the
# example's group of 32 is finer, so it must stay below that.
RTN4_G128_RATIO = 35.6902 / 27.7633


def test_quantize_at_load_rtn_defaults(real):
    from transformers import AutoModelForCausalLM

    from examples import quantize_at_load

    model_dir, tok, _, test_text = real
    r = quantize_at_load.main(["--method", "rtn"])
    assert r["eval_tokens"] == 4 * 512
    assert r["reload_max_logit_diff"] <= 1e-5

    # Float reference on the same 4 windows of 512 tokens, from transformers' own labels= loss.
    ids = tok(test_text[:20000], return_tensors="pt", add_special_tokens=False)["input_ids"][0][: 4 * 512]
    fp = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [fp(input_ids=w[None], labels=w[None], use_cache=False).loss for w in ids.view(4, 512)]
    fp_ppl = math.exp(torch.stack(losses).mean().item())
    assert 20 < fp_ppl < 22  # 20.83 on the first 4 x 512 tokens of Pride and Prejudice
    assert fp_ppl < r["ppl"] < RTN4_G128_RATIO * fp_ppl
