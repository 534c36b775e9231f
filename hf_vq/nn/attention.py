"""A decode step's attention through the kernel registry (storage "attention"): one query position over the KV
cache. :func:`decode_attention` returns None for any call it does not serve, and the caller then runs its usual
attention (hf_vq.model.attention wires this into transformers' attention interface)."""

from __future__ import annotations

import torch

from hf_vq.nn import kernel_registry

STORAGE = "attention"


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: torch.Tensor | None, scale: float) -> torch.Tensor | None:
    """[B, 1, Hq, D] attention output for a query [B, Hq, 1, D] over key/value [B, Hkv, L, D] with a boolean mask
    (True: attend) broadcastable to [B, Hq, 1, L], or None when no kernel serves the call (more than one query
    position, gradients, other dtypes or devices, an additive mask, HF_VQ_KERNELS)."""
    if (query.dim() != 4 or query.shape[2] != 1 or key.dim() != 4 or value.shape != key.shape
            or query.shape[0] != key.shape[0] or query.shape[-1] != key.shape[-1] or key.shape[1] == 0
            or query.shape[1] % key.shape[1] or not (query.dtype is key.dtype is value.dtype)
            or query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1
            or (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))):
        return None
    if mask is not None:
        if (mask.dtype is not torch.bool or mask.dim() != 4 or mask.shape[-1] != key.shape[2] or mask.shape[2] != 1
                or mask.shape[0] not in (1, query.shape[0]) or mask.shape[1] not in (1, query.shape[1])):
            return None
    for kernel in kernel_registry.candidates(STORAGE, query.device.type, 1):
        if kernel.prepare(query) is not None:
            return kernel.run(query, key, value, mask, scale)
    return None


def rope_kernel(x: torch.Tensor) -> kernel_registry.Kernel | None:
    """The registry's rotary-embedding kernel that serves ``x`` (its dtype and head dimension), or None."""
    for kernel in kernel_registry.candidates("rope", x.device.type, 1):
        if kernel.prepare(x) is not None:
            return kernel
    return None


def rotate_one_position(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """Rotary embedding of ``x`` [B, H, D] (one position per sequence) by ``cos``/``sin`` [B, D] as transformers'
    Llama family applies it, or None when no kernel serves the call."""
    if (x.dim() != 3 or cos.shape != (x.shape[0], x.shape[2]) or sin.shape != cos.shape or x.stride(-1) != 1
            or not (x.dtype is cos.dtype is sin.dtype)):
        return None
    kernel = rope_kernel(x)
    return None if kernel is None else kernel.run(x, cos, sin)
