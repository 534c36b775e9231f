"""The "triton" GPU kernels of affine layers (storage "affine", family "triton").

Three kernels share one packed layout, built once per layer by :func:`prepare`:

- a fused dequantize-multiply kernel for small batches (decode, up to ``DECODE_ROWS`` rows of input): each program
  owns a block of output features and all the rows, loops over K, unpacks the codes, applies scale and zero-point
  and accumulates ``x * w`` in fp32 (no tensor cores: the call is bound by reading the weights once);
- a tiled GEMM for larger batches: each program dequantizes one [BLOCK_K, BLOCK_N] tile of W at a time into
  registers, in the activation dtype, and feeds it to ``tl.dot`` (fp32 accumulate; fp32 inputs use
  ``input_precision="ieee"``, never TF32). No full-size dequantized weight is ever written;
- ``grouped``: the same products for fused experts, stacked along an expert dimension, one launch for all routed
  experts (hf_vq.nn.kernel_triton_experts).

Layout (all tensors on the layer's device): ``qw`` int32 [ceil(K / CPW), N], word ``(j, n)`` holding the codes of
columns ``j * CPW + i`` of output ``n`` at bit ``i * bits`` (CPW = 32 // bits: 16, 10, 8, 4 codes per word for
2/3/4/8 bits; 3-bit words waste 2 bits); scales fp16 [G, N] and zero-points uint8 [G, N] (transposed, so loads run
along N); ``w = (q - zero) * scale`` in fp32, the same values as hf_vq.formats.affine.dequantize_groups (both are
exact in fp32). Groups: when the (sorted) group index is ``column // group_size`` with ``group_size`` a multiple of
BLOCK_K (per-channel grids included) each K step reads one row of scales; otherwise (other group sizes, act-order)
the kernel reads the group of every column from ``g_idx``. Act-order (non-monotone g_idx): the columns are sorted
by group once at prepare time and the activations are permuted on every call.

Selection: under ``HF_VQ_KERNELS=auto`` it serves CUDA layers (priority 30) whenever Triton imports and compiles.
``HF_VQ_KERNELS=triton`` forces it; on CPU tensors it runs only when ``TRITON_INTERPRET=1`` as well (Triton's numpy
interpreter: slow, no bf16; for tests and checks on machines without a GPU). Triton is imported lazily, on the first
prepare: hf_vq imports without it. Missing Triton, or a kernel that does not compile, gives one warning per process;
prepare then returns None and the layer falls back to the next kernel or the exact path (a compile failure that only
shows at a later call, e.g. another activation dtype, is answered by the exact dequantized product for that call).

Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a function, so the kernels are built on first use,
once per interpreter mode. They call only Triton builtins (no ``tl.zeros`` / ``tl.sum``, which triton.language
decorates at import): the interpreter then works even when triton was imported (by torch or transformers) before
the variable was set.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from hf_vq.formats.affine import AffineWeight
from hf_vq.nn import kernel_registry
from hf_vq.nn.kernel_registry import Kernel, register

FAMILY = "triton"
PRIORITY = 30
DECODE_ROWS = 16   # rows served by the fused GEMV kernel; more rows take the tiled GEMM

_BUILT: dict[bool, SimpleNamespace | None] = {}   # interpret mode -> the jitted kernels (None: Triton unusable)
_SMOKE_OK: set = set()     # (device type, interpret mode): a kernel compiled and ran there once
_FAILED: set = set()       # launch keys that failed to compile: answered by the exact product
_warned = False


def _import_triton():
    """The lazy import (tests replace it to simulate a machine without Triton)."""
    import triton
    import triton.language as tl
    return triton, tl


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_once(checked: set, device: torch.device, launch, what: str) -> bool:
    """Compile and run ``launch()`` once per (device type, interpret mode) recorded in ``checked``: a broken Triton
    falls back at prepare time, not in a forward. False, after the family's one warning, when it fails."""
    key = (device.type, _interpret())
    if key in checked:
        return True
    try:
        launch()
    except Exception as exc:  # noqa: BLE001  (any compile or launch failure: fall back)
        _warn_once(f"{what} does not compile or run on {device.type} ({type(exc).__name__}: {exc})")
        return False
    checked.add(key)
    return True


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"hf_vq triton kernel: {message}; using the next kernel or the exact path", RuntimeWarning,
                      stacklevel=3)


# bound by _build: Triton (and its interpreter) resolve a kernel's names in its module's globals
triton = tl = SUM = dequant_tile = None


def _build(triton_module, tl_module) -> SimpleNamespace:
    """Define the kernels (``@triton.jit`` reads TRITON_INTERPRET now). Their shared dequantization is bound as a
    module global too: Triton looks names up there, not in this function's scope."""
    global triton, tl, SUM, dequant_tile
    triton, tl = triton_module, tl_module
    # tl.sum's own combine function: the interpreter recognises it (numpy sum) even when triton was imported before
    # TRITON_INTERPRET was set, when tl.sum / tl.zeros themselves are compiled-mode functions it cannot call
    SUM = tl.standard._sum_combine

    @triton.jit
    def _dequant_tile(qw_ptr, s_ptr, z_ptr, g_ptr, N, k0, offs_k, offs_n, mask_k, mask_n, BITS: tl.constexpr,
                      CPW: tl.constexpr, SCALAR_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr):
        """The fp32 weights [BLOCK_K, BLOCK_N] of columns offs_k and outputs offs_n: (q - zero) * scale."""
        mask_w = mask_k[:, None] & mask_n[None, :]
        words = tl.load(qw_ptr + (offs_k // CPW)[:, None] * N + offs_n[None, :], mask=mask_w, other=0)
        q = ((words >> ((offs_k % CPW) * BITS)[:, None]) & ((1 << BITS) - 1)).to(tl.float32)
        if SCALAR_GROUP:
            g = k0 // GROUP_SIZE
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
            w = (q - z[None, :]) * s[None, :]
        else:
            g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)
            sz = g[:, None] * N + offs_n[None, :]
            s = tl.load(s_ptr + sz, mask=mask_w, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + sz, mask=mask_w, other=0).to(tl.float32)
            w = (q - z) * s
        return w

    dequant_tile = _dequant_tile

    @triton.jit
    def gemv(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr, M, N, K, stride_xm,
             BITS: tl.constexpr, CPW: tl.constexpr, SCALAR_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr,
             HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
            w = dequant_tile(qw_ptr, s_ptr, z_ptr, g_ptr, N, k0, offs_k, offs_n, mask_k, mask_n, BITS, CPW, SCALAR_GROUP,
                             GROUP_SIZE)
            acc += tl.reduce(x[:, :, None] * w[None, :, :], 1, SUM)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def gemm(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr, M, N, K, stride_xm,
             BITS: tl.constexpr, CPW: tl.constexpr, SCALAR_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr,
             HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):
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
            w = dequant_tile(qw_ptr, s_ptr, z_ptr, g_ptr, N, k0, offs_k, offs_n, mask_k, mask_n, BITS, CPW, SCALAR_GROUP,
                             GROUP_SIZE)
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
    def grouped(x_ptr, off_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, perm_ptr, y_ptr, N, K, stride_xm, stride_qw, stride_s,
                BITS: tl.constexpr, CPW: tl.constexpr, SCALAR_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr,
                HAS_PERM: tl.constexpr, USE_DOT: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Stacked experts (hf_vq.nn.kernel_triton_experts): program (n block, expert e) runs the rows
        off[e]..off[e + 1] of x (sorted by expert) through expert e's weight, BLOCK_M rows at a time."""
        pid_n = tl.program_id(0)
        e = tl.program_id(1)
        start = tl.load(off_ptr + e)
        end = tl.load(off_ptr + e + 1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        qw_e = qw_ptr + e * stride_qw
        s_e = s_ptr + e * stride_s
        z_e = z_ptr + e * stride_s
        g_e = g_ptr + e * K
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < end
            acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                if HAS_PERM:
                    cols = tl.load(perm_ptr + e * K + offs_k, mask=mask_k, other=0)
                else:
                    cols = offs_k
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                w = dequant_tile(qw_e, s_e, z_e, g_e, N, k0, offs_k, offs_n, mask_k, mask_n, BITS, CPW,
                                 SCALAR_GROUP, GROUP_SIZE)
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
    """The jitted kernels for the current interpreter mode, or None (with one warning) when Triton is unusable."""
    mode = _interpret()
    if mode not in _BUILT:
        try:
            _BUILT[mode] = _build(*_import_triton())
        except Exception as exc:  # ImportError, or a Triton too old for this source
            _warn_once(f"Triton is unavailable ({type(exc).__name__}: {exc})")
            _BUILT[mode] = None
    return _BUILT[mode]


def codes_per_word(bits: int) -> int:
    return 32 // bits


def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] -> int32 [ceil(K / CPW), N]: word (j, n) holds column j * CPW + i at bit i * bits."""
    n, k = codes.shape
    cpw = codes_per_word(bits)
    kw = -(-k // cpw)
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, kw * cpw - k)).view(n, kw, cpw)
    shifts = torch.arange(cpw, device=codes.device, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1)                      # < 2^32: exact in int64, disjoint bit fields
    words = torch.where(words >= 2**31, words - 2**32, words)   # the same 32 bits as a signed int32
    return words.to(torch.int32).t().contiguous()


def unpack_words(qw: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_words` (the exact product on a launch failure, and tests): int32 [KW, N] -> [K, N]."""
    cpw = codes_per_word(bits)
    cols = torch.arange(k, device=qw.device)
    shift = ((cols % cpw) * bits).to(torch.int32)[:, None]
    return (qw[cols // cpw] >> shift) & ((1 << bits) - 1)


@dataclass
class TritonAffine:
    """A layer in the kernel layout (see the module docstring)."""

    n: int
    k: int
    bits: int
    qw: torch.Tensor            # int32 [ceil(K / CPW), N]
    scales: torch.Tensor        # fp16 [G, N]
    zeros: torch.Tensor         # uint8 [G, N]
    g_idx: torch.Tensor         # int32 [K], group of each (sorted) column
    perm: torch.Tensor | None   # int64 [K]: column order (act-order), applied to x on every call
    group_size: int             # > 0: sorted column c is in group c // group_size (multiple-of-BLOCK_K fast path)

    def nbytes(self) -> int:
        ts = [self.qw, self.scales, self.zeros, self.g_idx] + ([self.perm] if self.perm is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


def _allowed_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    if device.type == "cpu":   # only when forced, through the interpreter
        chosen = kernel_registry.selection()
        return chosen is not None and FAMILY in chosen and _interpret()
    return False


def _pick_block_k(default: int, group_size: int) -> tuple[int, bool]:
    """(BLOCK_K, one scale row per K step?): the largest block <= default that divides the group size."""
    if group_size > 0:
        for bk in (128, 64, 32, 16):
            if bk <= default and group_size % bk == 0:
                return bk, True
    return default, False


def prepare(aw: AffineWeight, **_facts) -> TritonAffine | None:
    """Repack ``aw`` once for the kernels; None when they cannot serve it here (device, Triton missing or broken)."""
    device = aw.codes.device
    if aw.bits not in (2, 3, 4, 8) or not _allowed_on(device):
        return None
    ns = kernels()
    if ns is None:
        return None
    n, k = aw.shape
    g = aw.g_idx.long()
    perm = None
    if k > 1 and bool((g[1:] < g[:-1]).any()):
        perm = torch.argsort(g, stable=True)
        g = g[perm]
    codes = aw.codes if perm is None else aw.codes[:, perm]
    # uniform groups: per-channel grids, or sorted group index == column // group_size (a shorter last group is fine)
    cols = torch.arange(k, device=device)
    gs = aw.group_size if aw.group_size > 0 else 0
    if bool((g == 0).all()):
        gs = 128 * -(-max(k, 1) // 128)   # one group: every K step reads row 0
    elif not (gs > 0 and torch.equal(g, cols // gs)):
        gs = 0
    state = TritonAffine(n, k, aw.bits, pack_words(codes, aw.bits), aw.scales.t().contiguous(),
                         aw.zeros.t().contiguous(), g.to(torch.int32).contiguous(), perm, gs)
    if not runs_once(_SMOKE_OK, device, lambda: _launch_kernel(ns, state, torch.zeros(1, k, device=device), None,
                                                               gemm=False), "the kernel"):
        return None
    return state


def _launch(ns: SimpleNamespace, st: TritonAffine, x2: torch.Tensor, bias: torch.Tensor | None, gemm: bool):
    """A forward's launch (tests count these; prepare's one-time check calls :func:`_launch_kernel` directly)."""
    return _launch_kernel(ns, st, x2, bias, gemm)


def _launch_kernel(ns: SimpleNamespace, st: TritonAffine, x2: torch.Tensor, bias: torch.Tensor | None,
                   gemm: bool) -> torch.Tensor:
    """y [M, N] = x2 [M, K] (unit column stride) @ W^T + bias, in x2's dtype."""
    m = x2.shape[0]
    y = torch.empty(m, st.n, dtype=x2.dtype, device=x2.device)
    b = bias if bias is not None else y   # a dummy pointer when HAS_BIAS is False
    cpw = codes_per_word(st.bits)
    common = dict(BITS=st.bits, CPW=cpw, HAS_BIAS=bias is not None)
    args = (x2, st.qw, st.scales, st.zeros, st.g_idx, b, y, m, st.n, st.k, x2.stride(0))
    if not gemm:
        bm = 1 << max(m - 1, 0).bit_length()        # next power of two >= m (m <= DECODE_ROWS)
        bk, scalar = _pick_block_k(128 if bm == 1 else (64 if bm <= 4 else 32), st.group_size)
        bn = 32
        grid = (-(-st.n // bn), -(-m // bm))
        ns.gemv[grid](*args, SCALAR_GROUP=scalar, GROUP_SIZE=max(st.group_size, 1), BLOCK_M=bm, BLOCK_N=bn,
                      BLOCK_K=bk, num_warps=4, **common)
    else:
        bm = 32 if m <= 32 else 64
        bn = 64
        bk, scalar = _pick_block_k(32, st.group_size)
        grid = (-(-m // bm), -(-st.n // bn))
        ns.gemm[grid](*args, SCALAR_GROUP=scalar, GROUP_SIZE=max(st.group_size, 1),
                      FP32_DOT=x2.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
                      num_stages=3, **common)
    return y


def _exact(st: TritonAffine, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The dequantized product from the packed layout (a kernel that failed to compile for this call)."""
    q = unpack_words(st.qw, st.bits, st.k).float()
    g = st.g_idx.long()
    w_t = (q - st.zeros.float()[g]) * st.scales.float()[g]        # [K, N], exact in fp32
    y = x2 @ w_t.to(x2.dtype)
    return y if bias is None else y + bias.to(y.dtype)


def run(st: TritonAffine, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W^T + bias for x of any leading shape; fp16/bf16/fp32 in place (fp32 accumulate), other dtypes via
    fp32; returns x's dtype."""
    dtype = x.dtype
    x2 = x.reshape(-1, st.k)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        x2 = x2.float()
    if st.perm is not None:
        x2 = x2.index_select(1, st.perm)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if bias is not None:
        bias = bias.detach().to(device=x2.device, dtype=torch.float32).contiguous()
    if x2.shape[0] == 0:
        y = x2.new_zeros(0, st.n)
    else:
        gemm = x2.shape[0] > DECODE_ROWS
        key = (x2.device.type, _interpret(), gemm, x2.dtype, st.bits, st.group_size > 0)
        ns = kernels()
        if ns is None or key in _FAILED:
            y = _exact(st, x2, bias)
        elif torch.compiler.is_compiling():
            y = _launch(ns, st, x2, bias, gemm)
        else:
            try:
                y = _launch(ns, st, x2, bias, gemm)
            except Exception as exc:
                _warn_once(f"the {'GEMM' if gemm else 'GEMV'} kernel failed for {x2.dtype} on {x2.device.type} "
                           f"({type(exc).__name__}: {exc})")
                _FAILED.add(key)
                y = _exact(st, x2, bias)
    if y.dtype is not dtype:
        y = y.to(dtype)
    return y.view(*x.shape[:-1], st.n)


KERNEL = register(Kernel(name="triton-affine", family=FAMILY, storage="affine", devices=("cuda",),
                         forced_devices=("cpu",), priority=PRIORITY, max_rows=None, prepare=prepare, run=run))
