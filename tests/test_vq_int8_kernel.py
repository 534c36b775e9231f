"""The int8 CPU kernel of VQ layers (hf_vq/nn/kernel_native_vq.py + csrc/vq_int8.c) against F.linear on the weight
VQLinear.dequantize_weight() decodes, on every instruction-set path, and its place among the VQ kernels.

Error bound. The kernel's only approximation is the activations' int8 rounding: each block of 32 consecutive input
columns is scaled by d = max|x_block| / 127 and rounded, so every input moves by at most d / 2 = max|x_block| / 254
(the weight codes are exact integers). Each output therefore moves by at most
    bound[m, r] = sum_blocks max|x[m, block]| / 254 * sum_{j in block} |w[r, j]|,
plus fp32 summation and scale rounding, at most 1e-5 of the absolute dot product |x| @ |W|^T + |bias| (the kernel
sums exact int32 block dot products, then about 2 fp32 operations per block; F.linear rounds at ~6e-8 per add);
bf16 outputs add their own rounding, 2^-8 relative. The test asserts
    |y - ref| <= bound * (1 + 1e-5) + 1e-5 * (|x| @ |W|^T + |bias|) + 1e-6  (+ 2^-8 * (|ref| + bound) for bf16),
and that this tolerance is, on average, under half the outputs' size (so the check is not vacuous).
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

import hf_vq.nn.kernel_native_vq as native_vq
from hf_vq.algorithms.gptvq import gptvq_quantize
from hf_vq.formats.vq import VQWeight
from hf_vq.nn import kernel_registry, vq_kernel
from hf_vq.nn.registry import module_from_format
from hf_vq.nn.vqlinear import VQLinear
from tests.test_cpu_kernels import assert_thread_split_invariant
from tests.test_vq_kernel import _random_vq as random_vq

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: the native kernel cannot build")
ISAS = ["scalar", "avx2", "avxvnni", "avx512vnni", "avx512vbmi"]


@pytest.fixture(autouse=True)
def auto_kernels(monkeypatch):
    monkeypatch.setenv("HF_VQ_KERNELS", "auto")
    monkeypatch.delenv("HF_VQ_NATIVE_ISA", raising=False)


def _random_vq(*args, **kwargs) -> VQLinear:
    """tests/test_vq_kernel.py's random VQ layer (every bit pattern of the packed buffers is a valid code; 8-bit
    codebooks then include the extreme code -128)."""
    return random_vq(*args, **kwargs)


def block_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[rows, N] bound of the int8-activation error, blocks of 32 consecutive columns."""
    x = x.reshape(-1, x.shape[-1]).float()
    pad = -x.shape[-1] % 32
    xb = F.pad(x.abs(), (0, pad)).view(x.shape[0], -1, 32).amax(-1) / 254
    wb = F.pad(w.abs(), (0, pad)).view(w.shape[0], -1, 32).sum(-1)
    return xb @ wb.T


def assert_within(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None):
    half = y.dtype == torch.bfloat16
    x2 = x.reshape(-1, x.shape[-1]).float()
    ref = F.linear(x2, w, bias)
    bound = block_bound(x2, w)
    absdot = F.linear(x2.abs(), w.abs()) + (0 if bias is None else bias.abs())
    tol = bound * (1 + 1e-5) + 1e-5 * absdot + 1e-6 + (2 ** -8 * (ref.abs() + bound) if half else 0)
    err = (y.reshape(ref.shape).float() - ref).abs()
    assert bool((err <= tol).all()), f"max err/tol {(err / tol).max():.3f}"
    # not vacuous: on average the tolerance is well below the outputs' size (it pins their sign and magnitude)
    assert tol.mean() < 0.5 * ref.abs().mean(), "the tolerance must be small next to the outputs"


def expected_isa(isa: str) -> str:
    return isa if native_vq.isa_supported(isa) else native_vq.best_isa()


def test_kernel_builds_here():
    assert native_vq.available(), "`cc` exists: a build failure is a bug"
    assert native_vq.best_isa() in ISAS
    assert native_vq.isa_supported("scalar")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("cb_bits", [4, 8])
@pytest.mark.parametrize("d,ib", [(1, 3), (1, 8), (2, 4), (2, 6), (2, 7), (2, 8), (4, 5), (4, 8)])
def test_every_path_matches_the_dequantized_linear(isa, d, ib, cb_bits, normalize, monkeypatch):
    monkeypatch.setenv("HF_VQ_NATIVE_ISA", isa)
    # odd shapes: 45 rows in row blocks of 24 (neither a multiple of the 16-row tile), 301 columns (not a multiple
    # of 32, of the vector dimension, nor of cols_per_block 96, which also crosses the 64-column norm blocks)
    mod = _random_vq(45, 301, d, ib, cb_bits, rpb=24, cpb=96, normalize=normalize, seed=7 * ib + d)
    w = mod.dequantize_weight()
    bias = mod.bias.detach()
    st = mod.kernel_state(native_vq.KERNEL)
    assert st is not None
    g = torch.Generator().manual_seed(ib)
    for shape in ((1, 301), (2, 301), (3, 301), (4, 301), (5, 301), (2, 2, 301)):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, generator=g).to(dtype)
            with torch.no_grad():
                y = mod(x)
            assert y.dtype == dtype and y.shape == (*shape[:-1], 45)
            assert_within(y, x, w, bias)
            assert mod._cache is None, "the kernel must not build the dense weight"
    assert native_vq.last_isa == expected_isa(isa), "the forced path runs where the CPU has it, the best otherwise"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("d", [1, 2, 4])
def test_every_index_width(isa, d, monkeypatch):
    # every table size: 2..256 entries (VBMI: vpermb / vpermi2b / two and a blend; else 1, 4 or 16 pshufb)
    monkeypatch.setenv("HF_VQ_NATIVE_ISA", isa)
    g = torch.Generator().manual_seed(d)
    for ib in range(1, 9):
        mod = _random_vq(40, 200, d, ib, 8, rpb=32, cpb=64, normalize=True, bias=False, seed=ib)
        st = native_vq.prepare(VQWeight(mod.layout, mod.stored_tensors()))
        x = torch.randn(3, 200, generator=g)
        assert_within(native_vq.run(st, x, None), x, mod.dequantize_weight())
        assert native_vq.last_isa == expected_isa(isa)


@pytest.mark.parametrize("rpb,cpb", [(8, 32), (16, 256), (32, 256), (64, 128)])
def test_block_sizes(rpb, cpb):
    # row blocks smaller than, equal to and larger than the 16-row tile; one codebook scale per codebook
    mod = _random_vq(70, 520, 2, 6, 8, rpb=rpb, cpb=cpb, normalize=False, seed=rpb)
    x = torch.randn(2, 520)
    with torch.no_grad():
        y = mod(x)
    assert mod.kernel_state(native_vq.KERNEL) is not None
    assert_within(y, x, mod.dequantize_weight(), mod.bias.detach())


@pytest.mark.parametrize("normalize", [False, True])
def test_real_gptvq_layer(normalize, monkeypatch):
    monkeypatch.setenv("HF_VQ_KERNELS", "native")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 330, generator=g)
    vq = gptvq_quantize(torch.randn(70, 330, generator=g) * 0.05, 2 * x.T @ x / 256, vector_dim=2, index_bits=6,
                        rows_per_block=32, cols_per_block=256, kmeans_iterations=10, data_normalization=normalize)
    assert vq.layout.codebook_bits == 8
    mod = module_from_format(vq, torch.randn(70, generator=g))
    xs = torch.randn(4, 330, generator=g)
    with torch.no_grad():
        y = mod(xs)
    assert mod.kernel_state(native_vq.KERNEL) is not None and mod._cache is None
    assert_within(y, xs, vq.dequantize(), mod.bias.detach())
    st = mod.kernel_state(native_vq.KERNEL)
    assert torch.equal(y, native_vq.run(st, xs, mod.bias.detach())), "the int8 kernel served the forward"


def test_it_serves_before_the_older_kernel():
    mod = _random_vq(48, 256, 2, 6, 8, rpb=32, cpb=256, normalize=False, seed=5)
    names = [k.name for k in kernel_registry.candidates("vq", "cpu", 1)]
    assert names.index("native-vq-int8") < names.index("native-vq")
    x = torch.randn(1, 1, 256)
    with torch.no_grad():
        y = mod(x)
    st = mod.kernel_state(native_vq.KERNEL)
    assert torch.equal(y, native_vq.run(st, x, mod.bias.detach()))
    # the int8 layout: one byte per vector (4 bits per weight at 2D) plus small tables, far below fp32
    assert st.nbytes() < 0.2 * 48 * 256 * 4


@pytest.mark.parametrize("cb_bits,cpb", [(16, 64), (8, 40)])
def test_unsupported_layouts_fall_back_to_the_older_kernel(cb_bits, cpb, monkeypatch):
    # fp16 codebooks are not integers; a 40-column codebook block splits a 32-column activation block
    monkeypatch.setenv("HF_VQ_KERNELS", "native")
    mod = _random_vq(40, 128, 2, 6, cb_bits, rpb=8, cpb=cpb, normalize=True, seed=cb_bits)
    assert native_vq.prepare(VQWeight(mod.layout, mod.stored_tensors())) is None
    assert [k.name for k in kernel_registry.candidates("vq", "cpu", 1)][:2] == ["native-vq-int8", "native-vq"]
    x = torch.randn(2, 128)
    with torch.no_grad():
        y = mod(x)
    assert mod.kernel_state(native_vq.KERNEL) is None
    old = mod.kernel_state(vq_kernel.KERNEL)
    assert old is not None and torch.equal(y, vq_kernel.KERNEL.run(old, x, mod.bias.detach()))
    assert mod._cache is None


def test_threads_split_rows_without_changing_results():
    mod = _random_vq(300, 256, 2, 6, 8, rpb=32, cpb=256, normalize=True, bias=False)
    st = native_vq.prepare(VQWeight(mod.layout, mod.stored_tensors()))
    x = torch.randn(3, 256)
    assert_thread_split_invariant(lambda: native_vq.run(st, x, None))


@pytest.mark.parametrize("isa", ISAS)
def test_many_rows_give_each_row_s_own_result(isa, monkeypatch):
    # from 8 rows on the kernel looks each tile's codes up once for all rows (prefill); every row still gets the
    # same integer sums and the same float operations in the same order as a call with that row alone
    monkeypatch.setenv("HF_VQ_NATIVE_ISA", isa)
    g = torch.Generator().manual_seed(0)
    for d, ib, packed in ((1, 5, True), (2, 6, True), (2, 6, False), (2, 8, False), (4, 4, True)):
        mod = _random_vq(45, 301, d, ib, 8, rpb=24, cpb=96, normalize=True, seed=11 * ib + d)
        st = native_vq.transcode(VQWeight(mod.layout, mod.stored_tensors()), packed)
        bias, w = mod.bias.detach(), mod.dequantize_weight()
        for rows in (8, 9, 16, 23):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(rows, 301, generator=g).to(dtype)
                x[1, 64:128] = 0   # blocks of zeros quantize to scale 0
                y = native_vq.run(st, x, bias)
                assert native_vq.last_isa == expected_isa(isa)
                one_by_one = torch.cat([native_vq.run(st, x[i:i + 1], bias) for i in range(rows)])
                assert torch.equal(y, one_by_one), f"D={d}, {ib}-bit indices, packed={packed}, {rows} rows"
            assert_within(y, x, w, bias)


def test_threads_split_many_rows_without_changing_results():
    # 70 rows: the threads quantize a share of the rows each (from 64 rows on), then split the tiles
    mod = _random_vq(300, 256, 2, 6, 8, rpb=32, cpb=256, normalize=True, bias=False, seed=4)
    st = native_vq.prepare(VQWeight(mod.layout, mod.stored_tensors()))
    x = torch.randn(70, 256, generator=torch.Generator().manual_seed(4))
    assert_thread_split_invariant(lambda: native_vq.run(st, x, None))
    assert_within(native_vq.run(st, x, None), x, mod.dequantize_weight())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("d,ib", [(1, 5), (2, 6), (4, 4)])
def test_packed_indices_give_the_byte_layout_s_results(isa, d, ib, monkeypatch):
    # indices of <= 6 bits packed 6 bits each: VBMI unpacks them in registers, the other paths into a buffer; the
    # arithmetic after the unpacking is the same, so the outputs are the same bits
    monkeypatch.setenv("HF_VQ_NATIVE_ISA", isa)
    mod = _random_vq(45, 301, d, ib, 8, rpb=24, cpb=96, normalize=True, seed=ib)
    vq = VQWeight(mod.layout, mod.stored_tensors())
    packed, plain = native_vq.transcode(vq, packed=True), native_vq.transcode(vq, packed=False)
    assert packed.packed and not plain.packed and packed.index_bytes() * 4 == plain.index_bytes() * 3
    assert packed.data.numel() < plain.data.numel()
    g = torch.Generator().manual_seed(d)
    for rows in (1, 2, 5, 12):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, 301, generator=g).to(dtype)
            y = native_vq.run(packed, x, mod.bias.detach())
            assert native_vq.last_isa == expected_isa(isa)
            assert torch.equal(y, native_vq.run(plain, x, mod.bias.detach()))
            assert_within(y, x, mod.dequantize_weight(), mod.bias.detach())


def test_prepare_packs_indices_where_vbmi_runs(monkeypatch):
    mod6, mod8 = _random_vq(32, 256, 2, 6, 8, 32, 256, False), _random_vq(32, 256, 2, 8, 8, 32, 256, False)
    vq6, vq8 = VQWeight(mod6.layout, mod6.stored_tensors()), VQWeight(mod8.layout, mod8.stored_tensors())
    assert native_vq.prepare(vq6).packed == (native_vq.best_isa() == "avx512vbmi")
    assert not native_vq.prepare(vq8).packed, "8-bit indices stay one byte each"
    monkeypatch.setenv("HF_VQ_NATIVE_ISA", "avx2")
    assert not native_vq.prepare(vq6).packed, "a path without VBMI gets the byte layout"
    with pytest.raises(ValueError, match="6 bits"):
        native_vq.transcode(vq8, packed=True)


def test_torch_compile_sees_one_op():
    mod = _random_vq(48, 200, 2, 6, 8, rpb=16, cpb=64, normalize=True, seed=3)
    st = native_vq.prepare(VQWeight(mod.layout, mod.stored_tensors()))
    bias = mod.bias.detach()
    x = torch.randn(2, 200).bfloat16()
    compiled = torch.compile(lambda t: native_vq.run(st, t, bias), backend="eager", fullgraph=True)
    y = compiled(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, native_vq.run(st, x, bias))
    assert_within(y, x, mod.dequantize_weight(), bias)
