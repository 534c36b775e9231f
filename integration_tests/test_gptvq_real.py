"""GPTVQ on the real SmolLM2-135M: quantize at load (small calibration), check perplexity, save, reload exactly.

To stay within the suite's time budget only decoder blocks 0-1 are quantized (14 of 210 Linears, every shape:
576x576, 192x576 k/v, 1536x576, 576x1536) with 5 EM iterations.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import hf_vq
from hf_vq import assets
from hf_vq.nn.vqlinear import VQLinear

# measured 2026-11-22 (bf16, 8 windows of 512 tokens of P&P): FP 22.39, this config 24.21
PPL_BOUND = 27.0


@pytest.fixture(scope="module")
def model_dir():
    return assets.ensure_smollm2()


def test_gptvq_real_quantize_save_reload(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = hf_vq.GPTVQConfig(vector_dim=2, index_bits=6, codebook_bits=8, rows_per_block=32, cols_per_block=256,
                            kmeans_iterations=5, dataset=[assets.austen_calibration_text()], tokenizer=tok,
                            num_samples=8, seq_len=256,
                            module_overrides={r"layers\.([2-9]|[1-2][0-9])\.": {"skip": True}})
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg, dtype=torch.float32)
    vq = {n: m for n, m in model.named_modules() if isinstance(m, VQLinear)}
    assert len(vq) == 14
    assert vq["model.layers.0.self_attn.k_proj"].out_features == 192
    for m in vq.values():  # 3 bits + 128x8-bit codebook and one fp16 scale per 32x256 group; shorter last groups cost more
        assert 3.12 < m.bits_per_value() < 3.25

    ids = tok(assets.austen_test_text()[:4000], return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["method"] == "gptvq" and len(saved["layers"]) == 14
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref)

    ppl = hf_vq.evaluate_perplexity(again, tok, assets.austen_test_text(), seq_len=512, max_windows=8)
    print(f"GPTVQ 2D (blocks 0-1) ppl@512 x 8 windows: {ppl:.3f}")
    assert math.isfinite(ppl) and ppl < PPL_BOUND, ppl
