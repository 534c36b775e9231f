"""The Triton kernels of VQ layers (hf_vq/nn/kernel_triton_vq.py) under Triton's CPU interpreter
(TRITON_INTERPRET=1, HF_VQ_KERNELS=triton), against F.linear on the layer's dequantized weight (VQExperts: in
tests/test_triton_experts.py).

Tolerance, as in tests/test_triton_kernels.py. The kernel decodes the same fp32 weights as
hf_vq.formats.vq.decode_weight (checked bit for bit below), so the outputs differ only by summation order and
roundings. With ``B = |x| @ |W|^T``: fp32 x: ``|y - ref| <= 1e-5 * B + 1e-6``; fp16 x (against the fp32 product of
the same fp16 inputs): add ``2^-11 * B`` (the tiled path feeds ``tl.dot`` fp16 weights) and ``2^-11 * |ref| + 2^-24``
(the fp16 output).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from hf_vq.algorithms.gptvq import gptvq_quantize
from hf_vq.nn import kernel_triton_affine as kta
from hf_vq.nn import kernel_triton_vq as ktv
from hf_vq.nn.experts import VQExperts
from hf_vq.nn.registry import module_from_format
from tests.test_triton_kernels import (HAS_TRITON, assert_close, bound, interpreter,  # noqa: F401  (fixtures)
                                       triton_kernels)
from tests.test_vq_kernel import _random_vq

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture
def launches(monkeypatch):
    """Every VQ kernel launch, as the path it took: True for the tiled GEMM, False for the fused GEMV."""
    seen = []
    real = ktv._launch

    def spy(ns, st, x2, bias, gemm):
        seen.append(gemm)
        return real(ns, st, x2, bias, gemm)

    monkeypatch.setattr(ktv, "_launch", spy)
    return seen


def check_layer(mod, rows_list, seed, launches):
    w = mod.dequantize_weight(torch.float32)
    st = mod.kernel_state(ktv.KERNEL)
    assert st is not None, "the Triton VQ kernel serves this layer"
    assert torch.equal(ktv.decode_state(st).T, w), "the kernel layout decodes to the stored weight, bit for bit"
    g = torch.Generator().manual_seed(seed)
    for rows in rows_list:
        for dtype in (torch.float32, torch.float16):
            x = torch.randn(rows, mod.in_features, generator=g).to(dtype)
            before = len(launches)
            with torch.no_grad():
                y = mod(x)
            assert launches[before:] == [rows > ktv.DECODE_ROWS], "one launch of the expected kernel"
            assert y.dtype == dtype and y.shape == (rows, mod.out_features)
            bias = None if mod.bias is None else mod.bias.detach().float()
            ref = F.linear(x.float(), w, bias)
            assert_close(y, ref, bound(x, w) + (0 if bias is None else bias.abs()), dtype == torch.float16)
    assert mod._cache is None, "the kernels never build the dense weight"


# every vector dim with every codebook width (4/8-bit integer, fp16), index bits 1..8, normalization on and off;
# 45 x 203: a partial row block (16), a partial column block (64), K not a multiple of d or of any block
@pytest.mark.parametrize("d,ib,cb_bits,normalize", [
    (1, 1, 8, False), (1, 3, 4, True), (1, 8, 16, False),
    (2, 2, 16, True), (2, 6, 8, False), (2, 8, 4, True),
    (4, 4, 4, False), (4, 5, 16, True), (4, 7, 8, True)])
def test_vq_linear_matches_its_dequantized_weight(d, ib, cb_bits, normalize, launches):
    mod = _random_vq(45, 203, d, ib, cb_bits, 16, 64, normalize, bias=ib % 2 == 0, seed=d * 10 + ib)
    check_layer(mod, (1, 3, 16, 64), seed=ib, launches=launches)


@pytest.mark.parametrize("rpb,cpb", [(64, 40), (8, 256)])
def test_block_sizes(rpb, cpb, launches):
    """One row block taller than the layer, column blocks that are no multiple of the kernel's K block; many row
    blocks, one column block wider than the layer."""
    mod = _random_vq(37, 150, 2, 5, 8, rpb, cpb, True, seed=rpb)
    check_layer(mod, (2, 17), seed=rpb, launches=launches)


def test_real_gptvq_layer(launches):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 160, generator=g)
    vq = gptvq_quantize(torch.randn(40, 160, generator=g) * 0.05, 2 * x.T @ x / 128, vector_dim=2, index_bits=6,
                        rows_per_block=16, cols_per_block=64, kmeans_iterations=5, data_normalization=True)
    mod = module_from_format(vq, torch.randn(40, generator=g))
    check_layer(mod, (1, 20), seed=1, launches=launches)


def test_any_leading_shape_and_strided_input(launches):
    mod = _random_vq(40, 96, 4, 6, 8, 32, 64, False, seed=3)
    w = mod.dequantize_weight()
    g = torch.Generator().manual_seed(6)
    for x in (torch.randn(2, 3, 96, generator=g), torch.randn(2, 9, 192, generator=g)[..., ::2]):
        with torch.no_grad():
            y = mod(x)
        assert y.shape == (*x.shape[:-1], 40)
        assert_close(y.reshape(-1, 40), F.linear(x.reshape(-1, 96), w, mod.bias.detach()),
                     bound(x.reshape(-1, 96), w) + mod.bias.detach().abs(), half=False)
    assert launches == [False, True]


def test_the_layout_is_compact():
    """One byte per vector, int8 codebooks and fp32 normalization scales per 64 columns: at 2D far below fp16."""
    mod = _random_vq(64, 512, 2, 8, 8, 32, 256, True, seed=2)
    with torch.no_grad():
        mod(torch.randn(1, 512))
    st = mod.kernel_state(ktv.KERNEL)
    assert st.cb.dtype == torch.int8 and st.idx.dtype == torch.uint8
    assert st.nbytes() < 0.5 * 64 * 512 * 2


def _vq_experts(seed=0):
    from tests.test_moe import _experts
    from hf_vq.model.experts import experts_layout

    mod = _experts("mixtral")
    layout = experts_layout(mod)
    n_first = 2 * layout.intermediate_size
    firsts = [_random_vq(n_first, layout.hidden_size, 2, 6, 8, 32, 64, True, bias=False,
                         seed=seed + e).format_weight() for e in range(layout.num_experts)]
    downs = [_random_vq(layout.hidden_size, layout.intermediate_size, 4, 8, 16, 16, 32, False, bias=False,
                        seed=seed + 10 + e).format_weight() for e in range(layout.num_experts)]
    q = VQExperts.from_vq(firsts, downs, layout.gated, layout.transposed)
    q.attach_float_module(mod)
    return q, layout


def test_missing_triton_warns_once_for_affine_and_vq_layers(monkeypatch):
    from hf_vq.algorithms.rtn import rtn_weight
    from hf_vq.nn.qlinear import QuantLinear

    for mod, names in ((kta, ("_BUILT", "_SMOKE_OK", "_FAILED")), (ktv, ("_BUILT", "_SMOKE_OK", "_FAILED"))):
        for name in names:
            monkeypatch.setattr(mod, name, {} if name == "_BUILT" else set())
    monkeypatch.setattr(kta, "_warned", False)

    def no_triton():
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(kta, "_import_triton", no_triton)
    layers = [QuantLinear.from_affine(rtn_weight(torch.randn(24, 64), 4, 32, False), None),
              _random_vq(24, 64, 2, 4, 8, 16, 64, True, seed=9)]
    x = torch.randn(3, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            ys = [layer(x) for layer in layers for _ in range(2)]
    ours = [w for w in caught if "hf_vq triton kernel" in str(w.message)]
    assert len(ours) == 1 and "unavailable" in str(ours[0].message), [str(w.message) for w in caught]
    for i, layer in enumerate(layers):
        want = F.linear(x, layer.dequantize_weight(x.dtype), None if layer.bias is None else layer.bias.detach())
        assert torch.equal(ys[2 * i], want) and torch.equal(ys[2 * i + 1], want), "the exact path, bit for bit"


def test_a_launch_that_fails_falls_back_for_that_call(monkeypatch):
    monkeypatch.setattr(ktv, "_FAILED", set())
    monkeypatch.setattr(kta, "_warned", False)
    real = ktv._launch_kernel

    def gemm_breaks(ns, st, x2, bias, gemm):
        if gemm:
            raise RuntimeError("simulated: no tl.dot for this dtype here")
        return real(ns, st, x2, bias, gemm)

    monkeypatch.setattr(ktv, "_launch_kernel", gemm_breaks)
    mod = _random_vq(24, 64, 1, 4, 16, 16, 32, False, seed=4)
    w = mod.dequantize_weight()
    x = torch.randn(20, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            ys = [mod(x), mod(x)]
    assert len([c for c in caught if "hf_vq triton kernel" in str(c.message)]) == 1
    for y in ys:
        assert_close(y, F.linear(x, w, mod.bias.detach()), bound(x, w) + mod.bias.detach().abs(), half=False)
