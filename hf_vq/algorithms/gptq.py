"""GPTQ (Frantar et al., 2022): quantize a weight column by column, feeding each column's rounding error back onto
the columns not yet quantized through the inverse Hessian. Lazy batch updates over blocks of columns.

With ``act_order`` columns are visited by decreasing Hessian diagonal, while groups stay defined on the original
column order ("static groups"), so act_order and grouping combine and inference needs no permutation.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_vq.algorithms.hessian import inverse_cholesky_upper, prepare_hessian
from hf_vq.utils.cbuild import CLibrary
from hf_vq.formats.affine import AffineWeight, grid_params, group_index, num_groups, search_clip


@dataclass(frozen=True)
class GPTQFactor:
    """What GPTQ derives from a Hessian alone: the act_order column order (None without act_order) and the upper
    Cholesky factor of the damped inverse Hessian in that order. Computed once, it serves every weight and setting
    quantized against that Hessian with the same percdamp and act_order."""

    perm: torch.Tensor | None
    hinv: torch.Tensor


@torch.no_grad()
def gptq_factor(hessian: torch.Tensor, percdamp: float = 0.01, act_order: bool = True) -> GPTQFactor:
    _, h = prepare_hessian(hessian.new_zeros(0, hessian.shape[0], dtype=torch.float32), hessian.to(torch.float32))
    return _factor(h, percdamp, act_order)


def _factor(h: torch.Tensor, percdamp: float, act_order: bool) -> GPTQFactor:
    """gptq_factor of a Hessian prepare_hessian has already seen."""
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    if perm is not None:
        h = h[perm][:, perm]
    hinv, _ = inverse_cholesky_upper(h, percdamp)
    return GPTQFactor(perm, hinv.contiguous())


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int = 128, sym: bool = False,
                  percdamp: float = 0.01, act_order: bool = True, block_size: int = 128,
                  clip_search: bool = False, use_kernel: bool = True,
                  grid: tuple[torch.Tensor, torch.Tensor] | None = None,
                  factor: GPTQFactor | None = None) -> AffineWeight:
    """``grid``: fixed (scales, zeros) [N, G] to round onto (e.g. an LPBQ grid, whose scales are int x per-channel
    and cannot come from GPTQ's per-group min-max); None: each group's min-max grid, as GPTQ sets it.
    ``factor``: gptq_factor(hessian, percdamp, act_order), shared by calls on one Hessian (the same codes as
    without it, the factorization done once)."""
    if factor is not None and (factor.perm is not None) != act_order:
        raise ValueError(f"factor was computed with act_order={factor.perm is not None}, this call has {act_order}")
    w, h = prepare_hessian(weight.detach().to(torch.float32), hessian.to(torch.float32))
    w = w.clone()
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    n_groups = num_groups(k, group_size)
    scales = torch.zeros(n, n_groups, device=w.device)
    zeros = torch.zeros(n, n_groups, device=w.device)
    if grid is not None:
        if clip_search:
            raise ValueError("clip_search picks each group's grid; it cannot apply with a fixed grid")
        if tuple(grid[0].shape) != (n, n_groups) or tuple(grid[1].shape) != (n, n_groups):
            raise ValueError(f"grid shapes {tuple(grid[0].shape)}, {tuple(grid[1].shape)} do not match a {n}x{k} "
                             f"weight in groups of {gs} ({n}x{n_groups})")
        scales.copy_(grid[0])
        zeros.copy_(grid[1])

    def set_group(g: int, cols: torch.Tensor) -> None:
        if grid is not None:
            return
        clip = search_clip(cols, bits, sym) if clip_search else 1.0
        scales[:, g], zeros[:, g] = grid_params(cols, bits, sym, clip)

    if factor is None:
        factor = _factor(h, percdamp, act_order)
    perm, hinv = factor.perm, factor.hinv
    if act_order:
        for g in range(n_groups):
            set_group(g, w[:, g * gs:(g + 1) * gs])
        w = w[:, perm]
        col_group = (perm // gs).tolist()
    else:
        col_group = [c // gs for c in range(k)]

    maxq = 2**bits - 1
    col_group_t = torch.tensor(col_group, device=w.device)
    codes_t = torch.zeros(k, n, device=w.device)
    lib = LIBRARY.load() if use_kernel and w.device.type == "cpu" else None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        # rows of the transposed block are contiguous columns of W: cheap per-column ops in the inner loop
        w1 = w[:, i1:i2].T.contiguous()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        s1 = scales[:, col_group_t[i1:i2]].T.contiguous()
        z1 = zeros[:, col_group_t[i1:i2]].T.contiguous()

        def new_group(i):
            # dynamic groups: grid from the already error-corrected columns of this group
            set_group((i1 + i) // gs, torch.cat((w1[i:].T, w[:, i2:]), 1)[:, :gs])
            s1[i:] = scales[:, col_group_t[i1 + i:i2]].T
            z1[i:] = zeros[:, col_group_t[i1 + i:i2]].T

        if lib is not None:
            # C loop between group starts; the rest of the block takes the segment's errors as one matrix update
            cuts = [i for i in range(i2 - i1) if i == 0 or (not act_order and (i1 + i) % gs == 0)] + [i2 - i1]
            for a, b in zip(cuts, cuts[1:]):
                if not act_order and (i1 + a) % gs == 0:
                    new_group(a)
                lib.gptq_block(w1[a:].data_ptr(), hinv1[a:, a:].data_ptr(), hinv.stride(0), s1[a:].data_ptr(),
                               z1[a:].data_ptr(), b - a, n, float(maxq), codes_t[i1 + a:].data_ptr(),
                               err1[a:].data_ptr(), torch.get_num_threads())
                if b < i2 - i1:
                    w1[b:].addmm_(hinv1[a:b, b:].T, err1[a:b], alpha=-1)
        else:
            diag = torch.diag(hinv1).tolist()
            for i in range(i2 - i1):
                if not act_order and (i1 + i) % gs == 0:
                    new_group(i)
                wi, si, zi = w1[i], s1[i], z1[i]
                q = torch.round(wi / si).add_(zi).clamp_(0, maxq)
                codes_t[i1 + i] = q
                e = wi.sub((q - zi).mul_(si)).div_(diag[i])
                if i + 1 < i2 - i1:
                    w1[i + 1:].addr_(hinv1[i, i + 1:], e, alpha=-1)
                err1[i] = e
        w[:, i2:].addmm_(err1.T, hinv[i1:i2, i2:], alpha=-1)
    codes = codes_t.T

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return AffineWeight(codes, scales, zeros, group_index(k, group_size, w.device), bits, group_size, sym)


def _bind(lib):
    lib.gptq_block.restype = None
    lib.gptq_block.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_int, ctypes.c_long, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_int]
    return lib


# The per-column loop is Python-overhead bound (a few small ops per column); the C version runs it in one call per
# block. Without a compiler the torch loop above runs instead (same math).
LIBRARY = CLibrary(Path(__file__).with_name("csrc") / "gptq_block.c", _bind, "GPTQ block kernel")
