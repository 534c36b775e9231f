"""The quantized layer types: each module class registers itself where it is defined, under the "type" that
config.json records, and names the format object it is built from."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

# Quantized module classes by the "type" written in config.json; each provides layer_record() and from_record().
LAYER_TYPES: dict[str, type] = {}
# Format class (hf_vq.formats) -> constructor (format object, bias) -> module.
FORMAT_BUILDERS: dict[type, Callable[[Any, torch.Tensor | None], nn.Module]] = {}


def register_layer_type(kind: str):
    def deco(cls):
        LAYER_TYPES[kind] = cls
        cls.layer_type = kind
        return cls
    return deco


def register_format(format_cls: type, builder: Callable[[Any, torch.Tensor | None], nn.Module]) -> None:
    FORMAT_BUILDERS[format_cls] = builder


def module_from_format(weight: Any, bias: torch.Tensor | None) -> nn.Module:
    """The quantized module that stores ``weight`` (an hf_vq.formats object) with ``bias``."""
    for cls in type(weight).__mro__:
        if cls in FORMAT_BUILDERS:
            return FORMAT_BUILDERS[cls](weight, bias)
    raise TypeError(f"no quantized module stores a {type(weight).__name__}")


def layer_record(module: nn.Module) -> dict[str, Any]:
    """What config.json records per layer so a reload can rebuild the module before reading tensors."""
    if getattr(module, "layer_type", None) not in LAYER_TYPES:
        raise TypeError(f"no layer record for {type(module).__name__}")
    return {"type": module.layer_type, **module.layer_record()}


def build_module(record: dict[str, Any], dtype: torch.dtype | None) -> nn.Module:
    cls = LAYER_TYPES.get(record.get("type"))
    if cls is None:
        raise ValueError(f"unknown quantized layer type {record.get('type')!r} in config.json "
                         f"(known: {sorted(LAYER_TYPES)}); written by a newer hf_vq?")
    return cls.from_record(record, dtype)
