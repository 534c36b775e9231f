"""Decoder layers whose decode step (one position, batch 1, on CPU) runs in one or two C calls, or a short list of
kernels.

A Llama-family decoder layer on one position computes little: two RMSNorms, the attention, two residual additions
and a gated MLP. Through transformers' modules a decode token still pays for about a dozen module calls per layer,
each with its checks and dispatch, and on a small model that costs as much as the arithmetic.
:func:`adopt_decode_layer` gives such a layer a forward that, for a decode step, runs a :class:`LayerPlan` looked up
once: when every part has a native kernel, the whole layer in C (hf_vq.nn.kernel_native_layer): one call that
also writes k and v into the cache where hf_vq.model.kv_append gives it room (transformers' default cache), else
two calls around the cache's ``update``; without native kernels, the norms', projections' (q/k/v and gate/up
joined, hf_vq.nn.shared_input), rotary and attention kernels one call each. Every other call (prefill, batches,
gradients, training, compile, hooks, arguments it does not know) runs the layer's own forward. As for the attention
(hf_vq.model.decode_step), a layer is adopted only after its own forward and the decode step give the same output
and cache on a test step, checked at its first decode step, so a variant (extra norms, another MLP, q/k norms, a
scaled residual) keeps its own forward."""

from __future__ import annotations

import weakref
from operator import is_

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from hf_vq.model import kv_append
from hf_vq.model.attention import NAME, sdpa_with_decode_kernel
from hf_vq.model.decode_step import DecodeStepForward, live, split_rotated, verify_step
from hf_vq.nn import kernel_native_layer, kernel_registry
from hf_vq.nn.attention import decode_attention, rope_kernel
from hf_vq.nn.base import KernelDispatch, with_mixin
from hf_vq.nn.native_isa import ENV as ISA_ENV
from hf_vq.nn.norm import KernelRMSNorm
from hf_vq.utils.env import getenv

_NORMS = ("input_layernorm", "post_attention_layernorm")
_MLP = ("gate_proj", "up_proj", "down_proj")


class DecodeStepLayer(DecodeStepForward):
    """Mixed in front of a transformers decoder layer class (see the module docstring)."""

    def _decode_step(self, h: torch.Tensor, kw: dict) -> torch.Tensor | None:
        checked = self.__dict__.get("hf_vq_decode_checked")
        if not checked:
            if checked is None or not _verify(self, h.dtype):
                return None
        cache = kw.get("cache", kw.get("past_key_values"))
        pe = kw.get("position_embeddings")
        if (cache is None or pe is None or h.dim() != 3 or h.shape[0] != 1 or h.shape[1] != 1
                or h.device.type != "cpu" or self.training or kw.get("output_attentions")
                or torch.compiler.is_compiling() or _global_forward_hooks or _global_forward_pre_hooks):
            return None
        if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in self.parameters())):
            return None   # autograd needs the modules' own forwards
        plan = self.__dict__.get("hf_vq_plan")
        if plan is None or plan.dtype is not h.dtype or not plan.valid():
            kernel_registry.selection()   # reads HF_VQ_KERNELS: a new value changes the epoch
            if self.__dict__.get("hf_vq_plan_refused") == (kernel_registry.epoch(), h.dtype):
                return None
            plan = self.hf_vq_plan = LayerPlan.build(self, h.dtype)
            if plan is None:   # no kernel for some part: not again until a kernel choice or a state changes
                self.hf_vq_plan_refused = (kernel_registry.epoch(), h.dtype)
                return None
        if plan.hooked():
            return None
        cos, sin = pe
        if (cos.numel() != plan.D or sin.numel() != plan.D or cos.dtype is not h.dtype or sin.dtype is not h.dtype
                or not (h.is_contiguous() and cos.is_contiguous() and sin.is_contiguous())):
            return None
        return plan.step(h, cache, cos.view(1, -1), sin.view(1, -1), kw)


_MISSING = object()

# keyword arguments of the layer that are not the attention's (the rest go on to cache.update and the attention,
# as transformers passes them)
_NOT_ATTENTION_KWARGS = frozenset({"hidden_states", "position_embeddings", "attention_mask", "cache",
                                   "past_key_values"})


class LayerPlan:
    """What one decode step of a layer calls, looked up once: the projections' kernels and prepared states (q/k/v
    and gate/up as one joined call, hf_vq.nn.shared_input), the norms', rotary and attention kernels, and what
    makes the plan stale: another kernel selection, a module's prepared states dropped or its tensors replaced, a
    hook, another attention implementation."""

    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.layer_ref = weakref.ref(layer)
        self.attn, self.act = attn, mlp.act_fn
        self.config_dict = attn.config.__dict__
        self.D, self.idx, self.scale = attn.head_dim, attn.layer_idx, attn.scaling
        self.hq, self.hk = attn.q_proj.out_features // self.D, attn.k_proj.out_features // self.D
        self.modules = (attn, mlp, layer.input_layernorm, layer.post_attention_layernorm, attn.q_proj, attn.k_proj,
                        attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        # the forward (pre-)hook dicts of those modules (torch adds to and removes from them in place)
        self.hook_dicts = [d for m in self.modules for d in (m._forward_hooks, m._forward_pre_hooks)]
        self.items: list[tuple] = []   # while building: (dict, key, value), stale once dict.get(key) is not value

    @classmethod
    def build(cls, layer: nn.Module, dtype: torch.dtype) -> "LayerPlan | None":
        """The plan of ``layer`` for decode rows of ``dtype``, or None when some part has no kernel."""
        plan = cls(layer)
        plan.dtype = dtype
        attn, mlp = layer.self_attn, layer.mlp
        probe = torch.empty(1, plan.D, dtype=dtype)
        plan.rope = rope_kernel(probe)
        plan.norm1 = plan._norm(layer.input_layernorm, dtype)
        plan.norm2 = plan._norm(layer.post_attention_layernorm, dtype)
        plan.qkv = plan._projections((attn.q_proj, attn.k_proj, attn.v_proj))
        plan.gate_up = plan._projections((mlp.gate_proj, mlp.up_proj))
        plan.o, plan.down = plan._single(attn.o_proj), plan._single(mlp.down_proj)
        if plan.rope is None or None in (plan.norm1, plan.norm2, plan.qkv, plan.gate_up, plan.o, plan.down):
            return None
        plan.item_dicts, plan.item_keys, plan.item_values = zip(*plan.items)
        del plan.items
        plan.native = plan._native(layer, dtype)
        plan.isa_env = getenv(ISA_ENV, "auto")
        plan.epoch = kernel_registry.epoch()   # after the lookups above, which may prepare states
        return plan

    def _native(self, layer: nn.Module, dtype: torch.dtype) -> kernel_native_layer.NativeLayer | None:
        """The whole step in C (hf_vq.nn.kernel_native_layer) when every projection's kernel offers the
        projection ABI, the MLP's activation is SiLU and the biases allow it; else None."""
        chosen = kernel_registry.candidates("decode_layer", "cpu", 1)
        if not chosen or chosen[0].prepare(dtype) is None or type(self.act).__name__ not in ("SiLU", "SiLUActivation"):
            return None
        (qkv_calls, qkv_parts, qkv_n), (gu_calls, gu_parts, gu_n) = self.qkv, self.gate_up
        # only a joined q/k/v's bias (fp32, refreshed at each step); the gate and up of one width
        if (any(c.has_bias for c in gu_calls + [self.o, self.down]) or (len(qkv_calls) > 1 and any(
                c.has_bias for c in qkv_calls)) or gu_parts[0][1] != gu_parts[1][1]):
            return None
        calls = qkv_calls + [self.o] + gu_calls + [self.down]
        exported = [None if c.kernel.projection is None else c.kernel.projection(c.state) for c in calls]
        if any(e is None for e in exported):
            return None
        projections = [kernel_native_layer.Projection(*e, c.bias() if c.has_bias else None)
                       for e, c in zip(exported, calls)]
        nq, ng = len(qkv_calls), len(gu_calls)
        return kernel_native_layer.build(
            dtype, layer.input_layernorm.weight.shape[0], self.D, self.hq, self.hk, self.scale,
            (self.norm1[1:], self.norm2[1:]), projections[:nq], tuple(st for st, _ in qkv_parts), qkv_n,
            projections[nq], projections[nq + 1:nq + 1 + ng], tuple(st for st, _ in gu_parts), gu_n, gu_parts[0][1],
            projections[-1])

    def valid(self) -> bool:
        kernel_registry.selection()   # reads HF_VQ_KERNELS: a new value changes the epoch
        return self.current(kernel_registry.epoch(), getenv(ISA_ENV, "auto")) and self.attention_current()

    def current(self, epoch: int, isa_env: str) -> bool:
        """Made under this kernel selection ``epoch`` and ``HF_VQ_NATIVE_ISA`` value, and no module's prepared
        states dropped nor its tensors replaced since."""
        return (epoch == self.epoch and isa_env == self.isa_env
                and all(map(is_, map(dict.get, self.item_dicts, self.item_keys), self.item_values)))

    def attention_current(self) -> bool:
        """The model still runs hf_vq's attention."""
        # the config's attribute behind its _attn_implementation property, read without transformers'
        # __getattribute__ (a few microseconds per layer); through the property where that attribute is not there
        impl = self.config_dict.get("_attn_implementation_internal", _MISSING)
        return (impl if impl is not _MISSING else self.attn.config._attn_implementation) == NAME

    def hooked(self) -> bool:
        """Whether a module whose forward the step leaves out has forward hooks that would act (they must run)."""
        return any(self.hook_dicts) and any(map(live, self.hook_dicts))

    def _norm(self, norm: nn.Module, dtype: torch.dtype):
        w = norm._parameters.get("weight")
        if not isinstance(norm, KernelRMSNorm) or w is None or w.dtype is not dtype:
            return None
        self.items.append((norm._parameters, "weight", w))
        kernel = next((k for k in kernel_registry.candidates("rms_norm", "cpu", 1) if k.prepare(w) is not None), None)
        return None if kernel is None else (kernel.run, w, norm.hf_vq_eps)

    def _watch(self, m: nn.Module) -> None:
        self.items += [(m._buffers, m.source_buffer, m.kernel_source()), (m._parameters, "bias", m.bias)]
        m._kernel_states.dependents[("decode plan", id(self.layer_ref))] = self._release_layer_plan

    def _release_layer_plan(self) -> None:
        """The module's states were dropped: the layer lets go of this plan (and of the states it holds)."""
        layer = self.layer_ref()
        if layer is not None and layer.__dict__.get("hf_vq_plan") is self:
            del layer.__dict__["hf_vq_plan"]

    def _single(self, m: nn.Module) -> "_Call | None":
        if not isinstance(m, KernelDispatch):
            return None
        binding = m.kernel_binding(1)
        if binding is None:
            return None
        self._watch(m)
        return _Call(binding[0], binding[1], module=m)

    def _projections(self, members: tuple):
        """([calls], [(first column, columns)] per member, columns in all) of projections that read the same input:
        one call when they form a group (hf_vq.nn.shared_input), else one call each, side by side; None when one
        has no kernel."""
        shared = members[0]._shared_input if isinstance(members[0], KernelDispatch) else None
        group = shared[0] if shared is not None else None
        binding = group.binding("cpu") if group is not None and tuple(group.modules) == members else None
        if binding is not None:
            for m in members:
                self._watch(m)
            parts = [(st, m.out_features) for st, m in zip(group.starts, members)]
            return [_Call(binding[0], binding[1], group=group)], parts, binding[1].n
        calls = [self._single(m) for m in members]
        if any(c is None for c in calls):
            return None
        starts = [sum(m.out_features for m in members[:i]) for i in range(len(members))]
        return calls, [(st, m.out_features) for st, m in zip(starts, members)], sum(m.out_features for m in members)

    def _run(self, projections, x: torch.Tensor) -> torch.Tensor:
        calls, _, _ = projections
        if len(calls) == 1:
            return calls[0](x)
        return torch.cat([c(x) for c in calls], dim=-1)

    def refresh_bias(self) -> None:
        """Point the C step at the joined q/k/v bias the group holds now (it makes a new one when a bias changes)."""
        first = self.qkv[0][0]
        if first.has_bias:
            bias = first.bias()
            if bias is not self.native.q_bias:
                self.native.set_q_bias(bias)

    def step(self, h: torch.Tensor, cache, cos: torch.Tensor, sin: torch.Tensor, kw: dict) -> torch.Tensor:
        """The layer's output for one decode position ``h`` [1, 1, hidden]; cos/sin [1, head_dim]."""
        native = self.native
        if native is not None:
            self.refresh_bias()
            # k and v go straight to the cache where it has room for them (hf_vq.model.kv_append): then the whole
            # step is one C call
            slot = kv_append.reserve(cache, self.idx, (1, self.hk, 1, self.D), h.dtype, h.device)
            if slot is not None:
                out = kernel_native_layer.step(native, h, cos, sin, slot[1:], kw.get("attention_mask"))
                if out is not None:
                    kv_append.commit(slot)
                    return out
            q, k, v = kernel_native_layer.pre(native, h, cos, sin)
            if slot is not None:   # a mask the one call does not take: the separate kernels below
                keys, values = kv_append.fill(slot, k, v)
        else:
            slot = None
            run, w, eps = self.norm1
            q, k, v = split_rotated(self._run(self.qkv, run(w, h, eps)), self.qkv[1], 1, self.D, self.rope.run, cos,
                                    sin)
        rest = {n: a for n, a in kw.items() if n not in _NOT_ATTENTION_KWARGS}
        if slot is None:
            keys, values = kv_append.append_kv(cache, k, v, self.idx, rest)
        mask = kw.get("attention_mask")
        if native is not None:
            out = kernel_native_layer.post(native, h, q, keys, values, mask)
            if out is not None:
                return out
        out = decode_attention(q, keys, values, mask, self.scale)
        if out is None:
            out, _ = sdpa_with_decode_kernel(self.attn, q, keys, values, mask, dropout=0.0, scaling=self.scale, **rest)
        h = h + self.o(out.view(1, 1, -1))
        run, w, eps = self.norm2
        y = self._run(self.gate_up, run(w, h, eps))
        (sg, ng), (su, nu) = self.gate_up[1]
        return h + self.down(self.act(y[..., sg:sg + ng]) * y[..., su:su + nu])


class _Call:
    """One kernel call of a plan: a projection, or a group of them joined (its bias is the group's)."""

    __slots__ = ("kernel", "state", "group", "module", "has_bias")

    def __init__(self, kernel, state, group=None, module=None):
        self.kernel, self.state, self.group, self.module = kernel, state, group, module
        self.has_bias = group.has_bias if group is not None else module.bias is not None

    def bias(self) -> torch.Tensor | None:
        return self.group.fused_bias() if self.group is not None else self.module.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.run(self.state, x, self.bias())


def _verify(layer: nn.Module, dtype: torch.dtype) -> bool:
    return verify_step(layer, layer.self_attn, dtype, forget=("hf_vq_plan", "hf_vq_plan_refused"))


def adopt_decode_layer(layer: nn.Module) -> bool:
    """Give ``layer`` the decode-step forward, in place, when it has a Llama-family layout (two RMSNorms around an
    attention that runs hf_vq's attention on CPU, and a gate/up/down MLP); returns whether it did. Its first decode
    step compares it with the layer's own forward."""
    cls = type(layer)
    if isinstance(layer, DecodeStepLayer):
        return True
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if not isinstance(attn, nn.Module) or not isinstance(mlp, nn.Module):
        return False
    if not all(isinstance(getattr(layer, n, None), nn.Module) for n in _NORMS):
        return False
    if not all(isinstance(getattr(mlp, n, None), nn.Module) for n in _MLP) or not callable(getattr(mlp, "act_fn", None)):
        return False
    if not all(isinstance(getattr(attn, n, None), (int, float)) for n in ("head_dim", "layer_idx")):
        return False
    if getattr(getattr(attn, "config", None), "_attn_implementation", None) != NAME:
        return False
    if any(hasattr(m, "_hf_hook") for m in layer.modules()):
        return False
    if any(p.device.type != "cpu" for p in list(layer.parameters()) + list(layer.buffers())):
        return False
    layer.hf_vq_own_class = cls
    layer.hf_vq_decode_checked = False
    layer.__class__ = with_mixin(DecodeStepLayer, cls)
    return True


def decode_step_layers(model: nn.Module) -> int:
    """Adopt every decoder layer of ``model`` that qualifies (see :func:`adopt_decode_layer`); returns how many."""
    return sum(adopt_decode_layer(m) for m in list(model.modules()) if type(m).__name__.endswith("DecoderLayer"))
