"""GPTQ (Frantar et al., 2022): quantize a weight column by column, feeding each column's rounding error back onto
the columns not yet quantized through the inverse Hessian. Lazy batch updates over blocks of columns.

With ``act_order`` columns are visited by decreasing Hessian diagonal, while groups stay defined on the original
column order ("static groups"), so act_order and grouping combine and inference needs no permutation.
"""

from __future__ import annotations

import torch

from hf_vq.algorithms.hessian import inverse_cholesky_upper, prepare_hessian
from hf_vq.quant.affine import AffineWeight, dequantize, grid_params, group_index, num_groups, quantize, search_clip


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int = 128, sym: bool = False,
                  percdamp: float = 0.01, act_order: bool = True, block_size: int = 128,
                  clip_search: bool = False) -> AffineWeight:
    w, h = prepare_hessian(weight.detach().to(torch.float32), hessian.to(torch.float32))
    w = w.clone()
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    n_groups = num_groups(k, group_size)
    scales = torch.zeros(n, n_groups, device=w.device)
    zeros = torch.zeros(n, n_groups, device=w.device)

    def set_group(g: int, cols: torch.Tensor) -> None:
        clip = search_clip(cols, bits, sym) if clip_search else 1.0
        scales[:, g], zeros[:, g] = grid_params(cols, bits, sym, clip)

    if act_order:
        for g in range(n_groups):
            set_group(g, w[:, g * gs:(g + 1) * gs])
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
        col_group = (perm // gs).tolist()
    else:
        perm = None
        col_group = [c // gs for c in range(k)]

    hinv, _ = inverse_cholesky_upper(h, percdamp)
    codes = torch.zeros_like(w)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = col_group[col]
            if not act_order and col % gs == 0:
                # dynamic groups: grid from the already error-corrected columns of this group
                set_group(g, torch.cat((w1[:, i:], w[:, i2:]), 1)[:, :gs])
            s, z = scales[:, g:g + 1], zeros[:, g:g + 1]
            q = quantize(w1[:, i:i + 1], s, z, bits)
            codes[:, col] = q[:, 0]
            e = (w1[:, i] - dequantize(q, s, z)[:, 0]) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return AffineWeight(codes, scales, zeros, group_index(k, group_size, w.device), bits, group_size, sym)
