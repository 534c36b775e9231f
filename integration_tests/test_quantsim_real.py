"""QuantSim at load on SmolLM2-135M-Instruct with Austen text: quality, LPBQ save/reload, encodings (Trainer QAT on
the real model is exercised by benchmarks/quantsim.py; unit tests cover the Trainer path)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_vq
from hf_vq import assets
from hf_vq.nn.qat import QATLinear, QuantSimLinear

EVAL = dict(seq_len=256, max_tokens=65536, max_windows=2)  # kept small: the quality numbers live in the benchmark


@pytest.fixture(scope="module")
def real():
    model_dir = assets.ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(model_dir)
    return model_dir, tok, assets.austen_calibration_text(), assets.austen_test_text()


def qsim(real, **kw):
    model_dir, tok, calib, _ = real
    cfg = hf_vq.QuantSimConfig(dataset=[calib], tokenizer=tok, num_samples=4, seq_len=128, **kw)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg, dtype=torch.float32)


def test_w8a16_per_channel_close_to_fp(real):
    model_dir, tok, _, test = real
    fp = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    fp_ppl = hf_vq.evaluate_perplexity(fp, tok, test, **EVAL)
    del fp
    m = qsim(real, weight_bits=8, weight_granularity="per_channel", activation_bits=16)
    assert sum(isinstance(x, QATLinear) for x in m.modules()) == 210
    q_ppl = hf_vq.evaluate_perplexity(m, tok, test, **EVAL)
    print(f"ppl@256 x2: FP {fp_ppl:.3f}  W8A16 per-channel {q_ppl:.3f}")
    assert abs(q_ppl / fp_ppl - 1) < 0.01


def test_lpbq_a16_reload_and_encodings(real, tmp_path):
    _, tok, _, test = real
    m = qsim(real, weight_bits=4, weight_granularity="lpbq", block_size=64, activation_bits=16)
    ids = tok(test[:3000], return_tensors="pt")["input_ids"][:, :32]
    with torch.no_grad():
        before = m(input_ids=ids).logits
    m.save_pretrained(tmp_path / "lpbq")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "lpbq")
    assert isinstance(again.model.layers[5].mlp.down_proj, QuantSimLinear)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, before)
    doc = json.loads(hf_vq.export_encodings(again, tmp_path / "enc").read_text())
    assert len(doc["param_encodings"]) == 210 and {p["enc_type"] for p in doc["param_encodings"]} == {"LPBQ"}
    assert len(doc["activation_encodings"]) == 420
