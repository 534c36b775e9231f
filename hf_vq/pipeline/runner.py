"""Block-by-block calibration runner.

Capture the inputs of decoder block 0 (with the kwargs the model passes it), then for each block: load it onto the
quantization device, accumulate the input Hessian of its Linear layers, quantize them, and replay the quantized block
to produce the next block's inputs. Memory: one block's calibration activations plus the model (blocks offloaded to
disk stay there). The pieces of one block's pass are in blocks.py.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from hf_vq.algorithms.hessian import output_error
from hf_vq.formats.state import to_device
from hf_vq.pipeline import distributed
from hf_vq.pipeline.blocks import (RunStats, _collect_hessians, _FrozenChildren, _run_block, bar_postfix,
                                   block_prefix, capture_block_inputs, find_decoder_blocks, last_target_block,
                                   probe_block)
from hf_vq.pipeline.experts import regroup
from hf_vq.pipeline.placement import SPILL_DIR, disk_offload_folder, execution_device, move, onloaded, resolve_device
from hf_vq.pipeline.resume import ResumeStore, SpilledResult, fingerprint, save_results

logger = logging.getLogger(__name__)


BlockHook = Callable[..., "dict[str, object] | None"]
QuantizeFn = Callable[[str, nn.Linear, torch.Tensor], object]
SharedQuantizeFn = Callable[[list[str], list[nn.Linear], torch.Tensor], list]

# Inputs of a child's last Linear are kept (to compute the child's output without re-running it) only while they
# take at most this multiple of the block-input cache: memory stays bounded by one block's activations.
CAPTURE_FACTOR = 4.0
# The per-layer error log is estimated on this many evenly spaced weight rows (the exact value costs as much as
# a good part of the GPTQ math).
LOG_ERROR_ROWS = 128


@torch.no_grad()
def run_sequential(model: nn.Module, samples: torch.Tensor, targets: dict[str, nn.Linear], quantize_fn: QuantizeFn,
                   batch_size: int = 8, true_sequential: bool = True, compute_dtype: torch.dtype = torch.float32,
                   progress: bool = True, reuse_frozen: bool = True,
                   quantize_shared_fn: SharedQuantizeFn | None = None,
                   block_hook: BlockHook | None = None,
                   first_token_weight: float = 1.0, quantization_device: str | None = None,
                   resume_dir=None, resume_key: dict | None = None) -> tuple[dict[str, object], RunStats]:
    """Quantize ``targets`` (full name -> Linear) block by block. ``quantize_fn(name, linear, H)`` returns an object
    with ``dequantize()``; its result replaces the layer's weight for the rest of the run. Returns those objects.
    ``quantize_shared_fn(names, linears, H)``, when given, quantizes layers that read the same input (one Hessian)
    in one call. ``reuse_frozen`` skips work whose result is already known: outputs of finished children, outputs
    nobody reads before a pass stops (same result, less work). ``block_hook(i, block, local, block_results, cache,
    fp_outputs, ranks)``, when given, runs once a block's layers are quantized, before the replay; ``fp_outputs`` are
    the block's outputs with its original weights on the same inputs, and it returns replacement results (or None;
    under torch.distributed every rank must return the same).
    ``first_token_weight``: see HessianAccumulator.

    ``quantization_device``: where each block is calibrated and quantized (hf_vq.pipeline.placement; None: where it
    is). Under torch.distributed each rank runs its shard of ``samples`` (hf_vq.pipeline.distributed). With
    ``resume_dir`` finished blocks are stored and a rerun continues after them (hf_vq.pipeline.resume;
    ``resume_key``: the config, part of what must match)."""
    from tqdm.auto import tqdm

    stats = RunStats()
    prefix, blocks = find_decoder_blocks(model)
    device = resolve_device(quantization_device, blocks[0])
    ranks = distributed.current(device)
    store = None
    if resume_dir is not None:
        store = ResumeStore(resume_dir, fingerprint(resume_key or {}, model_config(model), targets, samples,
                                                    ranks.world), ranks.rank)
    samples = distributed.shard(samples, ranks)
    stats.processes, stats.windows = ranks.world, samples.shape[0]

    def autocast():
        if compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=compute_dtype)

    t0 = time.perf_counter()
    cache = capture_block_inputs(model, blocks[0], samples, batch_size, autocast)
    stats.forward_s += time.perf_counter() - t0
    results: dict[str, object] = {}
    start = 0
    if store is not None and (done_before := store.last_finished()) >= 0:
        hidden = restore_finished(store, done_before, blocks, prefix, results, stats)
        cache = [(h, kw) for h, (_, kw) in zip(hidden, cache)]
        start = done_before + 1
        logger.info("hf_vq: resuming after block %d from %s", done_before, resume_dir)
    bar = tqdm(range(len(blocks)), desc="quantizing blocks", disable=not progress, unit="block", initial=start)
    last = last_target_block(prefix, len(blocks), targets)
    for i in range(start, len(blocks)):
        if i > last:
            break  # nothing left to quantize: no need to replay the remaining blocks
        block = blocks[i]
        home = execution_device(block)
        with onloaded(block, device):
            cache = [(hidden.to(device), move(kw, device)) for hidden, kw in cache]
            linears = _run_one_block(i, block, prefix, targets, cache, results, stats, autocast, ranks,
                                     true_sequential, reuse_frozen, quantize_fn, quantize_shared_fn, block_hook,
                                     first_token_weight)
        finish_block(i, block, home, list(linears), results, store, lambda: [hidden for hidden, _ in cache], stats)
        bar.update(1)
        worst = max(stats.layers[n] for n in linears) if linears else 0.0
        bar.set_postfix(bar_postfix(ranks, device, err=f"{worst:.4f}"))
    bar.close()
    if store is not None:
        store.finish()
    return results, stats


def restore_finished(store: ResumeStore, done_before: int, blocks, prefix: str, results: dict,
                     stats: RunStats) -> list[torch.Tensor]:
    """Put the stored results of blocks 0..``done_before`` into ``results`` (on each block's device, spilled where
    the block is on disk); returns the stored activations, the inputs of block ``done_before`` + 1."""
    t0 = time.perf_counter()
    stored, hidden = store.load(done_before)
    for j in range(done_before + 1):
        mine = [k for k in stored if k.startswith(block_prefix(prefix, j))]
        results.update({k: to_device(stored.pop(k), execution_device(blocks[j])) for k in mine})
        spill(blocks[j], f"block-{j:05d}", mine, results)
    stats.resumed_blocks = done_before + 1
    stats.resume_io_s += time.perf_counter() - t0
    return hidden


def finish_block(i: int, block: nn.Module, home: torch.device, names: list[str], results: dict,
                 store: ResumeStore | None, activations: Callable[[], list[torch.Tensor]], stats: RunStats) -> None:
    """Block ``i`` is done: its results go to the block's home device, into the resume state (with
    ``activations()``, the next block's inputs) and, for a block offloaded to disk, to disk."""
    for n in names:
        results[n] = to_device(results[n], home)
    if store is not None:
        t0 = time.perf_counter()
        store.save_block(i, {n: results[n] for n in names}, activations())
        stats.resume_io_s += time.perf_counter() - t0
    spill(block, f"block-{i:05d}", names, results)


def spill(module: nn.Module, stem: str, names: list[str], results: dict) -> None:
    """A module offloaded to disk keeps its results on disk too (beside accelerate's files) until they are converted:
    host memory does not grow with the number of finished blocks."""
    folder = disk_offload_folder(module)
    if folder is None or not names:
        return
    path = Path(folder) / SPILL_DIR / f"{stem}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_results(path, {n: results[n] for n in names})
    results.update({n: SpilledResult(path, n) for n in names})


def model_config(model: nn.Module) -> dict:
    """The model's config as resume state must match it (without what the quantizer sets around a run)."""
    out = getattr(getattr(model, "config", None), "to_dict", dict)()
    for key in ("use_cache", "quantization_config"):
        out.pop(key, None)
    return out


def run_options(config) -> dict:
    """run_sequential's placement and resume arguments from a config."""
    return dict(quantization_device=config.quantization_device, resume_dir=config.resume_dir,
                resume_key=config.to_dict())


def _run_one_block(i, block, prefix, targets, cache, results, stats, autocast, ranks, true_sequential, reuse_frozen,
                   quantize_fn, quantize_shared_fn, block_hook, first_token_weight) -> dict[str, nn.Module]:
    """Calibrate and quantize block ``i`` (on the device it is on), then replay it: ``cache`` becomes its outputs."""
    bp = block_prefix(prefix, i)
    linears = {n: m for n, m in targets.items() if n.startswith(bp)}
    frozen = None
    if linears:
        local = {n[len(bp):]: m for n, m in linears.items()}
        probe = probe_block(block, local, cache[0][0], cache[0][1], autocast)
        if true_sequential:
            groups, shared_input = probe.groups, probe.shared_input
        else:
            groups, shared_input = [list(local)], [False]
        groups, shared_input = regroup(block, groups, shared_input)  # fused experts: two groups per module
        frozen = _FrozenChildren(block, local, probe.tails if reuse_frozen else {})
        fp_outputs = None
        if block_hook is not None:
            t1 = time.perf_counter()
            with autocast():
                fp_outputs = [_run_block(block, hidden, kw) for hidden, kw in cache]
            stats.forward_s += time.perf_counter() - t1
        done: set[str] = set()
        solved = 0  # shared-Hessian sets solved so far in this block (dealt over torch.distributed ranks)
        for group, shared in zip(groups, shared_input):
            if reuse_frozen:
                frozen.prepare(done)
            # members other than the last only feed layers after the point where this pass stops
            skip = set(group[:-1]) if reuse_frozen and shared else set()
            child = frozen.capture_target(group, done | set(group))
            if child is not None and local[group[-1]].in_features > CAPTURE_FACTOR * cache[0][0].shape[-1]:
                child = None
            hessians, captured = _collect_hessians(block, {n: local[n] for n in group}, cache, autocast, stats,
                                                   frozen, skip=skip, capture=group[-1] if child else None,
                                                   first_token_weight=first_token_weight, ranks=ranks)
            t1 = time.perf_counter()
            solved = _quantize_group(group, local, hessians, bp, quantize_fn, quantize_shared_fn, results, stats, ranks,
                                     solved)
            done.update(group)
            stats.quantize_s += time.perf_counter() - t1
            del hessians
            if child is not None:
                t2 = time.perf_counter()
                with autocast():  # as the child itself runs: its captured inputs may be bf16
                    frozen.synthesize(child, local[group[-1]], captured)
                stats.forward_s += time.perf_counter() - t2
            del captured
        if block_hook is not None:
            t1 = time.perf_counter()
            mine = {n[len(bp):]: results[n] for n in linears}
            new = block_hook(i, block, local, mine, cache, fp_outputs, ranks)
            for n, result in (new or {}).items():
                local[n].weight.data.copy_(result.dequantize().to(local[n].weight.dtype))
                results[bp + n] = result
            frozen = None  # recorded child outputs predate the hook's changes
            del fp_outputs
            stats.quantize_s += time.perf_counter() - t1
    t2 = time.perf_counter()
    for j, (hidden, kw) in enumerate(cache):
        with autocast(), (frozen.stubbed(j) if frozen else contextlib.nullcontext()):
            out = _run_block(block, hidden, kw)
        cache[j] = (out.to(hidden.dtype), kw)
    stats.forward_s += time.perf_counter() - t2
    return linears


def _quantize_group(group, local, hessians, prefix, quantize_fn, quantize_shared_fn, results, stats,
                    ranks: distributed.Ranks = distributed.Ranks(), solved: int = 0) -> int:
    """Quantize one group's layers; layers sharing a Hessian go through ``quantize_shared_fn`` together. Under
    torch.distributed each such set is solved by one rank (dealt round-robin, counting from ``solved`` sets before
    this group in the block) and broadcast. Returns the count after this group."""
    by_hessian: dict[int, list[str]] = {}
    for n in group:
        by_hessian.setdefault(id(hessians[n]), []).append(n)
    for index, names in enumerate(by_hessian.values(), start=solved):
        h = hessians[names[0]]
        originals = [local[n].weight.data.clone() for n in names]
        fulls = [prefix + n for n in names]

        def solve():
            if quantize_shared_fn is not None and len(names) > 1:
                return quantize_shared_fn(fulls, [local[n] for n in names], h)
            return [quantize_fn(f, local[n], h) for f, n in zip(fulls, names)]
        outs = distributed.solved_by_owner(index, ranks, solve, len(names), h.device)
        for n, full, original, result in zip(names, fulls, originals, outs):
            lin = local[n]
            lin.weight.data.copy_(result.dequantize().to(lin.weight.dtype))
            err = output_error(original, lin.weight.data, h, max_rows=LOG_ERROR_ROWS)
            stats.layers[full] = err
            results[full] = result
            logger.info("%s: relative output error %.5f", full, err)
    return solved + len(by_hessian)
