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


def model_limits(model: nn.Module) -> tuple[int | None, int | None]:
    """(vocabulary size, max positions) of a causal LM: the input embedding's rows (else config.vocab_size) and
    config.max_position_embeddings (or n_positions); None where the model does not say."""
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None) or getattr(text_cfg, "vocab_size", None)
    positions = getattr(text_cfg, "max_position_embeddings", None) or getattr(text_cfg, "n_positions", None)
    return (vocab if isinstance(vocab, int) else None), (positions if isinstance(positions, int) else None)


def calibration_samples(model: nn.Module, config: HfVQConfig) -> torch.Tensor:
    """The config's calibration windows, checked against the model (token ids in its vocabulary, windows within
    its positions)."""
    vocab, positions = model_limits(model)
    return build_calibration(config.dataset, config.tokenizer, config.num_samples, config.seq_len, config.seed,
                             config.dataset_config, config.dataset_split, config.text_column,
                             model_path=getattr(model, "name_or_path", None) or None, vocab_size=vocab,
                             max_positions=positions)
