"""The "triton" GPU kernels of VQ layers (GPTVQ codebooks; storage "vq", family "triton").

Three kernels share one layout, built once per layer by :func:`prepare`:

- a fused gather-dequantize-multiply kernel for small batches (decode, up to ``DECODE_ROWS`` rows of input): each
  program owns a block of output features and all the rows, loops over K, looks every weight up in its codebook and
  accumulates ``x * w`` in fp32 (bound by reading the indices once; no tensor cores);
- a tiled GEMM for larger batches: each program decodes one [BLOCK_K, BLOCK_N] tile of W at a time into registers,
  in the activation dtype, and feeds it to ``tl.dot`` (fp32 accumulate; fp32 inputs use ``input_precision="ieee"``).
  No full-size decoded weight is ever written;
- ``grouped``: the same products for fused experts, stacked along an expert dimension, one launch for all routed
  experts (hf_vq.nn.kernel_triton_experts).

Layout (all on the layer's device): ``idx`` uint8 [nvec, N], one codebook index per vector of ``d`` adjacent input
columns (transposed, so loads run along N); the codebooks as ``cb`` [G * k * d] with their integer codes (int8, for
4- and 8-bit codebooks, next to one fp32 scale per codebook) or their fp16 values (16-bit codebooks); data
normalization scales ``base * 2^-code`` as fp32 [ceil(K_padded / 64), N]. Column ``c`` of output ``n`` is component
``c % d`` of entry ``idx[c // d, n]`` of codebook ``(n // rows_per_block) * col_blocks + c // cols_per_block``, times
its codebook scale and its normalization scale: in fp32, the same operations and roundings as
hf_vq.formats.vq.decode_weight, so both give the same weights bit for bit. Small: the indices take 8 / d bits per
weight, the codebooks (default 32 x 256 blocks) 2D 8-bit ~0.07 bit per weight.

Serves vector_dim 1/2/4, index_bits 1..8, codebook_bits 4/8/16, with or without normalization, any block sizes and
odd shapes. Selection, the lazy import of Triton, the interpreter (``TRITON_INTERPRET=1`` with
``HF_VQ_KERNELS=triton`` runs it on CPU tensors) and the one-warning fallback are those of
hf_vq.nn.kernel_triton_affine, whose warning this module shares (one per process for the whole family).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from hf_vq.formats.packing import unpack
from hf_vq.formats.vq import NORM_BITS, NORM_BLOCK, VQWeight, _bits_to_f32
from hf_vq.nn import kernel_triton_affine as affine
from hf_vq.nn.kernel_registry import Kernel, register

FAMILY = affine.FAMILY
PRIORITY = affine.PRIORITY
DECODE_ROWS = affine.DECODE_ROWS

_BUILT: dict[bool, SimpleNamespace | None] = {}   # interpret mode -> the jitted kernels (None: Triton unusable)
_SMOKE_OK: set = set()     # (device type, interpret mode): a kernel compiled and ran there once
_FAILED: set = set()       # launch keys that failed to compile: answered by the exact product

# bound by _build: Triton (and its interpreter) resolve a kernel's names in its module's globals
triton = tl = SUM = decode_tile = None


def _build(triton_module, tl_module) -> SimpleNamespace:
    """Define the kernels (``@triton.jit`` reads TRITON_INTERPRET now); builtins only, as in the affine kernels."""
    global triton, tl, SUM, decode_tile
    triton, tl = triton_module, tl_module
    SUM = tl.standard._sum_combine

    @triton.jit
    def _decode_tile(idx_ptr, cb_ptr, cs_ptr, ns_ptr, N, RPB, CPB, COL_BLOCKS, offs_k, offs_n, mask_k, mask_n,
                     D: tl.constexpr, KBOOK: tl.constexpr, CB_INT: tl.constexpr, NORM: tl.constexpr,
                     NORM_COLS: tl.constexpr):
        """The fp32 weights [BLOCK_K, BLOCK_N] of columns offs_k and outputs offs_n."""
        mask_w = mask_k[:, None] & mask_n[None, :]
        vec = offs_k // D
        iv = tl.load(idx_ptr + vec[:, None] * N + offs_n[None, :], mask=mask_w, other=0).to(tl.int32)
        book = (offs_n // RPB)[None, :] * COL_BLOCKS + ((vec * D) // CPB)[:, None]
        w = tl.load(cb_ptr + (book * KBOOK + iv) * D + (offs_k % D)[:, None], mask=mask_w, other=0).to(tl.float32)
        if CB_INT:
            w = w * tl.load(cs_ptr + book, mask=mask_w, other=0.0)
        if NORM:
            w = w * tl.load(ns_ptr + (offs_k // NORM_COLS)[:, None] * N + offs_n[None, :], mask=mask_w, other=0.0)
        return w

    decode_tile = _decode_tile

    @triton.jit
    def gemv(x_ptr, idx_ptr, cb_ptr, cs_ptr, ns_ptr, b_ptr, y_ptr, M, N, K, stride_xm, RPB, CPB, COL_BLOCKS,
             D: tl.constexpr, KBOOK: tl.constexpr, CB_INT: tl.constexpr, NORM: tl.constexpr,
             NORM_COLS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            w = decode_tile(idx_ptr, cb_ptr, cs_ptr, ns_ptr, N, RPB, CPB, COL_BLOCKS, offs_k, offs_n, mask_k, mask_n,
                            D, KBOOK, CB_INT, NORM, NORM_COLS)
            acc += tl.reduce(x[:, :, None] * w[None, :, :], 1, SUM)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def gemm(x_ptr, idx_ptr, cb_ptr, cs_ptr, ns_ptr, b_ptr, y_ptr, M, N, K, stride_xm, RPB, CPB, COL_BLOCKS,
             D: tl.constexpr, KBOOK: tl.constexpr, CB_INT: tl.constexpr, NORM: tl.constexpr,
             NORM_COLS: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = decode_tile(idx_ptr, cb_ptr, cs_ptr, ns_ptr, N, RPB, CPB, COL_BLOCKS, offs_k, offs_n, mask_k, mask_n,
                            D, KBOOK, CB_INT, NORM, NORM_COLS)
            w = w.to(x_ptr.dtype.element_ty)
            if FP32_DOT:
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def grouped(x_ptr, off_ptr, idx_ptr, cb_ptr, cs_ptr, ns_ptr, y_ptr, N, K, stride_xm, RPB, CPB, COL_BLOCKS,
                stride_idx, stride_cb, stride_cs, stride_ns, D: tl.constexpr, KBOOK: tl.constexpr,
                CB_INT: tl.constexpr, NORM: tl.constexpr, NORM_COLS: tl.constexpr, USE_DOT: tl.constexpr,
                FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Stacked experts (hf_vq.nn.kernel_triton_experts): program (n block, expert e) runs the rows
        off[e]..off[e + 1] of x (sorted by expert) through expert e's weight, BLOCK_M rows at a time."""
        pid_n = tl.program_id(0)
        e = tl.program_id(1)
        start = tl.load(off_ptr + e)
        end = tl.load(off_ptr + e + 1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        idx_e = idx_ptr + e * stride_idx
        cb_e = cb_ptr + e * stride_cb
        cs_e = cs_ptr + e * stride_cs
        ns_e = ns_ptr + e * stride_ns
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < end
            acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                w = decode_tile(idx_e, cb_e, cs_e, ns_e, N, RPB, CPB, COL_BLOCKS, offs_k, offs_n, mask_k, mask_n,
                                D, KBOOK, CB_INT, NORM, NORM_COLS)
                if USE_DOT:
                    if FP32_DOT:
                        acc = tl.dot(x, w.to(x_ptr.dtype.element_ty), acc, input_precision="ieee")
                    else:
                        acc = tl.dot(x, w.to(x_ptr.dtype.element_ty), acc)
                else:
                    acc += tl.reduce(x.to(tl.float32)[:, :, None] * w[None, :, :], 1, SUM)
            tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=mask_m[:, None] & mask_n[None, :])

    return SimpleNamespace(gemv=gemv, gemm=gemm, grouped=grouped)


def kernels() -> SimpleNamespace | None:
    """The jitted kernels for the current interpreter mode, or None (with the family's one warning)."""
    mode = affine._interpret()
    if mode not in _BUILT:
        try:
            _BUILT[mode] = _build(*affine._import_triton())
        except Exception as exc:  # ImportError, or a Triton too old for this source
            affine._warn_once(f"Triton is unavailable ({type(exc).__name__}: {exc})")
            _BUILT[mode] = None
    return _BUILT[mode]


@dataclass
class TritonVQ:
    """A layer in the kernel layout (see the module docstring)."""

    n: int
    k: int
    d: int
    kbook: int
    rows_per_block: int
    cols_per_block: int
    col_blocks: int
    idx: torch.Tensor                 # uint8 [nvec, N]
    cb: torch.Tensor                  # int8 or fp16 [G * kbook * d]
    cb_scales: torch.Tensor | None    # fp32 [G] (integer codebooks)
    norm: torch.Tensor | None         # fp32 [ceil(K_padded / 64), N]

    def nbytes(self) -> int:
        ts = [t for t in (self.idx, self.cb, self.cb_scales, self.norm) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)


def supports(layout) -> bool:
    return layout.vector_dim in (1, 2, 4) and 1 <= layout.index_bits <= 8 and layout.codebook_bits in (4, 8, 16)


@torch.no_grad()
def prepare(vq: VQWeight, **_facts) -> TritonVQ | None:
    """Transcode ``vq`` once for the kernels; None when they cannot serve it here (device, Triton missing or broken,
    a layout outside :func:`supports`)."""
    lay, t = vq.layout, vq.tensors
    device = t["vq_indices"].device
    if not supports(lay) or not affine._allowed_on(device):
        return None
    ns = kernels()
    if ns is None:
        return None
    n = lay.out_features
    idx = unpack(t["vq_indices"], lay.index_bits, lay.nvec).t().contiguous()
    if lay.codebook_bits == 16:
        cb = t["vq_codebook"].view(torch.float16).reshape(-1).contiguous()
        cb_scales = None
    else:
        codes = unpack(t["vq_codebook"], lay.codebook_bits, lay.k * lay.vector_dim).to(torch.int16)
        cb = (codes - 2 ** (lay.codebook_bits - 1)).to(torch.int8).reshape(-1).contiguous()
        cb_scales = _bits_to_f32(t["vq_codebook_scales"]).contiguous()
    norm = None
    if lay.normalize:
        nblk = -(-lay.padded_in // NORM_BLOCK)
        c = unpack(t["vq_norm_codes"], NORM_BITS, nblk).float()
        norm = (_bits_to_f32(t["vq_norm_base"]) * torch.exp2(-c)).t().contiguous()   # as formats.vq.norm_scales
    state = TritonVQ(n, lay.in_features, lay.vector_dim, lay.k, lay.rows_per_block, lay.cols_per_block,
                     lay.col_blocks, idx, cb, cb_scales, norm)
    if not affine.runs_once(_SMOKE_OK, device, lambda: _launch_kernel(ns, state, torch.zeros(1, state.k, device=device),
                                                                      None, gemm=False), "the VQ kernel"):
        return None
    return state


def _launch(ns: SimpleNamespace, st: TritonVQ, x2: torch.Tensor, bias: torch.Tensor | None, gemm: bool):
    """A forward's launch (tests count these; prepare's one-time check calls :func:`_launch_kernel` directly)."""
    return _launch_kernel(ns, st, x2, bias, gemm)


def _launch_kernel(ns: SimpleNamespace, st: TritonVQ, x2: torch.Tensor, bias: torch.Tensor | None,
                   gemm: bool) -> torch.Tensor:
    """y [M, N] = x2 [M, K] (unit column stride) @ W^T + bias, in x2's dtype."""
    m = x2.shape[0]
    y = torch.empty(m, st.n, dtype=x2.dtype, device=x2.device)
    b = bias if bias is not None else y                       # dummy pointers where a flag is off
    cs = st.cb_scales if st.cb_scales is not None else y
    nrm = st.norm if st.norm is not None else y
    args = (x2, st.idx, st.cb, cs, nrm, b, y, m, st.n, st.k, x2.stride(0), st.rows_per_block, st.cols_per_block,
            st.col_blocks)
    common = dict(D=st.d, KBOOK=st.kbook, CB_INT=st.cb_scales is not None, NORM=st.norm is not None,
                  NORM_COLS=NORM_BLOCK, HAS_BIAS=bias is not None)
    if not gemm:
        bm = 1 << max(m - 1, 0).bit_length()        # next power of two >= m (m <= DECODE_ROWS)
        bk = 128 if bm == 1 else (64 if bm <= 4 else 32)
        bn = 32
        grid = (-(-st.n // bn), -(-m // bm))
        ns.gemv[grid](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, **common)
    else:
        bm = 32 if m <= 32 else 64
        bn, bk = 64, 32
        grid = (-(-m // bm), -(-st.n // bn))
        ns.gemm[grid](*args, FP32_DOT=x2.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
                      num_stages=3, **common)
    return y


def decode_state(st: TritonVQ) -> torch.Tensor:
    """The fp32 weight [K, N] of the kernel layout, decoded by torch (a launch that failed, and tests)."""
    cols = torch.arange(st.k, device=st.idx.device)
    vec = cols // st.d
    rows = torch.arange(st.n, device=st.idx.device)
    book = (rows // st.rows_per_block)[None, :] * st.col_blocks + ((vec * st.d) // st.cols_per_block)[:, None]
    w = st.cb.float()[(book * st.kbook + st.idx[vec].long()) * st.d + (cols % st.d)[:, None]]
    if st.cb_scales is not None:
        w = w * st.cb_scales[book]
    if st.norm is not None:
        w = w * st.norm[cols // NORM_BLOCK]
    return w


def _exact(st: TritonVQ, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x2 @ decode_state(st).to(x2.dtype)
    return y if bias is None else y + bias.to(y.dtype)


def run(st: TritonVQ, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W^T + bias for x of any leading shape; fp16/bf16/fp32 in place (fp32 accumulate), other dtypes via
    fp32; returns x's dtype."""
    dtype = x.dtype
    x2 = x.reshape(-1, st.k)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        x2 = x2.float()
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if bias is not None:
        bias = bias.detach().to(device=x2.device, dtype=torch.float32).contiguous()
    if x2.shape[0] == 0:
        y = x2.new_zeros(0, st.n)
    else:
        gemm = x2.shape[0] > DECODE_ROWS
        key = (x2.device.type, affine._interpret(), gemm, x2.dtype)
        ns = kernels()
        if ns is None or key in _FAILED:
            y = _exact(st, x2, bias)
        elif torch.compiler.is_compiling():
            y = _launch(ns, st, x2, bias, gemm)
        else:
            try:
                y = _launch(ns, st, x2, bias, gemm)
            except Exception as exc:
                affine._warn_once(f"the VQ {'GEMM' if gemm else 'GEMV'} kernel failed for {x2.dtype} on "
                                  f"{x2.device.type} ({type(exc).__name__}: {exc})")
                _FAILED.add(key)
                y = _exact(st, x2, bias)
    if y.dtype is not dtype:
        y = y.to(dtype)
    return y.view(*x.shape[:-1], st.n)


KERNEL = register(Kernel(name="triton-vq", family=FAMILY, storage="vq", devices=("cuda",), forced_devices=("cpu",),
                         priority=PRIORITY, max_rows=None, prepare=prepare, run=run))
