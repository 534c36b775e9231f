"""GPTQ at load on the real model (SmolLM2-135M-Instruct) with real text (Austen): quality, save, reload, CLI."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_vq

EVAL = dict(seq_len=512, max_tokens=65536, max_windows=6)  # 6 x 512 tokens of Pride and Prejudice


@pytest.fixture(scope="module")
def gptq4(real):
    model_dir, tok, calib, _ = real
    cfg = hf_vq.GPTQConfig(bits=4, group_size=128, dataset=[calib], tokenizer=tok, num_samples=16, seq_len=256)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg, dtype=torch.float32)


def test_gptq4_quality_between_fp_and_rtn(real, gptq4, rtn4):
    model_dir, tok, _, test = real
    fp = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    fp_ppl = hf_vq.evaluate_perplexity(fp, tok, test, **EVAL)
    del fp
    rtn_ppl = hf_vq.evaluate_perplexity(rtn4, tok, test, **EVAL)
    q_ppl = hf_vq.evaluate_perplexity(gptq4, tok, test, **EVAL)
    print(f"ppl@512 x6: FP {fp_ppl:.2f}  RTN4 {rtn_ppl:.2f}  GPTQ4 {q_ppl:.2f}")
    assert fp_ppl < q_ppl < rtn_ppl
    # GPTQ must recover most of the RTN gap even with 16 x 256 calibration tokens
    assert q_ppl - fp_ppl < 0.6 * (rtn_ppl - fp_ppl)
    assert q_ppl < 1.15 * fp_ppl


def test_real_model_layers_and_partial_groups(gptq4):
    q = [m for m in gptq4.modules() if isinstance(m, hf_vq.QuantLinear)]
    assert len(q) == 210
    q_proj = gptq4.model.layers[0].self_attn.q_proj
    assert q_proj.scales.shape == (576, 5)  # 576 = 4 x 128 + 64
    assert gptq4.model.embed_tokens.weight.data_ptr() == gptq4.lm_head.weight.data_ptr()  # tied, unquantized


def test_save_reload_identical_logits(real, gptq4, tmp_path):
    _, tok, _, test = real
    gptq4.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = tok(test[:4000], return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        assert torch.equal(again(ids).logits, gptq4(ids).logits)
    size = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert size < 0.45 * 538_090_408  # fp32 checkpoint is 538 MB; the tied fp32 embedding alone is 113 MB


def test_cli_quantize_and_eval(real, tmp_path):
    model_dir, _, _, _ = real
    out = tmp_path / "rtn"
    cmd = [sys.executable, "-m", "hf_vq.cli"]
    r = subprocess.run(cmd + ["quantize", str(model_dir), "--method", "rtn", "--bits", "4", "--out", str(out)],
                       capture_output=True, text=True, check=True)
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["layers"] == 210
    r = subprocess.run(cmd + ["eval", str(out), "--seq-len", "512", "--max-windows", "2"],
                       capture_output=True, text=True, check=True)
    ppl = json.loads(r.stdout.strip().splitlines()[-1])["ppl"]
    assert 10 < ppl < 60
