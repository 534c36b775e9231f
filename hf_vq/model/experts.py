"""Fused mixture-of-experts modules: detect them, unfuse them into Linears for calibration, fuse the results.

An experts module is recognised by what it is, not by its class name: direct 3-D parameters sharing a leading expert
dimension, used through transformers' experts interface (``@use_experts_implementation`` sets ``has_gate``,
``has_bias``, ``is_transposed``, ``is_concatenated`` and the forward takes ``(hidden_states, top_k_index,
top_k_weights)``). The parameter names follow that interface: ``gate_up_proj`` (``up_proj`` when ungated),
``down_proj`` and, with biases, ``<name>_bias``; transposed modules store [E, in, out]. A module with 3-D expert
parameters that does not follow it (Llama4's ``Llama4TextExperts``, a post-expert norm, extra parameters) is refused
with an error naming its class.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from hf_vq.formats.affine import AffineWeight
from hf_vq.formats.vq import VQWeight
from hf_vq.nn.experts import FusedExperts, QuantExperts, VQExperts
from hf_vq.nn.registry import LAYER_TYPES
from hf_vq.pipeline.experts import CalibrationExperts, ExpertMLP

INTERFACE_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")


class UnsupportedExperts(ValueError):
    pass


@dataclass
class ExpertsLayout:
    cls: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    gated: bool
    transposed: bool
    bias: bool

    @property
    def first(self) -> str:
        return "gate_up_proj" if self.gated else "up_proj"


def has_expert_parameters(module: nn.Module) -> bool:
    """Two or more direct 3-D parameters sharing one leading (expert) dimension larger than 1 (the up and down
    projections of every expert; a lone [1, n, h] probe or position table is not one)."""
    three = [p for p in module.parameters(recurse=False) if p.dim() == 3]
    return len(three) >= 2 and len({p.shape[0] for p in three}) == 1 and three[0].shape[0] > 1


def experts_layout(module: nn.Module, name: str = "") -> ExpertsLayout | None:
    """The layout of a fused experts module; None if ``module`` has no 3-D expert parameters; raises
    UnsupportedExperts for one hf_vq cannot quantize."""
    if not has_expert_parameters(module):
        return None
    cls = type(module).__name__
    where = f"{name} ({cls})" if name else cls
    params = dict(module.named_parameters(recurse=False))
    if not all(hasattr(module, f) for f in INTERFACE_FLAGS):
        raise UnsupportedExperts(
            f"{where} holds 3-D expert parameters {sorted(params)} but is not used through transformers' experts "
            "interface (@use_experts_implementation), so hf_vq cannot quantize it; keep it in float with "
            f"modules_to_not_convert=[{name!r}] (and the usual lm_head)")
    sig = [p for p in inspect.signature(type(module).forward).parameters.values() if p.name != "self"]
    if len(sig) < 3:
        raise UnsupportedExperts(f"{where}: forward takes {[p.name for p in sig]}, not the experts contract "
                                 "(hidden_states, top_k_index, top_k_weights)")
    if getattr(module, "has_post_expert_norm", False):
        raise UnsupportedExperts(f"{where} applies a norm after each expert (has_post_expert_norm), which hf_vq's "
                                 f"quantized experts do not implement; keep it in float with "
                                 f"modules_to_not_convert=[{name!r}]")
    gated, transposed, bias = bool(module.has_gate), bool(module.is_transposed), bool(module.has_bias)
    first = "gate_up_proj" if gated else "up_proj"
    expected = {first, "down_proj"} | ({f"{first}_bias", "down_proj_bias"} if bias else set())
    if set(params) != expected:
        raise UnsupportedExperts(f"{where}: parameters {sorted(params)}, expected {sorted(expected)} for the experts "
                                 "interface it declares")
    up, down = params[first], params["down_proj"]
    if transposed:
        up, down = up.transpose(1, 2), down.transpose(1, 2)
    e, up_out, hidden = up.shape
    inter = down.shape[2]
    if down.shape != (e, hidden, inter) or up_out != (2 * inter if gated else inter):
        raise UnsupportedExperts(f"{where}: {first} {list(params[first].shape)} and down_proj "
                                 f"{list(params['down_proj'].shape)} do not form experts of one size")
    if not gated and not hasattr(module, "act_fn"):
        raise UnsupportedExperts(f"{where}: ungated experts without act_fn")
    return ExpertsLayout(cls, e, hidden, inter, gated, transposed, bias)


def _weights(module: nn.Module, layout: ExpertsLayout, pname: str) -> torch.Tensor:
    w = module._parameters[pname].detach()
    return w.transpose(1, 2) if layout.transposed else w  # [E, out, in]


def unfuse(module: nn.Module, layout: ExpertsLayout, mode: str, min_tokens: float) -> CalibrationExperts:
    """A CalibrationExperts holding ``module``'s weights as per-expert Linears (copies; same forward)."""
    up, down = _weights(module, layout, layout.first), _weights(module, layout, "down_proj")
    experts = []
    for e in range(layout.num_experts):
        lin1 = nn.Linear(layout.hidden_size, up.shape[1], bias=layout.bias, device=up.device, dtype=up.dtype)
        lin2 = nn.Linear(layout.intermediate_size, layout.hidden_size, bias=layout.bias, device=down.device,
                         dtype=down.dtype)
        lin1.weight.data.copy_(up[e])
        lin2.weight.data.copy_(down[e])
        if layout.bias:
            lin1.bias.data.copy_(module._parameters[f"{layout.first}_bias"].detach()[e])
            lin2.bias.data.copy_(module._parameters["down_proj_bias"].detach()[e])
        experts.append(ExpertMLP(layout.first, lin1, lin2))
    activation = module._apply_gate if layout.gated else module.act_fn
    cal = CalibrationExperts(experts, layout.first, activation, mode, min_tokens)
    cal.requires_grad_(any(p.requires_grad for p in module.parameters(recurse=False)))
    # the fused copy is no longer needed: keep the module (gate function, class) with meta parameters
    module._parameters = {n: nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), p.requires_grad)
                          for n, p in module._parameters.items()}
    cal.__dict__["_float_module"] = module
    return cal


# methods whose results a fused experts module stores: affine weights (QuantExperts) and VQ weights (VQExperts)
METHODS = ("rtn", "gptq", "adascale", "gptvq", "quantsim")


def refuse(module: nn.Module, layout: ExpertsLayout, name: str, method: str) -> None:
    """Methods whose results cannot be stored fused."""
    raise UnsupportedExperts(
        f"{name} ({layout.cls}): hf_vq stores fused MoE experts for {', '.join(METHODS)}, not for {method!r}; "
        f"quantize the experts with one of those, or keep them in float with modules_to_not_convert=[{name!r}]")


def is_experts_record(record) -> bool:
    cls = LAYER_TYPES.get(record.get("type")) if isinstance(record, dict) else None
    return isinstance(cls, type) and issubclass(cls, FusedExperts)


def fuse(cal: CalibrationExperts, layout: ExpertsLayout, results: dict[str, object], name: str) -> FusedExperts:
    """The fused module holding the per-expert results (AffineWeights or VQWeights keyed by full Linear name)."""
    firsts, downs = [], []
    for e in range(layout.num_experts):
        a, b = results.get(f"{name}.{e}.{layout.first}"), results.get(f"{name}.{e}.down_proj")
        if a is None or b is None:
            raise RuntimeError(f"{name}: expert {e} was not quantized")
        firsts.append(a)
        downs.append(b)
    kinds = {type(r) for r in firsts + downs}
    if kinds == {AffineWeight}:
        build = QuantExperts.from_affine
    elif kinds == {VQWeight}:
        build = VQExperts.from_vq
    else:
        raise UnsupportedExperts(f"{name} ({layout.cls}): fused experts store AffineWeights or VQWeights of one kind, "
                                 f"got {sorted(k.__name__ for k in kinds)}")
    biases = None
    if layout.bias:
        biases = (torch.stack([cal.expert(e)._modules[layout.first].bias.detach() for e in range(layout.num_experts)]),
                  torch.stack([cal.expert(e).down_proj.bias.detach() for e in range(layout.num_experts)]))
    q = build(firsts, downs, gated=layout.gated, transposed=layout.transposed, biases=biases)
    q.attach_float_module(cal.__dict__["_float_module"])
    return q


def refold(cal: CalibrationExperts) -> nn.Module:
    """Back to the original float module with the Linears' current weights (a run that failed midway)."""
    module = cal.__dict__["_float_module"]
    layout = experts_layout(module)
    for attr in (layout.first, "down_proj"):
        lins = [cal.expert(e)._modules[attr] for e in range(cal.num_experts)]
        w = torch.stack([lin.weight.detach() for lin in lins])
        w = w.transpose(1, 2) if layout.transposed else w
        module._parameters[attr] = nn.Parameter(w.contiguous(), module._parameters[attr].requires_grad)
        if layout.bias:
            module._parameters[f"{attr}_bias"] = nn.Parameter(torch.stack([lin.bias.detach() for lin in lins]),
                                                              module._parameters[f"{attr}_bias"].requires_grad)
    return module


def build_quantized(module: nn.Module, record: dict, dtype: torch.dtype | None, name: str) -> FusedExperts:
    """The empty QuantExperts a reload fills, checked against the model's experts module ``module``."""
    layout = experts_layout(module, name)
    if layout is None:
        raise ValueError(f"config.json lists quantized experts {name!r}, but it is a {type(module).__name__} "
                         "without expert parameters")
    cls = LAYER_TYPES[record["type"]]
    cls.check_record(record, where=f"layers[{name!r}]")
    want = (layout.num_experts, layout.hidden_size, layout.intermediate_size, layout.gated, layout.transposed,
            layout.bias)
    got = (record["num_experts"], record["hidden_size"], record["intermediate_size"], record["gated"],
           record["transposed"], record["bias"])
    if want != got:
        raise ValueError(f"experts {name!r}: config.json records (experts, hidden, intermediate, gated, transposed, "
                         f"bias) = {got}, the model has {want}")
    q = cls.from_record(record, dtype, where=f"layers[{name!r}]")
    q.attach_float_module(module)
    return q
