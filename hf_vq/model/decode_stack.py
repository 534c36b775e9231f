"""A decoder model's decode token (one position, batch 1, on CPU) through all its layers in one C call.

With each layer's step in C (hf_vq.model.decode_layer), what is left of a small model's decode token in Python is
the walk over the layers: per layer, transformers' module call, the step's checks and the cache's bookkeeping, about
40 microseconds, 1.2 ms of a 6 ms SmolLM2 token. :func:`adopt_decode_stack` gives a Llama-family base model (the
``*Model`` under ``*ForCausalLM``) a forward that, when every layer has a native step and the cache has room
(hf_vq.model.kv_append), runs the embedding, the rotary embedding and the final norm through the model's own modules
and the layers through one call of hf_vq.nn.kernel_native_layer.stack. Every other call (prefill, batches, a
padding mask, hooks, outputs of every layer, gradients, another cache, a sliding window) runs the model's own
forward, and with it each layer's own step. The first time the one call could run, it is compared with the
model's own forward on a test step (outputs and caches); a model that differs keeps its own forward."""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from hf_vq.model import kv_append
from hf_vq.model.decode_layer import DecodeStepLayer
from hf_vq.model.decode_step import agree, live
from hf_vq.nn import kernel_native_layer, kernel_registry
from hf_vq.nn.base import with_mixin
from hf_vq.nn.native_isa import ENV as ISA_ENV
from hf_vq.utils.env import getenv

# the base model's keyword arguments the one call knows; any other one gets the model's own forward
_KNOWN = frozenset({"input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "inputs_embeds",
                    "use_cache"})
_CPU = torch.device("cpu")
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


class DecodeStackModel:
    """Mixed in front of a transformers base model class (see the module docstring)."""

    def forward(self, *args, **kwargs):
        if not args and kwargs.keys() <= _KNOWN:
            out = self._stack_step(kwargs)
            if out is not None:
                return out
            if not isinstance(self, DecodeStackModel):   # the comparison on the test step handed it back
                return self.forward(**kwargs)
        return super().forward(*args, **kwargs)

    def _stack_step(self, kw: dict) -> BaseModelOutputWithPast | None:
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        cache = kw.get("cache", kw.get("past_key_values"))
        if (type(cache) is not DynamicCache or (ids is None) == (embeds is None) or kw.get("use_cache") is False
                or self.training or torch.compiler.is_compiling() or _global_forward_hooks
                or _global_forward_pre_hooks):
            return None
        if ids is not None and (ids.shape != (1, 1) or ids.device.type != "cpu"):
            return None
        if embeds is not None and (embeds.dim() != 3 or embeds.shape[:2] != (1, 1) or embeds.device.type != "cpu"):
            return None
        config = self.config
        if config.output_hidden_states or config.output_attentions:
            return None
        layers = list(self.layers._modules.values())[:config.num_hidden_layers]
        if not all(isinstance(layer, DecodeStepLayer) and layer.__dict__.get("hf_vq_decode_checked")
                   for layer in layers):
            return None   # a layer checks its own step at its first decode step, or has its own forward back
        plans = [layer.__dict__.get("hf_vq_plan") for layer in layers]
        if None in plans:
            return None   # the layers' own steps build their plans at their first decode step
        # every plan still valid (LayerPlan.valid, with what all plans share read once), none hooked
        first = plans[0]
        dtype = first.dtype
        kernel_registry.selection()   # reads HF_VQ_KERNELS: a new value changes the epoch
        epoch, isa_env = kernel_registry.epoch(), getenv(ISA_ENV, "auto")
        if not first.attention_current() or any(p.native is None or p.dtype is not dtype
                                                or not p.current(epoch, isa_env) or p.hooked() for p in plans):
            return None
        if any(live(layer._forward_hooks) or layer._forward_pre_hooks for layer in layers):
            return None
        if torch.is_grad_enabled() and (embeds is not None and embeds.requires_grad
                                        or any(p.requires_grad for p in self.parameters())):
            return None
        n = cache.get_seq_length()
        mask = kw.get("attention_mask")
        if mask is not None and not (mask.dim() == 2 and mask.shape == (1, n + 1) and bool(mask.all())):
            return None   # a padding mask: the layers' own steps take it
        checked = self.__dict__.get("hf_vq_stack_checked")
        if not checked:
            if checked is None or not _verify(self, dtype):
                return None
        slots = [kv_append.reserve(cache, p.idx, (1, p.hk, 1, p.D), dtype, _CPU) for p in plans]
        if None in slots or any(s[3] != n for s in slots):
            return None
        h = self.embed_tokens(ids) if embeds is None else embeds
        position_ids = kw.get("position_ids")
        if position_ids is None:
            position_ids = torch.tensor([[n]])
        cos, sin = self.rotary_emb(h, position_ids=position_ids)
        D = plans[0].D
        if (h.dtype is not dtype or cos.numel() != D or sin.numel() != D or cos.dtype is not dtype
                or sin.dtype is not dtype or not (h.is_contiguous() and cos.is_contiguous() and sin.is_contiguous())):
            return None
        # (the layers' C steps, weakly: their states go when a module drops them; the stack of those C steps)
        stack = self.__dict__.get("hf_vq_stack")
        if stack is None or len(stack[0]) != len(plans) or not all(r() is p.native for r, p in zip(stack[0], plans)):
            stack = self.hf_vq_stack = ([weakref.ref(p.native) for p in plans],
                                        kernel_native_layer.NativeStack([p.native for p in plans]))
        for p in plans:
            p.refresh_bias()
        out = kernel_native_layer.stack(stack[1], h, cos.view(1, -1), sin.view(1, -1), [s[1:] for s in slots])
        for s in slots:
            kv_append.commit(s)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(out), **{_CACHE_FIELD: cache})


def _trial(model: nn.Module, dtype: torch.dtype, forward) -> tuple:
    """What ``forward`` gives on one decode position after 3 cached ones, with fixed random inputs: the hidden
    states, then every layer's keys and values."""
    g = torch.Generator().manual_seed(0)
    cache = DynamicCache()
    for i, layer in enumerate(model.layers[:model.config.num_hidden_layers]):
        attn = layer.self_attn
        past = torch.randn(1, attn.k_proj.out_features // attn.head_dim, 3, attn.head_dim, generator=g).to(dtype)
        cache.update(past, past.flip(-1), i)
    ids = torch.randint(0, model.embed_tokens.num_embeddings, (1, 1), generator=g)
    with torch.no_grad():
        out = forward(input_ids=ids, position_ids=torch.tensor([[3]]), cache=cache, use_cache=True)
    return (out.last_hidden_state, *[t for layer in cache.layers for t in (layer.keys, layer.values)])


def _verify(model: nn.Module, dtype: torch.dtype) -> bool:
    """Compare the model's own forward and the one call on a test step; keep the one call only if the outputs and
    the caches agree, else the model gets its own class back."""
    own = model.hf_vq_own_class
    model.hf_vq_stack_checked = None   # the own forward (and the layers' steps), for the reference
    try:
        want = _trial(model, dtype, lambda **kw: own.forward(model, **kw))
        model.hf_vq_stack_checked = True
        got = _trial(model, dtype, lambda **kw: model._stack_step(kw))
    except Exception:   # noqa: BLE001  (a model that the test step does not fit keeps its own forward)
        got = None
    same = agree(got, want, dtype)
    if not same:
        model.__class__ = own
        for name in ("hf_vq_stack_checked", "hf_vq_own_class", "hf_vq_stack"):
            model.__dict__.pop(name, None)
    return same


def _full_attention(config) -> bool:
    """Whether every layer attends to every cached position (no sliding window)."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return all(t == "full_attention" for t in types)
    return getattr(config, "sliding_window", None) is None


def adopt_decode_stack(model: nn.Module) -> bool:
    """Give ``model`` (a base model with ``embed_tokens``, ``layers``, ``norm`` and ``rotary_emb``) the one-call
    decode forward, in place, when every layer it runs has the decode step of hf_vq.model.decode_layer; returns
    whether it did. Its first such decode step compares it with the model's own forward."""
    if isinstance(model, DecodeStackModel):
        return True
    config = getattr(model, "config", None)
    layers = getattr(model, "layers", None)
    if config is None or not isinstance(layers, nn.ModuleList) or not all(
            isinstance(getattr(model, n, None), nn.Module) for n in ("embed_tokens", "norm", "rotary_emb")):
        return False
    run = list(layers[:getattr(config, "num_hidden_layers", len(layers))])
    if not run or not all(isinstance(layer, DecodeStepLayer) for layer in run) or not _full_attention(config):
        return False
    if any(getattr(layer.self_attn, "layer_idx", None) != i for i, layer in enumerate(run)):
        return False
    if hasattr(model, "_hf_hook") or any(p.device.type != "cpu" for p in model.parameters()):
        return False
    model.hf_vq_own_class = type(model)
    model.hf_vq_stack_checked = False
    model.__class__ = with_mixin(DecodeStackModel, type(model))
    return True


def decode_step_stack(model: nn.Module) -> int:
    """Adopt every base model in ``model`` that qualifies (see :func:`adopt_decode_stack`); returns how many."""
    return sum(adopt_decode_stack(m) for m in list(model.modules()) if hasattr(m, "layers") and hasattr(m, "norm"))
