"""Registers the "rtn" and "gptq" algorithms: RTN per layer, GPTQ block by block on shared Hessians."""

from __future__ import annotations

import time

import torch

from hf_vq.algorithms.gptq import gptq_quantize
from hf_vq.algorithms.rtn import rtn_weight
from hf_vq.pipeline.registry import calibration_samples, register_algorithm
from hf_vq.pipeline.placement import execution_device, onloaded
from hf_vq.pipeline.blocks import RunStats
from hf_vq.pipeline.runner import run_options, run_sequential, spill


@register_algorithm("rtn")
def _run_rtn(model, config, targets, progress):
    stats = RunStats()
    t0 = time.perf_counter()
    results = {}
    for name, lin in targets.items():
        spec = config.spec_for(name)
        with onloaded(lin, execution_device(lin)):  # a disk-offloaded layer is read back for its rounding
            results[name] = rtn_weight(lin.weight.data, spec.bits, spec.group_size, spec.sym, config.clip_search)
        spill(lin, name, [name], results)
    stats.quantize_s = time.perf_counter() - t0
    return results, stats


@register_algorithm("gptq")
def _run_gptq(model, config, targets, progress):
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
                          quantize_shared_fn=quantize_shared_fn, first_token_weight=config.sink_weight(),
                          **run_options(config))
