"""AIMET-style grids (hf_vq.formats.blockwise): hand-computed cases and conventions checked on AIMET's own files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_vq.formats import blockwise as bw

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "aimet-encodings"  # shared/ beside the checkout


def _ref(name):
    return json.loads((REF / name).read_text())


def _params(name):
    return {e["name"]: e for e in _ref(name)["param_encodings"]}


# ------------------------------------------------------------------------------------------------ block_size rules
def test_block_size_rules():
    # the doc's example: Linear(64 -> 128), block 16 -> quantizer shape (128, 4), block_size [1, 16]
    assert bw.canonical_block_size((128, 64), 16) == (1, 16)
    assert bw.encoding_shape((128, 64), 16) == (128, 4)
    assert bw.canonical_block_size((128, 64), None) == (128, 64)          # per-tensor
    assert bw.canonical_block_size((128, 64), "per_channel") == (1, 64)
    assert bw.canonical_block_size((128, 64), [1, -1]) == (1, 64)
    assert bw.canonical_block_size((8, 128, 64), [1, 16]) == (8, 1, 16)   # right-aligned, missing dims whole
    assert bw.canonical_block_size((8, 6, 4, 4), 3) == (1, 3, 4, 4)       # conv: int goes to in-channels
    with pytest.raises(ValueError, match="block size 24 does not divide dimension 1 .*size 64"):
        bw.canonical_block_size((128, 64), 24)
    with pytest.raises(ValueError, match="does not divide dimension 0"):
        bw.canonical_block_size((10, 64), [4, 16])
    with pytest.raises(ValueError, match="more entries"):
        bw.canonical_block_size((10,), [1, 2])
    with pytest.raises(ValueError, match="-1 or >= 1"):
        bw.canonical_block_size((10, 4), [0, 4])


def test_expand_and_reduce_blocks():
    w = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    mx = bw.block_reduce(w, [2, 3], torch.amax)
    assert mx.tolist() == [[8.0, 11.0], [20.0, 23.0]]
    full = bw.expand_blocks(mx, w.shape, [2, 3])
    assert full.shape == (4, 6) and full[1, 2] == 8 and full[2, 3] == 23
    assert torch.equal(bw.expand_blocks(mx.flatten(), w.shape, [2, 3]), full)   # flat lists are accepted
    with pytest.raises(ValueError, match="encoding shape"):
        bw.expand_blocks(torch.zeros(3), w.shape, [2, 3])


# -------------------------------------------------------------------------------------------------- min-max grids
def test_symmetric_minmax_hand_case():
    w = torch.tensor([[-0.8, 0.35, 0.13, 1.4]])
    scale, offset = bw.minmax_grid(w, 4, True)            # per-tensor
    # delta = max(1.4/7, 0.8/8) = 0.2; signed 4-bit grid -> exported offset -8
    assert scale.shape == (1, 1) and scale.item() == pytest.approx(0.2, rel=1e-6) and offset.item() == -8
    q = bw.quantize(w, scale, offset, 4)
    assert q.tolist() == [[4.0, 10.0, 9.0, 15.0]]          # round(w/0.2) + 8
    assert torch.allclose(bw.dequantize(q, scale, offset), torch.tensor([[-0.8, 0.4, 0.2, 1.4]]))


def test_asymmetric_minmax_hand_case():
    w = torch.tensor([[-0.5, 1.0, 0.2], [0.3, 0.9, 0.6]])
    scale, offset = bw.minmax_grid(w, 2, False, "per_channel")
    # row 0: (1.0 + 0.5) / 3 = 0.5, offset round(-0.5/0.5) = -1; row 1: min clamped to 0 -> 0.3, offset 0
    assert scale.flatten().tolist() == pytest.approx([0.5, 0.3])
    assert offset.flatten().tolist() == [-1.0, 0.0]
    q = bw.quantize(w, scale, offset, 2, "per_channel")
    assert q.tolist() == [[0.0, 3.0, 1.0], [1.0, 3.0, 2.0]]
    qdq = bw.quantize_dequantize(w, scale, offset, 2, "per_channel")
    assert torch.allclose(qdq, torch.tensor([[-0.5, 1.0, 0.0], [0.3, 0.9, 0.6]]))


def test_blockwise_qdq_error_bound():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    scale, offset = bw.minmax_grid(w, 4, True, 16)
    assert scale.shape == (32, 4) and bool((offset == -8).all())
    err = (bw.quantize_dequantize(w, scale, offset, 4, 16) - w).abs()
    # min-max ranges cover every value, so the error is at most half a step
    assert bool((err <= bw.expand_blocks(scale, w.shape, 16) / 2 * (1 + 1e-6)).all())
    with pytest.raises(ValueError, match="bits must be >= 2"):
        bw.minmax_grid(w, 1, True)


def test_minmax_matches_aimet_reference_conventions():
    doc = _ref("mlp_w8a8_per-channel_v0.6.1.encodings")
    # activation "input": asymmetric 8-bit from min/max -> scale (max-min)/255, exported offset round(min/scale)
    a = doc["activation_encodings"]["input"][0]
    scale, offset = bw.minmax_grid(torch.tensor([[a["min"], a["max"]]]), 8, False)
    assert scale.item() == pytest.approx(a["scale"], rel=1e-6) and offset.item() == a["offset"] == -135
    # symmetric 8-bit weights: offset -128, min = -128 * scale, max = 127 * scale
    for entries in doc["param_encodings"].values():
        for d in entries:
            assert d["offset"] == -128 and d["is_symmetric"] == "True"
            assert d["min"] == pytest.approx(-128 * d["scale"], rel=1e-6)
            assert d["max"] == pytest.approx(127 * d["scale"], rel=1e-6)
            s, o = bw.minmax_grid(torch.tensor([[d["min"], d["max"]]]), 8, True)
            assert s.item() == pytest.approx(d["scale"], rel=1e-6) and o.item() == -128


# ----------------------------------------------------------------------------------------------------------- LPBQ
def test_lpbq_scales_hand_case():
    raw = torch.tensor([[0.16, 0.0049, 0.0951, 0.0]])
    pc, ints = bw.lpbq_scales(raw, 4, 8)
    # per-channel = 0.16 / 2^(8-4) = 0.01; ints = clamp(round(raw/0.01), 1, 16)
    assert pc.flatten().tolist() == pytest.approx([0.01])
    assert ints.tolist() == [[16.0, 1.0, 10.0, 1.0]]
    eff = bw.lpbq_effective_scale(pc, ints)
    assert eff.flatten().tolist() == pytest.approx([0.16, 0.01, 0.1, 0.01])
    # block_grouping=2: one float scale per pair of blocks
    pc2, ints2 = bw.lpbq_scales(torch.tensor([[0.16, 0.08, 0.04, 0.02]]), 4, 8, block_grouping=2)
    assert pc2.flatten().tolist() == pytest.approx([0.01, 0.0025]) and ints2.tolist() == [[16.0, 8.0, 16.0, 8.0]]
    with pytest.raises(ValueError, match="decompressed_bw"):
        bw.lpbq_scales(raw, 4, 3)
    with pytest.raises(ValueError, match="block_grouping 3"):
        bw.lpbq_scales(raw, 4, 8, block_grouping=3)


def test_lpbq_matches_aimet_files():
    """The PER_BLOCK and LPBQ MLP files come from the same seeded weights: AIMET's LPBQ equals our lpbq_scales of
    its own raw block scales, bit for bit (fp32)."""
    per_block = _params("mlp_w4a8_per-block-bs16_v1.0.0.encodings")
    lpbq = _params("mlp_w4a8_lpbq-bs16-dbw8_v1.0.0.encodings")
    for name, e in lpbq.items():
        assert (e["enc_type"], e["bw"], e["compressed_bw"], e["block_size"]) == ("LPBQ", 8, 4, 16)
        c = len(e["scale"])
        raw = torch.tensor(per_block[name]["scale"], dtype=torch.float32).reshape(c, -1)
        pc, ints = bw.lpbq_scales(raw, 4, 8)
        assert torch.equal(pc.flatten(), torch.tensor(e["scale"], dtype=torch.float32))
        assert ints.flatten().long().tolist() == e["per_block_int_scale"]
        assert min(e["per_block_int_scale"]) >= 1 and max(e["per_block_int_scale"]) <= 16
        assert bool((ints.amax(1) == 16).all())
        assert e["offset"] == [-128] * c
    # README cross-check: fc1 row 0, first block: 13 x 0.0011095236 = 0.0144238
    fc1 = lpbq["fc1.weight"]
    eff = bw.lpbq_effective_scale(torch.tensor(fc1["scale"]), torch.tensor(fc1["per_block_int_scale"]).reshape(128, -1))
    assert fc1["per_block_int_scale"][0] == 13 and eff[0, 0].item() == pytest.approx(0.0144238, rel=1e-5)


def test_lpbq_reference_llama_block_major_layout():
    """sim.onnx.export writes Llama Linear weights as transposed MatMul initializers ("<name>.weight_0", [in, out]);
    their per_block_int_scale is then flattened block-major ([n_blocks, C_out]), not channel-major like the MLP's
    Gemm weights: only that reading gives every row an int scale of 16, as AIMET's LPBQ (max/16) must."""
    for e in _ref("tiny-llama_w4a8_lpbq-bs16-dbw8_v1.0.0.encodings")["param_encodings"]:
        if e["enc_type"] != "LPBQ":
            continue
        assert e["name"].endswith(".weight_0")
        c = len(e["scale"])
        flat = torch.tensor(e["per_block_int_scale"])
        ints = flat.reshape(-1, c).T                   # [C, n_blocks]
        assert ints.shape[1] in (4, 8)                 # in_features 64 or 128 / block 16
        assert int(ints.min()) >= 1 and bool((ints.amax(1) == 16).all())
        assert not bool((flat.reshape(c, -1).amax(1) == 16).all())
        assert bw.factor_lpbq(bw.lpbq_effective_scale(torch.tensor(e["scale"]), ints), 4, 8) is not None


def test_lpbq_grid_and_factor():
    torch.manual_seed(1)
    w = torch.randn(24, 64)
    pc, ints, scale, offset = bw.lpbq_grid(w, 4, 16, 8)
    assert pc.shape == (24, 1) and ints.shape == scale.shape == (24, 4) and bool((offset == -8).all())
    f = bw.factor_lpbq(scale, 4, 8)
    assert f is not None and torch.equal(f[0], pc.flatten()) and torch.equal(f[1], ints)
    assert bw.factor_lpbq(torch.rand(24, 4) + 0.1, 4, 8) is None      # arbitrary scales do not factor
    assert bw.factor_lpbq(scale, 8, 8) is None                        # no int levels at decompressed_bw == bits


def test_lpbq_affine_weight_is_fp16_exact_and_close_to_aimet():
    torch.manual_seed(2)
    w = torch.randn(32, 128) * 0.05
    aw = bw.lpbq_affine_weight(w, 4, 32, 8)
    assert aw.group_size == 32 and aw.sym and bool((aw.zeros == 8).all())
    s = aw.scales.float()
    f = bw.factor_lpbq(s, 4, 8)
    assert f is not None and bool((f[1].amax(1) == 16).all())
    ref_pc, ref_ints, ref_scale, _ = bw.lpbq_grid(w, 4, 32, 8)
    # per-channel scale rounded up to 7 significant bits (relative change < 2^-6); ints may then round one step apart
    assert bool((f[0] >= ref_pc.flatten()).all()) and torch.allclose(f[0], ref_pc.flatten(), rtol=2.0**-6, atol=0)
    assert int((f[1] - ref_ints).abs().max()) <= 1 and float((f[1] != ref_ints).float().mean()) < 0.2
    ref = bw.quantize_dequantize(w, ref_scale, torch.full_like(ref_scale, -8), 4, 32)
    assert (aw.dequantize() - w).pow(2).mean() <= 1.05 * (ref - w).pow(2).mean()
    with pytest.raises(ValueError, match="does not divide"):
        bw.lpbq_affine_weight(w, 4, 48, 8)


# ------------------------------------------------------------------------------------------ hf_vq groups <-> blocks
def test_blocks_from_uneven_groups_are_exact():
    k, gs = 576, 128                                   # SmolLM2 hidden size with group 128: last group has 64
    g_idx = torch.arange(k) // gs
    scales = torch.rand(3, 5) + 0.5
    zeros = torch.randint(0, 16, (3, 5))
    b, bs, bo = bw.blocks_from_groups(scales, zeros, g_idx)
    assert b == 64 and bs.shape == (3, 9)
    assert torch.equal(bw.expand_blocks(bs, (3, k), (1, b)), scales[:, g_idx])
    assert torch.equal(bw.expand_blocks(bo, (3, k), (1, b)), -zeros[:, g_idx])
    gs_back, go_back = bw.groups_from_blocks(bs, bo, g_idx, 5)
    assert torch.equal(gs_back, scales) and torch.equal(go_back, -zeros)
    # per-channel (one group) -> a single block; a permuted g_idx -> blocks at every boundary
    assert bw.blocks_from_groups(scales[:, :1], zeros[:, :1], torch.zeros(k, dtype=torch.int32))[0] == k
    assert bw.blocks_from_groups(scales[:, :2], zeros[:, :2], torch.tensor([0, 0, 1, 1, 1, 0]))[0] == 1


def test_groups_from_blocks_rejects_mixed_group():
    g_idx = torch.arange(64) // 32
    scale = torch.tensor([[1.0, 1.0, 2.0, 3.0]])      # blocks of 16: group 1 holds two different scales
    with pytest.raises(ValueError, match="group 1 .*different scales"):
        bw.groups_from_blocks(scale, torch.zeros(1, 4, dtype=torch.long), g_idx, 2)
