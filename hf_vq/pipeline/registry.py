"""Which driver quantizes which config. The drivers (hf_vq.pipeline.gptq, .gptvq, .adascale, .quantsim) register
themselves here; this module imports none of them (hf_vq.pipeline's __init__ does).

A driver registers ``fn(model, config, targets, progress) -> (results, RunStats)`` under its config's ``method``;
each result is an hf_vq.formats object (built into a module by hf_vq.nn.registry.module_from_format) or has
``dequantize()`` and ``to_module(bias)``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from hf_vq.config import HfVQConfig
from hf_vq.pipeline.data import build_calibration

ALGORITHMS: dict[str, Callable] = {}


def register_algorithm(method: str):
    def deco(fn):
        ALGORITHMS[method] = fn
        return fn
    return deco


def run(model: nn.Module, config: HfVQConfig, targets: dict[str, nn.Linear], progress: bool = True):
    fn = ALGORITHMS.get(config.method)
    if fn is None:
        raise NotImplementedError(f"no algorithm registered for method {config.method!r} ({type(config).__name__})")
    return fn(model, config, targets, progress)


def calibration_samples(model: nn.Module, config: HfVQConfig) -> torch.Tensor:
    return build_calibration(config.dataset, config.tokenizer, config.num_samples, config.seq_len, config.seed,
                             config.dataset_config, config.dataset_split, config.text_column,
                             model_path=getattr(model, "name_or_path", None) or None)
