"""Attention modules whose decode step (one position, on CPU) runs in a few kernel calls.

A Llama-family attention forward on one position spends most of its time on small ops around its layers: three
views and transposes, about ten ops of rotary embedding, the interface lookup, a reshape. :func:`adopt_attention`
gives such a module a forward that, for a decode step, calls its q/k/v projections (one kernel call when they are
grouped, see hf_vq.nn.shared_input), rotates q and k in one call, appends k and v to the cache
(hf_vq.model.kv_append: in place for transformers' default cache, else through the cache's ``update``), runs
hf_vq's decode attention and its o projection. Every other call (prefill, gradients, training, arguments it does not
know) runs the module's own forward. A module is adopted only after its own forward and the decode forward give the
same output and the same cache on a test step (checked at its first decode step, so that loading prepares nothing),
so a variant (q/k norms, partial rotary, another formula) keeps its own forward."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from hf_vq.model.attention import NAME, sdpa_with_decode_kernel
from hf_vq.model.kv_append import append_kv
from hf_vq.nn.attention import decode_attention, rope_kernel
from hf_vq.nn.base import with_mixin

# keyword arguments a Llama-family decoder layer passes to its attention; any other one gets the module's own forward
KNOWN_KWARGS = frozenset({"hidden_states", "position_embeddings", "attention_mask", "cache", "past_key_values",
                    "position_ids", "use_cache", "cache_position", "output_attentions"})


class DecodeStepForward:
    """The forward of a module adopted in place with a decode step: ``_decode_step(hidden_states, kwargs)`` returns
    the output, or None for a call it does not serve (then the module's own forward runs)."""

    def forward(self, *args, **kwargs):
        if len(args) <= 1 and kwargs.keys() <= KNOWN_KWARGS:
            x = args[0] if args else kwargs.get("hidden_states")
            out = None if x is None else self._decode_step(x, kwargs)
            if out is not None:
                return out
            if not isinstance(self, DecodeStepForward):   # the first decode step's comparison handed it back
                return self.forward(*args, **kwargs)
        return super().forward(*args, **kwargs)


class DecodeStepAttention(DecodeStepForward):
    """Mixed in front of a transformers attention class (see the module docstring)."""

    def _decode_step(self, x: torch.Tensor, kw: dict):
        checked = self.__dict__.get("hf_vq_decode_checked")
        if not checked:
            if checked is None or not _verify(self, x.dtype):
                return None
        cache = kw.get("cache", kw.get("past_key_values"))
        pe = kw.get("position_embeddings")
        if (cache is None or pe is None or x.dim() != 3 or x.shape[1] != 1 or x.device.type != "cpu"
                or self.training or kw.get("output_attentions") or torch.compiler.is_compiling()
                or self.config._attn_implementation != NAME):
            return None
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return None   # autograd needs the modules' own forwards
        cos, sin = pe
        B, D = x.shape[0], self.head_dim
        fits = D % 2 == 0 and cos.numel() == sin.numel() == B * D and cos.dtype is sin.dtype is x.dtype
        rope = rope_kernel(x) if fits else None   # x's device and dtype are the projections'; D: checked here
        if rope is None:
            return None
        cos, sin = cos.reshape(B, D), sin.reshape(B, D)   # [B, D]; q, k: [B, heads, D] views of the projections
        q, k, v = _rotated_qkv(self, x, B, D, rope, cos, sin)
        rest = {n: a for n, a in kw.items() if n not in ("hidden_states", "position_embeddings", "attention_mask",
                                                          "cache", "past_key_values")}
        keys, values = append_kv(cache, k, v, self.layer_idx, rest)
        mask = kw.get("attention_mask")
        out = decode_attention(q, keys, values, mask, self.scaling)
        if out is None:
            out, _ = sdpa_with_decode_kernel(self, q, keys, values, mask, dropout=0.0, scaling=self.scaling, **rest)
        return self.o_proj(out.reshape(B, 1, -1)), None


def _output_capturing_code():
    """The code of transformers' output-capturing hook, or None where this transformers has none. transformers
    installs it for good on the layers (and attention modules) at the first call that asks for hidden states or
    attentions; it does nothing while no call collects outputs."""
    try:
        from transformers.utils.output_capturing import _active_collector, install_output_capuring_hook
        probe = nn.Module()
        install_output_capuring_hook(probe, "hidden_states", 0)
        return _active_collector, next(iter(probe._forward_hooks.values())).__code__
    except Exception:   # noqa: BLE001  (another transformers: every hook counts)
        return None


_CAPTURING = _output_capturing_code()


def live(hooks: dict) -> bool:
    """Whether the forward hooks in ``hooks`` would act on a call now: transformers' output-capturing hooks act only
    while a call collects outputs."""
    if not hooks:
        return False
    if _CAPTURING is None or _CAPTURING[0].get() is not None:
        return True
    return any(getattr(h, "__code__", None) is not _CAPTURING[1] for h in hooks.values())


def unhooked(modules) -> bool:
    """No forward hooks on ``modules`` nor global ones: a step may call their forwards directly."""
    return not (_global_forward_hooks or _global_forward_pre_hooks) and not any(
        live(m._forward_hooks) or m._forward_pre_hooks for m in modules)


def _rotated_qkv(attn: nn.Module, x: torch.Tensor, B: int, D: int, rope, cos, sin):
    """q [B, Hq, 1, D] and k [B, Hkv, 1, D], rotated, and v [B, Hkv, 1, D] for a one-position ``x``. Grouped q/k/v
    projections (hf_vq.nn.shared_input) run as one kernel call, and q and k, side by side in its output, rotate in
    one call; other projections are called as modules."""
    shared = attn.q_proj._shared_input
    y = None
    if shared is not None and shared[1] == 0:
        group = shared[0]
        members = group.modules
        if (len(members) == 3 and members[1] is attn.k_proj and members[2] is attn.v_proj
                and x.numel() == members[0].in_features and unhooked(members)):
            y = group.run_joined(x)
    if y is None:
        q = rope.run(attn.q_proj(x).view(B, -1, D), cos, sin)
        k = rope.run(attn.k_proj(x).view(B, -1, D), cos, sin)
        v = attn.v_proj(x).view(B, 1, -1, D).transpose(1, 2)
        return q.view(B, -1, 1, D), k.view(B, -1, 1, D), v
    return split_rotated(y, [(st, m.out_features) for st, m in zip(group.starts, members)], B, D, rope.run, cos, sin)


def split_rotated(y: torch.Tensor, parts, B: int, D: int, rope, cos, sin):
    """q [B, Hq, 1, D] and k [B, Hkv, 1, D], rotated by ``rope`` (a rotary kernel's run), and v [B, Hkv, 1, D] from
    the joined q/k/v output ``y`` [B, 1, N] whose parts are ``[(first column, columns)]`` for q, k, v. q and k side
    by side rotate in one call."""
    (sq, nq), (sk, nk), (sv, nv) = parts
    if sk == sq + nq:   # q and k adjacent: one rotation call over all their heads
        qk = rope(y[..., sq:sk + nk].view(B, -1, D), cos, sin)
        q, k = qk[:, :nq // D], qk[:, nq // D:]
    else:
        q, k = rope(y[..., sq:sq + nq].view(B, -1, D), cos, sin), rope(y[..., sk:sk + nk].view(B, -1, D), cos, sin)
    return q.view(B, -1, 1, D), k.view(B, -1, 1, D), y[..., sv:sv + nv].view(B, 1, -1, D).transpose(1, 2)


def trial_step(module: nn.Module, dtype: torch.dtype, forward):
    """What ``forward`` returns on one decode position after 3 cached ones, with fixed random inputs, and the cache
    of ``module`` (an attention module: its layer's cache) after it."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(0)
    D, hidden = module.head_dim, module.q_proj.in_features
    kv_heads = module.k_proj.out_features // D
    cache = DynamicCache()
    for i in range(module.layer_idx + 1):
        past = torch.randn(1, kv_heads, 3, D, generator=g).to(dtype)
        cache.update(past, past.flip(-1), i)
    x = torch.randn(1, 1, hidden, generator=g).to(dtype) * 4
    angles = torch.rand(1, 1, D // 2, generator=g) * 6.0
    cos, sin = torch.cat([angles.cos(), angles.cos()], -1).to(dtype), torch.cat([angles.sin(), angles.sin()], -1).to(dtype)
    with torch.no_grad():
        out = forward(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None, cache=cache,
                      position_ids=torch.tensor([[3]]))
    layer = cache.layers[module.layer_idx]
    return out, layer.keys, layer.values


def agree(got: tuple | None, want: tuple, dtype: torch.dtype) -> bool:
    """Whether a decode step's trial results ``got`` (None: it failed) match the own forward's ``want``, tensor by
    tensor, within ``dtype``'s rounding."""
    tol = 2.0 ** -7 if dtype is torch.bfloat16 else 1e-5
    return got is not None and len(got) == len(want) and all(
        isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
        and torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * float(b.abs().max()))
        for a, b in zip(got, want))


def verify_step(module: nn.Module, attn: nn.Module, dtype: torch.dtype, output=lambda out: out,
                forget: tuple[str, ...] = ()) -> bool:
    """Compare ``module``'s own forward and its decode forward on a trial step (``attn``: the attention module whose
    cache it fills; ``output`` picks the hidden states from what the forward returns); keep the decode forward only
    if the outputs and the caches agree, else the module gets its own class back (and loses the ``forget``
    attributes)."""
    own = module.hf_vq_own_class
    module.hf_vq_decode_checked = None   # the own forward, for the reference
    try:
        want = trial_step(attn, dtype, lambda **kw: own.forward(module, **kw))
        module.hf_vq_decode_checked = True
        got = trial_step(attn, dtype, module.forward)
        want, got = (output(want[0]), *want[1:]), (output(got[0]), *got[1:])
    except Exception:   # noqa: BLE001  (a forward that the trial step does not fit keeps its own forward)
        got = None
    same = agree(got, want, dtype)
    if not same:
        module.__class__ = own
        del module.hf_vq_decode_checked, module.hf_vq_own_class
        for name in forget:
            module.__dict__.pop(name, None)
    return same


def _verify(module: nn.Module, dtype: torch.dtype) -> bool:
    return verify_step(module, module, dtype, output=lambda out: out[0])   # (attention output, weights)


def adopt_attention(module: nn.Module) -> bool:
    """Give ``module`` the decode-step forward, in place, when it has Llama-family projections and runs hf_vq's
    attention on CPU; returns whether it did. Its first decode step compares it with the module's own forward."""
    cls = type(module)
    if isinstance(module, DecodeStepAttention):
        return True
    if not all(isinstance(getattr(module, n, None), nn.Module) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return False
    if not all(isinstance(getattr(module, n, None), (int, float)) for n in ("head_dim", "scaling", "layer_idx")):
        return False
    config = getattr(module, "config", None)
    if getattr(config, "_attn_implementation", None) != NAME or hasattr(module, "_hf_hook"):
        return False
    if any(p.device.type != "cpu" for p in list(module.parameters()) + list(module.buffers())):
        return False
    kernel_cls = with_mixin(DecodeStepAttention, cls)
    module.hf_vq_own_class = cls
    module.hf_vq_decode_checked = False
    module.__class__ = kernel_cls
    return True


def decode_step_attention(model: nn.Module) -> int:
    """Adopt every attention module of ``model`` that qualifies (see :func:`adopt_attention`); returns how many."""
    return sum(adopt_attention(m) for m in list(model.modules()) if type(m).__name__.endswith("Attention"))



