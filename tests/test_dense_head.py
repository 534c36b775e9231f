"""The float output head's kernel (csrc/dense_gemv.c via FloatLinear): every instruction-set path against a float64
product, FloatLinear as an nn.Linear in every other way, and the quantizer giving a loaded model's float head the
kernel while tied weights stay tied."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

import hf_vq
from hf_vq.nn import kernel_native_dense as dense
from hf_vq.nn.dense import FloatLinear

ISAS = ["scalar", "avx2", "avx512vnni"]


@pytest.fixture(autouse=True)
def auto_kernels(monkeypatch):
    monkeypatch.setenv("HF_VQ_KERNELS", "auto")
    monkeypatch.delenv("HF_VQ_NATIVE_ISA", raising=False)


def bound(x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """|y - ref| allowed: fp32 summation (k terms, any order) plus, for bf16 outputs, one rounding (2^-8 relative)."""
    k = x.shape[-1]
    mag = x.double().abs() @ w.double().abs().T
    rel = 2.0 ** -8 if out_dtype == torch.bfloat16 else 0.0
    return k * 2.0 ** -24 * mag + rel * ref.abs() + 1e-30


def test_dense_kernel_builds_here():
    assert dense.LIBRARY.load() is not None, "`cc` exists: a build failure is a bug"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 37, 45), (1, 1, 1), (3, 64, 576), (8, 33, 17), (2, 5, 16), (4, 7, 100)])
def test_every_path_matches_a_float64_product(isa, dtype, m, n, k, monkeypatch):
    monkeypatch.setenv("HF_VQ_NATIVE_ISA", isa)
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g)
    for b in (None, bias):
        y = dense.run(dense.prepare(w), x, b.to(dtype) if b is not None else None)
        assert y.dtype == dtype and y.shape == (m, n)
        bb = b.to(dtype).double() if b is not None else 0.0
        ref = x.double() @ w.double().T + bb
        err = (y.double() - ref).abs()
        assert bool((err <= bound(x, w, ref, dtype)).all()), f"max error {float(err.max()):.3g}"
    want = {"avx512vnni": "avx512"}.get(isa, isa)
    if dense._ISA.supported(isa):
        assert dense.last_isa == want
    else:  # a path this CPU lacks falls back to the best it has
        assert dense.last_isa == dense.ISA_NAMES[dense.LIBRARY.load().dense_best_isa()]


def test_two_threads_give_the_one_thread_result():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4099, 700, generator=g).to(torch.bfloat16)   # 2.9M multiply-adds: split over threads
    x = torch.randn(1, 700, generator=g).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dense.run(w, x, None)
        torch.set_num_threads(2)
        two = dense.run(w, x, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)   # each row is summed by one thread in the same order


def test_the_prepared_state_is_the_weight_itself():
    w = torch.randn(8, 32)
    assert dense.prepare(w) is w
    assert dense.prepare(w.half()) is None                       # fp16: torch's GEMM
    assert dense.prepare(torch.randn(2, 8, 32)) is None
    assert dense.prepare(torch.empty(8, 32, device="meta")) is None


def head(dtype=torch.bfloat16, bias=True):
    torch.manual_seed(0)
    return nn.Linear(96, 300, bias=bias).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_linear_matches_f_linear_and_keeps_its_parameters(dtype):
    lin = head(dtype)
    weight, bias = lin.weight, lin.bias
    x = torch.randn(2, 3, 96).to(dtype)
    ref = F.linear(x, weight, bias)
    assert FloatLinear.adopt(lin) is lin and isinstance(lin, nn.Linear)
    assert lin.weight is weight and lin.bias is bias and list(lin.state_dict()) == ["weight", "bias"]
    with torch.no_grad():
        y = lin(x)
    assert dense.last_isa != "none" and y.dtype == dtype
    err = (y.double() - ref.double()).abs()
    assert bool((err <= bound(x.reshape(-1, 96), weight.detach(), ref.reshape(-1, 300).double(), dtype).view_as(err)
                 + bias.double().abs() * 2.0 ** -8).all())


def test_float_linear_takes_torch_s_path_where_the_kernel_would_differ(monkeypatch):
    lin = FloatLinear.adopt(head(torch.float32))
    x = torch.randn(1, 96)
    # gradients: F.linear, with the same gradients as a plain Linear
    plain = head(torch.float32)
    lin(x).sum().backward()
    plain(x).sum().backward()
    assert torch.equal(lin.weight.grad, plain.weight.grad) and torch.equal(lin.bias.grad, plain.bias.grad)
    with torch.no_grad():
        # another dtype than the weight's: F.linear raises as for a plain Linear
        with pytest.raises(RuntimeError):
            lin(x.to(torch.bfloat16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
        monkeypatch.setenv("HF_VQ_KERNELS", "exact")
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
        monkeypatch.setenv("HF_VQ_KERNELS", "auto")
        rows = torch.randn(dense.MAX_ROWS + 1, 96)       # more rows than the kernel serves: torch's GEMM
        assert torch.equal(lin(rows), F.linear(rows, lin.weight, lin.bias))


def test_weight_changes_reach_the_kernel():
    lin = FloatLinear.adopt(head(torch.float32, bias=False))
    x = torch.randn(1, 96)
    with torch.no_grad():
        lin(x)
        lin.weight.mul_(2)                                    # in place (an optimizer step)
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)
        lin.weight.data = torch.randn(300, 96)               # a new storage under the same parameter
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)
        lin.load_state_dict({"weight": torch.randn(300, 96)})
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)
        lin.to(torch.bfloat16)                               # .to() drops the prepared state
        xb = x.to(torch.bfloat16)
        torch.testing.assert_close(lin(xb), F.linear(xb, lin.weight), rtol=2e-2, atol=2e-2)


def test_adopt_refuses_what_is_not_a_plain_linear():
    with pytest.raises(TypeError, match="plain nn.Linear"):
        FloatLinear.adopt(FloatLinear.adopt(head()))


def load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kw).eval()


def test_a_quantized_model_s_float_head_gets_the_kernel_and_stays_tied(tiny_llama_dir, tmp_path):
    model = load(tiny_llama_dir, quantization_config=hf_vq.RTNConfig(bits=4, group_size=32))
    assert type(model.lm_head) is FloatLinear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(2, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
        hidden = model.model(ids).last_hidden_state[0, -1:]
    ref = F.linear(hidden, model.lm_head.weight)[0]
    err = (logits.double() - ref.double()).abs()
    assert bool((err <= bound(hidden, model.lm_head.weight.detach(), ref.double()[None], torch.bfloat16)[0]).all())

    model.save_pretrained(tmp_path / "q")
    again = load(tmp_path / "q")
    assert type(again.lm_head) is FloatLinear and again.lm_head.weight is again.model.embed_tokens.weight
    assert set(again.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        assert torch.equal(again(ids).logits[0, -1], logits)
    report = hf_vq.optimize(again, warmup_tokens=0).hf_vq_optimize
    assert report["kernels"]["native-dense"] == 1


def test_quantized_and_quantsim_heads_are_left_alone(tiny_llama_dir, calib_ids):
    head8 = load(tiny_llama_dir, quantization_config=hf_vq.RTNConfig(bits=4, group_size=32, lm_head_bits=8))
    assert type(head8.lm_head).__name__ == "QuantLinear"
    # QuantSim simulates a deployment target: its float layers keep torch's GEMM
    sim = load(tiny_llama_dir, quantization_config=hf_vq.QuantSimConfig(dataset=calib_ids, num_samples=4, seq_len=32))
    assert type(sim.lm_head) is nn.Linear
