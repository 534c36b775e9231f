"""Whole models through the Triton kernels under Triton's CPU interpreter: a tiny Llama (GPTVQ 2D and 4D; its GPTQ
and RTN checks are in tests/test_triton_kernels.py) and a tiny Qwen3-MoE (GPTQ 3-bit g32 act-order, RTN 8-bit,
GPTVQ 2D and 4D) give, with ``HF_VQ_KERNELS=triton`` and ``TRITON_INTERPRET=1``, the logits of the exact path
(``HF_VQ_KERNELS=exact``), with every quantized module served by a Triton kernel (the routed experts by the grouped
kernels: each expert gets at most 48 rows here) and none decoding its whole weight.

Tolerance: every layer's output is within the per-layer bounds of tests/test_triton_kernels.py (fp32: 1e-5 of
``|x| @ |W|^T``); the logits compound that over the layers, attention, norms and routing, so they are compared at
1e-4 of their largest magnitude (prefill of 2 x 24 tokens and a one-token decode step).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_vq
from hf_vq.nn import kernel_triton_affine as kta
from hf_vq.nn import kernel_triton_experts as kte
from hf_vq.nn import kernel_triton_vq as ktv
from hf_vq.nn.experts import QuantExperts, VQExperts
from hf_vq.nn.qlinear import QuantLinear
from hf_vq.nn.vqlinear import VQLinear
from tests.arch_models import configs, save_tiny
from tests.test_triton_kernels import HAS_TRITON, interpreter, triton_kernels  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def method(name: str, calib_ids):
    calib = dict(dataset=calib_ids, num_samples=4, seq_len=16)   # the quantization's quality is not under test
    if name == "gptq3_g32_act_order":
        return hf_vq.GPTQConfig(bits=3, group_size=32, act_order=True, **calib)
    if name == "rtn8":
        return hf_vq.RTNConfig(bits=8, group_size=32)
    d = {"gptvq2d": 2, "gptvq4d": 4}[name]
    return hf_vq.GPTVQConfig(vector_dim=d, index_bits=6 if d == 2 else 8, rows_per_block=16, cols_per_block=32,
                             kmeans_iterations=2, codebook_update=False, **calib)


@pytest.fixture(scope="module")
def qwen3_moe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3_moe")
    save_tiny("qwen3_moe", *configs()["qwen3_moe"], d)
    return d


@pytest.fixture
def served(monkeypatch):
    """Triton launches per kernel file, and every whole-weight decode of a quantized module."""
    seen = {"affine": 0, "vq": 0, "grouped": 0, "decoded": 0}
    for name, mod in (("affine", kta), ("vq", ktv)):
        real = mod._launch

        def spy(ns, st, x2, bias, gemm, real=real, name=name):
            seen[name] += 1
            return real(ns, st, x2, bias, gemm)

        monkeypatch.setattr(mod, "_launch", spy)
    real_grouped = kte._launch

    def grouped(*args):
        seen["grouped"] += 1
        return real_grouped(*args)

    monkeypatch.setattr(kte, "_launch", grouped)
    for cls, attr in ((QuantLinear, "dequantize_weight"), (VQLinear, "dequantize_weight"),
                      (QuantExperts, "dequantize_expert"), (VQExperts, "dequantize_expert")):
        real = getattr(cls, attr)

        def decoded(self, *a, real=real, **kw):
            seen["decoded"] += 1
            return real(self, *a, **kw)

        monkeypatch.setattr(cls, attr, decoded)
    return seen


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def check_model(model_dir, cfg, calib_ids, monkeypatch, served, experts_cls):
    monkeypatch.setenv("HF_VQ_KERNELS", "exact")   # quantize on the exact path: the kernels serve inference only
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg, dtype=torch.float32)
    kinds = {type(m) for m in model.modules()}
    assert experts_cls is None or experts_cls in kinds, f"the routed experts are quantized ({experts_cls.__name__})"
    ids = calib_ids[:2, :24]
    exact = (_logits(model, ids), _logits(model, ids[:1, :1]))
    monkeypatch.setenv("HF_VQ_KERNELS", "triton")
    served.update(affine=0, vq=0, grouped=0, decoded=0)
    fast = (_logits(model, ids), _logits(model, ids[:1, :1]))
    assert served["decoded"] == 0, "no quantized module decoded its whole weight"
    storage = "vq" if isinstance(cfg, hf_vq.GPTVQConfig) else "affine"
    assert served[storage] > 0 and served["affine" if storage == "vq" else "vq"] == 0
    # a 2 x 24 prefill and a one-token decode through 2 MoE blocks: 2 grouped launches per block and call
    assert served["grouped"] == (0 if experts_cls is None else 8)
    for f, e in zip(fast, exact):
        assert (f - e).abs().max() <= 1e-4 * e.abs().max()


@pytest.mark.parametrize("name", ["gptvq2d", "gptvq4d"])
def test_tiny_llama_gptvq_logits_match_the_exact_path(name, tiny_llama_dir, calib_ids, monkeypatch, served):
    check_model(tiny_llama_dir, method(name, calib_ids), calib_ids, monkeypatch, served, None)


@pytest.mark.parametrize("name", ["gptq3_g32_act_order", "rtn8", "gptvq2d", "gptvq4d"])
def test_tiny_qwen3_moe_logits_match_the_exact_path(name, qwen3_moe_dir, calib_ids, monkeypatch, served):
    experts = VQExperts if name.startswith("gptvq") else QuantExperts
    check_model(qwen3_moe_dir, method(name, calib_ids), calib_ids, monkeypatch, served, experts)
