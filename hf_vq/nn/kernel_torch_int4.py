"""The "torch" CPU kernel of affine layers: torch's tinygemm int4 kernel (aten._weight_int4pack_mm_for_cpu) for
2/3/4-bit codes and small batches. It computes in bf16 (fp16 stays fp16): fp32 activations are rounded to bf16,
and its fp32-activation path is 10-100x slower. The packed layout depends on the CPU, so it is built at load,
never saved."""

from __future__ import annotations

import torch

from hf_vq.formats.affine import AffineWeight
from hf_vq.nn.kernel_registry import Kernel, register

KERNEL_GROUPS = (256, 128, 64, 32)


def _kernel_group(in_features: int, group_size: int, g_idx: torch.Tensor) -> int | None:
    gs = in_features if group_size == -1 else group_size
    for g in KERNEL_GROUPS:
        if in_features % g == 0 and gs % g == 0:
            # every kernel group must lie inside one quantization group
            first = g_idx.view(-1, g)
            if bool((first == first[:, :1]).all()):
                return g
    return None


def int4pack_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def int4pack_prepare(codes, scales, zeros, g_idx, group_size, dtype):
    """Repack codes [N, K] (values < 16) for the int4 CPU kernel; None when the shape is unsupported."""
    n, k = codes.shape
    if not int4pack_available() or codes.device.type != "cpu" or n % 16 or k % 2:
        return None
    kg = _kernel_group(k, group_size, g_idx)
    if kg is None:
        return None
    sel = g_idx.view(-1, kg)[:, 0].long()
    s = scales.float()[:, sel]
    z = zeros.float()[:, sel]
    q = codes.to(torch.int32)
    shifted = q - zeros.to(torch.int32)[:, g_idx.long()] + 8
    if int(shifted.min()) >= 0 and int(shifted.max()) <= 15:
        # zero-centred codes (always possible below 4 bits): the kernel's zero term vanishes, which avoids the
        # cancellation of two large bf16-rounded terms
        q, zero_term = shifted, torch.zeros_like(s)
    else:
        # the kernel computes (q - 8) * scale + zero; ours is s * (q - z)
        zero_term = s * (8 - z)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    sz = torch.stack((s, zero_term), -1).transpose(0, 1).contiguous().to(dtype)
    return packed, kg, sz


def int4pack_linear(x: torch.Tensor, packed: torch.Tensor, kernel_group: int, sz: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).contiguous(), packed, kernel_group, sz)
    return y.reshape(*shape[:-1], y.shape[-1])


MAX_ROWS = 4  # the kernel scales about linearly in rows; oneDNN's dense GEMM overtakes it by 4-16 rows


def in_compute_dtype(state: dict, x: torch.Tensor) -> tuple[torch.dtype, torch.Tensor]:
    """torch's weight-only kernels compute in bf16 (fp16 stays fp16): that dtype, and the state's fp32 "meta"
    (scales, zero terms) rounded to it once and kept."""
    kdtype = torch.float16 if x.dtype == torch.float16 else torch.bfloat16
    meta = state.get(kdtype)
    if meta is None:
        meta = state[kdtype] = state["meta"].to(kdtype)
    return kdtype, meta


def prepare(aw: AffineWeight, **_facts):
    if aw.bits > 4 or aw.codes.device.type != "cpu":
        return None
    packed = int4pack_prepare(aw.codes, aw.scales, aw.zeros, aw.g_idx, aw.group_size, torch.float32)
    if packed is None:
        return None
    return {"packed": packed[0], "group": packed[1], "meta": packed[2], torch.bfloat16: packed[2].bfloat16()}


def run(state: dict, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    kdtype, sz = in_compute_dtype(state, x)
    y = int4pack_linear(x.to(kdtype), state["packed"], state["group"], sz).to(x.dtype)
    return y if bias is None else y + bias.to(y.dtype)


KERNEL = register(Kernel(name="torch-int4", family="torch", storage="affine", devices=("cpu",), priority=10,
                         max_rows=MAX_ROWS, prepare=prepare, run=run))
