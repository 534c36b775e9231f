"""Grouped Triton kernels of fused experts (QuantExperts, VQExperts): one launch per projection for all the routed
experts of a call (family "triton", storages "affine_experts" and "vq_experts").

The experts module sorts the (token, slot) pairs by expert (hf_vq.nn.experts.ExpertGroups) and passes the gathered
rows ``x`` [pairs, K] with the grouping; the kernel's grid is (output blocks, experts), and program (j, e) runs rows
``starts[e]..starts[e + 1]`` through expert e's weight, ``BLOCK_M`` rows at a time: experts without tokens return at
once, and nothing per expert happens on the host. Each expert's weight is in the layout of the per-layer kernels
(hf_vq.nn.kernel_triton_affine / kernel_triton_vq, whose jitted tile decoders the grouped kernels share), stacked
along a leading expert dimension once per projection and kept until the module's tensors change.

Up to ``DECODE_ROWS`` rows per expert the products are fp32 FMAs, up to ``MAX_ROWS`` ``tl.dot`` tiles. Above that
(prefill) one program per output block would walk a long run of rows alone, so the registry offers no grouped kernel
and the module runs each expert through the per-layer kernels (tiled GEMMs over many programs).

``run(state, x, groups)`` returns None when the launch fails (one warning per process, shared with the per-layer
kernels); the module then takes its per-expert path for that call and later ones of the same kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_vq.nn import kernel_triton_affine as kta
from hf_vq.nn import kernel_triton_vq as ktv
from hf_vq.nn.kernel_registry import Kernel, register

DECODE_ROWS = kta.DECODE_ROWS
MAX_ROWS = 64          # most rows of one expert a grouped launch serves
_FAILED: set = set()   # launch keys that failed: answered by the per-expert path


@dataclass
class GroupedAffine:
    n: int
    k: int
    bits: int
    group_size: int             # > 0: every expert has column c in group c // group_size (one scale row per K step)
    qw: torch.Tensor            # int32 [E, KW, N]
    scales: torch.Tensor        # fp16 [E, G, N]
    zeros: torch.Tensor         # uint8 [E, G, N]
    g_idx: torch.Tensor         # int32 [E, K]
    perm: torch.Tensor | None   # int32 [E, K]: act-order column order per expert (identity for the others)


@dataclass
class GroupedVQ:
    one: ktv.TritonVQ           # expert 0's state: the shared layout (sizes, block shapes)
    idx: torch.Tensor           # uint8 [E, nvec, N]
    cb: torch.Tensor            # int8 / fp16 [E, G * k * d]
    cb_scales: torch.Tensor | None
    norm: torch.Tensor | None


@torch.no_grad()
def prepare_affine(weights: list, **_facts) -> GroupedAffine | None:
    states = [kta.prepare(w) for w in weights]
    ns = kta.kernels()
    if not states or any(s is None for s in states) or not hasattr(ns, "grouped"):
        return None
    s0 = states[0]
    gs = s0.group_size if all(s.group_size == s0.group_size for s in states) else 0
    perm = None
    if any(s.perm is not None for s in states):
        ident = torch.arange(s0.k, device=s0.qw.device)
        perm = torch.stack([ident if s.perm is None else s.perm for s in states]).to(torch.int32).contiguous()

    def stack(name):
        return torch.stack([getattr(s, name) for s in states]).contiguous()

    return GroupedAffine(s0.n, s0.k, s0.bits, gs, stack("qw"), stack("scales"), stack("zeros"), stack("g_idx"), perm)


@torch.no_grad()
def prepare_vq(weights: list, **_facts) -> GroupedVQ | None:
    states = [ktv.prepare(w) for w in weights]
    ns = ktv.kernels()
    if not states or any(s is None for s in states) or not hasattr(ns, "grouped"):
        return None

    def stack(name):
        ts = [getattr(s, name) for s in states]
        return None if ts[0] is None else torch.stack(ts).contiguous()

    return GroupedVQ(states[0], stack("idx"), stack("cb"), stack("cb_scales"), stack("norm"))


def _blocks(max_rows: int, group_size: int = 0) -> tuple[int, int, int, bool, bool]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, one scale row per K step?, tl.dot?) for the most rows one expert has."""
    if max_rows > DECODE_ROWS:
        bk, scalar = kta._pick_block_k(32, group_size)
        return (32 if max_rows <= 32 else 64), 64, bk, scalar, True
    bm = 1 << max(max_rows - 1, 0).bit_length()
    bk, scalar = kta._pick_block_k(128 if bm == 1 else (64 if bm <= 4 else 32), group_size)
    return bm, 32, bk, scalar, False


def _launch_affine(st: GroupedAffine, x: torch.Tensor, offsets: torch.Tensor, max_rows: int) -> torch.Tensor:
    y = torch.empty(x.shape[0], st.n, dtype=x.dtype, device=x.device)
    bm, bn, bk, scalar, dot = _blocks(max_rows, st.group_size)
    grid = (-(-st.n // bn), st.qw.shape[0])
    kta.kernels().grouped[grid](
        x, offsets, st.qw, st.scales, st.zeros, st.g_idx, st.perm if st.perm is not None else st.g_idx, y, st.n,
        st.k, x.stride(0), st.qw.stride(0), st.scales.stride(0), BITS=st.bits, CPW=kta.codes_per_word(st.bits),
        SCALAR_GROUP=scalar, GROUP_SIZE=max(st.group_size, 1), HAS_PERM=st.perm is not None, USE_DOT=dot,
        FP32_DOT=x.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return y


def _launch_vq(st: GroupedVQ, x: torch.Tensor, offsets: torch.Tensor, max_rows: int) -> torch.Tensor:
    one = st.one
    y = torch.empty(x.shape[0], one.n, dtype=x.dtype, device=x.device)
    bm, bn, bk, _scalar, dot = _blocks(max_rows)
    grid = (-(-one.n // bn), st.idx.shape[0])
    cs = st.cb_scales if st.cb_scales is not None else y
    nrm = st.norm if st.norm is not None else y
    ktv.kernels().grouped[grid](
        x, offsets, st.idx, st.cb, cs, nrm, y, one.n, one.k, x.stride(0), one.rows_per_block, one.cols_per_block,
        one.col_blocks, st.idx.stride(0), st.cb.stride(0), cs.stride(0) if st.cb_scales is not None else 0,
        nrm.stride(0) if st.norm is not None else 0, D=one.d, KBOOK=one.kbook, CB_INT=st.cb_scales is not None,
        NORM=st.norm is not None, NORM_COLS=ktv.NORM_BLOCK, USE_DOT=dot, FP32_DOT=x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return y


def _launch(st, x: torch.Tensor, offsets: torch.Tensor, max_rows: int) -> torch.Tensor:
    """One grouped launch (tests count these)."""
    if isinstance(st, GroupedAffine):
        return _launch_affine(st, x, offsets, max_rows)
    return _launch_vq(st, x, offsets, max_rows)


def run(st, x: torch.Tensor, groups) -> torch.Tensor | None:
    """y [pairs, N] for x [pairs, K], its rows sorted by expert as ``groups`` (hf_vq.nn.experts.ExpertGroups) says;
    fp16/bf16/fp32 in place, other dtypes via fp32; None when the launch failed."""
    dtype = x.dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        x = x.float()
    if x.stride(-1) != 1:
        x = x.contiguous()
    max_rows = max(groups.counts, default=0)
    key = (type(st).__name__, x.device.type, kta._interpret(), x.dtype, max_rows > DECODE_ROWS)
    if key in _FAILED:
        return None
    offsets = groups.offsets(x.device)
    if torch.compiler.is_compiling():
        y = _launch(st, x, offsets, max_rows)
    else:
        try:
            y = _launch(st, x, offsets, max_rows)
        except Exception as exc:
            kta._warn_once(f"the grouped experts kernel failed for {x.dtype} on {x.device.type} "
                           f"({type(exc).__name__}: {exc})")
            _FAILED.add(key)
            return None
    return y if y.dtype is dtype else y.to(dtype)


AFFINE = register(Kernel(name="triton-affine-experts", family=kta.FAMILY, storage="affine_experts",
                         devices=("cuda",), forced_devices=("cpu",), priority=kta.PRIORITY, max_rows=MAX_ROWS,
                         prepare=prepare_affine, run=run))
VQ = register(Kernel(name="triton-vq-experts", family=kta.FAMILY, storage="vq_experts", devices=("cuda",),
                     forced_devices=("cpu",), priority=kta.PRIORITY, max_rows=MAX_ROWS, prepare=prepare_vq, run=run))
