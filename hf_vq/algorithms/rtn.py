"""Round-to-nearest: the calibration-free baseline."""

from __future__ import annotations

import torch

from hf_vq.formats.affine import AffineWeight, group_index, quantize_groups


@torch.no_grad()
def rtn_weight(w: torch.Tensor, bits: int, group_size: int, sym: bool, clip_search: bool = False) -> AffineWeight:
    """Round-to-nearest quantization of a [N, K] weight."""
    codes, scales, zeros = quantize_groups(w.float(), bits, group_size, sym, clip_search)
    return AffineWeight(codes, scales, zeros, group_index(w.shape[1], group_size, w.device), bits, group_size, sym)
