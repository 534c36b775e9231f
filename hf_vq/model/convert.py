"""Model-level operations: pick the Linear layers to quantize, run an algorithm over them, swap modules, and rebuild
the exact quantized skeleton of a saved model from its config."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

import hf_vq.nn  # noqa: F401  (registers the layer types that build_module reads)
from hf_vq.config import HfVQConfig
from hf_vq.nn.registry import LAYER_TYPES, build_module, layer_record, module_from_format
from hf_vq.model.checkpoint import check_checkpoint, expected_tensors, validate_layer_records  # noqa: F401
from hf_vq.model import experts as experts_mod
from hf_vq.model import offload
from hf_vq.model import report as report_mod
from hf_vq.model import targets as targets_mod
from hf_vq.pipeline import head as head_mod
from hf_vq.pipeline import mixed, placement, registry
from hf_vq.pipeline.resume import SpilledResult
from hf_vq.pipeline.experts import resolve_options as expert_options
from hf_vq.utils.modules import set_module

logger = logging.getLogger(__name__)


def select_linears(model: nn.Module, config: HfVQConfig, skip: list[str]) -> dict[str, nn.Module]:
    """The Linear (and GPT-2 Conv1D) layers a run quantizes; hf_vq.model.targets.plan_targets gives the whole plan
    (fused experts, and why every other weight stays float)."""
    return targets_mod.plan_targets(model, config, skip).linears


def build_skeleton(model: nn.Module, layers: dict[str, dict[str, Any]], dtype: torch.dtype | None) -> None:
    """Swap each recorded Linear for an empty quantized module of exactly the recorded shape."""
    validate_layer_records(layers)  # hf_vq.model.checkpoint: a clear error naming the layer and field
    for name, record in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"config.json lists quantized layer {name!r}, which this model does not have") from None
        if experts_mod.is_experts_record(record):  # fused MoE experts
            set_module(model, name, experts_mod.build_quantized(old, record, dtype, name))
            continue
        shape = targets_mod.linear_shape(old)  # nn.Linear, or GPT-2's Conv1D (weight stored transposed)
        if shape is None:
            raise ValueError(f"config.json lists quantized layer {name!r}, but it is a {type(old).__name__}")
        if shape != (record["in_features"], record["out_features"]):
            raise ValueError(f"layer {name!r}: config.json records {record['out_features']}x{record['in_features']}, "
                             f"the model has {shape[1]}x{shape[0]}")
        set_module(model, name, build_module(record, dtype))


def quantize_model(model: nn.Module, config: HfVQConfig, skip: list[str], progress: bool = True) -> dict:
    """Quantize the model's Linear layers and fused experts in place according to ``config``; returns the run report
    (hf_vq.model.report): what was quantized, what stayed float and why, per-layer error, run times."""
    head = _head_to_quantize(model, config)
    plan = targets_mod.plan_targets(model, config, skip + [head] if head else skip)
    if head:
        plan.floats.pop(head, None)
    if not plan.linears and not plan.experts and not head:
        kept = ", ".join(f"{n}: {r}" for n, r in list(plan.floats.items())[:6])
        raise ValueError(f"no layer to quantize in {type(model).__name__} (weight-bearing modules kept in float: "
                         f"{kept or 'none found'})")
    if plan.experts and config.method not in experts_mod.METHODS:
        name, layout = next(iter(plan.experts.items()))
        experts_mod.refuse(model.get_submodule(name), layout, name, config.method)
    on_disk = {n: placement.disk_offload_folder(m) for n, m in [*plan.linears.items(),
               *((e, model.get_submodule(e)) for e in plan.experts)]}
    on_disk = {n: f for n, f in on_disk.items() if f is not None}
    t0 = time.perf_counter()
    for name, mod in plan.linears.items():
        if not isinstance(mod, nn.Linear):  # GPT-2 Conv1D: the same layer as a Linear (weight transposed)
            set_module(model, name, targets_mod.conv1d_to_linear(mod))
    mode, min_tokens = expert_options(config)
    unfused = {}
    for name, layout in plan.experts.items():
        unfused[name] = offload.unfuse_experts(model.get_submodule(name), layout, mode, min_tokens, name,
                                               on_disk.get(name))
        set_module(model, name, unfused[name])
    targets = {name: model.get_submodule(name) for name in plan.linears}
    for name, cal in unfused.items():
        targets.update({f"{name}.{n}": m for n, m in cal.named_modules() if isinstance(m, nn.Linear)})
    try:
        allocation = None
        if getattr(config, "average_bits", None) is not None:  # mixed precision: choose each layer's setting first
            allocation = mixed.allocate(model, config, targets, list(unfused), progress=progress)
        results, stats = registry.run(model, config, targets, progress=progress)
    except BaseException:
        for name, cal in unfused.items():
            set_module(model, name, offload.refold_experts(cal, on_disk.get(name)))
        raise
    member_of = {t: name for name in unfused for t in targets if t.startswith(name + ".")}
    quantized = []
    for name, result in results.items():
        if name in member_of:
            continue
        if isinstance(result, SpilledResult):
            result = result.load()
        old = targets[name]
        home = placement.execution_device(old)
        with placement.onloaded(old, home):  # an offloaded Linear's bias is read from the offload folder
            to_module = getattr(result, "to_module", None)
            new = to_module(old.bias) if to_module else module_from_format(result, old.bias)
        set_module(model, name, new)
        if name in on_disk and getattr(new, "_hf_hook", None) is None:  # not already put back on disk by the run
            placement.offload_to_disk(new, name, on_disk[name], home)
        quantized.append(name)
    experts_report = {}
    for name, cal in unfused.items():
        if "routed_tokens" in cal.report:  # calibrated (RTN never routes a token)
            experts_report[name] = dict(cal.report)
        if all(t in results for t, owner in member_of.items() if owner == name):
            set_module(model, name, offload.fuse_experts(cal, plan.experts[name], results, name, on_disk.get(name)))
            quantized.append(name)
        else:
            set_module(model, name, offload.refold_experts(cal, on_disk.get(name)))
    if head:
        t1 = time.perf_counter()
        err = _quantize_head(model, config, head)
        stats.quantize_s += time.perf_counter() - t1  # its whole-model Hessian pass included
        if err is not None:
            stats.layers[head] = err
        quantized.append(head)
        skip = [s for s in skip if not targets_mod.matches(head, [s])]
    config.layers = {name: layer_record(model.get_submodule(name)) for name in quantized}
    config.modules_to_not_convert = list(skip)
    floats = dict(plan.floats)
    floats.update({n: targets_mod.UNREACHED for n in list(plan.linears) + list(plan.experts) if n not in quantized})
    summary = report_mod.build_report(model, config, quantized, floats, stats, experts_report, member_of,
                                      time.perf_counter() - t0)
    if allocation is not None:
        summary["allocation"] = allocation
    return summary


def _head_to_quantize(model: nn.Module, config: HfVQConfig) -> str | None:
    """The output head's name when the config quantizes it (``lm_head_bits``), else None."""
    if getattr(config, "lm_head_bits", None) is None:
        return None
    head = targets_mod.output_head(model)
    mod = model.get_submodule(head) if head else None
    if mod is None or targets_mod.linear_shape(mod) is None:
        raise ValueError(f"lm_head_bits={config.lm_head_bits}: {type(model).__name__} has no Linear output head "
                         f"(get_output_embeddings() gives {type(mod).__name__ if mod is not None else None})")
    return head


def _quantize_head(model: nn.Module, config: HfVQConfig, name: str) -> float | None:
    """Quantize the output head (hf_vq.pipeline.head) after the method's run and swap it in; a head tied to the
    input embedding is untied first (the embedding keeps the float weight). Returns its relative output error."""
    old = model.get_submodule(name)
    if not isinstance(old, nn.Linear):  # GPT-2 style Conv1D head
        old = targets_mod.conv1d_to_linear(old)
        set_module(model, name, old)
    untied = targets_mod.untie_head(model, name)
    if untied:
        logger.info("hf_vq: %s untied from the input embedding (tie_word_embeddings=False in %s)", name,
                    ", ".join(untied))
    folder = placement.disk_offload_folder(old)
    home = placement.execution_device(old)
    result, err = head_mod.quantize_head(model, config, old)
    with placement.onloaded(old, home):
        new = module_from_format(result, old.bias)
    set_module(model, name, new)
    if folder is not None and getattr(new, "_hf_hook", None) is None:
        placement.offload_to_disk(new, name, folder, home)
    return err


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    for name, mod in list(model.named_modules()):
        if getattr(mod, "layer_type", None) in LAYER_TYPES:
            set_module(model, name, mod.to_linear(dtype))
    return model
