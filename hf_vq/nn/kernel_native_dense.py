"""The "native" CPU kernel of float layers hf_vq leaves in float, the output head above all (csrc/dense_gemv.c).

A decode token's head product reads the whole [vocab, hidden] weight for one row of activations: on CPU, torch's
bf16 and fp32 GEMM read it at a fraction of the memory bandwidth for a single row. This kernel streams the weight
(bf16 or fp32, as stored, no copy) and sums in fp32, on AVX-512 or AVX2 + FMA, picked at run time. It serves up to
``MAX_ROWS`` rows (decode, and the last position of a prefill); more rows go to torch's GEMM.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from hf_vq.nn.kernel_registry import Kernel, register
from hf_vq.nn.native_isa import IsaChoice
from hf_vq.utils.cbuild import CLibrary

SOURCE = Path(__file__).with_name("csrc") / "dense_gemv.c"
# the shared HF_VQ_NATIVE_ISA names map onto this kernel's paths (it has no integer dot products)
ISAS = {"auto": 0, "scalar": 1, "avxvnni": 2, "avx2": 2, "avx512vnni": 3}
ISA_NAMES = {0: "auto", 1: "scalar", 2: "avx2", 3: "avx512"}
MAX_ROWS = 8
DTYPES = (torch.float32, torch.bfloat16)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.dense_gemv.restype = i
    lib.dense_gemv.argtypes = [p, i, i, i, p, i, i, p, i, p, i, i]
    lib.dense_isa_supported.restype = i
    lib.dense_isa_supported.argtypes = [i]
    lib.dense_best_isa.restype = i
    return lib


LIBRARY = CLibrary(SOURCE, _bind, "native dense kernel")
_ISA = IsaChoice(LIBRARY, ISAS, "dense_isa_supported", "dense_best_isa")
last_isa = "none"  # the instruction set of the last call (tests check the run-time dispatch with it)


def prepare(weight: torch.Tensor, **_facts) -> torch.Tensor | None:
    """The weight itself (read in place at each call) when the kernel can serve it (CPU, fp32/bf16); else None."""
    if weight.device.type != "cpu" or weight.dtype not in DTYPES or weight.dim() != 2:
        return None
    return weight if LIBRARY.load() is not None else None


def run(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias for CPU x of the weight's dtype and any leading shape."""
    n, k = weight.shape
    w = weight if weight.is_contiguous() else weight.contiguous()
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if bias is not None and (bias.dtype is not torch.float32 or not bias.is_contiguous()):
        bias = bias.detach().float().contiguous()
    y = torch.empty(x2.shape[0], n, dtype=x2.dtype)
    half = x2.dtype is torch.bfloat16
    rc = LIBRARY.load().dense_gemv(x2.data_ptr(), half, x2.shape[0], k, w.data_ptr(),
                                   w.dtype is torch.bfloat16, n, y.data_ptr(), half,
                                   None if bias is None else bias.data_ptr(), torch.get_num_threads(),
                                   _ISA.requested())
    if rc < 0:
        raise RuntimeError(f"native dense kernel refused a [{x2.shape[0]}, {k}] x [{n}, {k}] call")
    global last_isa
    last_isa = ISA_NAMES[rc]
    return y.view(*x.shape[:-1], n)


KERNEL = register(Kernel(name="native-dense", family="native", storage="dense", devices=("cpu",), priority=20,
                         max_rows=MAX_ROWS, prepare=prepare, run=run))
