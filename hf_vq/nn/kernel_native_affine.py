"""The "native" CPU kernel of affine layers: integer codes x int8 activations (csrc/affine_gemm.c).

Activations are quantized to int8 in blocks of 32 columns with one fp32 scale each (llama.cpp's Q8_0, IPEX's
``lowp_mode=INT8``); the codes stay integers, and the dot products run on AVX2 ``maddubs``, AVX-VNNI or AVX512-VNNI
``dpbusd``, picked at run time from what the CPU reports. Covers 2/3/4/8-bit codes, sym and asym, groups of any
multiple of 32 columns (and the partial last group), and act-order groups (columns are permuted once at pack time
and the activations on the fly). The only difference from the exact forward is the activations' int8 rounding:
each output moves by at most ``sum_b max|x_b| / 254 * sum_{j in b} |w_j|`` (tests/test_cpu_kernels.py checks it).

``HF_VQ_NATIVE_ISA`` (``avx512vnni``, ``avxvnni``, ``avx2``, ``scalar``) forces a path for testing; a path the CPU
lacks falls back to the best one it has.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_vq.formats.affine import AffineWeight
from hf_vq.nn.kernel_registry import Kernel, register
from hf_vq.nn.native_isa import IsaChoice
from hf_vq.utils.cbuild import CLibrary

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "affine_gemm.c"
ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avxvnni": 3, "avx512vnni": 4}
ISA_NAMES = {v: k for k, v in ISAS.items()}
BLOCK = 32
TILE = 16  # output rows per vector of lanes in the kernel layout
# every batch size: at 512 rows it runs about as fast as a dense bf16 GEMM and several times faster than fp32
# (benchmarks/decode.py prefill column), and it never builds a dequantized weight
MAX_ROWS = None


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.affine_gemm.restype = i
    lib.affine_gemm.argtypes = [p, i, i, i, p, p, i, i, p, i, i, p, p, p, i, p, i, i]
    lib.affine_isa_supported.restype = i
    lib.affine_isa_supported.argtypes = [i]
    lib.affine_best_isa.restype = i
    return lib


LIBRARY = CLibrary(SOURCE, _bind, "native affine kernel")
_GEMM = None  # the bound C function, set by the first prepare()
last_isa = "none"  # the instruction set of the last call (tests check the run-time dispatch with it)


def available() -> bool:
    return LIBRARY.load() is not None


_ISA = IsaChoice(LIBRARY, ISAS, "affine_isa_supported", "affine_best_isa")
isa_supported, best_isa, requested_isa = _ISA.supported, _ISA.best, _ISA.requested


def storage_bits(bits: int) -> int:
    """Bits per code in the kernel layout: 3-bit codes travel as 4-bit."""
    return 2 if bits == 2 else (4 if bits <= 4 else 8)


def pack_tiles(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [16 * tiles, 32 * nblk] -> the kernel layout (see csrc/affine_gemm.c): per tile of 16 rows and
    block of 32 columns, ``bits`` chunks of 64 bytes; byte 4i + u of chunk c holds, at bit ``bits * f``, the code of
    row i, column 32b + (32 / bits) c + 4f + u."""
    n, k = codes.shape
    fields = 8 // bits
    c = codes.view(n // TILE, TILE, k // BLOCK, bits, fields, 4).permute(0, 2, 3, 1, 5, 4)
    out = c[..., 0]
    for f in range(1, fields):
        out = out | (c[..., f] << (bits * f))
    return out.contiguous().view(-1)


def one_allocation(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Contiguous copies of ``tensors`` as views into one allocation, in this order, each at a 64-byte boundary. A
    kernel's small streams (scales, zero-points, codebooks) then lie next to its codes, and a cold call reads one
    region of memory instead of three far apart (a cold 192 x 576 GPTVQ call at 1 thread: 2.5 -> 1.6 us)."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + -(-n // 64) * 64)
    buf = torch.empty(starts[-1], dtype=torch.uint8)
    out = []
    for t, at, n in zip(tensors, starts, sizes):
        view = buf[at:at + n].view(t.dtype).view(t.shape)
        view.copy_(t)
        out.append(view)
    return out


def tile_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """[n, G] per-row values -> [tiles, G, 16] (rows padded with zeros)."""
    t = torch.nn.functional.pad(t, (0, 0, 0, rows - t.shape[0]))
    return t.view(rows // TILE, TILE, -1).transpose(1, 2).contiguous()


@dataclass
class NativeAffine:
    """A layer in the kernel layout. The raw pointers stay valid because the state holds the tensors."""

    n: int
    k: int
    bits: int
    nblk: int
    groups: int
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    gstart: torch.Tensor
    perm: torch.Tensor | None
    ptrs: tuple

    def nbytes(self) -> int:
        ts = [self.codes, self.scales, self.zeros, self.gstart] + ([self.perm] if self.perm is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


def layout_groups(g_idx: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor] | None:
    """(column permutation or None, group of each sorted column, group start columns [G + 1]); None when some block
    of 32 sorted columns would hold two groups (a group size that is not a multiple of 32)."""
    g = g_idx.long()
    k = g.numel()
    perm = None
    if k > 1 and bool((g[1:] < g[:-1]).any()):
        perm = torch.argsort(g, stable=True)
        g = g[perm]
    groups = int(g.max()) + 1 if k else 1
    counts = torch.bincount(g, minlength=groups)
    starts = torch.zeros(groups + 1, dtype=torch.long)
    starts[1:] = torch.cumsum(counts, 0)
    if bool((starts[1:-1] % BLOCK != 0).any()):
        return None
    return perm, g, starts


def prepare(aw: AffineWeight, **_facts) -> NativeAffine | None:
    """Pack ``aw`` once for the kernel; None when the kernel cannot serve it (no compiler, a group that is not a
    multiple of 32 columns)."""
    global _GEMM
    lib = LIBRARY.load()
    if lib is None or aw.codes.device.type != "cpu":
        return None
    _GEMM = lib.affine_gemm
    n, k = aw.shape
    lay = layout_groups(aw.g_idx.cpu())
    if lay is None:
        return None
    perm, _, starts = lay
    bits = storage_bits(aw.bits)
    nblk = -(-k // BLOCK)
    rows = -(-n // TILE) * TILE
    codes = aw.codes if perm is None else aw.codes[:, perm]
    codes = torch.nn.functional.pad(codes, (0, nblk * BLOCK - k, 0, rows - n)).contiguous()
    packed = pack_tiles(codes, bits)
    gstart = (starts // BLOCK).to(torch.int32)
    gstart[-1] = nblk
    scales = tile_rows(aw.scales.view(torch.int16), rows)
    zeros = tile_rows(aw.zeros, rows)
    perm32 = None if perm is None else perm.to(torch.int32).contiguous()
    groups = gstart.numel() - 1
    scales, zeros, packed = one_allocation(scales, zeros, packed)
    return NativeAffine(n, k, bits, nblk, groups, packed, scales, zeros, gstart, perm32,
                        _pointers(packed, scales, zeros, gstart, perm32))


def _pointers(codes, scales, zeros, gstart, perm) -> tuple:
    return (codes.data_ptr(), scales.data_ptr(), zeros.data_ptr(), gstart.data_ptr(),
            0 if perm is None else perm.data_ptr())


def fuse(states: list[NativeAffine]) -> tuple[NativeAffine, list[NativeAffine], list[int]] | None:
    """One state whose output is the layers' outputs side by side (each padded to whole 16-row tiles), the layers'
    own states as views into its tensors (no second copy), and each layer's first output column; None unless the
    layers share the input side of the layout (columns, code width, groups, act-order permutation)."""
    a = states[0]
    for s in states[1:]:
        if (s.k != a.k or s.bits != a.bits or s.nblk != a.nblk or s.zeros.dtype != a.zeros.dtype
                or not torch.equal(s.gstart, a.gstart) or (s.perm is None) != (a.perm is None)
                or (s.perm is not None and not torch.equal(s.perm, a.perm))):
            return None
    scales, zeros, codes = one_allocation(torch.cat([s.scales for s in states]), torch.cat([s.zeros for s in states]),
                                          torch.cat([s.codes for s in states]))
    tile_bytes = a.codes.numel() // a.scales.shape[0]
    members, starts, tile = [], [], 0
    for s in states:
        t = s.scales.shape[0]
        c, sc, z = codes[tile * tile_bytes:(tile + t) * tile_bytes], scales[tile:tile + t], zeros[tile:tile + t]
        members.append(NativeAffine(s.n, s.k, s.bits, s.nblk, s.groups, c, sc, z, s.gstart, s.perm,
                                    _pointers(c, sc, z, s.gstart, s.perm)))
        starts.append(tile * TILE)
        tile += t
    fused = NativeAffine(tile * TILE, a.k, a.bits, a.nblk, a.groups, codes, scales, zeros, a.gstart, a.perm,
                         _pointers(codes, scales, zeros, a.gstart, a.perm))
    return fused, members, starts


class _Layer(ctypes.Structure):
    """csrc/affine_gemm.c's aff_layer (the context of affine_projection)."""

    _fields_ = [(f, ctypes.c_void_p) for f in ("codes", "scales", "zeros", "gstart", "perm")] + \
               [(f, ctypes.c_int32) for f in ("n", "k", "bits", "nblk", "G")]


def projection(st: NativeAffine) -> tuple[int, int, object, int] | None:
    """The one-row projection of ``st`` for csrc/decode_layer.c (see Kernel.projection)."""
    lib = LIBRARY.load()
    if lib is None:
        return None
    layer = _Layer(*st.ptrs, st.n, st.k, st.bits, st.nblk, st.groups)
    return ctypes.cast(lib.affine_projection, ctypes.c_void_p).value, ctypes.addressof(layer), (layer, st), \
        requested_isa()


def _gemm(x2: torch.Tensor, n: int, k: int, bits: int, nblk: int, groups: int, codes: int, scales: int, zeros: int,
          gstart: int, perm: int, bias: torch.Tensor | None, isa: int, out_shape=None) -> torch.Tensor:
    """The C call on raw pointers: x2 [m, k] contiguous fp32/bf16 -> y [m, n] (or ``out_shape``) of the same dtype."""
    y = torch.empty(out_shape or (x2.shape[0], n), dtype=x2.dtype)
    half = x2.dtype is torch.bfloat16
    rc = _GEMM(x2.data_ptr(), half, x2.numel() // k, k, perm, y.data_ptr(), half, n, codes, bits, nblk, scales, zeros,
               gstart, groups, 0 if bias is None else bias.data_ptr(), torch.get_num_threads(), isa)
    if rc < 0:
        raise RuntimeError(f"native affine kernel refused a [{x2.numel() // k}, {k}] x [{n}, {k}] call")
    global last_isa
    last_isa = ISA_NAMES[rc]
    return y


def run(st: NativeAffine, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W^T + bias for CPU x of any leading shape (fp32/bf16 in place; other dtypes via fp32)."""
    dtype = x.dtype
    xc = x if dtype is torch.float32 or dtype is torch.bfloat16 else x.float()
    if not xc.is_contiguous():
        xc = xc.contiguous()
    if bias is not None and (bias.dtype is not torch.float32 or not bias.is_contiguous()):
        bias = bias.detach().float().contiguous()
    if torch.compiler.is_compiling():
        y = torch.ops.hf_vq.affine_gemm(xc.reshape(-1, st.k), st.codes, st.scales, st.zeros, st.gstart, st.perm, bias,
                                        st.n, st.k, st.bits, st.nblk, requested_isa()).view(*x.shape[:-1], st.n)
    else:   # the eager call reads x in place and writes y in its final shape: no reshapes (SmolLM2 makes 210 a token)
        y = _gemm(xc, st.n, st.k, st.bits, st.nblk, st.groups, *st.ptrs, bias, requested_isa(), (*x.shape[:-1], st.n))
    return y if y.dtype is dtype else y.to(dtype)


# torch.compile sees the kernel as one opaque op (eager calls skip the dispatcher: it costs more than the kernel
# on small layers)
@torch.library.custom_op("hf_vq::affine_gemm", mutates_args=(), device_types="cpu")
def _affine_gemm_op(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    gstart: torch.Tensor, perm: torch.Tensor | None, bias: torch.Tensor | None, n: int, k: int,
                    bits: int, nblk: int, isa: int) -> torch.Tensor:
    return _gemm(x, n, k, bits, nblk, gstart.numel() - 1, codes.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
                 gstart.data_ptr(), 0 if perm is None else perm.data_ptr(), bias, isa)


@_affine_gemm_op.register_fake
def _(x, codes, scales, zeros, gstart, perm, bias, n, k, bits, nblk, isa):
    return x.new_empty(x.shape[0], n)


KERNEL = register(Kernel(name="native-affine", family="native", storage="affine", devices=("cpu",), priority=20,
                         max_rows=MAX_ROWS, prepare=prepare, run=run, fuse=fuse, projection=projection))
