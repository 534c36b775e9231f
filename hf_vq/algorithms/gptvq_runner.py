"""Registers the "gptvq" algorithm: block-by-block calibration (shared Hessians) around ``gptvq_quantize``."""

from __future__ import annotations

import torch

from hf_vq.algorithms.registry import calibration_samples, register_algorithm
from hf_vq.sequential import run_sequential


@register_algorithm("gptvq")
def run_gptvq(model, config, targets, progress):
    from hf_vq.algorithms.gptvq import gptvq_quantize

    def quantize_fn(name, lin, h):
        return gptvq_quantize(
            lin.weight.data, h, vector_dim=config.vector_dim, index_bits=config.index_bits,
            codebook_bits=config.codebook_bits, rows_per_block=config.rows_per_block,
            cols_per_block=config.cols_per_block, kmeans_iterations=config.kmeans_iterations,
            percdamp=config.percdamp, hessian_weighted_lookup=config.hessian_weighted_lookup,
            codebook_update=config.codebook_update, codebook_update_steps=config.codebook_update_steps,
            data_normalization=config.data_normalization, init=config.init, block_size=config.block_size,
            seed=config.seed, codebook_scale=config.codebook_scale)

    return run_sequential(model, calibration_samples(model, config), targets, quantize_fn,
                          batch_size=config.calibration_batch_size, true_sequential=config.true_sequential,
                          compute_dtype=getattr(torch, config.calibration_dtype), progress=progress)
