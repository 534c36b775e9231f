import pytest
import torch

from hf_vq.formats.affine import (AffineWeight, dequantize_groups, grid_params, group_index, num_groups,
                                  quantize_groups)
from hf_vq.formats.packing import pack, packed_length, unpack


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 64, 99])
def test_pack_roundtrip_exact(bits, n):
    codes = torch.randint(0, 2**bits, (5, n), generator=torch.Generator().manual_seed(n))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, packed_length(n, bits))
    assert torch.equal(unpack(packed, bits, n).long(), codes)


def test_pack_4bit_layout_is_low_nibble_first():
    packed = pack(torch.tensor([[1, 2, 15]]), 4)
    assert packed.tolist() == [[1 | (2 << 4), 15]]


def test_pack_3bit_is_dense():
    assert packed_length(8, 3) == 3  # 8 codes x 3 bits = 24 bits


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([[16]]), 4)


def test_groups_with_partial_last_group():
    assert num_groups(576, 128) == 5
    g = group_index(576, 128)
    assert g[511] == 3 and g[512] == 4 and g[-1] == 4
    assert num_groups(576, -1) == 1


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_error_within_half_step(bits, sym):
    w = torch.randn(16, 100, generator=torch.Generator().manual_seed(bits))
    codes, scales, zeros = quantize_groups(w, bits, 32, sym)
    assert scales.shape == (16, 4)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    w_hat = dequantize_groups(codes, scales, zeros, group_index(100, 32))
    step = scales.float()[:, group_index(100, 32).long()]
    # symmetric grids reach -amax but only (2^(b-1)-1)/(2^(b-1)-0.5) * amax on top: still within half a step
    assert ((w - w_hat).abs() <= step / 2 * (1 + 1e-3)).all()


@pytest.mark.parametrize("clip_search", [False, True])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_zero_weights_decode_to_exactly_zero(bits, sym, clip_search):
    """Every grid's range contains 0, so a 0.0 weight (pruned, padding) takes the zero-point as its code and
    decodes to exactly 0.0: after packing, through both dequantize paths, in fp32 and bf16. Rows with only positive
    or only negative weights included (their range is widened to reach 0)."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(24, 100, generator=g) * torch.rand(24, 1, generator=g) * 4
    w[:6] = w[:6].abs() + 0.5
    w[6:12] = -w[6:12].abs() - 0.5
    zero = torch.rand(w.shape, generator=g) < 0.25
    zero[:, 96:] = True  # the whole short last group
    w[zero] = 0.0
    codes, scales, zeros = quantize_groups(w, bits, 32, sym, clip_search)
    q = AffineWeight(codes, scales, zeros, group_index(100, 32), bits, 32, sym)
    cols = q.g_idx.long()
    assert torch.equal(q.codes[zero], q.zeros[:, cols][zero])
    assert (q.zeros[:6] == 0).all() if not sym else (q.zeros == 2 ** (bits - 1)).all()
    unpacked = unpack(pack(q.codes, bits), bits, 100)
    for group_size in (32, None):  # broadcast and gather
        for dtype in (torch.float32, torch.bfloat16):
            w_hat = dequantize_groups(unpacked, q.scales, q.zeros, q.g_idx, dtype, group_size)
            assert (w_hat[zero] == 0).all() and (w_hat[~zero] != 0).any()
    assert (q.dequantize()[zero] == 0).all()


def test_scales_are_exact_in_fp16():
    w = torch.randn(8, 64)
    scale, _ = grid_params(w, 4, sym=False)
    assert torch.equal(scale, scale.half().float())


@pytest.mark.parametrize("k,group", [(100, 32), (96, 96), (128, -1), (64, 16)])
def test_broadcast_dequantize_equals_gather(k, group):
    w = torch.randn(8, k)
    codes, scales, zeros = quantize_groups(w, 4, group, sym=False)
    scales = scales.half()
    g = group_index(k, group)
    fast = dequantize_groups(codes, scales, zeros, g, group_size=group)
    slow = dequantize_groups(codes, scales, zeros, g)
    ref = scales.float()[:, g.long()] * (codes - zeros[:, g.long()])
    assert torch.allclose(fast, slow, atol=1e-6) and torch.allclose(fast, ref, atol=1e-6)
