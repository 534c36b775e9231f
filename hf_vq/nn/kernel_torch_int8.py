"""The "torch" CPU kernel of 8-bit per-channel affine layers: torch's int8 weight-only kernel
(``aten._weight_int8pack_mm``: ``(x @ w.T) * scales`` with int8 weights). It takes layers whose codes minus their
per-row zero-point fit in int8 (every symmetric 8-bit grid; asymmetric ones when they happen to fit), such as an
8-bit output head (``lm_head_bits=8``). Like the int4 kernel it computes in bf16 (fp16 stays fp16): fp32 activations
are rounded to bf16, its fp32 path being several times slower."""

from __future__ import annotations

import torch

from hf_vq.formats.affine import AffineWeight
from hf_vq.nn.kernel_registry import Kernel, register
from hf_vq.nn.kernel_torch_int4 import in_compute_dtype

MAX_ROWS = 4  # like the int4 kernel: a dense GEMM wins above a few rows


def available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def prepare(aw: AffineWeight, **_facts):
    if aw.bits != 8 or aw.scales.shape[1] != 1 or aw.codes.device.type != "cpu" or not available():
        return None
    w = aw.codes.to(torch.int16) - aw.zeros.to(torch.int16)   # [N, K] - [N, 1]
    if int(w.min()) < -128 or int(w.max()) > 127:
        return None
    return {"w": w.to(torch.int8).contiguous(), "meta": aw.scales[:, 0].float()}


def run(state: dict, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    kdtype, scales = in_compute_dtype(state, x)
    shape = x.shape
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(kdtype).contiguous(), state["w"], scales)
    y = y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])
    return y if bias is None else y + bias.to(y.dtype)


KERNEL = register(Kernel(name="torch-int8", family="torch", storage="affine", devices=("cpu",), priority=10,
                         max_rows=MAX_ROWS, prepare=prepare, run=run))
