"""Registers "adascale": blockwise knowledge distillation of AdaScale quantizers (hf_vq/algorithms/adascale.py).

Per decoder block, in order:
1. FP target = the block with FP weights on the FP model's block input (cached on CPU, or on disk with
   ``activation_cache_dir``: see hf_vq/activation_store.py).
2. Starting grid per Linear: RTN, or GPTQ with Hessians of the quantized model's block input.
3. ``num_iterations`` Adam steps (two groups: clipping gamma/beta at ``lr_clip``, scales s2/s3 at ``lr_scales``,
   cosine decay to 0) on the MSE between the FP target and the quantized block run on a mixed input: each element
   from the FP input with probability ``fp_input_prob``, else from the quantized model's input (AIMET's sampling).
4. Fold into AffineWeights, write the dequantized weights into the block, and run it on the quantized input to get
   the next block's quantized input; the FP target is the next block's FP input.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch import nn

from hf_vq.pipeline.activation_store import ActivationStore
from hf_vq.algorithms.adascale import AdaScaleLinear, check_layout, quantizer_from_affine, quantizer_from_rtn
from hf_vq.pipeline.distill import distill_block
from hf_vq.algorithms.gptq import gptq_quantize
from hf_vq.algorithms.hessian import output_error
from hf_vq.pipeline.registry import calibration_samples, register_algorithm
from hf_vq.pipeline.runner import (RunStats, _run_block, block_prefix, capture_block_inputs, collect_hessians,
                              find_decoder_blocks, last_target_block)

logger = logging.getLogger(__name__)


@register_algorithm("adascale")
def run_adascale(model, config, targets, progress):
    return adascale_model(model, calibration_samples(model, config), targets, config, progress=progress)


def _init_quantizers(block, local, config, q_inputs, prefix):
    hessians = (collect_hessians(block, local, q_inputs, first_token_weight=config.sink_weight())
                if config.init == "gptq" else {})
    quantizers, init_err = {}, {}
    for n, lin in local.items():
        spec = config.spec_for(prefix + n)
        check_layout(lin.weight.shape, spec.group_size, config.weight_granularity, prefix + n)
        w = lin.weight.data.float()
        if config.init == "gptq":
            start = gptq_quantize(w, hessians[n], spec.bits, spec.group_size, spec.sym, config.percdamp)
            quantizers[n] = quantizer_from_affine(w, start, config.weight_granularity)
            init_err[n] = output_error(w, start.dequantize(), hessians[n])
        else:
            quantizers[n] = quantizer_from_rtn(w, spec.bits, spec.group_size, spec.sym, config.weight_granularity,
                                               config.decompressed_bw)
    return quantizers, init_err


def train_block(block: nn.Module, quantizers: dict, fp_inputs, q_inputs, kwargs, targets, *, num_iterations: int,
                lr_scales: float, lr_clip: float, fp_input_prob: float, generator: torch.Generator,
                desc: str = "", progress: bool = True) -> tuple[float, float]:
    """Distil ``block`` (Linears named as ``quantizers``' keys, relative to the block) for ``num_iterations`` Adam
    steps: clipping parameters at ``lr_clip``, scales at ``lr_scales``. Returns (first loss, mean loss of the last
    10%)."""
    stand_ins = {n: AdaScaleLinear(block.get_submodule(n), qz) for n, qz in quantizers.items()}
    groups = [{"params": [p for qz in quantizers.values() for p in qz.clip_params()], "lr": lr_clip},
              {"params": [p for qz in quantizers.values() for p in qz.scale_params()], "lr": lr_scales}]
    return distill_block(block, stand_ins, groups, fp_inputs, q_inputs, kwargs, targets,
                         num_iterations=num_iterations, fp_input_prob=fp_input_prob, generator=generator,
                         desc=desc, progress=progress)


class _OnDevice:
    """(hidden, kwargs) per batch from a store, moved to the block's device: the cache shape collect_hessians reads."""

    def __init__(self, store, kws, device):
        self.store, self.kws, self.device = store, kws, device

    def __len__(self):
        return len(self.store)

    def __iter__(self):
        for j in range(len(self.store)):
            yield self.store[j].to(self.device), self.kws[j]


def adascale_model(model: nn.Module, samples: torch.Tensor, targets: dict[str, nn.Linear], config,
                   progress: bool = True) -> tuple[dict, RunStats]:
    """Quantize ``targets`` (full name -> Linear) with AdaScale, block by block. Returns AffineWeights by name."""
    from tqdm.auto import tqdm

    try:
        prefix, blocks = find_decoder_blocks(model)
    except ValueError as e:
        raise ValueError(f"AdaScale distils decoder blocks one at a time, but none were found in "
                         f"{type(model).__name__}: {e}") from None
    covered = [n for n in targets if n.startswith(f"{prefix}." if prefix else "")]
    outside = sorted(set(targets) - set(covered))
    stats = RunStats()
    stats.block_seconds = []  # training + folding wall time per block
    stats.block_losses = []  # (first, final) distillation loss per block
    t0 = time.perf_counter()
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    stack: list[ActivationStore] = []
    model.requires_grad_(False)
    try:
        # block 0's input is the embedding output: identical for the FP and the quantized model
        captured = capture_block_inputs(model, blocks[0], samples, config.batch_size, contextlib.nullcontext)
        kws = [kw for _, kw in captured]
        n = len(captured)
        for name in ("fp_in", "fp_out", "q_in"):  # one by one into `stack`: a failure closes those already open
            stack.append(ActivationStore(n, config.activation_cache_dir, name))
        fp_in, fp_out, q_in = stack
        for j, (h, _) in enumerate(captured):
            fp_in[j] = h
            q_in[j] = h
        del captured
        stats.forward_s += time.perf_counter() - t0
        device = next(blocks[0].parameters()).device
        results = {}
        bar = tqdm(range(len(blocks)), desc="AdaScale blocks", disable=not progress, unit="block")
        last_block = last_target_block(prefix, len(blocks), targets)
        for i in bar:
            if i > last_block:
                break  # no layers left to quantize: later blocks need no activations
            block = blocks[i]
            bp = block_prefix(prefix, i)
            local = {n[len(bp):]: m for n, m in targets.items() if n.startswith(bp)}
            t1 = time.perf_counter()
            with torch.no_grad():
                for j in range(n):
                    fp_out[j] = _run_block(block, fp_in[j].to(device), kws[j])
            stats.forward_s += time.perf_counter() - t1
            if local:
                t2 = time.perf_counter()
                gen = torch.Generator().manual_seed(config.seed * 100_003 + i)
                quantizers, init_err = _init_quantizers(block, local, config, _OnDevice(q_in, kws, device),
                                                        bp)
                first, last = train_block(
                    block, quantizers, fp_in, q_in, kws, fp_out, num_iterations=config.num_iterations,
                    lr_scales=config.lr_scales, lr_clip=config.lr_clip, fp_input_prob=config.fp_input_prob,
                    generator=gen, desc=f"block {i}", progress=progress)
                with torch.no_grad():
                    for name, qz in quantizers.items():
                        aw = qz.fold()
                        local[name].weight.data.copy_(aw.dequantize().to(local[name].weight.dtype))
                        results[bp + name] = aw
                        if name in init_err:
                            stats.layers[bp + name] = init_err[name]  # GPTQ start's relative output error
                dt = time.perf_counter() - t2
                stats.quantize_s += dt
                stats.block_seconds.append(dt)
                stats.block_losses.append((first, last))
                bar.set_postfix(loss=f"{first:.3g}->{last:.3g}")
                logger.info("AdaScale block %d: loss %.4g -> %.4g in %.1fs", i, first, last, dt)
            t3 = time.perf_counter()
            with torch.no_grad():
                for j in range(n):
                    q_in[j] = _run_block(block, q_in[j].to(device), kws[j])
            fp_in, fp_out = fp_out, fp_in  # this block's FP output is the next block's FP input
            stats.forward_s += time.perf_counter() - t3
    finally:
        for store in stack:
            store.close()
        for p in model.parameters():
            p.requires_grad_(requires_grad[id(p)])
    if outside:
        # Linears outside the decoder blocks (e.g. an untied lm_head) have no block to distil: plain RTN grid.
        for name in outside:
            spec = config.spec_for(name)
            lin = targets[name]
            check_layout(lin.weight.shape, spec.group_size, config.weight_granularity, name)
            results[name] = quantizer_from_rtn(lin.weight.data.float(), spec.bits, spec.group_size, spec.sym,
                                               config.weight_granularity, config.decompressed_bw).fold()
    return results, stats
