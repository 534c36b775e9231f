"""The Triton kernels of affine layers (hf_vq/nn/kernel_triton_affine.py), run on CPU tensors by Triton's numpy
interpreter (TRITON_INTERPRET=1, HF_VQ_KERNELS=triton): QuantLinear against F.linear on its dequantized weight,
tiny Llamas (GPTQ 3-bit g32 act-order, RTN 8-bit) against HF_VQ_KERNELS=exact,
the device gating, and the fallback when Triton is missing or does not compile.

Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates a function (``knobs.runtime.interpret`` in
triton/runtime/jit.py): at ``import triton`` for triton.language's own jitted helpers (``tl.zeros``, ``tl.sum``), and
for hf_vq's kernels when they are first built (lazily). Under pytest, torch/transformers import triton from
tests/conftest.py before this module, so hf_vq's kernels use builtins only and work either way; this module sets
the variable for its own tests only (other modules never see it). The interpreter has
no bfloat16: fp32 and fp16 activations only. It proves indexing, masking, unpacking and arithmetic, not speed.

Tolerance. Kernel and reference use the same dequantized weights (``(q - z) * s`` is exact in fp32 on both sides),
so they differ only by summation order and, for fp16, by roundings. With ``B = |x| @ |W|^T`` (per output):
- fp32 x: ``|y - ref| <= 1e-5 * B + 1e-6`` (fp32 accumulation in another order);
- fp16 x: against the fp32 product of the same fp16 inputs, add 2^-11 * B (the tiled path feeds ``tl.dot`` weights
  rounded to fp16, as F.linear on ``dequantize_weight(float16)`` does) and 2^-11 * |ref| + 2^-24 (the fp16 output).
Whole models: every layer's error is within the bound above; the logits compound it over 14 layers, attention and
norms, so they are compared at 1e-4 of their largest magnitude.
"""

from __future__ import annotations

import os


import importlib.util  # noqa: E402
import warnings  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import hf_vq  # noqa: E402
from hf_vq.algorithms.rtn import rtn_weight  # noqa: E402
from hf_vq.formats.affine import AffineWeight  # noqa: E402
from hf_vq.formats.packing import pack, unpack  # noqa: E402
from hf_vq.nn import kernel_registry  # noqa: E402
from hf_vq.nn import kernel_triton_affine as kta  # noqa: E402
from hf_vq.nn.qlinear import QuantLinear  # noqa: E402
from tests.test_cpu_kernels import act_order_weight  # noqa: E402



HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if previous is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = previous


@pytest.fixture(autouse=True)
def triton_kernels(monkeypatch):
    monkeypatch.setenv("HF_VQ_KERNELS", "triton")


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launch, as the path it took: True for the tiled GEMM, False for the fused GEMV."""
    seen = []
    real = kta._launch

    def spy(ns, st, x2, bias, gemm):
        seen.append(gemm)
        return real(ns, st, x2, bias, gemm)

    monkeypatch.setattr(kta, "_launch", spy)
    return seen


def bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.float().abs() @ w.abs().T


def assert_close(y, ref, b, half):
    tol = 1e-5 * b + 1e-6
    if half:
        tol = tol + 2.0**-11 * b + 2.0**-11 * ref.abs() + 2.0**-24
    err = (y.float() - ref).abs()
    assert bool((err <= tol).all()), f"max err/tol {(err / tol).max():.3f}"


def check_layer(q: QuantLinear, rows_list, seed, launches):
    w = q.dequantize_weight(torch.float32)
    g = torch.Generator().manual_seed(seed)
    for rows in rows_list:
        for dtype in (torch.float32, torch.float16):
            x = torch.randn(rows, q.in_features, generator=g).to(dtype)
            before = len(launches)
            with torch.no_grad():
                y = q(x)
            assert launches[before:] == [rows > kta.DECODE_ROWS], "one launch of the expected kernel"
            assert y.dtype == dtype and y.shape == (rows, q.out_features)
            bias = None if q.bias is None else q.bias.float()
            ref = F.linear(x.float(), w, bias)
            assert_close(y, ref, bound(x, w) + (0 if bias is None else bias.abs()), dtype == torch.float16)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_word_packing_round_trips(bits):
    codes = torch.randint(0, 2**bits, (7, 45), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    words = kta.pack_words(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (-(-45 // (32 // bits)), 7)
    assert torch.equal(kta.unpack_words(words, bits, 45).to(torch.uint8), codes.T)
    assert torch.equal(unpack(pack(codes, bits), bits, 45), codes)   # the module's own packing, for the record


@needs_triton
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_quant_linear_matches_its_dequantized_weight(bits, sym, group, launches):
    g = torch.Generator().manual_seed(bits * 7 + group)
    # 45 outputs (not a multiple of any block), 200 inputs (partial last group for 32/64/128, partial K block)
    aw = rtn_weight(torch.randn(45, 200, generator=g), bits, group, sym)
    q = QuantLinear.from_affine(aw, torch.randn(45, generator=g))
    state = q.kernel_state(kta.KERNEL)
    assert state is not None and state.perm is None
    assert state.group_size > 0, "contiguous groups take the one-scale-row-per-step path"
    check_layer(q, (1, 3, 16, 64), seed=bits + group, launches=launches)


@needs_triton
@pytest.mark.parametrize("group", [48, 100])
def test_group_sizes_that_are_not_a_block_multiple(group, launches):
    aw = rtn_weight(torch.randn(33, 200, generator=torch.Generator().manual_seed(group)), 4, group, False)
    q = QuantLinear.from_affine(aw, None)
    check_layer(q, (1, 5, 17), seed=group, launches=launches)


@needs_triton
@pytest.mark.parametrize("bits,sym", [(2, False), (3, False), (4, True), (8, False)])
def test_act_order_groups(bits, sym, launches):
    aw = act_order_weight(45, 200, bits, 32, sym, seed=bits)
    assert bool((aw.g_idx[1:] < aw.g_idx[:-1]).any()), "g_idx must be non-monotone for this test"
    q = QuantLinear.from_affine(aw, None)
    state = q.kernel_state(kta.KERNEL)
    assert state is not None and state.perm is not None
    check_layer(q, (1, 3, 16, 64), seed=bits, launches=launches)


@needs_triton
def test_arbitrary_group_index(launches):
    """Groups of unequal sizes, columns assigned at random: the kernels read each column's group from g_idx."""
    g = torch.Generator().manual_seed(8)
    n, k, groups, bits = 45, 200, 5, 4
    g_idx = torch.randint(0, groups, (k,), generator=g).to(torch.int32)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    scales = (torch.rand(n, groups, generator=g) * 0.1 + 0.01).half()
    zeros = torch.randint(0, 2**bits, (n, groups), generator=g)
    q = QuantLinear.from_affine(AffineWeight(codes, scales, zeros, g_idx, bits, 40, False), None)
    state = q.kernel_state(kta.KERNEL)
    assert state is not None and state.perm is not None and state.group_size == 0, "the per-column group path"
    check_layer(q, (1, 3, 16, 64), seed=8, launches=launches)


@needs_triton
def test_any_leading_shape_and_strided_input(launches):
    aw = rtn_weight(torch.randn(40, 96, generator=torch.Generator().manual_seed(5)), 4, 32, False)
    q = QuantLinear.from_affine(aw, torch.randn(40))
    w = q.dequantize_weight()
    g = torch.Generator().manual_seed(6)
    for x in (torch.randn(2, 3, 96, generator=g), torch.randn(2, 9, 192, generator=g)[..., ::2]):
        with torch.no_grad():
            y = q(x)
        assert y.shape == (*x.shape[:-1], 40)
        assert_close(y.reshape(-1, 40), F.linear(x.reshape(-1, 96), w, q.bias.detach()),
                     bound(x.reshape(-1, 96), w) + q.bias.detach().abs(), half=False)
    assert launches == [False, True]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@needs_triton
@pytest.mark.parametrize("cfg", ["gptq3_g32_act_order", "rtn8"])
def test_tiny_llama_logits_match_the_exact_path(cfg, tiny_llama_dir, calib_ids, monkeypatch, launches):
    monkeypatch.setenv("HF_VQ_KERNELS", "exact")   # quantize on the exact path: the kernels serve inference only
    if cfg == "rtn8":
        qc = hf_vq.RTNConfig(bits=8, group_size=32)
    else:
        qc = hf_vq.GPTQConfig(dataset=calib_ids, num_samples=16, seq_len=64, bits=3, group_size=32, act_order=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=qc)
    ids = calib_ids[:2, :24]
    exact_prefill, exact_decode = _logits(model, ids), _logits(model, ids[:1, :1])
    monkeypatch.setenv("HF_VQ_KERNELS", "triton")
    fast_prefill, fast_decode = _logits(model, ids), _logits(model, ids[:1, :1])
    assert launches.count(True) == 14 and launches.count(False) == 14, "every QuantLinear, both paths"
    for fast, exact in ((fast_prefill, exact_prefill), (fast_decode, exact_decode)):
        assert (fast - exact).abs().max() <= 1e-4 * exact.abs().max()


@needs_triton
def test_device_gating(monkeypatch):
    aw = rtn_weight(torch.randn(16, 64), 4, 32, False)
    monkeypatch.setenv("HF_VQ_KERNELS", "auto")
    assert kernel_registry.candidates("affine", "cuda", 1)[0] is kta.KERNEL, "first choice on CUDA under auto"
    assert kta.prepare(aw) is None, "on CPU only when forced"
    monkeypatch.setenv("HF_VQ_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert kta.prepare(aw) is None, "on CPU only through the interpreter"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kta.prepare(aw) is not None


@pytest.fixture
def fresh_triton_state(monkeypatch):
    monkeypatch.setattr(kta, "_BUILT", {})
    monkeypatch.setattr(kta, "_SMOKE_OK", set())
    monkeypatch.setattr(kta, "_FAILED", set())
    monkeypatch.setattr(kta, "_warned", False)


def _two_layers_under_fallback():
    g = torch.Generator().manual_seed(3)
    layers = [QuantLinear.from_affine(rtn_weight(torch.randn(24, 64, generator=g), 4, 32, False),
                                      torch.randn(24, generator=g)) for _ in range(2)]
    x = torch.randn(3, 64, generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            ys = [layer(x) for layer in layers for _ in range(2)]
    ours = [w for w in caught if "hf_vq triton kernel" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    for i, layer in enumerate(layers):
        want = F.linear(x, layer.dequantize_weight(x.dtype), layer.bias.detach())
        assert torch.equal(ys[2 * i], want) and torch.equal(ys[2 * i + 1], want), "the exact path, bit for bit"
        assert layer.kernel_state(kta.KERNEL) is None
    return ours[0]


def test_missing_triton_warns_once_and_falls_back(monkeypatch, fresh_triton_state):
    def no_triton():
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(kta, "_import_triton", no_triton)
    assert "unavailable" in str(_two_layers_under_fallback().message)


def test_a_kernel_that_does_not_compile_warns_once_and_falls_back(monkeypatch, fresh_triton_state):
    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("CompilationError: simulated")
            return launch

    monkeypatch.setattr(kta, "_build", lambda triton, tl: SimpleNamespace(gemv=Broken(), gemm=Broken()))
    monkeypatch.setattr(kta, "_import_triton", lambda: (None, None))
    assert "does not compile" in str(_two_layers_under_fallback().message)


@needs_triton
def test_a_launch_that_fails_later_falls_back_for_that_call(monkeypatch, fresh_triton_state):
    real = kta._launch_kernel
    attempts = []

    def gemm_breaks(ns, st, x2, bias, gemm):
        if gemm:
            attempts.append(x2.dtype)
            raise RuntimeError("simulated: no tl.dot for this dtype here")
        return real(ns, st, x2, bias, gemm)

    monkeypatch.setattr(kta, "_launch_kernel", gemm_breaks)
    aw = rtn_weight(torch.randn(24, 64, generator=torch.Generator().manual_seed(4)), 3, 32, False)
    q = QuantLinear.from_affine(aw, torch.randn(24))
    w = q.dequantize_weight()
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(5))
    ref = F.linear(x, w, q.bias.detach())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            ys = [q(x), q(x)]
    assert q.kernel_state(kta.KERNEL) is not None, "the GEMV compiled at prepare: the layer keeps the kernel"
    assert len([c for c in caught if "hf_vq triton kernel" in str(c.message)]) == 1
    assert attempts == [torch.float32], "a failed launch is not retried"
    for y in ys:
        assert_close(y, ref, bound(x, w) + q.bias.detach().abs(), half=False)
