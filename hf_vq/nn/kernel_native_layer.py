"""The "native" decoder-layer decode step (csrc/decode_layer.c): a Llama-family layer's one-position forward in two
C calls around the KV-cache update, its projections called through their own kernels' projection ABI
(``Kernel.projection``: native affine and native VQ).

A decode token through separate kernels still makes about a dozen calls from Python per layer; each costs little,
but on a small model they add up to as much as the layers' arithmetic. hf_vq.model.decode_layer builds a
:class:`NativeLayer` for a layer whose parts all have native kernels and runs its step here.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_vq.nn.kernel_registry import Kernel, register
from hf_vq.utils.cbuild import CLibrary

SOURCE = Path(__file__).with_name("csrc") / "decode_layer.c"
DTYPES = (torch.float32, torch.bfloat16)
MAX_HEAD_DIM = 512


class _Projection(ctypes.Structure):
    _fields_ = [("fn", ctypes.c_void_p), ("ctx", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("isa", ctypes.c_int32)]


class _Layer(ctypes.Structure):
    """csrc/decode_layer.c's dl_layer."""

    _fields_ = ([(n, _Projection) for n in ("q", "k", "v", "o", "gate", "up", "down")]
                + [(n, ctypes.c_void_p) for n in ("norm1", "norm2")]
                + [(n, ctypes.c_float) for n in ("eps1", "eps2", "scale")]
                + [(n, ctypes.c_int32) for n in ("bf16", "hidden", "D", "hq", "hk", "sq", "sk", "sv", "sg", "su",
                                                 "inter", "gu_n")])


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    lib.layer_pre.restype = i
    lib.layer_pre.argtypes = [p, p, p, p, p, p, p, p, ll, i]
    lib.layer_step.restype = i
    lib.layer_step.argtypes = [p, p, p, p, i, p, p, ll, ll, i, p, ll, ll, p, i]
    lib.layer_post.restype = i
    lib.layer_post.argtypes = [p, p, p, i, p, ll, ll, p, ll, ll, p, ll, ll, p, i]
    lib.stack_step.restype = i
    lib.stack_step.argtypes = [p, i, p, p, p, p, p, p, p, p, p, p, i]
    lib.layer_time_projection.restype = ll
    lib.layer_time_projection.argtypes = [p, p, i, i, p, i, p, p, i, i]
    return lib


LIBRARY = CLibrary(SOURCE, _bind, "native decoder layer kernel")


@dataclass
class Projection:
    """A projection as the layer step calls it: its kernel's projection (function, context, what keeps the context
    alive, instruction set) and its fp32 bias or None."""

    fn: int
    ctx: int
    keep: object
    isa: int
    bias: torch.Tensor | None


@dataclass
class NativeLayer:
    """One layer's step in C: the context struct and the tensors its pointers point into."""

    layer: _Layer
    keep: list
    dtype: torch.dtype
    hq: int
    hk: int
    D: int
    qkv_n: int
    sv: int
    q_bias: torch.Tensor | None = None

    def set_q_bias(self, bias: torch.Tensor | None) -> None:
        """A new bias of the q (or joined q/k/v) projection."""
        self.layer.q.bias = 0 if bias is None else bias.data_ptr()
        self.q_bias = bias


def prepare(dtype: torch.dtype, **_facts) -> bool | None:
    """True when the library is built and serves ``dtype``; else None."""
    return True if dtype in DTYPES and LIBRARY.load() is not None else None


def build(dtype: torch.dtype, hidden: int, D: int, hq: int, hk: int, scale: float, norms: tuple,
          qkv: list[Projection], qkv_starts: tuple[int, int, int], qkv_n: int, o: Projection,
          gate_up: list[Projection], gate_up_starts: tuple[int, int], gate_up_n: int, inter: int,
          down: Projection) -> NativeLayer | None:
    """The C context of one layer. qkv: one projection writing q, k and v side by side at ``qkv_starts`` (of
    ``qkv_n`` columns), or one each; gate_up likewise. norms: ((weight, eps), (weight, eps)) in ``dtype``. None when
    the kernel cannot serve it (no library, another dtype, an odd head dimension or one above 512)."""
    if prepare(dtype) is None or D > MAX_HEAD_DIM or D % 2 or len(qkv) not in (1, 3) or len(gate_up) not in (1, 2):
        return None
    (w1, eps1), (w2, eps2) = norms
    none = _Projection(0, 0, 0, 0)

    def proj(p: Projection | None) -> _Projection:
        return none if p is None else _Projection(p.fn, p.ctx, 0 if p.bias is None else p.bias.data_ptr(), p.isa)

    q, k, v = (qkv + [None, None])[:3]
    gate, up = (gate_up + [None])[:2]
    layer = _Layer(proj(q), proj(k), proj(v), proj(o), proj(gate), proj(up), proj(down), w1.data_ptr(),
                   w2.data_ptr(), eps1, eps2, scale, dtype is torch.bfloat16, hidden, D, hq, hk, *qkv_starts,
                   *gate_up_starts, inter, gate_up_n)
    keep = qkv + gate_up + [o, down, w1, w2]
    return NativeLayer(layer, keep, dtype, hq, hk, D, qkv_n, qkv_starts[2], qkv[0].bias)


def _mask(st: NativeLayer, mask: torch.Tensor | None, length: int) -> tuple | None:
    """(pointer, head stride, position stride) of a boolean mask broadcastable to [1, hq, 1, length], (None, 0, 0)
    for no mask, or None for a mask of another form."""
    if mask is None:
        return None, 0, 0
    if (mask.dtype is not torch.bool or mask.dim() != 4 or mask.shape[0] != 1 or mask.shape[2] != 1
            or mask.shape[3] != length or mask.shape[1] not in (1, st.hq)):
        return None
    return mask.data_ptr(), (mask.stride(1) if mask.shape[1] > 1 else 0), mask.stride(3)


def pre(st: NativeLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Norm, q/k/v projection and rotation of one position ``h`` [1, 1, hidden] (contiguous; cos/sin: D
    contiguous values): q [1, hq, 1, D] and k [1, hk, 1, D] rotated, v [1, hk, 1, D]."""
    D, hq, hk = st.D, st.hq, st.hk
    y = torch.empty(st.qkv_n, dtype=st.dtype)
    qk = torch.empty(hq + hk, D, dtype=st.dtype)
    if LIBRARY.load().layer_pre(ctypes.addressof(st.layer), h.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                y.data_ptr(), qk.data_ptr(), None, None, 0, torch.get_num_threads()) < 0:
        raise RuntimeError("native decoder layer kernel: a projection refused its call")
    return qk[:hq].view(1, hq, 1, D), qk[hq:].view(1, hk, 1, D), y[st.sv:st.sv + hk * D].view(1, hk, 1, D)


def post(st: NativeLayer, h: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
         mask: torch.Tensor | None) -> torch.Tensor | None:
    """The layer's output [1, 1, hidden] from ``h``, the rotated ``q`` of :func:`pre` and the cache's keys/values
    [1, hk, len, D] (head dim contiguous, ``pre``'s dtype) under a boolean mask broadcastable to [1, hq, 1, len] or
    None; None when the cache or mask is not of that form (the caller then goes on with separate kernels)."""
    if (keys.dtype is not st.dtype or values.dtype is not st.dtype or keys.dim() != 4 or keys.shape != values.shape
            or keys.shape[0] != 1 or keys.shape[1] != st.hk or keys.shape[3] != st.D or keys.stride(-1) != 1
            or values.stride(-1) != 1 or keys.device.type != "cpu" or values.device.type != "cpu"):
        return None
    length = keys.shape[2]
    m = _mask(st, mask, length)
    if m is None:
        return None
    out = torch.empty(h.shape, dtype=st.dtype)
    ks, vs = keys.stride(), values.stride()
    if LIBRARY.load().layer_post(ctypes.addressof(st.layer), h.data_ptr(), q.data_ptr(), length, keys.data_ptr(),
                                 ks[1], ks[2], values.data_ptr(), vs[1], vs[2], *m, out.data_ptr(),
                                 torch.get_num_threads()) < 0:
        raise RuntimeError("native decoder layer kernel: a projection refused its call")
    return out


def _check_kv(kb: torch.Tensor, vb: torch.Tensor, n: int, dtype: torch.dtype, hk: int, D: int) -> None:
    """Raise unless the key and value buffers are [1, hk, > n, D] of ``dtype`` with D contiguous and the same
    strides: the C step writes position n through raw pointers."""
    if (kb.dtype is not dtype or vb.dtype is not dtype or kb.shape[1] != hk or kb.shape[3] != D
            or kb.stride() != vb.stride() or kb.stride(3) != 1 or kb.shape[2] <= n):
        raise ValueError("native decoder layer kernel: KV buffers of another layout")


def step(st: NativeLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: tuple,
         mask: torch.Tensor | None) -> torch.Tensor | None:
    """:func:`pre` and :func:`post` in one C call, on KV buffers with room: ``kv`` = (key buffer, value buffer, n)
    [1, hk, > n, D] in ``h``'s dtype (D contiguous, the same strides); k and v are written at position n and the
    attention reads positions 0..n. None, before anything is written, for a mask :func:`post` does not take."""
    kb, vb, n = kv
    m = _mask(st, mask, n + 1)
    if m is None:
        return None
    _check_kv(kb, vb, n, st.dtype, st.hk, st.D)
    out = torch.empty(h.shape, dtype=st.dtype)
    if LIBRARY.load().layer_step(ctypes.addressof(st.layer), h.data_ptr(), cos.data_ptr(), sin.data_ptr(), st.qkv_n,
                                 kb.data_ptr(), vb.data_ptr(), kb.stride(1), kb.stride(2), n, *m, out.data_ptr(),
                                 torch.get_num_threads()) < 0:
        raise RuntimeError("native decoder layer kernel: a projection refused its call")
    return out


class NativeStack:
    """The C contexts of a model's layers in order, for :func:`stack`, with the per-layer argument arrays that
    stay put between tokens; those of the KV buffers (pointers, strides, positions) are written at each call, into
    arrays of the calling thread (the C call runs without the GIL: another thread's call must not overwrite them).
    It points into the layers' :class:`NativeLayer` without holding them (their memory goes when their plans let go
    of them): the caller passes it only with those layers alive."""

    def __init__(self, layers: list[NativeLayer]):
        nl = len(layers)
        self.heads = [(st.hk, st.D) for st in layers]
        self.dtype = layers[0].dtype
        self.ptrs = (ctypes.c_void_p * nl)(*[ctypes.addressof(st.layer) for st in layers])
        self.qkv_n = (ctypes.c_int32 * nl)(*[st.qkv_n for st in layers])
        self._per_thread = threading.local()

    def kv_arrays(self) -> tuple:
        """This thread's (keys, values, head strides, position strides, positions) arrays."""
        arrays = getattr(self._per_thread, "arrays", None)
        if arrays is None:
            nl = len(self.heads)
            arrays = self._per_thread.arrays = ((ctypes.c_void_p * nl)(), (ctypes.c_void_p * nl)(),
                                                (ctypes.c_longlong * nl)(), (ctypes.c_longlong * nl)(),
                                                (ctypes.c_int32 * nl)())
        return arrays


def stack(st: NativeStack, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kvs: list[tuple]) -> torch.Tensor:
    """:func:`step` of every layer of ``st`` in turn, in one C call, without a mask: ``kvs[i]`` = (key buffer,
    value buffer, n) of layer i, as :func:`step` takes them. The last layer's output [1, 1, hidden]."""
    keys, values, kvsh, kvsl, pos = st.kv_arrays()
    for i, ((kb, vb, n), (hk, D)) in enumerate(zip(kvs, st.heads, strict=True)):
        _check_kv(kb, vb, n, st.dtype, hk, D)
        keys[i], values[i], kvsh[i], kvsl[i], pos[i] = kb.data_ptr(), vb.data_ptr(), kb.stride(1), kb.stride(2), n
    out = torch.empty(h.shape, dtype=st.dtype)
    if LIBRARY.load().stack_step(st.ptrs, len(st.heads), h.data_ptr(), cos.data_ptr(), sin.data_ptr(), st.qkv_n,
                                 keys, values, kvsh, kvsl, pos, out.data_ptr(), torch.get_num_threads()) < 0:
        raise RuntimeError("native decoder layer kernel: a projection refused its call")
    return out


def time_projection(projections: list[tuple], x: torch.Tensor, n: int, count: int,
                    bias: torch.Tensor | None = None) -> float:
    """Benchmark aid: seconds per one-row call of a layer's projection as the layer step makes it (timed inside C,
    no Python between calls), call i on ``projections[i % len]`` (each a ``Kernel.projection(state)`` of a copy of
    the same layer, so that cold copies stream from memory). ``x`` [k] fp32 or bf16; ``n`` output columns."""
    lib = LIBRARY.load()
    if lib is None:
        raise RuntimeError("native decoder layer kernel unavailable")
    fns = {p[0] for p in projections}
    isas = {p[3] for p in projections}
    if len(fns) != 1 or len(isas) != 1:
        raise ValueError("time_projection: every projection must be of the same kernel and instruction set")
    x = x.contiguous()
    y = torch.empty(n, dtype=x.dtype)
    ctxs = (ctypes.c_void_p * len(projections))(*[p[1] for p in projections])
    ns = lib.layer_time_projection(fns.pop(), ctxs, len(projections), count, x.data_ptr(),
                                   x.dtype is torch.bfloat16, y.data_ptr(), 0 if bias is None else bias.data_ptr(),
                                   torch.get_num_threads(), isas.pop())
    if ns < 0:
        raise RuntimeError("native decoder layer kernel: a projection refused its call")
    return ns / 1e9 / count


# registered so that HF_VQ_KERNELS selects it with the other native kernels; hf_vq.model.decode_layer calls
# prepare(dtype), build, pre and post itself (a layer step is not a projection's run(state, x, bias))
KERNEL = register(Kernel(name="native-decode-layer", family="native", storage="decode_layer", devices=("cpu",),
                         priority=20, max_rows=1, prepare=prepare, run=post))
