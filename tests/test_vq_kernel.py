"""The C decode kernel of VQLinear (hf_vq/nn/vq_kernel.py + csrc/vq_gemv.c) against F.linear on the decoded weight.

Tolerance: fp32 sums in a different order, so every output must satisfy |y - ref| <= 1e-5 * (|x| @ |W|^T) + 1e-7,
i.e. a relative error of 1e-5 of the absolute dot product (the kernel and F.linear each round at ~6e-8 per add).
"""

from __future__ import annotations

import ctypes
import shutil

import pytest
import torch
import torch.nn.functional as F

from hf_vq.algorithms.gptvq import gptvq_quantize
from hf_vq.formats.vq import VQLayout
from hf_vq.nn import vq_kernel
from hf_vq.nn.vqlinear import VQLinear
from hf_vq.nn.registry import module_from_format

CC = shutil.which("cc")
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (`cc`) on PATH: the VQ kernel cannot be built")


def _random_vq(out_f, in_f, d, ib, cb_bits, rpb, cpb, normalize, bias=True, seed=0) -> VQLinear:
    """A VQLinear with random valid codes (every bit pattern of the packed index/code buffers is a valid code)."""
    g = torch.Generator().manual_seed(seed)
    lay = VQLayout(out_f, in_f, d, ib, cb_bits, rpb, cpb, normalize)
    mod = VQLinear(lay, bias=bias)
    mod.vq_indices.copy_(torch.randint(0, 256, mod.vq_indices.shape, generator=g, dtype=torch.uint8))
    if cb_bits == 16:
        mod.vq_codebook.copy_((torch.randn(mod.vq_codebook.shape, generator=g) * 0.1).half().view(torch.int16))
    else:
        mod.vq_codebook.copy_(torch.randint(0, 256, mod.vq_codebook.shape, generator=g, dtype=torch.uint8))
        sc = (torch.rand(lay.num_codebooks, generator=g) + 0.5) * 0.02
        mod.vq_codebook_scales.copy_(sc.half().view(torch.int16))
    if normalize:
        mod.vq_norm_codes.copy_(torch.randint(0, 256, mod.vq_norm_codes.shape, generator=g, dtype=torch.uint8))
        mod.vq_norm_base.copy_(torch.tensor([0.75]).view(torch.int32))
    if bias:
        mod.bias.data.copy_(torch.randn(out_f, generator=g))
    return mod


def _check(y, x, w, bias=None):
    ref = F.linear(x, w, bias)
    scale = F.linear(x.abs(), w.abs()) + (0 if bias is None else bias.abs())
    err = (y - ref).abs()
    assert bool((err <= 1e-5 * scale + 1e-7).all()), f"max err {err.max():.3e}, max scale {scale.max():.3e}"


@torch.no_grad()
def _kernel_forward(mod, x):
    """This fp32 kernel's forward (the int8-activation VQ kernel, which the registry prefers where it serves, has its
    own tests in tests/test_vq_int8_kernel.py)."""
    kw = mod.kernel_weights()
    assert kw is not None, "the fast path must serve this layer"
    y = vq_kernel.KERNEL.run(kw, x, mod.bias)
    assert mod._cache is None, "the fast path must not build the dense weight"
    return y


def test_kernel_builds_here():
    # `cc` exists: a build failure is a bug, not a reason to skip
    assert vq_kernel.available()
    assert vq_kernel.simd_width() in (1, 8)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("cb_bits", [4, 8, 16])
@pytest.mark.parametrize("d,ib", [(1, 2), (1, 3), (1, 8), (2, 6), (2, 8), (4, 8), (4, 5)])
def test_kernel_matches_dequantized_linear(d, ib, cb_bits, normalize):
    # odd shapes: in_features not a multiple of d, nor of cols_per_block; out_features not a multiple of rpb;
    # cols_per_block 96 crosses the 64-column normalization blocks
    mod = _random_vq(45, 301, d, ib, cb_bits, rpb=16, cpb=96 if d != 1 else 40, normalize=normalize, seed=ib + d)
    w = mod.dequantize_weight()
    g = torch.Generator().manual_seed(1)
    for shape in ((1, 301), (3, 301), (1, 1, 301), (2, 2, 301)):
        x = torch.randn(shape, generator=g)
        y = _kernel_forward(mod, x)
        assert y.shape == (*shape[:-1], 45)
        _check(y, x, w, mod.bias.detach())


def test_gptvq_weights_and_threads():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 130, generator=g)
    vq = gptvq_quantize(torch.randn(70, 130, generator=g) * 0.05, 2 * x.T @ x / 256, vector_dim=2, index_bits=6,
                        rows_per_block=32, cols_per_block=64, kmeans_iterations=10, data_normalization=True)
    mod = module_from_format(vq, None)
    kw = mod.kernel_weights()
    xs = torch.randn(4, 130, generator=g)
    for threads in (1, 2, 3):
        _check(vq_kernel.gemv(kw, xs, num_threads=threads), xs, vq.dequantize())
    # the kernel layout is far smaller than the dense fp32 weight (here: tiny layer, so only < 1/2)
    assert kw.nbytes() < 0.5 * 70 * 130 * 4


def test_fallback_paths_agree():
    mod = _random_vq(40, 128, 2, 6, 8, rpb=8, cpb=64, normalize=True)
    x = torch.randn(1, 1, 128)
    with torch.no_grad():
        y_fast = _kernel_forward(mod, x)
        VQLinear.fast_decode = False
        try:
            y_dense = mod(x)
        finally:
            VQLinear.fast_decode = True
        _check(y_fast, x, mod.dequantize_weight(), mod.bias.detach())
        torch.testing.assert_close(y_fast, y_dense, rtol=1e-5, atol=1e-5)
        # more than 4 rows: this kernel declines, the dense path serves them
        assert vq_kernel.KERNEL.max_rows == 4
        VQLinear.fast_decode = False
        try:
            x5 = torch.randn(5, 128)
            _check(mod(x5), x5, mod.dequantize_weight(), mod.bias.detach())
        finally:
            VQLinear.fast_decode = True
        assert mod._cache is not None
    # autograd needs a backward: with grad enabled and a trainable bias the dense path serves it
    y = mod(torch.randn(1, 128))
    assert y.grad_fn is not None


def test_half_inputs_computed_in_fp32():
    mod = _random_vq(32, 64, 2, 6, 8, rpb=32, cpb=64, normalize=False, bias=False)
    x = torch.randn(2, 64).bfloat16()
    with torch.no_grad():
        y = _kernel_forward(mod, x)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.float(), mod.dequantize_weight())
    # x is exact in fp32, so the only extra error is the final bf16 rounding of y (relative 2^-8)
    torch.testing.assert_close(y.float(), ref, rtol=2 ** -8, atol=1e-6)


def test_cache_follows_buffer_changes():
    mod = _random_vq(24, 64, 2, 6, 8, rpb=8, cpb=32, normalize=True, seed=3)
    x = torch.randn(1, 64)
    with torch.no_grad():
        mod(x)
        first = mod.kernel_weights()
        assert mod.kernel_weights() is first                  # reused while the buffers are unchanged
        other = _random_vq(24, 64, 2, 6, 8, rpb=8, cpb=32, normalize=True, seed=4)
        mod.load_state_dict(other.state_dict())                 # a weight change: the prepared layout is dropped
        y = _kernel_forward(mod, x)
        assert mod.kernel_weights() is not first
        _check(y, x, other.dequantize_weight(), other.bias.detach())
        second = mod.kernel_weights()
        mod.float()                                             # _apply drops it too
        third = mod.kernel_weights()
        assert third is not second and mod.kernel_weights() is third
        mod._buffers["vq_indices"] = mod.vq_indices.clone()     # a swapped buffer (offload hooks, placement)
        assert mod.kernel_weights() is not third


def test_portable_build_without_simd(tmp_path, monkeypatch):
    # the plain-C path (what a compiler without AVX2/FMA builds) gives the same results
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = vq_kernel.LIBRARY.compile(CC, [])
    assert path.parent == tmp_path / "hf_vq" / "kernels" and vq_kernel.LIBRARY.compile(CC, []) == path
    assert not list(path.parent.glob("*.tmp"))
    lib = vq_kernel.bind(ctypes.CDLL(str(path)))
    assert lib.vq_simd_width() == 1
    monkeypatch.setattr(vq_kernel.LIBRARY, "_lib", lib)
    monkeypatch.setattr(vq_kernel.LIBRARY, "_tried", True)
    for d in (1, 2, 4):
        mod = _random_vq(33, 70, d, 4, 8, rpb=16, cpb=32, normalize=True, seed=d)
        x = torch.randn(3, 70)
        _check(vq_kernel.gemv(mod.kernel_weights(), x, mod.bias), x, mod.dequantize_weight(), mod.bias.detach())
