"""Registers the "gptvq" algorithm: block-by-block calibration (shared Hessians) around ``gptvq_quantize``."""

from __future__ import annotations

import logging

import torch

from hf_vq.algorithms.gptvq import gptvq_quantize
from hf_vq.pipeline.registry import calibration_samples, register_algorithm
from hf_vq.pipeline.distill import block_mse
from hf_vq.pipeline.runner import run_options, run_sequential
from hf_vq.pipeline.vq_finetune import finetune_vq_block

logger = logging.getLogger(__name__)


@register_algorithm("gptvq")
def run_gptvq(model, config, targets, progress):
    def quantize_fn(name, lin, h):
        return gptvq_quantize(lin.weight.data, h, **config.vq_setting(name), **vq_options(config))

    return run_sequential(model, calibration_samples(model, config), targets, quantize_fn,
                          batch_size=config.calibration_batch_size, true_sequential=config.true_sequential,
                          compute_dtype=getattr(torch, config.calibration_dtype), progress=progress,
                          block_hook=_finetune_hook(config, progress) if config.finetune_iterations else None,
                          first_token_weight=config.sink_weight(), **run_options(config))


def vq_options(config) -> dict:
    """gptvq_quantize's arguments from the config, but for the per-layer setting (config.vq_setting)."""
    return dict(codebook_bits=config.codebook_bits, cols_per_block=config.cols_per_block,
                kmeans_iterations=config.kmeans_iterations, percdamp=config.percdamp,
                hessian_weighted_lookup=config.hessian_weighted_lookup, codebook_update=config.codebook_update,
                codebook_update_steps=config.codebook_update_steps, data_normalization=config.data_normalization,
                init=config.init, block_size=config.block_size, seed=config.seed,
                codebook_scale=config.codebook_scale)


def _finetune_hook(config, progress):
    def load(local, results):
        for n, vq in results.items():
            local[n].weight.data.copy_(vq.dequantize().to(local[n].weight.dtype))

    @torch.no_grad()
    def hook(i, block, local, results, cache, fp_outputs, ranks):
        # the block's weights hold ``results`` (the runner wrote them): compare with the fine-tuned codebooks as stored
        before = block_mse(block, cache, fp_outputs, ranks)
        gen = torch.Generator().manual_seed(config.seed * 100_003 + i)
        new, _, _ = finetune_vq_block(
            block, local, results, [h for h, _ in cache], [kw for _, kw in cache], fp_outputs,
            iterations=config.finetune_iterations, lr=config.finetune_lr, codebook_scale=config.codebook_scale,
            generator=gen, desc=f"block {i} codebooks", progress=progress, ranks=ranks)
        load(local, new)
        after = block_mse(block, cache, fp_outputs, ranks)
        logger.info("GPTVQ block %d codebook fine-tuning: block MSE %.4g -> %.4g", i, before, after)
        if after < before:
            return new
        load(local, results)
        return None

    return hook
