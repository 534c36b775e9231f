"""Affine integer grids: w ~= scale * (q - zero), q in [0, 2^bits - 1].

Pure tensor functions. Groups run along the input dimension (columns of a [out, in] weight); a group size that does
not divide the input dimension leaves a shorter last group.
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.float16  # scales are stored in fp16; grids are computed so that they are exact in fp16
FP16_MIN_SCALE = 2.0**-14  # smallest normal fp16: below it a stored scale would lose precision


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


def group_index(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """g_idx: the group of each input column (int32)."""
    cols = torch.arange(in_features, device=device, dtype=torch.int32)
    return torch.zeros_like(cols) if group_size == -1 else cols // group_size


def grid_params(w: torch.Tensor, bits: int, sym: bool, clip: torch.Tensor | float = 1.0):
    """Scale and integer zero per row of ``w`` [rows, cols] from its (clipped) range.

    The range always contains 0 (so zero padding and exact zeros stay exact). ``clip`` shrinks the range (a scalar or a
    per-row tensor). Scales are rounded to fp16 so the stored grid is the grid used for rounding.
    """
    maxq = 2**bits - 1
    wmin = w.amin(dim=1).clamp(max=0) * clip
    wmax = w.amax(dim=1).clamp(min=0) * clip
    if sym:
        amax = torch.maximum(wmin.abs(), wmax)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        scale = (wmax - wmin) / maxq
        zero = None
    scale = _round_up_to_storage(scale.clamp(min=1e-4))
    if zero is None:
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    return scale, zero


def _round_up_to_storage(scale: torch.Tensor) -> torch.Tensor:
    """Round scales up to the next fp16 value, so the stored grid still covers the whole range."""
    s16 = scale.to(SCALE_DTYPE)
    up = torch.nextafter(s16, torch.tensor(float("inf"), dtype=SCALE_DTYPE, device=s16.device))
    return torch.where(s16.float() < scale, up, s16).float()


def fp16_up(scale: torch.Tensor) -> torch.Tensor:
    """Scales rounded up to fp16-representable values, at least the smallest normal fp16."""
    return _round_up_to_storage(scale.clamp(min=FP16_MIN_SCALE))


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes for ``w`` [rows, cols] with per-row ``scale``/``zero`` [rows] (or broadcastable)."""
    maxq = 2**bits - 1
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return scale * (q - zero)


def search_clip(w: torch.Tensor, bits: int, sym: bool, grid: int = 40, min_ratio: float = 0.5, norm: float = 2.4):
    """Per-row range shrink factor minimising sum |w - Q(w)|^norm (the GPTQ reference 'mse' grid search)."""
    best = torch.full((w.shape[0],), float("inf"), device=w.device)
    best_clip = torch.ones(w.shape[0], device=w.device)
    for i in range(grid + 1):
        ratio = 1.0 - (1.0 - min_ratio) * i / grid
        scale, zero = grid_params(w, bits, sym, ratio)
        err = (dequantize(quantize(w, scale, zero, bits), scale, zero) - w).abs().pow(norm).sum(1)
        better = err < best
        best = torch.where(better, err, best)
        best_clip = torch.where(better, torch.full_like(best_clip, ratio), best_clip)
    return best_clip


def quantize_groups(w: torch.Tensor, bits: int, group_size: int, sym: bool, clip_search: bool = False):
    """Round-to-nearest over groups of columns. Returns (codes [N, K] float, scales [N, G], zeros [N, G])."""
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    codes = torch.empty_like(w)
    scales, zeros = [], []
    for start in range(0, k, gs):
        block = w[:, start:start + gs]
        clip = search_clip(block, bits, sym) if clip_search else 1.0
        scale, zero = grid_params(block, bits, sym, clip)
        codes[:, start:start + gs] = quantize(block, scale, zero, bits)
        scales.append(scale)
        zeros.append(zero)
    return codes, torch.stack(scales, 1), torch.stack(zeros, 1)


def is_standard_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    """True when group g holds columns [g*gs, (g+1)*gs): the layout every hf_vq algorithm writes."""
    return bool(torch.equal(g_idx.long(), group_index(g_idx.numel(), group_size, g_idx.device).long()))


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                      dtype: torch.dtype = torch.float32, group_size: int | None = None) -> torch.Tensor:
    """Weight [N, K] from codes [N, K], per-group scales/zeros [N, G] and g_idx [K].

    With ``group_size`` (and the standard contiguous g_idx) groups are broadcast instead of gathered: several times
    faster, same values.
    """
    s = scales.to(torch.float32)
    zs = zeros.to(torch.float32) * s  # w = q*s - z*s
    q = codes.to(torch.float32)
    n, k = q.shape
    if group_size is not None and (group_size == -1 or is_standard_g_idx(g_idx, group_size)):
        gs = k if group_size == -1 else group_size
        full = (k // gs) * gs
        out = torch.empty(n, k, dtype=torch.float32, device=q.device)
        if full:
            g_full = full // gs
            torch.addcmul(-zs[:, :g_full, None], q[:, :full].view(n, g_full, gs), s[:, :g_full, None],
                          out=out[:, :full].view(n, g_full, gs))
        if full < k:
            torch.addcmul(-zs[:, -1:], q[:, full:], s[:, -1:], out=out[:, full:])
        return out.to(dtype)
    g = g_idx.long()
    return torch.addcmul(-zs.index_select(1, g), q, s.index_select(1, g)).to(dtype)


class AffineWeight:
    """A weight quantized on an affine integer grid: codes [N, K], fp16 scales and integer zeros [N, G], g_idx [K]."""

    def __init__(self, codes, scales, zeros, g_idx, bits: int, group_size: int, sym: bool):
        self.codes = codes.to(torch.uint8)
        self.scales = scales.to(SCALE_DTYPE)
        self.zeros = zeros.to(torch.uint8)
        self.g_idx = g_idx.to(torch.int32)
        self.bits, self.group_size, self.sym = bits, group_size, sym

    @property
    def shape(self):
        return tuple(self.codes.shape)

    def split_rows(self, sizes: list[int]) -> list["AffineWeight"]:
        """Row blocks of a weight quantized as one (layers that share an input share the GPTQ problem)."""
        parts = zip(self.codes.split(sizes), self.scales.split(sizes), self.zeros.split(sizes))
        return [AffineWeight(c, s, z, self.g_idx, self.bits, self.group_size, self.sym) for c, s, z in parts]

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_groups(self.codes, self.scales, self.zeros, self.g_idx, dtype, self.group_size)

