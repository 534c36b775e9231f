"""Which weights a quantization run takes, and why every other weight-bearing module stays in float.

Every module with a direct parameter of two or more dimensions is accounted for: a Linear (GPT-2's transposed
``Conv1D`` included) or a fused experts module is quantized unless it is excluded (``modules_to_not_convert``, a
``module_overrides`` skip), a router (a sibling of an experts module whose weight maps the hidden state to one logit
per expert, or to one gate value: Qwen2-MoE's ``shared_expert_gate``), or outside the language model of a multimodal
model (vision/audio towers and projectors are quantized only when a ``module_overrides`` pattern names them);
embeddings stay float; anything else is reported as unsupported, with a warning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_vq.config import HfVQConfig
from hf_vq.model.experts import ExpertsLayout, experts_layout, has_expert_parameters

EXCLUDED = "excluded (modules_to_not_convert)"
SKIPPED = "excluded (module_overrides skip)"
ROUTER = "router"
EMBEDDING = "embedding"
NOT_LANGUAGE = "not the language model (quantize_vision=True or a module_overrides pattern quantizes it)"
UNREACHED = "not reached by calibration"


def matches(name: str, patterns: list[str]) -> bool:
    """Prefix at a module boundary, suffix, or regex match (transformers' should_convert_module semantics)."""
    for p in patterns:
        if name == p or name.startswith(p + ".") or name.endswith("." + p):
            return True
        try:
            if re.fullmatch(p, name):
                return True
        except re.error:
            pass
    return False


def is_linear_like(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.Linear, Conv1D))


def conv1d_to_linear(mod: Conv1D) -> nn.Linear:
    """GPT-2's Conv1D (weight [in, out], y = x W + b) as the equal nn.Linear."""
    nx, nf = mod.weight.shape
    lin = nn.Linear(nx, nf, bias=mod.bias is not None, device=mod.weight.device, dtype=mod.weight.dtype)
    lin.weight.data.copy_(mod.weight.detach().T)
    if mod.bias is not None:
        lin.bias.data.copy_(mod.bias.detach())
    lin.requires_grad_(mod.weight.requires_grad)
    return lin


def linear_shape(mod: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear or Conv1D, else None."""
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features
    if isinstance(mod, Conv1D):
        return tuple(mod.weight.shape)
    return None


@dataclass
class Plan:
    linears: dict[str, nn.Module] = field(default_factory=dict)   # Linear or Conv1D
    experts: dict[str, ExpertsLayout] = field(default_factory=dict)
    floats: dict[str, str] = field(default_factory=dict)          # name -> why it stays float


def _weight_bearing(mod: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in mod.parameters(recurse=False))


def _routers(model: nn.Module) -> set[str]:
    out = set()
    for name, mod in model.named_modules():
        if has_expert_parameters(mod):
            n_experts = next(p for p in mod.parameters(recurse=False) if p.dim() == 3).shape[0]
        elif isinstance(getattr(mod, "num_experts", None), int) and hasattr(mod, "dequantize_expert"):
            n_experts = mod.num_experts  # already quantized experts (hf_vq.nn.experts)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        for cname, sib in parent.named_children():
            w = sib._parameters.get("weight")
            if cname != child and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] in (n_experts, 1):
                out.add(f"{parent_name}.{cname}" if parent_name else cname)
    return out


def _language_model(model: nn.Module) -> tuple[str | None, str | None]:
    """(name of the language model, name of the output head) of a multimodal model; (None, None) otherwise."""
    get = getattr(model, "get_decoder", None)
    if get is None:
        return None, None
    try:
        decoder = get()
    except Exception:  # noqa: BLE001  (best-effort lookup in transformers; a text model has nothing to find)
        return None, None
    base = getattr(model, "base_model", model)
    if decoder is None or decoder is model or decoder is base:
        return None, None
    name = next((n for n, m in model.named_modules() if m is decoder), None)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    head_name = next((n for n, m in model.named_modules() if head is not None and m is head), None)
    return name, head_name


def output_head(model: nn.Module) -> str | None:
    """Name of the model's output head (``get_output_embeddings()``), None if it has none."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head and n), None)


def untie_head(model: nn.Module, head: str) -> list[str]:
    """Stop tying ``head``'s weight to the input embedding: tie flags off in the model's configs (so a reload builds a
    separate head) and the head dropped from every tied-weights map. Returns the configs' names that were changed."""
    changed = []
    configs = {}
    for prefix, mod in model.named_modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None:
            configs.setdefault(id(cfg), (prefix, cfg))
            text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else None
            if text is not None and text is not cfg:
                configs.setdefault(id(text), (f"{prefix}.text_config".lstrip("."), text))
        tied = getattr(mod, "all_tied_weights_keys", None)
        local = head if not prefix else head[len(prefix) + 1:] if head.startswith(prefix + ".") else None
        if isinstance(tied, dict) and local is not None:
            for key in [k for k, v in tied.items() if _under(k, local) or _under(v, local)]:
                del tied[key]
    for name, cfg in configs.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
            changed.append(name or "config")
    return changed


def _under(key: str, module: str) -> bool:
    return key == module or key.startswith(module + ".")


def _vision_asked(config: HfVQConfig, name: str) -> bool:
    if config.quantize_vision:
        return True
    return any(re.search(p, name) and not o.get("skip") for p, o in config.module_overrides.items())


def plan_targets(model: nn.Module, config: HfVQConfig, skip: list[str]) -> Plan:
    plan = Plan()
    routers = _routers(model)
    lm, head = _language_model(model)
    for name, mod in model.named_modules():
        if not name or not _weight_bearing(mod):
            continue
        in_lm = lm is None or name == head or name.startswith(lm + ".")
        if name in routers:
            plan.floats[name] = ROUTER
        elif matches(name, skip):
            plan.floats[name] = EXCLUDED
        elif not in_lm and not _vision_asked(config, name):
            plan.floats[name] = NOT_LANGUAGE
        elif isinstance(mod, nn.Embedding):
            plan.floats[name] = EMBEDDING
        elif is_linear_like(mod):
            if config.spec_for(name) is None:
                plan.floats[name] = SKIPPED
            else:
                plan.linears[name] = mod
        elif has_expert_parameters(mod):
            layout = experts_layout(mod, name)
            members = [f"{name}.{e}.{p}" for e in range(layout.num_experts) for p in (layout.first, "down_proj")]
            specs = [config.spec_for(m) is None for m in members]
            if all(specs):
                plan.floats[name] = SKIPPED
            elif any(specs):
                raise ValueError(f"{name} ({layout.cls}): module_overrides skip some experts' projections but not "
                                 "others; fused experts are quantized all together or kept in float together")
            else:
                plan.experts[name] = layout
        else:
            plan.floats[name] = f"unsupported ({type(mod).__name__})"
    return plan


_PLACEHOLDER = "_hf_vq_init_placeholder"


def add_init_placeholders(model: nn.Module) -> None:
    """While a quantized checkpoint loads, transformers re-runs the model's ``_init_weights``, and some (GPT-2's
    attention and MLP) write ``module.c_proj.weight`` directly. hf_vq's quantized modules have no ``weight``: give each
    an empty one marked initialized (transformers' init functions skip it) until loading ends."""
    from hf_vq.nn.registry import LAYER_TYPES

    for mod in model.modules():
        if getattr(mod, "layer_type", None) in LAYER_TYPES and not hasattr(mod, "weight"):
            t = torch.empty(0)
            t._is_hf_initialized = True
            mod.__dict__["weight"] = t
            mod.__dict__[_PLACEHOLDER] = True


def remove_init_placeholders(model: nn.Module) -> None:
    for mod in model.modules():
        if mod.__dict__.pop(_PLACEHOLDER, False):
            mod.__dict__.pop("weight", None)
