"""ONNX export of a quantsim model: run in onnxruntime (CPU), compare logits, check encodings names."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_vq
from hf_vq.export.quantsim import activation_quantizers

# fp32 graph vs fp32 torch with the same QDQ'd weights: only op order differs
ORT_ATOL = 1e-4


@pytest.fixture(scope="module")
def exported(tiny_llama_dir, calib_ids, tmp_path_factory):
    cfg = hf_vq.QuantSimConfig(weight_bits=4, weight_granularity="lpbq", block_size=32, activation_bits=16,
                               dataset=calib_ids, num_samples=16, seq_len=64)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)
    out = tmp_path_factory.mktemp("onnx")
    path = hf_vq.export_onnx(model, out, seq_len=16)
    return model, path


def run_ort(path, ids):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": np.ones(ids.shape, dtype=np.int64)})[0]


def test_onnxruntime_logits_match_weight_quantized_model(exported, calib_ids):
    model, path = exported
    for length in (16, 40):  # traced at 16; dynamic sequence axis
        ids = calib_ids[:2, :length]
        got = run_ort(path, ids)
        for _, _, q in activation_quantizers(model):
            q.enabled = False
        try:
            with torch.no_grad():
                ref = model(input_ids=ids).logits.numpy()
        finally:
            for _, _, q in activation_quantizers(model):
                q.enabled = True
        assert np.abs(got - ref).max() < ORT_ATOL
        with torch.no_grad():
            sim = model(input_ids=ids).logits.numpy()
        # the full A16 simulation differs from the float-activation graph by the activation rounding only
        assert np.abs(got - sim).max() < 0.05 * np.abs(ref).max()


def test_encodings_names_match_onnx_tensors(exported):
    model, path = exported
    doc = json.loads(path.with_suffix(".encodings").read_text())
    graph = onnx.load(str(path)).graph
    initializers = {i.name: tuple(i.dims) for i in graph.initializer}
    tensors = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    params = doc["param_encodings"]
    assert len(params) == 14
    for p in params:
        assert p["name"] in initializers and p["enc_type"] == "LPBQ"
        mod = model.get_submodule(p["name"].rpartition(".")[0])
        assert initializers[p["name"]] == (mod.out_features, mod.in_features)  # torch layout, per-channel order
    acts = doc["activation_encodings"]
    assert all(a["name"] in tensors for a in acts)
    # q/k/v share one input tensor, gate/up another: 28 quantizers -> 22 distinct tensors
    assert len(acts) == len({a["name"] for a in acts}) == 22
    q = model.model.layers[0].self_attn.q_proj.output_quantizer.encoding()
    q_out = next(a for a in acts if "q_proj" in a["name"])
    assert q_out["scale"][0] == pytest.approx(q["scale"]) and q_out["offset"][0] == q["offset"]
    assert doc["quantizer_args"]["activation_bitwidth"] == 16


def test_export_after_reload(exported, tmp_path, calib_ids):
    model, _ = exported
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    path = hf_vq.export_onnx(again, tmp_path / "onnx", filename_prefix="reloaded", version="0.6.1")
    doc = json.loads(path.with_suffix(".encodings").read_text())
    assert doc["version"] == "0.6.1" and len(doc["activation_encodings"]) == 22
    assert run_ort(path, calib_ids[:1, :16]).shape == (1, 16, 128)
