"""Which algorithm quantizes which config: glue between configs and the pure algorithms.

An algorithm registers ``fn(model, config, targets, progress) -> (results, RunStats)`` under its config's ``method``;
each result has ``dequantize()`` and ``to_module(bias)``.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from hf_vq.config import HfVQConfig
from hf_vq.sequential import RunStats, run_sequential

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


@register_algorithm("rtn")
def _run_rtn(model, config, targets, progress):
    from hf_vq.algorithms.rtn import rtn_weight

    stats = RunStats()
    t0 = time.perf_counter()
    results = {}
    for name, lin in targets.items():
        spec = config.spec_for(name)
        results[name] = rtn_weight(lin.weight.data, spec.bits, spec.group_size, spec.sym, config.clip_search)
    stats.quantize_s = time.perf_counter() - t0
    return results, stats


@register_algorithm("gptq")
def _run_gptq(model, config, targets, progress):
    from hf_vq.algorithms.gptq import gptq_quantize

    def quantize(weight, h, spec):
        return gptq_quantize(weight, h, spec.bits, spec.group_size, spec.sym, config.percdamp, config.act_order,
                             config.block_size, config.clip_search)

    def quantize_fn(name, lin, h):
        return quantize(lin.weight.data, h, config.spec_for(name))

    def quantize_shared_fn(names, lins, h):
        # GPTQ treats rows independently given H: layers reading one input are one problem with stacked rows
        out = {}
        by_spec: dict = {}
        for name, lin in zip(names, lins):
            spec = config.spec_for(name)
            by_spec.setdefault((spec.bits, spec.group_size, spec.sym), (spec, []))[1].append((name, lin))
        for spec, members in by_spec.values():
            stacked = quantize(torch.cat([lin.weight.data for _, lin in members]), h, spec)
            parts = stacked.split_rows([lin.out_features for _, lin in members])
            out.update({name: part for (name, _), part in zip(members, parts)})
        return [out[n] for n in names]

    return run_sequential(model, calibration_samples(model, config), targets, quantize_fn,
                          batch_size=config.calibration_batch_size, true_sequential=config.true_sequential,
                          compute_dtype=getattr(torch, config.calibration_dtype), progress=progress,
                          quantize_shared_fn=quantize_shared_fn, first_token_weight=config.sink_weight())


def calibration_samples(model: nn.Module, config: HfVQConfig) -> torch.Tensor:
    from hf_vq.calibration import build_calibration

    return build_calibration(config.dataset, config.tokenizer, config.num_samples, config.seq_len, config.seed,
                             config.dataset_config, config.dataset_split, config.text_column,
                             model_path=getattr(model, "name_or_path", None) or None)


# The other algorithms register themselves on import (they import this module, hence the imports at the end).
import hf_vq.algorithms.adascale_runner  # noqa: E402,F401
import hf_vq.algorithms.gptvq_runner  # noqa: E402,F401
import hf_vq.quantsim  # noqa: E402,F401
