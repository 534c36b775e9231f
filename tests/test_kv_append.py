"""Appending a decode position to transformers' DynamicCache in place (model/kv_append.py): the layer holds what
``update`` would give, through growth, replaced tensors and caches it leaves to their own ``update``; and a decode
with the layer step writes k and v straight into the cache."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer, StaticCache

import hf_vq
from hf_vq.model import kv_append
from tests.test_decode_step_kernels import load, strip_decode_kernels, tiny_llama


def filled(n: int, batch=1, heads=2, d=8, dtype=torch.float32, seed=0) -> tuple[DynamicCache, DynamicCache]:
    """Two DynamicCaches of one layer holding the same n positions."""
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(batch, heads, n, d, generator=g).to(dtype) for _ in range(2))
    caches = (DynamicCache(), DynamicCache())
    for c in caches:
        c.update(k.clone(), v.clone(), 0)
    return caches


def step(batch=1, heads=2, d=8, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, 1, d, generator=g).to(dtype) for _ in range(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_appending_gives_what_update_gives_through_several_regrowths(monkeypatch, dtype):
    monkeypatch.setattr(kv_append, "MIN_ROOM", 3)
    ours, theirs = filled(5, batch=2, dtype=dtype)
    buffers = set()
    for i in range(40):
        k, v = step(batch=2, dtype=dtype, seed=i)
        got = kv_append.append_kv(ours, k, v, 0, {})
        want = theirs.update(k, v, 0)
        layer = ours.layers[0]
        assert got[0] is layer.keys and got[1] is layer.values
        assert torch.equal(layer.keys, want[0]) and torch.equal(layer.values, want[1])
        assert ours.get_seq_length() == theirs.get_seq_length() == 6 + i
        buffers.add(layer.hf_vq_kv[0].data_ptr())
    assert layer.keys.data_ptr() == layer.hf_vq_kv[0].data_ptr(), "a view of the buffer, not a copy"
    assert 3 <= len(buffers) <= 12, "the buffers grew several times, not at every step"


def test_replaced_or_cropped_tensors_are_picked_up():
    ours, theirs = filled(6, batch=2)
    for i in range(3):
        k, v = step(batch=2, seed=i)
        kv_append.append_kv(ours, k, v, 0, {})
        theirs.update(k, v, 0)
    beams = torch.tensor([1, 1])
    for c in (ours, theirs):
        c.reorder_cache(beams)   # new tensors (index_select)
    k, v = step(batch=2, seed=10)
    assert torch.equal(kv_append.append_kv(ours, k, v, 0, {})[0], theirs.update(k, v, 0)[0])
    for c in (ours, theirs):
        c.crop(-6)               # 10 -> 4 positions: a view of the same buffer, shorter
    for i in range(2):
        k, v = step(batch=2, seed=20 + i)
        got, want = kv_append.append_kv(ours, k, v, 0, {}), theirs.update(k, v, 0)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert ours.get_seq_length() == 6


def test_other_caches_and_mismatched_steps_go_through_update():
    sliding = DynamicCache()
    sliding.layers.append(DynamicSlidingWindowLayer(sliding_window=4))
    ref = DynamicCache()
    ref.layers.append(DynamicSlidingWindowLayer(sliding_window=4))
    for i in range(6):
        k, v = step(seed=i)
        got, want = kv_append.append_kv(sliding, k, v, 0, {}), ref.update(k, v, 0)
        assert torch.equal(got[0], want[0])
    assert "hf_vq_kv" not in sliding.layers[0].__dict__
    ours, theirs = filled(4)
    k, v = step(heads=3)   # another head count: update's own error
    with pytest.raises(RuntimeError):
        theirs.update(k, v, 0)
    with pytest.raises(RuntimeError):
        kv_append.append_kv(ours, k, v, 0, {})
    k, v = step(dtype=torch.bfloat16)   # another dtype: update promotes, and so does the fallback
    got, want = kv_append.append_kv(ours, k, v, 0, {}), theirs.update(k, v, 0)
    assert got[0].dtype == want[0].dtype and torch.equal(got[0], want[0])
    assert kv_append.reserve(DynamicCache(), 0, (1, 2, 1, 8), torch.float32, torch.device("cpu")) is None


def test_a_static_cache_is_left_to_its_update():
    cfg = LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1)
    cache = StaticCache(config=cfg, max_cache_len=8)
    k, v = step(heads=2, d=8)
    keys, _ = kv_append.append_kv(cache, k, v, 0, {"cache_position": torch.tensor([0])})
    assert keys.shape == (1, 2, 8, 8) and torch.equal(keys[:, :, :1], k)
    assert "hf_vq_kv" not in cache.layers[0].__dict__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_layer_step_writes_k_and_v_into_the_cache(tmp_path, dtype):
    path = tiny_llama(tmp_path)
    ids = torch.randint(2, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    caches = []
    for stripped in (False, True):   # the layer step; transformers' own modules and cache update
        model = load(path, dtype=dtype, quantization_config=hf_vq.RTNConfig(bits=4, group_size=32))
        if stripped:
            strip_decode_kernels(model)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids, cache=cache, use_cache=True)
            nxt = ids[:, -1:]
            for _ in range(5):
                nxt = model(nxt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        caches.append(cache)
    fast, own = caches
    assert all("hf_vq_kv" in layer.__dict__ for layer in fast.layers), "k and v went to the buffers"
    assert not any("hf_vq_kv" in layer.__dict__ for layer in own.layers)
    tol = 2.0 ** -7 if dtype is torch.bfloat16 else 1e-5
    for a, b in zip(fast.layers, own.layers):
        assert a.keys.shape == b.keys.shape == (1, 1, 12, 24)
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            assert torch.allclose(x.float(), y.float(), rtol=tol, atol=tol * float(y.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_one_call_step_equals_pre_then_post(tmp_path, dtype):
    from hf_vq.nn import kernel_native_layer
    model = load(tiny_llama(tmp_path), dtype=dtype, quantization_config=hf_vq.RTNConfig(bits=4, group_size=32))
    ids = torch.randint(2, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
    native = model.model.layers[1].hf_vq_plan.native
    g = torch.Generator().manual_seed(3)
    h = torch.randn(1, 1, 96, generator=g).to(dtype)
    angles = torch.rand(1, 12, generator=g) * 6
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    n = 9
    kb, vb = (torch.randn(1, 1, n + 5, 24, generator=g).to(dtype) for _ in range(2))
    mask = torch.ones(1, 1, 1, n + 1, dtype=torch.bool)
    mask[..., 2] = False
    for m in (None, mask):
        k1, v1 = kb.clone(), vb.clone()
        got = kernel_native_layer.step(native, h, cos, sin, (k1, v1, n), m)
        q, k, v = kernel_native_layer.pre(native, h, cos, sin)
        keys, values = torch.cat([kb[:, :, :n], k], 2), torch.cat([vb[:, :, :n], v], 2)
        want = kernel_native_layer.post(native, h, q, keys, values, m)
        assert torch.equal(got, want)
        assert torch.equal(k1[:, :, :n + 1], keys) and torch.equal(v1[:, :, :n + 1], values)
        assert torch.equal(k1[:, :, n + 1:], kb[:, :, n + 1:]), "nothing written past position n"
    k1, v1 = kb.clone(), vb.clone()
    additive = torch.zeros(1, 1, 1, n + 1, dtype=dtype)
    assert kernel_native_layer.step(native, h, cos, sin, (k1, v1, n), additive) is None
    assert torch.equal(k1, kb) and torch.equal(v1, vb), "a refused call writes nothing"


def test_a_mask_the_one_call_refuses_still_appends_in_place(tmp_path):
    model = load(tiny_llama(tmp_path), quantization_config=hf_vq.RTNConfig(bits=4, group_size=32))
    ids = torch.randint(2, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
    plan = model.model.layers[1].hf_vq_plan
    got = []
    for mask in (None, torch.zeros(1, 1, 1, 6)):   # an additive mask of zeros: the same attention, other kernels
        cache = DynamicCache()
        for i in range(2):
            cache.update(*(torch.randn(1, 1, 5, 24, generator=torch.Generator().manual_seed(10 * i + j))
                           for j in range(2)), i)
        h = torch.randn(1, 1, 96, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            out = plan.step(h, cache, torch.ones(1, 24), torch.zeros(1, 24), {"attention_mask": mask})
        assert "hf_vq_kv" in cache.layers[1].__dict__
        got.append((out, cache.layers[1].keys, cache.layers[1].values))
    (a, ka, va), (b, kb, vb) = got
    assert ka.shape == (1, 1, 6, 24) and torch.equal(ka, kb) and torch.equal(va, vb)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
