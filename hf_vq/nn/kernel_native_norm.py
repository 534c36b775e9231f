"""The "native" CPU kernel of RMSNorm (csrc/rms_norm.c): the Llama-family formula, rounding included, in one call.

A decode token runs two norms per decoder layer on a single row; torch spends its time dispatching the seven ops
of that forward, not computing them. Serves bf16 and fp32 inputs whose dtype is the weight's, any number of rows.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from hf_vq.nn.kernel_registry import Kernel, register
from hf_vq.utils.cbuild import CLibrary

SOURCE = Path(__file__).with_name("csrc") / "rms_norm.c"
DTYPES = (torch.float32, torch.bfloat16)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.rms_norm.restype = i
    lib.rms_norm.argtypes = [p, i, i, i, p, ctypes.c_float, p]
    return lib


LIBRARY = CLibrary(SOURCE, _bind, "native RMSNorm kernel")
_RMS_NORM = None  # the bound C function, set by the first prepare() that finds the library


def prepare(weight: torch.Tensor, **_facts) -> torch.Tensor | None:
    """The weight itself (read in place at each call) when the kernel can serve it; else None."""
    global _RMS_NORM
    if weight.dtype not in DTYPES or weight.device.type != "cpu" or weight.dim() != 1 or not weight.is_contiguous():
        return None
    if _RMS_NORM is None:
        lib = LIBRARY.load()
        if lib is None:
            return None
        _RMS_NORM = lib.rms_norm
    return weight


def run(weight: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the last dimension of CPU ``x`` (the weight's dtype, any leading shape) with ``weight`` and
    ``eps``."""
    n = weight.shape[0]
    xc = x if x.is_contiguous() else x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype)
    rc = _RMS_NORM(xc.data_ptr(), x.dtype is torch.bfloat16, xc.numel() // n, n, weight.data_ptr(),
                                 eps, y.data_ptr())
    if rc < 0:
        raise RuntimeError(f"native RMSNorm kernel refused a {tuple(x.shape)} input with a [{n}] weight")
    return y


KERNEL = register(Kernel(name="native-rms-norm", family="native", storage="rms_norm", devices=("cpu",), priority=20,
                         max_rows=None, prepare=prepare, run=run))
