"""The "native" CPU kernel of a decode step's attention (csrc/decode_attention.c): one query position per head over
the KV cache, grouped-query heads reading their key/value head in place, an optional boolean mask.

On a decode token torch's scaled_dot_product_attention spends most of each call on setup (about 20 us per layer
for a 64-key bf16 cache, growing with the cache). This kernel reads each key and value row once for all the query
heads that share it, in 16-float vectors, splits long caches into chunks of 256 positions that threads share, and
stops at the last key the mask lets any row attend to (a static cache's unused tail costs nothing). Serves bf16 and
fp32 with the head dimension contiguous.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from hf_vq.nn.kernel_registry import Kernel, register
from hf_vq.utils.cbuild import CLibrary

SOURCE = Path(__file__).with_name("csrc") / "decode_attention.c"
DTYPES = (torch.float32, torch.bfloat16)
MAX_HEAD_DIM = 512


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    lib.decode_attention.restype = i
    lib.decode_attention.argtypes = [p, i, i, i, i, i, i, ll, ll, p, ll, ll, ll, p, ll, ll, ll, p, ll, ll, ll,
                                     ctypes.c_float, p, i]
    return lib


LIBRARY = CLibrary(SOURCE, _bind, "native decode attention kernel")


def prepare(query: torch.Tensor, **_facts) -> bool | None:
    """True when the kernel can serve attention for this query (CPU, fp32/bf16, head dim <= 512); else None."""
    if (query.device.type != "cpu" or query.dtype not in DTYPES or query.shape[-1] > MAX_HEAD_DIM
            or LIBRARY.load() is None):
        return None
    return True


def run(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
        scale: float) -> torch.Tensor:
    """softmax(scale * q k^T + mask) v for query [B, Hq, 1, D], key/value [B, Hkv, L, D] (head dim contiguous) and
    a boolean mask broadcastable to [B, Hq, 1, L] (True: attend) or None; returns [B, 1, Hq, D] contiguous."""
    B, Hq, _, D = query.shape
    Hkv, L = key.shape[1], key.shape[2]
    out = torch.empty(B, 1, Hq, D, dtype=query.dtype)
    if mask is not None:
        m = mask.expand(B, Hq, 1, L)
        ms = (m.stride(0), m.stride(1), m.stride(3))
        mp = m.data_ptr()
    else:
        ms, mp = (0, 0, 0), None
    qs, ks, vs = query.stride(), key.stride(), value.stride()
    rc = LIBRARY.load().decode_attention(
        query.data_ptr(), query.dtype is torch.bfloat16, B, Hq, Hkv, D, L, qs[0], qs[1],
        key.data_ptr(), ks[0], ks[1], ks[2], value.data_ptr(), vs[0], vs[1], vs[2], mp, *ms, scale, out.data_ptr(),
        torch.get_num_threads())
    if rc < 0:
        raise RuntimeError(f"native decode attention refused query {tuple(query.shape)}, key {tuple(key.shape)}")
    return out


KERNEL = register(Kernel(name="native-decode-attention", family="native", storage="attention", devices=("cpu",),
                         priority=20, max_rows=1, prepare=prepare, run=run))
