"""Registers "adascale": blockwise knowledge distillation of AdaScale quantizers (hf_vq/algorithms/adascale.py).

Per decoder block, in order:
1. FP target = the block with FP weights on the FP model's block input (cached on CPU, or on disk with
   ``activation_cache_dir``: see hf_vq/activation_store.py).
2. Starting grid per Linear: GPTQ with Hessians of the quantized model's block input (default; for LPBQ, GPTQ's
   rounding onto the RTN LPBQ grid), or RTN.
3. Up to ``num_iterations`` Adam steps (scales s2/s3 at ``lr_scales``, clipping gamma/beta at ``lr_clip``, which
   by default is 0 from a GPTQ start: GPTQ's grid stays; cosine decay to 0) on the MSE between the FP target and the
   quantized block run on a mixed input: each element from the FP input with probability ``fp_input_prob``, else
   from the quantized model's input (AIMET's sampling); fewer when the loss stops falling (``early_stop_margin``). The block runs under bfloat16 autocast where
   that is fast (``train_dtype``); the quantizer's element-wise math is compiled for long runs (``compile``).
4. Fold into AffineWeights and write the dequantized weights into the block; if the block's output MSE on the
   quantized input (against the FP target) is higher than the start's, keep the start. Run it on the quantized input
   to get the next block's quantized input; the FP target is the next block's FP input.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch import nn

from hf_vq.pipeline.activation_store import ActivationStore
from hf_vq.algorithms.adascale import (AdaScaleLinear, check_layout, compiled_kernels, initial_grid,
                                      quantizer_from_affine, quantizer_from_rtn)
from hf_vq.pipeline.distill import EarlyStop, block_mse, distill_block
from hf_vq.algorithms.gptq import gptq_quantize
from hf_vq.algorithms.hessian import output_error
from hf_vq.pipeline.registry import calibration_samples, register_algorithm
from hf_vq.pipeline import distributed
from hf_vq.pipeline.blocks import (RunStats, _run_block, bar_postfix, block_prefix, capture_block_inputs,
                                   collect_hessians, find_decoder_blocks, last_target_block, probe_block)
from hf_vq.pipeline.placement import execution_device, move, onloaded, resolve_device
from hf_vq.pipeline.resume import ResumeStore, fingerprint
from hf_vq.pipeline.runner import finish_block, model_config as _model_config, restore_finished, run_options

logger = logging.getLogger(__name__)


@register_algorithm("adascale")
def run_adascale(model, config, targets, progress):
    return adascale_model(model, calibration_samples(model, config), targets, config, progress=progress)


# compile the quantizer when the element-wise work it saves (~8 ns per weight and step on a CPU core) exceeds its
# one-off compile (~20 s)
COMPILE_MIN_WEIGHT_STEPS = 2e9


def _fast_bf16(device: torch.device) -> bool:
    """bfloat16 matmuls in hardware (on a CPU without AVX512-BF16/AMX they are emulated, slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private oneDNN query: absent from some builds
        return False


def _init_quantizers(block, local, config, q_inputs, prefix, ranks: distributed.Ranks = distributed.Ranks()):
    """Starting quantizers. GPTQ start: as the GPTQ method does (true-sequential), each group of Linears reading one
    input (q/k/v, o, gate/up, down) gets its Hessians with the groups before it already quantized, so 0 iterations
    give GPTQ's result. The block is left holding those GPTQ weights (training replaces the Linears, folding
    overwrites them). Under torch.distributed the Hessians are summed over ranks and each layer is solved by one
    rank and broadcast."""
    quantizers, init_err = {}, {}
    if config.init_method() == "rtn":
        for n, lin in local.items():
            spec = config.spec_for(prefix + n)
            check_layout(lin.weight.shape, spec.group_size, config.weight_granularity, prefix + n)
            quantizers[n] = quantizer_from_rtn(lin.weight.data.float(), spec.bits, spec.group_size, spec.sym,
                                               config.weight_granularity, config.decompressed_bw)
        return quantizers, init_err
    for n, lin in local.items():
        check_layout(lin.weight.shape, config.spec_for(prefix + n).group_size, config.weight_granularity, prefix + n)
    hidden, kw = next(iter(q_inputs))
    solved = 0
    for group in probe_block(block, local, hidden, kw, contextlib.nullcontext).groups:
        hessians = collect_hessians(block, {n: local[n] for n in group}, q_inputs,
                                    first_token_weight=config.sink_weight(), ranks=ranks)
        for n in group:
            spec = config.spec_for(prefix + n)
            w = local[n].weight.data.float().clone()
            # LPBQ: GPTQ rounds onto the RTN LPBQ grid (int x per-channel scales), which training then keeps
            grid = (initial_grid(w, spec.bits, spec.group_size, True, "lpbq", config.decompressed_bw)
                    if config.weight_granularity == "lpbq" else None)
            start, = distributed.solved_by_owner(solved, ranks, lambda: [gptq_quantize(
                w, hessians[n], spec.bits, spec.group_size, spec.sym, config.percdamp, grid=grid)], 1, w.device)
            solved += 1
            quantizers[n] = quantizer_from_affine(w, start, config.weight_granularity)
            init_err[n] = output_error(w, start.dequantize(), hessians[n])
            local[n].weight.data.copy_(start.dequantize().to(local[n].weight.dtype))
    return quantizers, init_err


def train_block(block: nn.Module, quantizers: dict, fp_inputs, q_inputs, kwargs, targets, *, num_iterations: int,
                lr_scales: float, lr_clip: float, fp_input_prob: float, generator: torch.Generator,
                desc: str = "", progress: bool = True, **distill_kw) -> tuple[float, float]:
    """Distil ``block`` (Linears named as ``quantizers``' keys, relative to the block) for ``num_iterations`` Adam
    steps: clipping parameters at ``lr_clip`` (0: not trained), scales at ``lr_scales``; ``distill_kw``
    (autocast_dtype, early_stop, history, ranks) as for distill_block. Returns (first loss, mean loss of the last 10%)."""
    stand_ins = {n: AdaScaleLinear(block.get_submodule(n), qz) for n, qz in quantizers.items()}
    clip = [p for qz in quantizers.values() for p in qz.clip_params()]
    groups = [{"params": [p for qz in quantizers.values() for p in qz.scale_params()], "lr": lr_scales}]
    if lr_clip > 0:
        groups.append({"params": clip, "lr": lr_clip})
    else:  # the grid stays as it starts (no gradient work for it)
        for p in clip:
            p.requires_grad_(False)
    return distill_block(block, stand_ins, groups, fp_inputs, q_inputs, kwargs, targets,
                         num_iterations=num_iterations, fp_input_prob=fp_input_prob, generator=generator,
                         desc=desc, progress=progress, **distill_kw)


@torch.no_grad()
def _fold(quantizers: dict, local: dict) -> dict:
    """AffineWeights of ``quantizers`` (or AffineWeights as they are), written into the block's Linears."""
    folded = {n: q.fold() if isinstance(q, nn.Module) else q for n, q in quantizers.items()}
    for name, aw in folded.items():
        local[name].weight.data.copy_(aw.dequantize().to(local[name].weight.dtype))
    return folded


@torch.no_grad()
def folded_block_mse(block: nn.Module, local: dict, quantizers: dict, batches, targets) -> float:
    """block_mse with the quantizers' folded weights in the block's Linears (``local``, name -> Linear); the weights
    are put back afterwards (the quality a trained quantizer gives, for studies and tests)."""
    weights = {n: m.weight.data.clone() for n, m in local.items()}
    try:
        _fold(quantizers, local)
        return block_mse(block, batches, targets)
    finally:
        for n, m in local.items():
            m.weight.data.copy_(weights[n])


def _each(store):
    return (store[j] for j in range(len(store)))


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
    stats.block_iterations = []  # Adam steps run per block (fewer than num_iterations after an early stop)
    stats.block_output_mse = []  # (start, trained) output MSE on the quantized input per trained block
    device = resolve_device(config.quantization_device, blocks[0])
    ranks = distributed.current(device)
    store = None
    if config.resume_dir is not None:
        key = fingerprint(run_options(config)["resume_key"], _model_config(model), targets, samples, ranks.world)
        store = ResumeStore(config.resume_dir, key, ranks.rank)
    samples = distributed.shard(samples, ranks)  # each rank: its windows; gradients are averaged over ranks
    stats.processes, stats.windows = ranks.world, samples.shape[0]
    t0 = time.perf_counter()
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}  # by name: onloading swaps them
    stack: list[ActivationStore] = []
    model.requires_grad_(False)
    try:
        # block 0's input is the embedding output: identical for the FP and the quantized model
        captured = capture_block_inputs(model, blocks[0], samples, config.batch_size, contextlib.nullcontext)
        kws = [move(kw, device) for _, kw in captured]
        n = len(captured)
        for name in ("fp_in", "fp_out", "q_in"):  # one by one into `stack`: a failure closes those already open
            stack.append(ActivationStore(n, config.activation_cache_dir, name))
        fp_in, fp_out, q_in = stack
        for j, (h, _) in enumerate(captured):
            fp_in[j] = h
            q_in[j] = h
        del captured
        stats.forward_s += time.perf_counter() - t0
        train_dtype = config.train_dtype or ("bfloat16" if _fast_bf16(device) else "float32")
        autocast_dtype = torch.bfloat16 if train_dtype == "bfloat16" else None
        lr_scales, lr_clip = config.learning_rates()
        weight_steps = config.num_iterations * sum(p.numel() for n in covered for p in targets[n].parameters())
        use_compile = config.compile if config.compile is not None else weight_steps >= COMPILE_MIN_WEIGHT_STEPS
        results = {}
        start = 0
        if store is not None and (done_before := store.last_finished()) >= 0:
            hidden = restore_finished(store, done_before, blocks, prefix, results, stats)
            for j in range(n):  # FP, then quantized inputs of block done_before + 1
                fp_in[j], q_in[j] = hidden[j], hidden[n + j]
            start = done_before + 1
        bar = tqdm(range(len(blocks)), desc="AdaScale blocks", disable=not progress, unit="block", initial=start)
        last_block = last_target_block(prefix, len(blocks), targets)
        for i in range(start, len(blocks)):
            bar.update(1)
            if i > last_block:
                break  # no layers left to quantize: later blocks need no activations
            block = blocks[i]
            home = execution_device(block)
            with onloaded(block, device):  # disk-offloaded or on another device: loaded for this block only
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
                                                            bp, ranks)
                    if use_compile:
                        for qz in quantizers.values():
                            qz.kernels = compiled_kernels()
                    early = (EarlyStop.over_passes(n, config.early_stop_margin)
                             if config.early_stop_margin is not None else None)
                    history: list[float] = []
                    start_grid = _fold(quantizers, local)
                    start_mse = None
                    if config.num_iterations:
                        start_mse = block_mse(block, _OnDevice(q_in, kws, device), _each(fp_out), ranks)
                    first, last = train_block(
                        block, quantizers, fp_in, q_in, kws, fp_out, num_iterations=config.num_iterations,
                        lr_scales=lr_scales, lr_clip=lr_clip, fp_input_prob=config.fp_input_prob,
                        generator=gen, desc=f"block {i}", progress=progress, autocast_dtype=autocast_dtype,
                        early_stop=early, history=history, ranks=ranks)
                    stats.block_iterations.append(len(history))
                    folded = _fold(quantizers, local)
                    if history:
                        # training minimises a noisy proxy (mixed inputs, few steps): keep the start (e.g. GPTQ's)
                        # when the trained block is worse on what matters, the quantized input against the FP output
                        trained_mse = block_mse(block, _OnDevice(q_in, kws, device), _each(fp_out), ranks)
                        stats.block_output_mse.append((start_mse, trained_mse))
                        if trained_mse > start_mse:
                            logger.info("AdaScale block %d: training raised the output MSE (%.4g -> %.4g): start "
                                        "kept", i, start_mse, trained_mse)
                            folded = _fold(start_grid, local)
                    for name, aw in folded.items():
                        results[bp + name] = aw
                        if name in init_err:
                            stats.layers[bp + name] = init_err[name]  # GPTQ start's relative output error
                    dt = time.perf_counter() - t2
                    stats.quantize_s += dt
                    stats.block_seconds.append(dt)
                    stats.block_losses.append((first, last))
                    bar.set_postfix(bar_postfix(ranks, device, loss=f"{first:.3g}->{last:.3g}"))
                    logger.info("AdaScale block %d: loss %.4g -> %.4g in %d steps, %.1fs", i, first, last,
                                len(history), dt)
                t3 = time.perf_counter()
                with torch.no_grad():
                    for j in range(n):
                        q_in[j] = _run_block(block, q_in[j].to(device), kws[j])
                fp_in, fp_out = fp_out, fp_in  # this block's FP output is the next block's FP input
                stats.forward_s += time.perf_counter() - t3
            finish_block(i, block, home, [k for k in results if k.startswith(bp)], results, store,
                         lambda: [*(fp_in[j] for j in range(n)), *(q_in[j] for j in range(n))], stats)
        bar.close()
        if store is not None:
            store.finish()
    finally:
        for activations in stack:
            activations.close()
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(name, p.requires_grad))
    if outside:
        # Linears outside the decoder blocks (e.g. an untied lm_head) have no block to distil: plain RTN grid.
        for name in outside:
            spec = config.spec_for(name)
            lin = targets[name]
            check_layout(lin.weight.shape, spec.group_size, config.weight_granularity, name)
            results[name] = quantizer_from_rtn(lin.weight.data.float(), spec.bits, spec.group_size, spec.sym,
                                               config.weight_granularity, config.decompressed_bw).fold()
    return results, stats
