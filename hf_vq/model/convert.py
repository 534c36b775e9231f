"""Model-level operations: pick the Linear layers to quantize, run an algorithm over them, swap modules, and rebuild
the exact quantized skeleton of a saved model from its config."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import torch
from torch import nn

import hf_vq.nn  # noqa: F401  (registers the layer types that build_module reads)
from hf_vq.config import HfVQConfig
from hf_vq.nn.registry import LAYER_TYPES, build_module, layer_record, module_from_format
from hf_vq.pipeline import registry
from hf_vq.utils.modules import set_module

logger = logging.getLogger(__name__)


def _matches(name: str, patterns: list[str]) -> bool:
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


def select_linears(model: nn.Module, config: HfVQConfig, skip: list[str]) -> dict[str, nn.Linear]:
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and not _matches(name, skip) and config.spec_for(name) is not None}


def build_skeleton(model: nn.Module, layers: dict[str, dict[str, Any]], dtype: torch.dtype | None) -> None:
    """Swap each recorded Linear for an empty quantized module of exactly the recorded shape."""
    for name, record in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"config.json lists quantized layer {name!r}, which this model does not have") from None
        if not isinstance(old, nn.Linear):
            raise ValueError(f"config.json lists quantized layer {name!r}, but it is a {type(old).__name__}")
        if (old.in_features, old.out_features) != (record["in_features"], record["out_features"]):
            raise ValueError(f"layer {name!r}: config.json records {record['out_features']}x{record['in_features']}, "
                             f"the model has {old.out_features}x{old.in_features}")
        set_module(model, name, build_module(record, dtype))


def expected_tensors(model: nn.Module, layers: dict[str, dict[str, Any]]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    out = {}
    for name in layers:
        mod = model.get_submodule(name)
        for key, t in mod.state_dict(keep_vars=True).items():
            out[f"{name}.{key}"] = (tuple(t.shape), t.dtype)
    return out


def check_checkpoint(model: nn.Module, layers: dict, checkpoint_files: list[str] | None) -> None:
    """Fail loudly when the checkpoint's quantized tensors disagree with the config (transformers would only warn and
    leave random values)."""
    if not checkpoint_files:
        return
    files = [f for f in checkpoint_files if str(f).endswith(".safetensors")]
    if len(files) != len(checkpoint_files):
        raise ValueError("hf_vq checkpoints load from safetensors only; found "
                         f"{[str(f) for f in checkpoint_files if not str(f).endswith('.safetensors')]}")
    from safetensors import safe_open

    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                sl = sf.get_slice(key)
                found[key] = (tuple(sl.get_shape()), sl.get_dtype())
    expected = expected_tensors(model, layers)
    problems = []
    for key, (shape, dtype) in expected.items():
        if key not in found:
            problems.append(f"missing {key}")
        elif found[key][0] != shape:
            problems.append(f"{key}: checkpoint shape {list(found[key][0])}, config expects {list(shape)}")
    quant_suffixes = tuple(f".{n}" for cls in LAYER_TYPES.values() for n in getattr(cls, "tensor_names", ()))
    for key in found:
        if quant_suffixes and key.endswith(quant_suffixes) and key not in expected:
            problems.append(f"unexpected quantized tensor {key} (not in config.json's layers)")
    if problems:
        head = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(f"checkpoint does not match its hf_vq quantization config: {head}")


def quantize_model(model: nn.Module, config: HfVQConfig, skip: list[str], progress: bool = True) -> dict:
    """Quantize the model's Linear layers in place according to ``config``; returns run statistics."""
    targets = select_linears(model, config, skip)
    if not targets:
        raise ValueError("no Linear layer to quantize (everything is excluded by modules_to_not_convert/overrides)")
    t0 = time.perf_counter()
    results, stats = registry.run(model, config, targets, progress=progress)
    for name, result in results.items():
        bias = targets[name].bias
        to_module = getattr(result, "to_module", None)
        set_module(model, name, to_module(bias) if to_module else module_from_format(result, bias))
    config.layers = {name: layer_record(model.get_submodule(name)) for name in results}
    config.modules_to_not_convert = list(skip)
    total = time.perf_counter() - t0
    summary = {"total_s": total, "forward_s": stats.forward_s, "quantize_s": stats.quantize_s,
               "layers": stats.layers, "num_layers": len(results)}
    logger.info("hf_vq %s: quantized %d layers in %.1fs (forward %.1fs, %s math %.1fs)", config.method, len(results),
                total, stats.forward_s, config.method, stats.quantize_s)
    return summary


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    for name, mod in list(model.named_modules()):
        if getattr(mod, "layer_type", None) in LAYER_TYPES:
            set_module(model, name, mod.to_linear(dtype))
    return model
