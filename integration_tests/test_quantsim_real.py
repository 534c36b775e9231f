"""QuantSim at load on SmolLM2-135M-Instruct with Austen text: quality, LPBQ save/reload, encodings (Trainer QAT on
the real model is exercised by benchmarks/quantsim.py; unit tests cover the Trainer path)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_vq
from hf_vq.nn.qat import QATLinear, QuantSimLinear

EVAL = dict(seq_len=256, max_tokens=65536, max_windows=2)  # kept small: the quality numbers live in the benchmark


def qsim(real, **kw):
    model_dir, tok, calib, _ = real
    cfg = hf_vq.QuantSimConfig(dataset=[calib], tokenizer=tok, num_samples=4, seq_len=128, **kw)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg, dtype=torch.float32)


@pytest.fixture(scope="module")
def lpbq_w4a16(real):
    """W4A16 LPBQ (blocks of 64), calibrated once for the tests below; they must leave it as they found it."""
    return qsim(real, weight_bits=4, weight_granularity="lpbq", block_size=64, activation_bits=16)


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


def test_lpbq_a16_reload_and_encodings(real, lpbq_w4a16, tmp_path):
    _, tok, _, test = real
    m = lpbq_w4a16
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


def test_onnx_export_of_real_model_runs_in_onnxruntime(real, lpbq_w4a16, tmp_path):
    """W4A16 LPBQ SmolLM2 exported to ONNX: onnxruntime's logits on real text match the PyTorch model with float
    activations (the graph carries QDQ'd weights; activation encodings ride beside it), and every encodings name is a
    tensor of the graph."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from hf_vq.export.quantsim import activation_quantizers

    _, tok, _, test = real
    m = lpbq_w4a16
    path = hf_vq.export_onnx(m, tmp_path, seq_len=8)
    ids = tok(test[:4000], return_tensors="pt")["input_ids"][:, :48]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": np.ones(ids.shape, dtype=np.int64)})[0]
    quantizers = [q for _, _, q in activation_quantizers(m)]
    enabled = [q.enabled for q in quantizers]
    try:
        for q in quantizers:
            q.enabled = False
        with torch.no_grad():
            ref = m(input_ids=ids).logits.numpy()
    finally:  # the model is shared with the other tests of this file
        for q, was in zip(quantizers, enabled):
            q.enabled = was
    # fp32 on both sides, same weights: only op order differs (30 blocks deep)
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.99
    doc = json.loads(path.with_suffix(".encodings").read_text())
    graph = onnx.load(str(path), load_external_data=False).graph
    tensors = {i.name for i in graph.initializer} | {v for n in graph.node for v in (*n.input, *n.output)}
    names = [e["name"] for e in doc["param_encodings"]] + [e["name"] for e in doc["activation_encodings"]]
    assert len(doc["param_encodings"]) == 210 and set(names) <= tensors
