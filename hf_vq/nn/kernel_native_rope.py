"""The "native" CPU kernel of rotary position embeddings for one position (csrc/rope.c): the Llama-family
``x * cos + rotate_half(x) * sin`` with transformers' roundings, in one call instead of about ten small ops."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from hf_vq.nn.kernel_registry import Kernel, register
from hf_vq.utils.cbuild import CLibrary

SOURCE = Path(__file__).with_name("csrc") / "rope.c"
DTYPES = (torch.float32, torch.bfloat16)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    lib.rope.restype = i
    lib.rope.argtypes = [p, i, i, i, i, ll, ll, p, p, p]
    return lib


LIBRARY = CLibrary(SOURCE, _bind, "native rotary embedding kernel")


def prepare(x: torch.Tensor, **_facts) -> bool | None:
    """True when the kernel can serve ``x`` (CPU, fp32/bf16, an even head dimension); else None."""
    if x.device.type != "cpu" or x.dtype not in DTYPES or x.shape[-1] % 2 or LIBRARY.load() is None:
        return None
    return True


def run(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, D] (head dim contiguous) by ``cos``/``sin`` [B, D] (x's dtype); returns [B, H, D]."""
    B, H, D = x.shape
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(B, H, D, dtype=x.dtype)
    rc = LIBRARY.load().rope(x.data_ptr(), x.dtype is torch.bfloat16, B, H, D, x.stride(0), x.stride(1),
                             cos.data_ptr(), sin.data_ptr(), out.data_ptr())
    if rc < 0:
        raise RuntimeError(f"native rotary embedding kernel refused x {tuple(x.shape)}")
    return out


KERNEL = register(Kernel(name="native-rope", family="native", storage="rope", devices=("cpu",), priority=20,
                         max_rows=1, prepare=prepare, run=run))
