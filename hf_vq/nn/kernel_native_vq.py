"""The "native" int8 CPU kernel of VQ layers (GPTVQ): integer codebooks x int8 activations (csrc/vq_int8.c).

Activations are quantized to int8 in blocks of 32 columns with one fp32 scale each (llama.cpp's Q8_0, as
kernel_native_affine); the codebooks of 4- and 8-bit layers are integers (codes times an fp16 scale per codebook,
see hf_vq.formats.vq.decode_codebooks) and stay int8 in the kernel, offset to unsigned (c + 128) so that
``dpbusd`` (unsigned x signed) multiplies them; the offset is removed in integers through each activation block's
sum. A lookup turns 64 stored indices (one byte per vector, 16 rows x 4 vectors) into 64 code bytes of one vector
component: AVX512-VBMI ``vpermb`` for <= 64 entries (``vpermi2b`` 128, two and a blend 256), else ``pshufb`` on
16-entry subtables. Codebook scales and data-normalization scales are folded into one fp32 scale per row and
segment (a run of 32-column blocks with one codebook and one normalization block), applied with one FMA per
segment; the activation scale is one FMA per block.

From 8 activation rows on (prefill), a call looks each 16-row tile's codes up once into a per-thread scratch buffer
and multiplies every row against them (a load and a ``dpbusd`` per 64 codes and row), instead of looking them up
again for every few rows; the outputs are the same bits as row by row.

Indices of up to 6 bits are stored packed, 6 bits each (GPTVQ 2D/6-bit: 3 bits per weight of indices, not 4), where
the CPU's best path is AVX512-VBMI, which unpacks them in registers; elsewhere one byte each. Every path reads both
layouts (the others unpack a block into a buffer), with the same results bit for bit.

Serves vector_dim 1/2/4, index_bits 1..8, codebook_bits 4/8, with or without data normalization, any row block
size (row blocks are padded to whole 16-row tiles), and cols_per_block a multiple of 32. Everything else (fp16
codebooks, other column blocks or vector dims) gets None from :func:`prepare`, and the older kernel
(hf_vq.nn.vq_kernel) or the dense path serves it. The only difference from the exact forward is the activations'
int8 rounding: each output moves by at most ``sum_b max|x_b| / 254 * sum_{j in b} |w_j|`` over blocks b of 32
columns (tests/test_vq_int8_kernel.py checks it).

``HF_VQ_NATIVE_ISA`` (``avx512vbmi``, ``avx512vnni``, ``avxvnni``, ``avx2``, ``scalar``) forces a path for
testing; a path the CPU lacks falls back to the best one it has. (kernel_native_affine has no ``avx512vbmi``: there
the name falls back to that kernel's best path.)
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_vq.formats.packing import unpack
from hf_vq.formats.vq import NORM_BITS, NORM_BLOCK, VQWeight
from hf_vq.nn.kernel_registry import Kernel, register
from hf_vq.nn.native_isa import IsaChoice
from hf_vq.utils.cbuild import CLibrary

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "vq_int8.c"
ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avxvnni": 3, "avx512vnni": 4, "avx512vbmi": 5}
ISA_NAMES = {v: k for k, v in ISAS.items()}
BLOCK = 32
TILE = 16  # output rows per vector of lanes in the kernel layout
SUPPORTED_DIMS = (1, 2, 4)
# every batch size: one thread, 2D/6-bit/8-bit layers at 8..128 rows run 3.5-14x faster than F.linear on the cached
# dense fp32 weight (the path VQLinear takes above max_rows), and it never builds that weight
# (benchmarks/vq_int8_speed.py --rows 8 32 128 --dense)
MAX_ROWS = None


class _Layer(ctypes.Structure):
    """csrc/vq_int8.c's vq8_layer: the prepared tensors' pointers and sizes, passed as one pointer per call."""

    _fields_ = [(f, ctypes.c_void_p) for f in ("data", "seg_start", "seg_cb", "tile_r0", "tile_cnt")] + \
               [(f, ctypes.c_int32) for f in ("n", "k", "d", "kbook", "kp", "nblk", "ncb", "nseg", "ntiles", "packed")]


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.vq8_gemm_layer.restype = i
    lib.vq8_gemm_layer.argtypes = [p, p, i, i, p, p, i, i]
    lib.vq8_gemm.restype = i
    lib.vq8_gemm.argtypes = [p, i, i, p, p, i, i] + [i] * 10 + [p] * 5
    lib.vq8_isa_supported.restype = i
    lib.vq8_isa_supported.argtypes = [i]
    lib.vq8_best_isa.restype = i
    return lib


LIBRARY = CLibrary(SOURCE, _bind, "native VQ int8 kernel")
_GEMM = None  # the bound C functions (one layer struct, every field), set by the first prepare()
_GEMM_ARGS = None
last_isa = "none"  # the instruction set of the last call (tests check the run-time dispatch with it)


def available() -> bool:
    return LIBRARY.load() is not None


_ISA = IsaChoice(LIBRARY, ISAS, "vq8_isa_supported", "vq8_best_isa")
isa_supported, best_isa, requested_isa = _ISA.supported, _ISA.best, _ISA.requested


def supports(layout) -> bool:
    return (layout.codebook_bits in (4, 8) and layout.vector_dim in SUPPORTED_DIMS and 1 <= layout.index_bits <= 8
            and layout.cols_per_block % BLOCK == 0)


@dataclass
class NativeVQ:
    """A layer in the kernel layout (see csrc/vq_int8.c). The raw pointers stay valid because the state holds the
    tensors."""

    n: int
    k: int
    d: int
    kbook: int
    kp: int
    nblk: int
    ncb: int
    packed: bool             # indices packed 6 bits each (see csrc/vq_int8.c)
    data: torch.Tensor       # uint8 [ntiles, record]: per tile its scales, codebooks and indices (csrc/vq_int8.c)
    segments: torch.Tensor   # int32 [2, nseg + 1]: start block, codebook column block
    tiles: torch.Tensor      # int32 [2, ntiles]: first row, rows
    layer: _Layer            # the pointers and sizes above, for the C call
    layer_ptr: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.segments, self.tiles))

    def index_bytes(self) -> int:
        """Bytes of indices in :attr:`data` (the rest: scales and codebooks)."""
        return self.tiles.shape[1] * self.nblk * ((384 if self.packed else 512) // self.d)


def _segments(nblk: int, cpb: int, normalize: bool) -> torch.Tensor:
    """Runs of 32-column blocks with one codebook column block and one normalization block."""
    b = torch.arange(nblk)
    cb = b * BLOCK // cpb
    nb = b * BLOCK // NORM_BLOCK if normalize else torch.zeros_like(b)
    change = torch.ones(nblk, dtype=torch.bool)
    change[1:] = (cb[1:] != cb[:-1]) | (nb[1:] != nb[:-1])
    starts = b[change]
    seg = torch.zeros(2, starts.numel() + 1, dtype=torch.int32)
    seg[0, :-1], seg[0, -1] = starts, nblk
    seg[1, :-1] = cb[starts]
    return seg


def packs_indices(index_bits: int) -> bool:
    """Whether :func:`prepare` stores indices of ``index_bits`` packed: up to 6 bits, where the path that runs
    (HF_VQ_NATIVE_ISA, else the CPU's best) is AVX512-VBMI."""
    isa = requested_isa()
    return index_bits <= 6 and (ISA_NAMES[isa] if isa else best_isa()) == "avx512vbmi"


def pack6(idx: torch.Tensor) -> torch.Tensor:
    """uint8 indices < 64 [..., 64] -> [..., 48]: bytes 6q..6q+5 hold indices 8q..8q+7 at bits 6t, little-endian."""
    v = idx.view(*idx.shape[:-1], 8, 8).to(torch.int64)
    word = (v << (6 * torch.arange(8))).sum(-1, keepdim=True)                        # [..., 8, 1] 48-bit values
    return ((word >> (8 * torch.arange(6))) & 255).to(torch.uint8).view(*idx.shape[:-1], 48)


@torch.no_grad()
def prepare(vq: VQWeight, **_facts) -> NativeVQ | None:
    """Transcode ``vq`` once for the kernel; None when the kernel cannot serve it (no compiler, fp16 codebooks, a
    vector dimension other than 1/2/4, cols_per_block not a multiple of 32)."""
    if not supports(vq.layout) or LIBRARY.load() is None:
        return None
    return transcode(vq, packs_indices(vq.layout.index_bits))


@torch.no_grad()
def transcode(vq: VQWeight, packed: bool) -> NativeVQ | None:
    """:func:`prepare` with the index layout chosen by the caller (``packed`` needs index_bits <= 6)."""
    global _GEMM, _GEMM_ARGS
    lay = vq.layout
    if not supports(lay) or vq.tensors["vq_indices"].device.type != "cpu":
        return None
    if packed and lay.index_bits > 6:
        raise ValueError(f"packed indices hold 6 bits; this layer has {lay.index_bits}-bit indices")
    lib = LIBRARY.load()
    if lib is None:
        return None
    _GEMM, _GEMM_ARGS = lib.vq8_gemm_layer, lib.vq8_gemm
    t = vq.tensors
    n, d, rpb = lay.out_features, lay.vector_dim, lay.rows_per_block
    nblk = -(-lay.padded_in // BLOCK)
    nvec_p = nblk * BLOCK // d
    kbook = lay.k
    kp = 64 if kbook <= 64 else 256

    # tiles of 16 rows that never straddle two row blocks (each row block padded to whole tiles)
    rb_of, r0s, cnts = [], [], []
    for rb in range(lay.row_blocks):
        lo, hi = rb * rpb, min(rb * rpb + rpb, n)
        for r0 in range(lo, hi, TILE):
            rb_of.append(rb)
            r0s.append(r0)
            cnts.append(min(TILE, hi - r0))
    tiles = torch.tensor([rb_of, r0s, cnts], dtype=torch.int32)
    ntiles = tiles.shape[1]
    rows = (tiles[1].long()[:, None] + torch.arange(TILE)[None]).view(-1)           # padded row -> layer row
    valid = (torch.arange(TILE)[None] < tiles[2].long()[:, None]).view(-1)
    rows = torch.where(valid, rows, torch.zeros_like(rows))

    idx = unpack(t["vq_indices"].cpu(), lay.index_bits, lay.nvec)                       # uint8 [n, nvec]
    idx = torch.nn.functional.pad(idx, (0, nvec_p - lay.nvec))
    idx = torch.where(valid[:, None], idx[rows], torch.zeros((), dtype=torch.uint8))
    idx = idx.view(ntiles, TILE, nblk, 8 // d, 4).permute(0, 2, 3, 1, 4).reshape(ntiles, nblk, 8 // d, 64)
    idx = pack6(idx) if packed else idx

    # integer codes c in [-2^(b-1), 2^(b-1) - 1] as c + 128: [row_blocks, col_blocks, d, kp]
    g = lay.num_codebooks
    codes = unpack(t["vq_codebook"].cpu(), lay.codebook_bits, kbook * d).to(torch.int32)
    codes = codes - 2 ** (lay.codebook_bits - 1) + 128
    tables = torch.full((g, d, kp), 128, dtype=torch.int32)
    tables[:, :, :kbook] = codes.view(g, kbook, d).transpose(1, 2)
    tables = tables.to(torch.uint8).view(lay.row_blocks, -1)

    seg = _segments(nblk, lay.cols_per_block, lay.normalize)
    cs = t["vq_codebook_scales"].cpu().view(torch.float16).float().view(lay.row_blocks, lay.col_blocks)
    s = cs[tiles[0].long()][:, seg[1, :-1].long()]                                      # [ntiles, nseg]
    s = s[:, :, None].expand(-1, -1, TILE).clone()
    if lay.normalize:
        nb = -(-lay.padded_in // NORM_BLOCK)
        ncodes = unpack(t["vq_norm_codes"].cpu(), NORM_BITS, nb).float()
        ns = t["vq_norm_base"].cpu().view(torch.float32) * torch.exp2(-ncodes)         # [n, nb]
        seg_nb = seg[0, :-1].long() * BLOCK // NORM_BLOCK
        s = s * ns[rows][:, seg_nb].view(ntiles, TILE, -1).transpose(1, 2)
    s = (s * valid.view(ntiles, 1, TILE)).contiguous()                                  # padding rows: 0

    # one record per tile, read as one stream: scales, the codebooks of its row block, indices (padded to 64 bytes)
    parts = [s.view(torch.uint8).view(ntiles, -1), tables[tiles[0].long()], idx.reshape(ntiles, -1)]
    size = sum(p.shape[1] for p in parts)
    data = torch.zeros(ntiles, -(-size // 64) * 64, dtype=torch.uint8)
    data[:, :size] = torch.cat(parts, dim=1)
    return _state(n, lay.in_features, d, kbook, kp, nblk, lay.col_blocks, packed, data, seg, tiles[1:].contiguous())


def _state(n, k, d, kbook, kp, nblk, ncb, packed, data, seg, tiles) -> NativeVQ:
    layer = _Layer(data.data_ptr(), seg[0].data_ptr(), seg[1].data_ptr(), tiles[0].data_ptr(), tiles[1].data_ptr(),
                   n, k, d, kbook, kp, nblk, ncb, seg.shape[1] - 1, tiles.shape[1], packed)
    return NativeVQ(n, k, d, kbook, kp, nblk, ncb, packed, data, seg, tiles, layer, ctypes.addressof(layer))


def fuse(states: list[NativeVQ]) -> tuple[NativeVQ, list[NativeVQ], list[int]] | None:
    """One state whose output is the layers' outputs side by side, the layers' own states as views into its
    tensors (no second copy), and each layer's first output column; None unless the layers share the input side of
    the layout (columns, vector dimension, codebook size, column blocks and segments)."""
    a = states[0]
    for s in states[1:]:
        if (s.k != a.k or s.d != a.d or s.kbook != a.kbook or s.kp != a.kp or s.nblk != a.nblk or s.ncb != a.ncb
                or s.packed != a.packed or not torch.equal(s.segments, a.segments)):
            return None
    data = torch.cat([s.data for s in states])   # tile records are self-contained
    tiles, members, starts = [], [], []
    t0 = row0 = 0
    for s in states:
        nt = s.tiles.shape[1]
        tiles.append(s.tiles + torch.tensor([[row0], [0]], dtype=torch.int32))
        members.append(_state(s.n, s.k, s.d, s.kbook, s.kp, s.nblk, s.ncb, s.packed, data[t0:t0 + nt], s.segments,
                              s.tiles))
        starts.append(row0)
        t0, row0 = t0 + nt, row0 + s.n
    fused = _state(row0, a.k, a.d, a.kbook, a.kp, a.nblk, a.ncb, a.packed, data, a.segments,
                   torch.cat(tiles, dim=1).contiguous())
    return fused, members, starts


def _done(rc: int, x2: torch.Tensor, n: int) -> None:
    if rc < 0:
        raise RuntimeError(f"native VQ int8 kernel refused a [{x2.shape[0]}, {x2.shape[-1]}] x [{n}, ...] call")
    global last_isa
    last_isa = ISA_NAMES[rc]


def run(st: NativeVQ, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W^T + bias for CPU x of any leading shape (fp32/bf16 in place; other dtypes via fp32)."""
    dtype = x.dtype
    if x.shape[-1] != st.k:
        raise ValueError(f"native VQ int8 kernel: x has {x.shape[-1]} features, the layer {st.k}")
    if (dtype is not torch.float32 and dtype is not torch.bfloat16) or not x.is_contiguous():
        x = x.to(torch.float32 if dtype is not torch.bfloat16 else dtype).contiguous()
    if bias is not None and (bias.dtype is not torch.float32 or not bias.is_contiguous()):
        bias = bias.detach().float().contiguous()
    if torch.compiler.is_compiling():
        y = torch.ops.hf_vq.vq_int8_gemm(x.reshape(-1, st.k), st.data, st.segments, st.tiles, bias, st.n, st.k, st.d,
                                         st.kbook, st.kp, st.nblk, st.ncb, st.packed, requested_isa())
        y = y.view(*x.shape[:-1], st.n)
    else:
        # the C code needs only the pointer: no reshape of x, and y is allocated in its final shape
        y = torch.empty(x.shape[:-1] + (st.n,), dtype=x.dtype)
        rows = x.numel() // st.k
        if rows:
            _done(_GEMM(st.layer_ptr, x.data_ptr(), x.dtype is torch.bfloat16, rows, y.data_ptr(),
                        0 if bias is None else bias.data_ptr(), torch.get_num_threads(), requested_isa()), x, st.n)
    return y if y.dtype is dtype else y.to(dtype)


def projection(st: NativeVQ) -> tuple[int, int, object, int] | None:
    """The one-row projection of ``st`` for csrc/decode_layer.c (see Kernel.projection)."""
    lib = LIBRARY.load()
    if lib is None:
        return None
    return ctypes.cast(lib.vq8_projection, ctypes.c_void_p).value, st.layer_ptr, st, requested_isa()


# torch.compile sees the kernel as one opaque op (eager calls skip the dispatcher: it costs more than the kernel
# on small layers)
@torch.library.custom_op("hf_vq::vq_int8_gemm", mutates_args=(), device_types="cpu")
def _vq_int8_gemm_op(x: torch.Tensor, data: torch.Tensor, segments: torch.Tensor, tiles: torch.Tensor,
                     bias: torch.Tensor | None, n: int, k: int, d: int, kbook: int, kp: int, nblk: int, ncb: int,
                     packed: bool, isa: int) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    if x.shape[0]:
        segments, tiles = segments.contiguous(), tiles.contiguous()
        rc = _GEMM_ARGS(x.data_ptr(), x.dtype == torch.bfloat16, x.shape[0], y.data_ptr(),
                        0 if bias is None else bias.data_ptr(), torch.get_num_threads(), isa, n, k, d, kbook, kp,
                        nblk, ncb, segments.shape[1] - 1, tiles.shape[1], packed, data.data_ptr(),
                        segments[0].data_ptr(), segments[1].data_ptr(), tiles[0].data_ptr(), tiles[1].data_ptr())
        _done(rc, x, n)
    return y


@_vq_int8_gemm_op.register_fake
def _(x, data, segments, tiles, bias, n, k, d, kbook, kp, nblk, ncb, packed, isa):
    return x.new_empty(x.shape[0], n)


KERNEL = register(Kernel(name="native-vq-int8", family="native", storage="vq", devices=("cpu",), priority=30,
                         max_rows=MAX_ROWS, prepare=prepare, run=run, fuse=fuse, projection=projection))
