"""One decode position appended to transformers' default KV cache without copying the cache.

``DynamicLayer.update`` concatenates, so every decode step copies the layer's whole keys and values: after a
1024-token prompt that is more memory traffic per token than SmolLM2's attention reads. :func:`append_kv` keeps a
plain ``DynamicLayer``'s keys and values as views of buffers with room to grow, writes the new position in place and
sets the layer's ``keys``/``values`` to views one position longer: the same values as ``update`` gives, in strided
storage (as a static cache's are). A layer whose tensors were replaced since (``reorder_cache``, a user's
assignment) gets new buffers; anything else (another cache or layer class, offloading) goes through the cache's own
``update``."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

# room added when a buffer is (re)made: a quarter of the positions, at least this many (the copies stay amortized;
# the memory is at most a quarter, or this many positions, above the cache's own)
MIN_ROOM = 128


def append_kv(cache, k: torch.Tensor, v: torch.Tensor, idx: int, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``cache.update(k, v, idx, kwargs=kwargs)`` for one new position (k, v: [B, heads, 1, D])."""
    slot = reserve(cache, idx, k.shape, k.dtype, k.device) if v.shape == k.shape and v.dtype is k.dtype else None
    if slot is None:
        return cache.update(k, v, idx, kwargs=kwargs)
    return fill(slot, k, v)


def fill(slot: tuple, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write k and v at the position :func:`reserve` gave, then :func:`commit`."""
    _, kb, vb, n = slot
    kb.narrow(2, n, 1).copy_(k)
    vb.narrow(2, n, 1).copy_(v)
    return commit(slot)


def reserve(cache, idx: int, shape, dtype: torch.dtype, device: torch.device) -> tuple | None:
    """Room for one position of keys and values of ``shape`` [B, heads, 1, D] in layer ``idx``: (layer, key buffer,
    value buffer, position n), to be written at position n of both buffers and then passed to :func:`commit`; None
    where the cache's own ``update`` must run."""
    layers = cache.layers if type(cache) is DynamicCache and not cache.offloading else ()
    layer = layers[idx] if idx < len(layers) else None
    if type(layer) is not DynamicLayer:
        return None
    keys, values = layer.keys, layer.values
    grown = layer.__dict__.get("hf_vq_kv")   # (key buffer, value buffer, the views set last)
    if grown is not None and grown[2] is keys and grown[3] is values:
        kb, vb = grown[0], grown[1]
        if not (shape == (kb.shape[0], kb.shape[1], 1, kb.shape[3]) and dtype is kb.dtype and device == kb.device):
            return None
        n = keys.shape[2]
        if n == kb.shape[2]:   # full
            kb, vb = _grown(keys, n), _grown(values, n)
        return layer, kb, vb, n
    # the first append, or the layer's tensors were replaced since
    if not (layer.is_initialized and keys.dim() == 4 and values.shape == keys.shape and keys.shape[2] > 0
            and len(shape) == 4 and shape[2] == 1 and tuple(keys.shape[:2]) == tuple(shape[:2])
            and keys.shape[3] == shape[3] and keys.dtype is dtype and values.dtype is dtype
            and keys.device == device and values.device == device):
        return None
    n = keys.shape[2]
    return layer, _grown(keys, n), _grown(values, n), n


def commit(slot: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """After position n of the buffers of :func:`reserve`'s ``slot`` is written: the layer's keys and values, one
    position longer."""
    layer, kb, vb, n = slot
    keys, values = layer.keys, layer.values = kb.narrow(2, 0, n + 1), vb.narrow(2, 0, n + 1)
    layer.hf_vq_kv = (kb, vb, keys, values)
    return keys, values


def _grown(t: torch.Tensor, n: int) -> torch.Tensor:
    """A buffer with t's first n positions and room for more."""
    b, h, _, d = t.shape
    buf = t.new_empty(b, h, n + max(MIN_ROOM, n // 4), d)
    buf.narrow(2, 0, n).copy_(t.narrow(2, 0, n))
    return buf
