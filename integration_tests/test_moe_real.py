"""MoE with real weights and a known answer (the small version of benchmarks/moe.py): the first blocks of
SmolLM2-135M upcycled into Mixtral (4 experts, top-2, every expert a copy of its block's MLP, random router). The
float MoE computes the dense function; GPTQ on it must land close to dense GPTQ, also when the router starves one
expert (the few-token fallback runs and is reported)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_vq
from benchmarks.moe import bias_router, mlp_inputs, upcycle
from hf_vq import assets
from hf_vq.model import convert
from hf_vq.nn.experts import QuantExperts
from hf_vq.pipeline.data import build_calibration

BLOCKS = 4  # the first 4 of 30 blocks (final norm and head kept): keeps 4 experts x 4 blocks of GPTQ in the budget
CALIB = dict(num_samples=8, seq_len=256)


@pytest.fixture(scope="module")
def models():
    model_dir = assets.ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(model_dir)
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    dense.model.layers = dense.model.layers[:BLOCKS]
    dense.config.num_hidden_layers = BLOCKS
    moe = upcycle(dense, experts=4, top_k=2)
    return tok, dense, moe, assets.austen_calibration_text(), assets.austen_test_text()


def _gptq(model, tok, calib, **kw):
    cfg = hf_vq.GPTQConfig(bits=4, group_size=128, dataset=[calib], tokenizer=tok, **CALIB, **kw)
    run = convert.quantize_model(model, cfg, ["lm_head"], progress=False)
    model.config.quantization_config = cfg
    return run


def _test_ids(tok, test):
    return tok(test[:20000], return_tensors="pt").input_ids[:, :1024].reshape(4, 256)


@torch.no_grad()
def _kl(model, ref_logits, ids):
    """Mean KL(float dense || model) of the next-token distributions: a truncated model's perplexity means nothing
    (millions), its distortion of the float function does."""
    logp = torch.log_softmax(model(ids).logits.float(), -1)
    ref = torch.log_softmax(ref_logits, -1)
    return float((ref.exp() * (ref - logp)).sum(-1).mean())


def test_float_moe_is_the_dense_model(models):
    tok, dense, moe, _, test = models
    ids = _test_ids(tok, test)
    with torch.no_grad():
        a, b = moe(ids).logits, dense(ids).logits
    assert (a - b).abs().max() < 1e-3 * b.abs().max()


def test_gptq_moe_close_to_dense_gptq_also_with_a_starved_expert(models):
    tok, dense, moe, calib, test = models
    ids = _test_ids(tok, test)
    with torch.no_grad():
        ref = dense(ids).logits.float()
    q_dense = copy.deepcopy(dense)
    _gptq(q_dense, tok, calib)
    dense_kl = _kl(q_dense, ref, ids)
    del q_dense

    q_moe = copy.deepcopy(moe)
    run = _gptq(q_moe, tok, calib)
    assert all(isinstance(layer.mlp.experts, QuantExperts) for layer in q_moe.model.layers)
    moe_kl = _kl(q_moe, ref, ids)
    del q_moe

    starved = copy.deepcopy(moe)
    samples = build_calibration([calib], tok, CALIB["num_samples"], CALIB["seq_len"], 0)
    shares = bias_router(starved, mlp_inputs(dense, samples), rare=3)
    assert max(shares) < 0.01
    run = _gptq(starved, tok, calib)
    # (routing follows the quantized model's activations, so the starved expert's share can pass 1% in a block)
    for rep in run["experts"].values():
        rare = {str(e) for e, n in enumerate(rep["routed_tokens"]) if n < rep["threshold"]}
        assert set(rep.get("fallback", {})) == rare
    assert sum("3" in rep.get("fallback", {}) for rep in run["experts"].values()) >= BLOCKS // 2
    assert any("fewer than" in w for w in run["warnings"])
    starved_kl = _kl(starved, ref, ids)
    print(f"KL to float, 4 x 256 tokens ({BLOCKS} blocks): dense GPTQ {dense_kl:.5f}  MoE GPTQ {moe_kl:.5f}  "
          f"starved-expert MoE GPTQ {starved_kl:.5f}")
    # no worse than dense GPTQ (2% / 3%, the targets). It comes out better: each token averages two
    # differently rounded copies of the MLP, and each copy's Hessian covers the tokens routed to it.
    assert 0 < moe_kl <= 1.02 * dense_kl
    assert 0 < starved_kl <= 1.03 * dense_kl
