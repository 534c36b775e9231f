"""QuantSim grid helpers with AIMET's argument conventions (``arg`` = module types, module instances or a
predicate): :func:`set_blockwise_quantization_for_weights`, :func:`set_grouped_blockwise_quantization_for_weights`,
:func:`set_activation_quantizers_to_float`. Weight grids are re-initialized at once (min-max from the latent)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from hf_vq.nn.qat import FloatQuantizer, QATLinear, QuantSimLinear
from hf_vq.nn.registry import layer_record
from hf_vq.utils.modules import set_module


def _select(model: nn.Module, arg) -> list[tuple[str, nn.Module]]:
    """Quantized layers matching AIMET's ``arg``: a list of module types, of module instances, or a predicate."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (QATLinear, QuantSimLinear))]
    if callable(arg) and not isinstance(arg, type):
        return [(n, m) for n, m in layers if arg(m)]
    items = list(arg) if isinstance(arg, Iterable) else [arg]
    if items and all(isinstance(a, type) for a in items):
        types = tuple(items)
        # quantized layers stand for the nn.Linear they replaced
        return [(n, m) for n, m in layers if isinstance(m, types) or nn.Linear in types]
    if all(isinstance(a, nn.Module) for a in items):
        ids = {id(a) for a in items}
        found = [(n, m) for n, m in layers if id(m) in ids]
        if len(found) != len(ids):
            raise ValueError("some module instances are not quantized layers of this model")
        return found
    raise ValueError("arg must be a list of module types, a list of module instances, or a callable(module) -> bool")


def _qat(model: nn.Module, name: str, mod: nn.Module) -> QATLinear:
    if isinstance(mod, QuantSimLinear):
        mod = QATLinear.from_quantlinear(mod)
        set_module(model, name, mod)
    return mod


def _in_block(block_size) -> int:
    if isinstance(block_size, int):
        return block_size
    bs = [int(b) for b in block_size]
    if len(bs) != 2 or bs[0] != 1:
        raise ValueError(f"block_size for a Linear weight must be an int or (1, in_block), got {block_size!r}")
    return bs[1]


def _set_weights(model, arg, bitwidth, symmetric, block_size, granularity, decompressed_bw=8) -> list[str]:
    if not symmetric:
        raise ValueError("hf_vq quantsim weights are symmetric: pass symmetric=True")
    block = _in_block(block_size)
    done = []
    for name, mod in _select(model, arg):
        b = mod.in_features if block == -1 else block
        if mod.in_features % b:
            raise ValueError(f"{name}: block size {b} does not divide in_features {mod.in_features}")
        mod = _qat(model, name, mod)
        mod.set_weight_grid(bitwidth, "per_channel" if b == mod.in_features and granularity == "blockwise"
                            else granularity, b, decompressed_bw)
        done.append(name)
    refresh_layer_records(model)
    return done


def set_blockwise_quantization_for_weights(model: nn.Module, arg, bitwidth: int, symmetric: bool,
                                           block_size) -> list[str]:
    """Blockwise symmetric weights (int ``block_size`` along the input channels) for the matching layers."""
    return _set_weights(model, arg, bitwidth, symmetric, block_size, "blockwise")


def set_grouped_blockwise_quantization_for_weights(model: nn.Module, arg, bitwidth: int, symmetric: bool,
                                                   decompressed_bw: int, block_size, block_grouping=-1) -> list[str]:
    """LPBQ weights: int block scales of ``decompressed_bw - bitwidth`` bits x one float scale per output channel
    (``block_grouping=-1``; 1 means plain blockwise; other groupings are not supported)."""
    grouping = block_grouping if isinstance(block_grouping, int) else list(block_grouping)[-1]
    if grouping == 1:
        return set_blockwise_quantization_for_weights(model, arg, bitwidth, symmetric, block_size)
    if grouping != -1:
        raise ValueError(f"block_grouping must be -1 (one group per output channel) or 1, got {block_grouping!r}")
    if decompressed_bw <= bitwidth:
        raise ValueError(f"decompressed_bw ({decompressed_bw}) must be > bitwidth ({bitwidth})")
    return _set_weights(model, arg, bitwidth, symmetric, block_size, "lpbq", decompressed_bw)


def set_activation_quantizers_to_float(model: nn.Module, arg, exponent_bits: int | None = None,
                                       mantissa_bits: int | None = None, dtype: torch.dtype | None = None) -> list[str]:
    """Replace the input/output quantizers of the matching layers with fp16 (or bf16) casts."""
    if dtype is None:
        dtype = {(5, 10): torch.float16, (8, 7): torch.bfloat16}.get((exponent_bits, mantissa_bits))
    names = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
    if dtype not in names:
        raise ValueError("only float16 (5/10) and bfloat16 (8/7) activations are supported; pass dtype= or "
                         f"exponent_bits/mantissa_bits (got {dtype}, {exponent_bits}/{mantissa_bits})")
    done = []
    for name, mod in _select(model, arg):
        for attr in ("input_quantizer", "output_quantizer"):
            if getattr(mod, attr) is not None:
                setattr(mod, attr, FloatQuantizer(names[dtype]))
        done.append(name)
    refresh_layer_records(model)
    return done


def refresh_layer_records(model: nn.Module) -> None:
    """Rewrite config.layers for quantsim layers from the modules (their grids may have been changed)."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    layers = getattr(qc, "layers", None)
    if not isinstance(layers, dict):
        return
    for name, mod in model.named_modules():
        if isinstance(mod, (QATLinear, QuantSimLinear)):
            layers[name] = layer_record(mod)
