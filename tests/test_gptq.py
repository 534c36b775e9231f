import pytest
import torch

from hf_vq.algorithms.gptq import gptq_quantize
from hf_vq.algorithms.hessian import HessianAccumulator, output_error
from hf_vq.algorithms.rtn import rtn_weight
from hf_vq.formats.affine import dequantize, quantize


def correlated_inputs(k, n_tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    scale = torch.rand(k, generator=g) * 3 + 0.1
    return (torch.randn(n_tokens, k, generator=g) @ mix) * scale


def hessian_of(x):
    acc = HessianAccumulator(x.shape[1])
    for chunk in x.split(300):
        acc.add(chunk)
    return acc.finalize()


def reference_gptq(w, h, bits, scales, zeros, percdamp):
    """Textbook OBS-style GPTQ in float64: explicit inverse Hessian, eliminated one column at a time."""
    w = w.double().clone()
    h = h.double()
    k = w.shape[1]
    hinv = torch.linalg.inv(h + percdamp * torch.diag(h).mean() * torch.eye(k, dtype=torch.float64))
    codes = torch.zeros_like(w)
    for j in range(k):
        s, z = scales[:, j].double(), zeros[:, j].double()
        q = quantize(w[:, j:j + 1], s[:, None], z[:, None], bits)[:, 0]
        codes[:, j] = q
        err = (w[:, j] - dequantize(q[:, None], s[:, None], z[:, None])[:, 0]) / hinv[j, j]
        w[:, j + 1:] -= err[:, None] * hinv[j, j + 1:][None, :]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return codes


def test_accumulated_hessian_matches_direct():
    x = correlated_inputs(16, 1000)
    assert torch.allclose(hessian_of(x), 2 * x.T @ x / 1000, rtol=1e-4, atol=1e-4)


def static_group_grid(w, bits, group_size):
    """The static-group grid of act-order GPTQ (the reference implementation's ``static_groups``), built here from
    the weight alone: each group of ``group_size`` consecutive input columns of the original weight, taken before
    any column is quantized, gets an asymmetric min/max grid whose range includes 0; its scale is stored in fp16,
    rounded up so that the grid still spans the range. Returns per-column (scales, zeros) [N, K] and the per-group
    ones [N, G]."""
    maxq = 2**bits - 1
    scales, zeros = [], []
    for start in range(0, w.shape[1], group_size):
        cols = w[:, start:start + group_size]
        lo, hi = cols.min(dim=1).values.clamp(max=0), cols.max(dim=1).values.clamp(min=0)
        scale = (hi - lo) / maxq
        s16 = scale.half()
        s16 = torch.where(s16.float() < scale, torch.nextafter(s16, torch.tensor(float("inf"), dtype=torch.half)), s16)
        scale = s16.float()
        scales.append(scale)
        zeros.append(torch.round(-lo / scale).clamp(0, maxq))
    g_scales, g_zeros = torch.stack(scales, 1), torch.stack(zeros, 1)
    group = torch.arange(w.shape[1]) // group_size
    return g_scales[:, group], g_zeros[:, group], g_scales, g_zeros


@pytest.mark.parametrize("block_size", [128, 7])
def test_gptq_matches_textbook_reference(block_size):
    k, n, bits, gs = 48, 12, 3, 16
    x = correlated_inputs(k)
    h = hessian_of(x)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    aw = gptq_quantize(w, h, bits, group_size=gs, act_order=True, block_size=block_size)
    # act_order=True with static groups: the grid is fixed up front from the original column groups
    col_scales, col_zeros, g_scales, g_zeros = static_group_grid(w, bits, gs)
    assert torch.equal(aw.g_idx.long(), torch.arange(k) // gs)
    assert torch.equal(aw.scales, g_scales.half()) and torch.equal(aw.zeros.float(), g_zeros)
    # the reference eliminates columns in order of decreasing Hessian diagonal, each on its own group's grid
    perm = torch.argsort(torch.diag(h), descending=True)
    ref = reference_gptq(w[:, perm], h[perm][:, perm], bits, col_scales[:, perm], col_zeros[:, perm], 0.01)
    ours = aw.codes.float()[:, perm]
    mismatch = (ref != ours).float().mean().item()
    assert mismatch < 0.01, f"{mismatch:.3%} of codes differ from the reference"


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,group", [(4, 32), (3, 32), (2, -1), (4, 40)])
def test_gptq_beats_rtn_on_output_error(bits, group, act_order):
    k, n = 100, 24  # 100 columns: group 32 leaves a last group of 4, group 40 one of 20
    x = correlated_inputs(k)
    h = hessian_of(x)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(bits))
    aw = gptq_quantize(w, h, bits, group_size=group, act_order=act_order)
    rtn = rtn_weight(w, bits, group, sym=False)
    e_gptq = output_error(w, aw.dequantize(), h)
    e_rtn = output_error(w, rtn.dequantize(), h)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    assert aw.codes.max() <= 2**bits - 1
    assert aw.scales.shape[1] == (1 if group == -1 else -(-k // group))


def test_dead_inputs_get_zero_weight():
    k, n = 32, 8
    x = correlated_inputs(k)
    x[:, 5] = 0  # an input that is never active
    h = hessian_of(x)
    w = torch.randn(n, k)
    aw = gptq_quantize(w, h, 4, group_size=16)
    w_hat = aw.dequantize()
    assert torch.isfinite(w_hat).all()
    assert torch.allclose(w_hat[:, 5], torch.zeros(n), atol=aw.scales.float().max().item())


def test_sym_grid_zero_is_midpoint():
    x = correlated_inputs(32)
    aw = gptq_quantize(torch.randn(8, 32), hessian_of(x), 4, group_size=16, sym=True)
    assert (aw.zeros == 8).all()


def test_wide_hessian_uses_triangle_and_stays_symmetric():
    x = correlated_inputs(1100, 700)
    h = hessian_of(x)
    assert torch.equal(h, h.T)
    assert torch.allclose(h, 2 * x.T @ x / 700, rtol=1e-4, atol=1e-3)


def test_c_block_kernel_matches_torch_loop():
    """The compiled inner loop gives the same codes as the torch loop (static and dynamic groups, odd shapes)."""
    from hf_vq.algorithms import gptq

    assert gptq.LIBRARY.load() is not None  # cc exists on every machine this suite runs on
    for n, k, gs, act_order, bits in [(96, 200, 64, True, 4), (96, 200, 64, False, 3), (50, 300, -1, False, 4),
                                      (64, 130, 32, False, 2), (40, 576, 128, True, 3)]:
        g = torch.Generator().manual_seed(n + k)
        w = torch.randn(n, k, generator=g)
        x = torch.randn(512, k, generator=g) * torch.rand(k, generator=g) * 3
        h = x.T @ x / 512
        a = gptq_quantize(w, h, bits, gs, act_order=act_order, use_kernel=False)
        b = gptq_quantize(w, h, bits, gs, act_order=act_order, use_kernel=True)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales), (n, k, gs, act_order, bits)


def test_output_error_row_subset_estimates_full_value():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 64, generator=g)
    x = torch.randn(256, 64, generator=g)
    h = x.T @ x / 256
    w_hat = w + 0.05 * torch.randn(1000, 64, generator=g)
    full, est = output_error(w, w_hat, h), output_error(w, w_hat, h, max_rows=128)
    assert est == pytest.approx(full, rel=0.15) and est != full


@pytest.mark.parametrize("k", [40, 1100])  # plain and tiled (upper triangle) accumulation
@pytest.mark.parametrize("weight", [0.0, 1.0, 16.0])
def test_first_token_weight_matches_weighted_sum(k, weight):
    x = torch.randn(3, 24, k, generator=torch.Generator().manual_seed(1))
    acc = HessianAccumulator(k, first_token_weight=weight)
    acc.add(x[:2])
    acc.add(x[2:])
    w = torch.ones(3, 24)
    w[:, 0] = weight
    flat, wf = x.reshape(-1, k).double(), w.reshape(-1, 1).double()
    ref = 2.0 / flat.shape[0] * (flat * wf).T @ flat
    torch.testing.assert_close(acc.finalize().double(), ref, rtol=1e-5, atol=1e-4)
