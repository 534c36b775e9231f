"""The "native" small-batch CPU kernel of VQ layers: builds and loads csrc/vq_gemv.c, transcodes the stored layout to
its input, and registers itself for storage "vq".

The C source is compiled on first use (hf_vq/cbuild.py: system compiler, ``-O3 -march=native`` and OpenMP when they
work, cached per source/flags/CPU, loaded with ctypes). Anything that goes wrong leaves ``available()`` False (logged
once) and VQLinear keeps its dense path.

Kernel layout (``KernelWeights``): one uint8 index per vector, fp32 codebooks with their scales applied, fp32
normalization scales per row and 64 columns, and the segment table (runs of vectors sharing a codebook and a
normalization block). For 4096x4096 at 2D/6-bit this is ~9 MiB against 64 MiB for the dense fp32 weight.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_vq.formats.vq import NORM_BITS, NORM_BLOCK, VQLayout, VQWeight, decode_codebooks
from hf_vq.nn.kernel_registry import Kernel, register
from hf_vq.utils.cbuild import CLibrary
from hf_vq.formats.packing import unpack

SOURCE = Path(__file__).with_name("csrc") / "vq_gemv.c"
MAX_ROWS = 4
SUPPORTED_DIMS = (1, 2, 4)


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.vq_gemv.restype = ctypes.c_int
    lib.vq_gemv.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                            ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                            ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    lib.vq_simd_width.restype = ctypes.c_int
    lib.vq_tile_rows.restype = ctypes.c_int
    return lib


LIBRARY = CLibrary(SOURCE, bind, "VQ kernel")


def available() -> bool:
    return LIBRARY.load() is not None


def simd_width() -> int:
    lib = LIBRARY.load()
    return lib.vq_simd_width() if lib is not None else 0


def supports(layout: VQLayout) -> bool:
    return layout.vector_dim in SUPPORTED_DIMS and layout.index_bits <= 8


@dataclass
class KernelWeights:
    layout: VQLayout
    idx: torch.Tensor             # uint8 [N * nvec], tile-major (see csrc/vq_gemv.c)
    codebooks: torch.Tensor       # fp32 [G, k, d], scales applied (1D: k padded to >= 8)
    norm: torch.Tensor | None     # fp32 [N, nblk] or None
    segments: torch.Tensor        # int32 [3, nseg + 1]: start vector, codebook column block, norm block

    def nbytes(self) -> int:
        ts = [self.idx, self.codebooks, self.segments] + ([self.norm] if self.norm is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


def _tile_major(idx: torch.Tensor, layout: VQLayout, seg: torch.Tensor, tile: int) -> torch.Tensor:
    n, rpb = layout.out_features, layout.rows_per_block
    starts = seg[0].tolist()
    parts = []
    for b0 in range(0, n, rpb):
        for r0 in range(b0, min(b0 + rpb, n), tile):
            rows = idx[r0:min(r0 + tile, b0 + rpb, n)]
            parts += [rows[:, j0:j1].reshape(-1) for j0, j1 in zip(starts, starts[1:])]
    return torch.cat(parts)


def _segments(layout: VQLayout) -> torch.Tensor:
    j = torch.arange(layout.nvec)
    cbk = j * layout.vector_dim // layout.cols_per_block
    nb = j * layout.vector_dim // NORM_BLOCK if layout.normalize else torch.zeros_like(j)
    change = torch.ones(layout.nvec, dtype=torch.bool)
    change[1:] = (cbk[1:] != cbk[:-1]) | (nb[1:] != nb[:-1])
    starts = j[change]
    seg = torch.zeros(3, starts.numel() + 1, dtype=torch.int32)
    seg[0, :-1], seg[0, -1] = starts, layout.nvec
    seg[1, :-1], seg[2, :-1] = cbk[starts], nb[starts]
    return seg


@torch.no_grad()
def prepare(layout: VQLayout, tensors: dict[str, torch.Tensor]) -> KernelWeights:
    """Transcode the stored tensors (see hf_vq.algorithms.gptvq) to the kernel layout."""
    if not supports(layout):
        raise ValueError(f"VQ kernel supports vector_dim in {SUPPORTED_DIMS} and index_bits <= 8, got {layout}")
    lib = LIBRARY.load()
    if lib is None:
        raise RuntimeError("VQ kernel: not available (see the hf_vq.nn.vq_kernel log)")
    seg = _segments(layout)
    idx = _tile_major(unpack(tensors["vq_indices"], layout.index_bits, layout.nvec), layout, seg, lib.vq_tile_rows())
    cb = decode_codebooks(layout, tensors["vq_codebook"], tensors.get("vq_codebook_scales")).float().contiguous()
    if layout.vector_dim == 1 and layout.k < 8:   # the kernel then keeps the codebook in one 8-float register
        cb = torch.nn.functional.pad(cb, (0, 0, 0, 8 - layout.k)).contiguous()
    norm = None
    if layout.normalize:
        nblk = -(-layout.padded_in // NORM_BLOCK)
        codes = unpack(tensors["vq_norm_codes"], NORM_BITS, nblk).float()
        base = tensors["vq_norm_base"].view(torch.float32)
        norm = (base * torch.exp2(-codes)).contiguous()
    return KernelWeights(layout, idx, cb, norm, seg)


def gemv(kw: KernelWeights, x: torch.Tensor, bias: torch.Tensor | None = None,
         num_threads: int | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for fp32 CPU x [m, in_features], m <= MAX_ROWS."""
    lib = LIBRARY.load()
    lay = kw.layout
    m = x.shape[0]
    if lib is None or not 1 <= m <= MAX_ROWS or x.dtype != torch.float32 or x.shape[1] != lay.in_features:
        raise ValueError("VQ kernel: needs the compiled kernel and fp32 x of shape [1..4, in_features]")
    if lay.padded_in != lay.in_features:
        xp = x.new_zeros(m, lay.padded_in)
        xp[:, :lay.in_features] = x
        x = xp
    else:
        x = x.contiguous()
    if bias is not None:
        bias = bias.detach().to(torch.float32).contiguous()
    y = torch.empty(m, lay.out_features, dtype=torch.float32)
    seg = kw.segments
    nthreads = torch.get_num_threads() if num_threads is None else num_threads
    rc = lib.vq_gemv(x.data_ptr(), m, lay.padded_in, y.data_ptr(), lay.out_features, kw.idx.data_ptr(), lay.nvec,
                     kw.codebooks.data_ptr(), lay.vector_dim, kw.codebooks.shape[1], lay.rows_per_block, lay.col_blocks,
                     seg[0].data_ptr(), seg[1].data_ptr(), seg[2].data_ptr(), seg.shape[1] - 1,
                     0 if kw.norm is None else kw.norm.data_ptr(), 0 if kw.norm is None else kw.norm.shape[1],
                     0 if bias is None else bias.data_ptr(), nthreads)
    if rc != 0:
        raise ValueError(f"VQ kernel rejected the layout {lay}")
    return y


def _prepare(vq: VQWeight, **_facts) -> KernelWeights | None:
    t = vq.tensors["vq_indices"]
    if t.device.type != "cpu" or not supports(vq.layout) or not available():
        return None
    return prepare(vq.layout, vq.tensors)


def _run(kw: KernelWeights, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 compute for fp32/bf16/fp16 x of any leading shape, cast back to x's dtype."""
    lay = kw.layout
    rows = x.numel() // lay.in_features
    x2 = x.reshape(rows, lay.in_features).to(torch.float32)
    if torch.compiler.is_compiling():
        b = None if bias is None else bias.detach().to(torch.float32).contiguous()
        y = torch.ops.hf_vq.vq_gemv(x2, kw.idx, kw.codebooks, kw.norm, kw.segments, b, lay.out_features,
                                    lay.in_features, lay.padded_in, lay.nvec, lay.vector_dim, lay.rows_per_block,
                                    lay.col_blocks)
    else:
        y = gemv(kw, x2, bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], lay.out_features)


# torch.compile sees the kernel as one opaque op
@torch.library.custom_op("hf_vq::vq_gemv", mutates_args=(), device_types="cpu")
def _vq_gemv_op(x: torch.Tensor, idx: torch.Tensor, codebooks: torch.Tensor, norm: torch.Tensor | None,
                segments: torch.Tensor, bias: torch.Tensor | None, n: int, k: int, padded_in: int, nvec: int, d: int,
                rpb: int, col_blocks: int) -> torch.Tensor:
    m = x.shape[0]
    if padded_in != k:
        x = torch.nn.functional.pad(x, (0, padded_in - k))
    x = x.contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    rc = LIBRARY.load().vq_gemv(x.data_ptr(), m, padded_in, y.data_ptr(), n, idx.data_ptr(), nvec,
                                codebooks.data_ptr(), d, codebooks.shape[1], rpb, col_blocks, segments[0].data_ptr(),
                                segments[1].data_ptr(), segments[2].data_ptr(), segments.shape[1] - 1,
                                0 if norm is None else norm.data_ptr(), 0 if norm is None else norm.shape[1],
                                0 if bias is None else bias.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise ValueError("VQ kernel rejected its layout")
    return y


@_vq_gemv_op.register_fake
def _(x, idx, codebooks, norm, segments, bias, n, k, padded_in, nvec, d, rpb, col_blocks):
    return x.new_empty(x.shape[0], n, dtype=torch.float32)


KERNEL = register(Kernel(name="native-vq", family="native", storage="vq", devices=("cpu",), priority=20,
                         max_rows=MAX_ROWS, prepare=_prepare, run=_run))
