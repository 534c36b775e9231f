import json

import pytest
import torch
import torch.nn.functional as F

import hf_vq
from hf_vq.algorithms.rtn import rtn_weight
from hf_vq.config import HfVQConfig
from hf_vq.nn import kernel_torch_int4
from hf_vq.nn.qlinear import QuantLinear


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=5), "bits must be one of"),
    (dict(group_size=0), "group_size must be -1"),
    (dict(num_samples=0), "num_samples must be a positive integer"),
    (dict(percdamp=0.0), "percdamp must be in"),
    (dict(module_overrides={"[": {"bits": 4}}), "not a valid regex"),
    (dict(module_overrides={"down": {"bitz": 4}}), "unknown keys"),
    (dict(module_overrides={"down": {"bits": 7}}), "bits must be one of .* in module_overrides"),
    (dict(calibration_dtype="float16"), "calibration_dtype"),
    (dict(first_token_weight=-1), "first_token_weight"), (dict(first_token_weight="high"), "first_token_weight"),
    (dict(nonsense=1), "unknown arguments"),
])
def test_config_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        hf_vq.GPTQConfig(**kwargs)


def test_sink_weight_default_scales_with_window_length():
    assert hf_vq.GPTQConfig(seq_len=2048).sink_weight() == 64.0
    assert hf_vq.GPTQConfig(seq_len=512).sink_weight() == 16.0
    assert hf_vq.GPTQConfig(seq_len=16).sink_weight() == 1.0  # never below a plain token
    assert hf_vq.GPTQConfig(seq_len=2048, first_token_weight=0).sink_weight() == 0.0
    assert HfVQConfig.from_dict(hf_vq.GPTQConfig(first_token_weight=2.5).to_dict()).sink_weight() == 2.5


def test_config_json_roundtrip_dispatches_by_method(tiny_tokenizer):
    cfg = hf_vq.GPTQConfig(bits=3, group_size=64, act_order=False, dataset=["x"] * 3, tokenizer=tiny_tokenizer)
    d = cfg.to_dict()
    json.dumps(d)  # JSON-clean even with a tokenizer object and in-memory texts
    assert "tokenizer" not in d and "dataset" not in d
    again = HfVQConfig.from_dict(d)
    assert type(again) is hf_vq.GPTQConfig and again.bits == 3 and again.act_order is False
    assert type(HfVQConfig.from_dict(hf_vq.RTNConfig().to_dict())) is hf_vq.RTNConfig
    with pytest.raises(ValueError, match="unknown hf_vq method"):
        HfVQConfig.from_dict({**d, "method": "nope"})
    repr(cfg)


def test_deepcopy_shares_runtime_objects(tiny_tokenizer):
    import copy

    tok = tiny_tokenizer  # a tokenizer object (configs refuse non-callable ones)
    cfg = hf_vq.GPTQConfig(dataset=["a"], tokenizer=tok)
    assert copy.deepcopy(cfg).tokenizer is tok


def test_newer_format_is_refused():
    with pytest.raises(ValueError, match="newer than this hf_vq supports"):
        hf_vq.RTNConfig(format_version=99)


def _qlinear(n=64, k=100, bits=4, group=32, bias=True):
    w = torch.randn(n, k)
    b = torch.randn(n) if bias else None
    return QuantLinear.from_affine(rtn_weight(w, bits, group, sym=False), b)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_forward_equals_dequantized_weight_exactly(bits, monkeypatch):
    monkeypatch.setenv("HF_VQ_KERNELS", "exact")  # the reference path (the kernels: tests/test_cpu_kernels.py)
    q = _qlinear(bits=bits)
    x = torch.randn(3, 20, 100)
    assert torch.equal(q(x), F.linear(x, q.dequantize_weight(), q.bias))
    monkeypatch.setenv("HF_VQ_KERNELS", "auto")
    q.exact_decode = True
    x1 = torch.randn(1, 100)
    assert torch.equal(q(x1), F.linear(x1, q.dequantize_weight(), q.bias))


def test_fp32_decode_uses_the_native_kernel_within_int8_activation_error():
    q = _qlinear(n=64, k=128, bits=4, group=64)
    x = torch.randn(2, 128)
    w = q.dequantize_weight()
    ref = F.linear(x, w, q.bias)
    with torch.no_grad():
        out = q(x)
    assert out.dtype == torch.float32 and not torch.equal(out, ref)  # the kernel ran
    # int8 activations in blocks of 32: each x moves by at most max|x_block| / 254
    step = x.view(2, 4, 32).abs().amax(-1) / 254
    bound = step @ w.abs().view(64, 4, 32).sum(-1).T
    assert bool(((out - ref).abs() <= bound * (1 + 1e-5) + 1e-5).all())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int4_kernel_decode_path(bits, monkeypatch):
    monkeypatch.setenv("HF_VQ_KERNELS", "torch")
    q = _qlinear(n=64, k=128, bits=bits, group=64)
    x = torch.randn(1, 128).bfloat16()
    assert q.kernel_state(kernel_torch_int4.KERNEL) is not None, "decode shapes should use the packed int4 kernel"
    ref = F.linear(x.float(), q.dequantize_weight(), q.bias)
    with torch.no_grad():
        out = q(x).float()
    assert (out - ref).norm() / ref.norm() < 1e-2  # bf16 activations: bf16 rounding only


def test_partial_group_kernel_uses_finer_group(monkeypatch):
    # 96 columns with group 64: the kernel group must be 32 (divides 96 and 64)
    monkeypatch.setenv("HF_VQ_KERNELS", "torch")
    q = _qlinear(n=32, k=96, bits=4, group=64)
    state = q.kernel_state(kernel_torch_int4.KERNEL)
    assert state is not None and state["group"] == 32
    x = torch.randn(2, 96).bfloat16()
    ref = F.linear(x.float(), q.dequantize_weight(), q.bias)
    with torch.no_grad():
        assert (q(x).float() - ref).norm() / ref.norm() < 1e-2


def test_bits_per_value_counts_metadata():
    q = _qlinear(n=64, k=128, bits=4, group=128, bias=False)
    # 4 bits + (16-bit scale + 8-bit zero) / 128 + 32-bit g_idx per column / 64 rows
    assert q.bits_per_value() == pytest.approx(4 + 24 / 128 + 32 / 64)


def test_to_linear_matches(monkeypatch):
    monkeypatch.setenv("HF_VQ_KERNELS", "exact")
    q = _qlinear()
    lin = q.to_linear()
    x = torch.randn(4, 100)
    assert torch.equal(lin(x), q(x))
