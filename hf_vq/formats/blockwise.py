"""AIMET-compatible weight grids: per-tensor, per-channel, blockwise and LPBQ (pure tensor math).

Conventions (aimet-torch 2.42.0, shared docs/aimet-reference.md sections 2-4, 6):

- Grid ("exported" convention of the 0.6.1 / 1.0.0 encodings): ``x = (q + offset) * scale`` with unsigned codes
  ``q`` in [0, 2^bw - 1] and ``offset`` = -(zero point) <= 0. A signed symmetric grid has ``offset = -2^(bw-1)``.
  hf_vq's affine grid ``w = scale * (q - zero)`` is the same grid with ``offset = -zero``.
- ``block_size`` has one entry per weight dimension (right-aligned; missing leading entries mean the whole
  dimension); -1 means the whole dimension; the encoding has shape ``weight.shape[d] // block_size[d]`` and every
  block size must divide its dimension (AIMET raises; we raise ValueError). An int applies to the input-channel dim
  (dim 1 of a Linear weight [out, in]); the output dim gets 1, other dims -1.
- Min-max grids: the range always contains 0. Symmetric: ``delta = max(max/floor(N/2), -min/ceil(N/2))`` with
  ``N = 2^bw - 1``; asymmetric: ``scale = (max - min)/N``, ``offset = round(min/scale)`` clamped to [-N, 0].
- LPBQ (``GroupedBlockQuantizeDequantize``): raw block scales -> ``per_channel = max(raw over group) /
  2^(dbw - bw)``; ``int = clamp(round(raw / per_channel), 1, 2^(dbw - bw))``; effective block scale = int *
  per_channel (fp32). Rounding to nearest (torch.round, half to even).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

# Smallest scale we emit (AIMET clamps too; its exact floor is not documented, so this is hf_vq's choice).
MIN_SCALE = float(torch.finfo(torch.float32).eps)


# ----------------------------------------------------------------------------------------------- block layout
def canonical_block_size(weight_shape: Sequence[int], block_size: int | Sequence[int] | None) -> tuple[int, ...]:
    """Resolve ``block_size`` against ``weight_shape``: explicit sizes per dim (no -1), divisibility checked.

    None means per-tensor. "per_channel" means one encoding per output channel (dim 0).
    """
    shape = tuple(int(s) for s in weight_shape)
    nd = len(shape)
    if block_size is None:
        bs = [-1] * nd
    elif block_size == "per_channel":
        bs = [1] + [-1] * (nd - 1)
    elif isinstance(block_size, int):
        if nd < 2:
            raise ValueError(f"an int block_size needs a weight with >= 2 dims, got shape {list(shape)}")
        bs = [1, block_size] + [-1] * (nd - 2)
    else:
        bs = [int(b) for b in block_size]
        if len(bs) > nd:
            raise ValueError(f"block_size {bs} has more entries than the weight has dims ({list(shape)})")
        bs = [-1] * (nd - len(bs)) + bs
    out = []
    for d, (n, b) in enumerate(zip(shape, bs)):
        b = n if b == -1 else b
        if b < 1:
            raise ValueError(f"block_size entries must be -1 or >= 1, got {bs}")
        if n % b:
            raise ValueError(f"block size {b} does not divide dimension {d} of the weight (size {n}, shape "
                             f"{list(shape)}); AIMET requires equal blocks")
        out.append(b)
    return tuple(out)


def encoding_shape(weight_shape: Sequence[int], block_size) -> tuple[int, ...]:
    bs = canonical_block_size(weight_shape, block_size)
    return tuple(n // b for n, b in zip(weight_shape, bs))


def expand_blocks(enc: torch.Tensor, weight_shape: Sequence[int], block_size) -> torch.Tensor:
    """Broadcast an encoding tensor (scale or offset) of the encoding shape to the full weight shape."""
    bs = canonical_block_size(weight_shape, block_size)
    expected = tuple(n // b for n, b in zip(weight_shape, bs))
    enc = torch.as_tensor(enc)
    if tuple(enc.shape) != expected:
        enc = enc.reshape(expected) if enc.numel() == math.prod(expected) else enc
    if tuple(enc.shape) != expected:
        raise ValueError(f"encoding shape {list(enc.shape)} does not match weight {list(weight_shape)} with "
                         f"block_size {list(bs)} (expected {list(expected)})")
    for d, b in enumerate(bs):
        if b > 1:
            enc = enc.repeat_interleave(b, dim=d)
    return enc


def block_reduce(w: torch.Tensor, block_size, fn) -> torch.Tensor:
    """Reduce ``w`` over each block with ``fn(x, dim)`` (e.g. torch.amin): result has the encoding shape."""
    bs = canonical_block_size(w.shape, block_size)
    split = []
    for n, b in zip(w.shape, bs):
        split += [n // b, b]
    x = w.reshape(split)
    return fn(x, dim=tuple(range(1, 2 * len(bs), 2)))


# ---------------------------------------------------------------------------------------------- min-max grids
def minmax_grid(w: torch.Tensor, bits: int, symmetric: bool, block_size=None):
    """AIMET min-max (QuantScheme.min_max) scale and exported offset per block; both of the encoding shape."""
    if bits < 2:
        raise ValueError(f"bits must be >= 2, got {bits}")
    w = w.float()
    wmin = block_reduce(w, block_size, torch.amin).clamp(max=0)
    wmax = block_reduce(w, block_size, torch.amax).clamp(min=0)
    n = 2**bits - 1
    if symmetric:
        scale = torch.maximum(wmax / (n // 2), -wmin / ((n + 1) // 2)).clamp(min=MIN_SCALE)
        offset = torch.full_like(scale, -(2 ** (bits - 1)))
    else:
        scale = ((wmax - wmin) / n).clamp(min=MIN_SCALE)
        offset = torch.round(wmin / scale).clamp(-n, 0)
    return scale, offset


def quantize(w: torch.Tensor, scale, offset, bits: int, block_size=None) -> torch.Tensor:
    """Unsigned codes ``clamp(round(w/scale) - offset, 0, 2^bits - 1)`` (float tensor of integers)."""
    s = expand_blocks(torch.as_tensor(scale, dtype=torch.float32), w.shape, block_size)
    o = expand_blocks(torch.as_tensor(offset, dtype=torch.float32), w.shape, block_size)
    return torch.clamp(torch.round(w.float() / s) - o, 0, 2**bits - 1)


def dequantize(codes: torch.Tensor, scale, offset, block_size=None) -> torch.Tensor:
    s = expand_blocks(torch.as_tensor(scale, dtype=torch.float32), codes.shape, block_size)
    o = expand_blocks(torch.as_tensor(offset, dtype=torch.float32), codes.shape, block_size)
    return (codes.float() + o) * s


def quantize_dequantize(w: torch.Tensor, scale, offset, bits: int, block_size=None) -> torch.Tensor:
    return dequantize(quantize(w, scale, offset, bits, block_size), scale, offset, block_size)


# ------------------------------------------------------------------------------------------------------- LPBQ
def _grouped(x: torch.Tensor, block_grouping: int) -> torch.Tensor:
    """[C, nb] -> [C, ng, g] along the block dim (-1: one group per row)."""
    c, nb = x.shape
    g = nb if block_grouping == -1 else int(block_grouping)
    if g < 1 or nb % g:
        raise ValueError(f"block_grouping {block_grouping} does not divide the {nb} blocks per channel")
    return x.reshape(c, nb // g, g)


def lpbq_scales(block_scale: torch.Tensor, bits: int, decompressed_bw: int, block_grouping: int = -1):
    """AIMET LPBQ split of raw block scales [C, nb] -> (per-group float scale [C, ng], int scales [C, nb])."""
    if decompressed_bw < bits:
        raise ValueError(f"decompressed_bw ({decompressed_bw}) must be >= bits ({bits})")
    levels = 2 ** (decompressed_bw - bits)
    raw = _grouped(block_scale.float(), block_grouping)
    pc = raw.amax(-1) / levels
    ints = torch.clamp(torch.round(raw / pc[..., None]), 1, levels)
    return pc, ints.reshape(block_scale.shape)


def lpbq_effective_scale(per_channel_scale: torch.Tensor, int_scale: torch.Tensor) -> torch.Tensor:
    """Block scales [C, nb] = int * per-group scale, in fp32 like AIMET."""
    ints = torch.as_tensor(int_scale, dtype=torch.float32)
    pc = torch.as_tensor(per_channel_scale, dtype=torch.float32).reshape(ints.shape[0], -1)
    g = ints.shape[1] // pc.shape[1]
    return (ints.reshape(ints.shape[0], pc.shape[1], g) * pc[..., None]).reshape(ints.shape)


def lpbq_grid(w: torch.Tensor, bits: int, block_size: int, decompressed_bw: int, block_grouping: int = -1):
    """AIMET LPBQ on a [out, in] weight: (per-group scale, int scales [C, nb], effective block scale, offset)."""
    raw, _ = minmax_grid(w, bits, True, (1, block_size))
    pc, ints = lpbq_scales(raw, bits, decompressed_bw, block_grouping)
    scale = lpbq_effective_scale(pc, ints)
    return pc, ints, scale, torch.full_like(scale, -(2 ** (bits - 1)))


def factor_lpbq(block_scale: torch.Tensor, bits: int, decompressed_bw: int):
    """Exact LPBQ factoring of given block scales [C, nb] (one group per row), or None if there is none.

    Uses AIMET's choice ``per_channel = max(row) / 2^(dbw - bw)`` and requires integers in [1, 2^(dbw - bw)] whose
    fp32 product with per_channel reproduces every scale exactly.
    """
    if decompressed_bw <= bits:
        return None
    levels = 2 ** (decompressed_bw - bits)
    s = block_scale.float()
    pc = s.amax(1) / levels
    if not bool((pc > 0).all()):
        return None
    r = torch.round(s / pc[:, None])  # the quotient itself may be off by an ulp; the product must be exact
    if float(r.min()) < 1 or float(r.max()) > levels:
        return None
    if not bool((lpbq_effective_scale(pc, r) == s).all()):
        return None
    return pc, r


def _fp16_exact_per_channel(pc: torch.Tensor, int_bits: int) -> torch.Tensor:
    """Round ``pc`` up so every int*pc (int < 2^int_bits + 1) is exact in fp16: <= 11 - int_bits significant bits
    and a multiple of 2^-24 (fp16 subnormal step)."""
    keep = 11 - int_bits
    if keep < 1:
        raise ValueError(f"decompressed_bw - bits = {int_bits} leaves no fp16 mantissa for the per-channel scale")
    m, e = torch.frexp(pc.clamp(min=2.0**-24))
    pc = torch.ldexp(torch.ceil(m * 2**keep) / 2**keep, e)
    return torch.ceil(pc * 2**24) / 2**24


def lpbq_affine_weight(w: torch.Tensor, bits: int, block_size: int, decompressed_bw: int = 8):
    """RTN LPBQ quantization of a [out, in] weight stored as an hf_vq AffineWeight (sym, group_size=block_size).

    Same algorithm as AIMET except that the per-channel scale is rounded up to at most 11 - (dbw - bw) significant
    bits (relative change <= 2^-(10 - (dbw - bw))) so that every block scale int*pc is exact in fp16 (QuantLinear
    stores fp16 scales). Such a layer exports as an exact LPBQ encoding.
    """
    from hf_vq.formats.affine import AffineWeight, group_index

    w = w.detach().float()
    canonical_block_size(w.shape, (1, block_size))
    raw, _ = minmax_grid(w, bits, True, (1, block_size))
    if decompressed_bw < bits:
        raise ValueError(f"decompressed_bw ({decompressed_bw}) must be >= bits ({bits})")
    levels = 2 ** (decompressed_bw - bits)
    pc = _fp16_exact_per_channel(raw.amax(1) / levels, decompressed_bw - bits)
    ints = torch.clamp(torch.round(raw / pc[:, None]), 1, levels)
    scale = ints * pc[:, None]
    if not bool((scale.half().float() == scale).all()):
        raise ValueError("LPBQ block scales are out of fp16 range for this weight")
    zero = 2 ** (bits - 1)
    codes = quantize(w, scale, torch.full_like(scale, -zero), bits, (1, block_size))
    return AffineWeight(codes, scale, torch.full_like(scale, zero), group_index(w.shape[1], block_size, w.device),
                        bits, block_size, True)


# ------------------------------------------------------------------------------ hf_vq groups <-> AIMET blocks
def blocks_from_groups(scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor):
    """hf_vq per-group grid (scales/zeros [C, G], g_idx [K]) -> equal AIMET blocks, exactly.

    The block size is the largest divisor of K at which every group boundary lies (gcd of K and the boundary
    columns), so groups that do not divide K (a shorter last group) or a permuted g_idx become smaller blocks with
    repeated scales. Returns (block_size, scale [C, nb] fp32, offset [C, nb] int64).
    """
    g = g_idx.long().cpu()
    k = g.numel()
    changes = (torch.nonzero(g[1:] != g[:-1]).flatten() + 1).tolist()
    b = k
    for c in changes:
        b = math.gcd(b, c)
    first = g[::b]
    return b, scales.float()[:, first], -zeros.long()[:, first]


def groups_from_blocks(block_scale: torch.Tensor, block_offset: torch.Tensor, g_idx: torch.Tensor, n_groups: int):
    """AIMET blocks [C, nb] -> hf_vq per-group (scale, offset) [C, G]; ValueError when a group's blocks disagree."""
    k = g_idx.numel()
    c, nb = block_scale.shape
    if k % nb:
        raise ValueError(f"{nb} blocks per channel do not divide the {k} input columns")
    col_s = block_scale.repeat_interleave(k // nb, dim=1)
    col_o = block_offset.repeat_interleave(k // nb, dim=1)
    g = g_idx.long().cpu()
    first_col = torch.full((n_groups,), -1, dtype=torch.long)
    first_col.scatter_reduce_(0, g, torch.arange(k), reduce="amin", include_self=False)
    if bool((first_col < 0).any()):
        raise ValueError("g_idx leaves a group without columns")
    gs, go = col_s[:, first_col], col_o[:, first_col]
    bad = (col_s != gs[:, g]) | (col_o != go[:, g])
    if bool(bad.any()):
        col = int(torch.nonzero(bad.any(0))[0])
        raise ValueError(f"encoding blocks of {k // nb} columns do not fit the layer's groups: the blocks inside "
                         f"group {int(g[col])} (column {col}) have different scales/offsets")
    return gs, go
