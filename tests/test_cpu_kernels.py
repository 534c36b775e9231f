"""The CPU kernels of affine layers (hf_vq/nn/kernel_native_affine.py, csrc/affine_gemm.c and the torch int4 kernel)
against the exact dequantized forward, the kernel switch HF_VQ_KERNELS, the run-time instruction-set dispatch, and
the pack-once kernel states.

Tolerance of the native kernel: it rounds activations to int8 in blocks of 32 columns (scale max|x_block| / 127), so
each input moves by at most max|x_block| / 254 and each output by at most
    bound = sum_blocks max|x_block| / 254 * sum_{j in block} |w_j|      (plus fp32 summation error, 1e-5 relative);
bf16 outputs add their own rounding (2^-8 relative). With act-order the kernel's blocks follow the sorted groups, so
those tests use the looser row bound max|x| / 254 * sum_j |w_j|, which holds for any blocking.
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

from hf_vq.algorithms.rtn import rtn_weight
from hf_vq.formats.affine import AffineWeight
from hf_vq.nn import kernel_native_affine as native
from hf_vq.nn import kernel_registry, kernel_torch_int4, kernel_torch_int8
from hf_vq.nn.qlinear import QuantLinear
from hf_vq.utils.cbuild import CLibrary

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: the native kernel cannot build")
ISAS = ["scalar", "avx2", "avxvnni", "avx512vnni"]


def block_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[rows, N] bound of the int8-activation error, blocks of 32 consecutive columns."""
    k = x.shape[-1]
    pad = -k % 32
    xb = F.pad(x.float().abs(), (0, pad)).view(x.shape[0], -1, 32).amax(-1) / 254
    wb = F.pad(w.abs(), (0, pad)).view(w.shape[0], -1, 32).sum(-1)
    return xb @ wb.T


def row_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.float().abs().amax(-1, keepdim=True) / 254) * w.abs().sum(-1)[None]


def assert_within(y, ref, bound, half=False):
    tol = bound * (1 + 1e-5) + 1e-5 * ref.abs() + 1e-6 + (2 ** -8 * ref.abs() if half else 0)
    err = (y.float() - ref).abs()
    assert bool((err <= tol).all()), f"max err/bound {(err / tol).max():.3f}"


def act_order_weight(n, k, bits, group, sym, seed=0) -> AffineWeight:
    """An act-order grid: the columns quantized in a random order, groups of ``group`` consecutive columns *in that
    order*, so g_idx is non-monotone (GPTQ's act_order without static groups)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    order = torch.randperm(k, generator=g)
    aw = rtn_weight(w[:, order], bits, group, sym)
    inv = torch.argsort(order)
    g_idx = (torch.arange(k) // group).to(torch.int32)[inv]
    return AffineWeight(aw.codes[:, inv], aw.scales, aw.zeros, g_idx, bits, group, sym)


@pytest.fixture(autouse=True)
def auto_kernels(monkeypatch):
    monkeypatch.setenv("HF_VQ_KERNELS", "auto")
    monkeypatch.delenv("HF_VQ_NATIVE_ISA", raising=False)


def test_native_kernel_builds_here():
    assert native.available(), "`cc` exists: a build failure is a bug"
    assert native.best_isa() in ISAS


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_every_path_matches_the_exact_forward(isa, bits, sym, group, monkeypatch):
    monkeypatch.setenv("HF_VQ_NATIVE_ISA", isa)
    g = torch.Generator().manual_seed(bits * 7 + group)
    # odd shapes: 45 / 40 rows (three 16-row tiles, the last one 13 / 8 rows: both halves, or only the first, of a
    # 256-bit path's tile), 200 columns (partial last group and block); 1-17 activation rows (single rows, pairs, 4s)
    for n in (45, 40):
        aw = rtn_weight(torch.randn(n, 200, generator=g), bits, group, sym)
        w = aw.dequantize()
        bias = torch.randn(n, generator=g)
        q = QuantLinear.from_affine(aw, bias)
        for rows in (1, 2, 3, 4, 17):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(rows, 200, generator=g).to(dtype)
                with torch.no_grad():
                    y = q(x)
                assert y.dtype == dtype and y.shape == (rows, n)
                assert_within(y, F.linear(x.float(), w, bias), block_bound(x, w), half=dtype == torch.bfloat16)
    expected = isa if native.isa_supported(isa) else native.best_isa()
    assert native.last_isa == expected, "the forced path runs where the CPU has it, the best one otherwise"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits,sym", [(3, False), (4, True), (8, False)])
def test_act_order_groups(isa, bits, sym, monkeypatch):
    monkeypatch.setenv("HF_VQ_NATIVE_ISA", isa)
    aw = act_order_weight(33, 256, bits, 64, sym, seed=bits)
    assert bool((aw.g_idx[1:] < aw.g_idx[:-1]).any()), "g_idx must be non-monotone for this test"
    state = native.prepare(aw)
    assert state is not None and state.perm is not None
    w = aw.dequantize()
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(9))
    assert_within(native.run(state, x, None), F.linear(x, w), row_bound(x, w))


def test_groups_that_split_a_block_are_left_to_other_kernels():
    aw = rtn_weight(torch.randn(16, 96), 4, 48, sym=True)   # group 48: some blocks of 32 hold two groups
    assert native.prepare(aw) is None
    q = QuantLinear.from_affine(aw, None)
    x = torch.randn(1, 96)
    with torch.no_grad():
        y = q(x)   # the next candidate (or the exact path) serves it
    assert (y - F.linear(x, aw.dequantize())).abs().max() < 0.05 * F.linear(x, aw.dequantize()).abs().max()


def assert_thread_split_invariant(call):
    """``call()`` gives the same bits at 1 and 2 threads: rows are independent, the split must not change any."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = call()
        torch.set_num_threads(2)
        two = call()
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_threads_split_rows_without_changing_results():
    aw = rtn_weight(torch.randn(300, 256), 4, 32, sym=False)
    st = native.prepare(aw)
    x = torch.randn(2, 256)
    assert_thread_split_invariant(lambda: native.run(st, x, None))


def test_kernel_switch(monkeypatch):
    q = QuantLinear.from_affine(rtn_weight(torch.randn(64, 128), 4, 64, sym=False), None)
    x = torch.randn(1, 128).bfloat16()
    exact = F.linear(x, q.dequantize_weight(torch.bfloat16))
    with torch.no_grad():
        monkeypatch.setenv("HF_VQ_KERNELS", "exact")
        assert torch.equal(q(x), exact)
        assert kernel_registry.candidates("affine", "cpu", 1) == []
        monkeypatch.setenv("HF_VQ_KERNELS", "torch")
        assert [k.name for k in kernel_registry.candidates("affine", "cpu", 1)] == ["torch-int4", "torch-int8"]
        ref_torch = kernel_torch_int4.run(q.kernel_state(kernel_torch_int4.KERNEL), x, None)
        assert torch.equal(q(x), ref_torch)
        monkeypatch.setenv("HF_VQ_KERNELS", "native")
        assert torch.equal(q(x), native.run(q.kernel_state(native.KERNEL), x, None))
        monkeypatch.setenv("HF_VQ_KERNELS", "torch,native")   # an order of preference
        assert [k.family for k in kernel_registry.candidates("affine", "cpu", 1)] == ["torch", "torch", "native"]
        assert [k.family for k in kernel_registry.candidates("affine", "cpu", 64)] == ["native"]  # torch: <= 4 rows
        monkeypatch.setenv("HF_VQ_KERNELS", "auto")
        assert kernel_registry.candidates("affine", "cpu", 1)[0].family == "native"
        monkeypatch.setenv("HF_VQ_KERNELS", "fastest")
        with pytest.raises(ValueError, match="HF_VQ_KERNELS"):
            q(x)


def test_kernels_are_prepared_once_and_dropped_when_weights_change():
    g = torch.Generator().manual_seed(0)
    q = QuantLinear.from_affine(rtn_weight(torch.randn(32, 64, generator=g), 4, 32, sym=False), None)
    x = torch.randn(1, 64, generator=g)
    with torch.no_grad():
        q(x)
        first = q.kernel_state(native.KERNEL)
        q(x)
        assert q.kernel_state(native.KERNEL) is first, "no repacking between calls"
        other = QuantLinear.from_affine(rtn_weight(torch.randn(32, 64, generator=g), 4, 32, sym=False), None)
        q.load_state_dict(other.state_dict())
        y = q(x)
        assert q.kernel_state(native.KERNEL) is not first
        w = other.dequantize_weight()
        assert_within(y, F.linear(x, w), block_bound(x, w))
        second = q.kernel_state(native.KERNEL)
        q.to(torch.bfloat16)
        assert q.kernel_state(native.KERNEL) is not second


def test_a_kernel_that_cannot_build_falls_back_with_one_warning(tmp_path, monkeypatch):
    broken = tmp_path / "affine_gemm.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(native, "LIBRARY", CLibrary(broken, native._bind, "native affine kernel (test)"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    q = QuantLinear.from_affine(rtn_weight(torch.randn(32, 64), 4, 32, sym=False), None)
    x = torch.randn(1, 64)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        y1, y2 = q(x), q(x)
    relevant = [w for w in caught if "native affine kernel (test)" in str(w.message)]
    assert len(relevant) == 1 and "falling back" in str(relevant[0].message)
    assert q.kernel_state(native.KERNEL) is None
    assert torch.equal(y1, y2)
    w = q.dequantize_weight()
    assert_within(y1, F.linear(x, w), 0.01 * F.linear(x, w).abs().max())   # the torch int4 kernel (bf16) served it


def test_gradients_take_the_exact_path():
    q = QuantLinear.from_affine(rtn_weight(torch.randn(16, 64), 4, 32, sym=False), torch.randn(16))
    x = torch.randn(1, 64, requires_grad=True)
    y = q(x)
    assert torch.equal(y, F.linear(x, q.dequantize_weight(), q.bias))
    y.sum().backward()
    assert x.grad is not None
    # a trainable bias alone: the kernel serves the matmul and autograd adds the bias
    q.bias.grad = None
    x2 = torch.randn(1, 64)
    y2 = q(x2)
    assert y2.grad_fn is not None
    y2.sum().backward()
    assert torch.equal(q.bias.grad, torch.ones(16))


def test_routed_experts_use_the_kernels_with_skewed_routing():
    from tests.test_moe import _quant_experts
    q, layout = _quant_experts("mixtral", bits=4, group=32)
    g = torch.Generator().manual_seed(11)
    for tokens in (1, 3, 16):
        h = torch.randn(tokens, layout.hidden_size, generator=g)
        # skewed: every token picks expert 0, the second choice is random
        idx = torch.stack([torch.zeros(tokens, dtype=torch.long),
                           torch.randint(1, layout.num_experts, (tokens,), generator=g)], 1)
        w = torch.softmax(torch.randn(tokens, 2, generator=g), -1)
        with torch.no_grad():
            fast = q(h, idx, w)
            q.exact_decode = True
            exact = q(h, idx, w)
            q.exact_decode = False
        assert not torch.equal(fast, exact), "the kernels served the routed experts"
        assert (fast - exact).norm() <= 2e-2 * exact.norm()
        for e in (0, int(idx[0, 1])):   # each projection alone: within the int8-activation bound
            for proj in (q.first, "down"):
                x = torch.randn(tokens, q.shapes[proj][1], generator=g)
                w = q.dequantize_expert(proj, e)
                with torch.no_grad():
                    assert_within(q._project(proj, e, x), F.linear(x, w), block_bound(x, w))
    states = q.__dict__["_kernel_states"].states
    assert {key[1][1] for key in states} <= {0, *range(1, layout.num_experts)} and (("native-affine", ("gate_up", 0))
                                                                                  in states)


@pytest.mark.parametrize("sym,one_sided", [(True, False), (False, False), (False, True)])
def test_torch_int8_kernel_serves_8bit_per_channel_layers(sym, one_sided, monkeypatch):
    monkeypatch.setenv("HF_VQ_KERNELS", "torch")
    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 96, generator=g)
    if one_sided:   # asymmetric grid with zero-point 0: codes up to 255 do not fit int8
        w = w.abs() + 0.1
    aw = rtn_weight(w, 8, -1, sym)
    q = QuantLinear.from_affine(aw, torch.randn(48, generator=g))
    fits = bool(((aw.codes.int() - aw.zeros.int()).abs() <= 127).all())
    state = q.kernel_state(kernel_torch_int8.KERNEL)
    assert (state is not None) == fits
    x = torch.randn(3, 96, generator=g)
    ref = F.linear(x, aw.dequantize(), q.bias)
    with torch.no_grad():
        y = q(x)
    if fits:
        # bf16 compute: x and the scales rounded to bf16 (2^-8 each), the output too
        bound = 3 * 2 ** -8 * (F.linear(x.abs(), aw.dequantize().abs()) + q.bias.abs())
        assert bool(((y - ref).abs() <= bound + 1e-6).all()) and not torch.equal(y, ref)
    else:
        assert torch.equal(y, ref), "not servable: the exact path"
    assert kernel_torch_int8.prepare(rtn_weight(w, 8, 32, sym)) is None, "grouped 8-bit: not this kernel"
