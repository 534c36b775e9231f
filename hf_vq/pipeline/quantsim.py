"""The "quantsim" algorithm (AIMET QuantSim semantics, docs/aimet-reference.md sections 1-4): every target Linear
becomes a :class:`~hf_vq.nn.qat.QATLinear` (symmetric min-max weights: per channel, blockwise or LPBQ) with activation
quantizers on its input and output, whose ranges come from the calibration windows (hf_vq.pipeline.act_ranges).

Calibration goes one decoder block at a time, as the GPTQ runner does: block 0's inputs are captured; then each block
is loaded onto ``quantization_device``, its Linears are swapped, its quantizers observe the block's passes, and the
block's outputs (activations unquantized while observing, as in a whole-model pass) are the next block's inputs. So
QuantSim onloads disk-offloaded blocks, runs under torch.distributed (each rank observes its windows, ranges are
reduced over ranks) and resumes from ``resume_dir`` (each finished block's ranges are stored). Quantizers outside the
decoder blocks (an included lm_head, a model without decoder blocks) are calibrated by one whole-model pass after.

The user-facing grid helpers live in hf_vq.model.quantsim, the encodings export in hf_vq.export.quantsim.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch import nn

from hf_vq.formats.state import to_device
from hf_vq.nn.qat import ActQuantizer, FloatQuantizer, QATLinear
from hf_vq.pipeline import distributed
from hf_vq.pipeline.act_ranges import compute_encodings, observe_ranges
from hf_vq.pipeline.blocks import (RunStats, _run_block, bar_postfix, block_prefix, capture_block_inputs,
                                   find_decoder_blocks)
from hf_vq.pipeline.experts import CalibrationExperts
from hf_vq.pipeline.placement import (disk_offload_folder, execution_device, move, offload_to_disk, onloaded,
                                      resolve_device)
from hf_vq.pipeline.registry import calibration_samples, register_algorithm
from hf_vq.pipeline.resume import ResumeStore, fingerprint
from hf_vq.pipeline.runner import model_config, run_options
from hf_vq.utils.modules import set_module

logger = logging.getLogger(__name__)
ACT_QUANTIZERS = ("input_quantizer", "output_quantizer")


class _Built:
    """Algorithm result whose module is already in the model (calibration needs the swapped modules)."""

    def __init__(self, module: QATLinear):
        self.module = module

    def dequantize(self) -> torch.Tensor:
        return self.module.weight_qdq().detach()

    def to_module(self, bias):
        return self.module


def make_act_quantizer(config) -> nn.Module | None:
    if config.activation_bits is None:
        return None
    if config.activation_dtype == "int":
        return ActQuantizer(config.activation_bits)
    return FloatQuantizer(config.activation_dtype)


def _build(name: str, lin: nn.Linear, config, acts: bool) -> QATLinear:
    """``lin`` as a QATLinear (its weights must be loaded); ``acts``: with activation quantizers."""
    spec = config.spec_for(name)
    if spec.group_size == -1:
        gran, block = "per_channel", lin.in_features
    else:
        gran = "lpbq" if config.weight_granularity == "lpbq" else "blockwise"
        block = spec.group_size
    if gran == "lpbq" and lin.in_features % block:
        raise ValueError(f"{name}: LPBQ block_size {block} does not divide in_features {lin.in_features} "
                         "(AIMET requires equal blocks)")
    return QATLinear(lin.weight.data, None if lin.bias is None else lin.bias.data, spec.bits, gran, block,
                     config.decompressed_bits,
                     make_act_quantizer(config) if acts and config.quantize_inputs else None,
                     make_act_quantizer(config) if acts and config.quantize_outputs else None)


def _act_quantizers(name: str, mod: nn.Module) -> dict[str, ActQuantizer]:
    return {f"{name}.{q}": getattr(mod, q) for q in ACT_QUANTIZERS if isinstance(getattr(mod, q, None), ActQuantizer)}


def _place(mod: nn.Module, name: str, home: torch.device, folder) -> None:
    """A finished QATLinear goes where its block lives: ``home``, or back to disk beside the block's weights."""
    if folder is not None:
        offload_to_disk(mod, name, folder, home)
    else:
        mod.to(home)


class _Swapper:
    """Swaps target Linears for QATLinears, and settles them once calibrated."""

    def __init__(self, model: nn.Module, config, targets: dict[str, nn.Linear]):
        self.model, self.config = model, config
        # fused MoE experts are stored as QuantExperts: QuantSim weight grids, no activation quantizers inside them
        self.experts = {n for n in targets if n.count(".") >= 2 and isinstance(
            model.get_submodule(n.rsplit(".", 2)[0]), CalibrationExperts)}
        self.originals: dict[str, nn.Linear] = {}

    def swap(self, name: str, lin: nn.Linear) -> QATLinear:
        mod = _build(name, lin, self.config, acts=name not in self.experts)
        set_module(self.model, name, mod)
        self.originals[name] = lin
        return mod

    def settle(self, mods: dict[str, QATLinear], ranges, home: torch.device, folder, results: dict) -> dict:
        """Swapped layers whose activation quantizers all got a range (``ranges``; None: no calibration): their
        result goes to ``results`` and the module to its block's home (or disk); the others go back to float (the
        calibration never reached them; the report says so). Returns the kept layers' range state (resume)."""
        kept = {}
        for n, mod in mods.items():
            if ranges is not None and any(k not in ranges for k in _act_quantizers(n, mod)):
                set_module(self.model, n, self.originals[n])
                continue
            kept[n] = _range_state(n, mod)
            results[n] = to_device(mod.affine_weight(), home) if n in self.experts else _Built(mod)
            _place(mod, n, home, folder)
        return kept


@register_algorithm("quantsim")
def run_quantsim(model, config, targets: dict[str, nn.Linear], progress: bool = True):
    swapper = _Swapper(model, config, targets)
    if config.needs_calibration:
        results, stats = _calibrate(model, config, targets, swapper, progress)
    else:  # weights only: no forward pass; an offloaded layer is loaded for its swap and goes back to disk
        stats, t0, results = RunStats(), time.perf_counter(), {}
        for name, lin in targets.items():
            home, folder = execution_device(lin), disk_offload_folder(lin)
            with onloaded(lin, home):
                mod = swapper.swap(name, lin)
            swapper.settle({name: mod}, None, home, folder, results)
        stats.quantize_s = time.perf_counter() - t0
    if swapper.experts:
        logger.info("QuantSim: %d fused-expert projections get QuantSim weight grids, without activation quantizers",
                    len(swapper.experts))
    return results, stats


def _range_state(name: str, mod: nn.Module) -> dict[str, torch.Tensor]:
    """A calibrated QATLinear's activation ranges, as stored in resume_dir (the weights are rebuilt from the model)."""
    return {q: torch.stack([m.min.detach(), m.max.detach()]).cpu()
            for q, m in ((k.rsplit(".", 1)[1], m) for k, m in _act_quantizers(name, mod).items())}


def _calibrate(model, config, targets, swapper: _Swapper, progress: bool) -> tuple[dict, RunStats]:
    from tqdm.auto import tqdm

    stats = RunStats()
    samples = calibration_samples(model, config)
    try:
        prefix, blocks = find_decoder_blocks(model)
    except ValueError:  # no decoder blocks: everything is calibrated by the whole-model pass
        prefix, blocks = "", []
    per_block = [{n: targets[n] for n in targets if n.startswith(block_prefix(prefix, i))} for i in range(len(blocks))]
    last = max((i for i, local in enumerate(per_block) if local), default=-1)
    device = resolve_device(config.quantization_device, blocks[0] if blocks else model)
    ranks = distributed.current(device)
    store = None
    if config.resume_dir is not None and last >= 0:
        key = fingerprint(run_options(config)["resume_key"], model_config(model), targets, samples, ranks.world)
        store = ResumeStore(config.resume_dir, key, ranks.rank)
    samples = distributed.shard(samples, ranks)
    stats.processes, stats.windows = ranks.world, samples.shape[0]
    results: dict[str, object] = {}
    if last >= 0:
        t0 = time.perf_counter()
        cache = capture_block_inputs(model, blocks[0], samples, config.calibration_batch_size, contextlib.nullcontext)
        stats.forward_s += time.perf_counter() - t0
        start = 0
        if store is not None and (done := store.last_finished()) >= 0:
            t1 = time.perf_counter()
            stored, hidden = store.load(done)
            for j in range(done + 1):
                home, folder = execution_device(blocks[j]), disk_offload_folder(blocks[j])
                with onloaded(blocks[j], home):
                    mods = {n: swapper.swap(n, per_block[j][n]) for n in per_block[j] if n in stored}
                for n, mod in mods.items():
                    for q, (lo, hi) in stored[n].items():
                        getattr(mod, q).set_range(float(lo), float(hi))
                swapper.settle(mods, None, home, folder, results)
            cache = [(h, kw) for h, (_, kw) in zip(hidden, cache)]
            start = stats.resumed_blocks = done + 1
            stats.resume_io_s += time.perf_counter() - t1
        bar = tqdm(range(len(blocks)), desc="QuantSim blocks", disable=not progress, unit="block", initial=start)
        for i in range(start, last + 1):
            block, local = blocks[i], per_block[i]
            home, folder = execution_device(block), disk_offload_folder(block)
            t1 = time.perf_counter()
            with onloaded(block, device):
                cache = [(h.to(device), move(kw, device)) for h, kw in cache]
                mods = {n: swapper.swap(n, lin) for n, lin in local.items()}
                outputs: list[torch.Tensor] = []

                def run():
                    first = not outputs
                    for h, kw in cache:
                        out = _run_block(block, h, kw)
                        if first:
                            outputs.append(out.to(h.dtype))

                quantizers = {k: q for n, m in mods.items() for k, q in _act_quantizers(n, m).items()}
                if quantizers:
                    ranges = observe_ranges(quantizers, run, config.quant_scheme, config.percentile,
                                            skip_unreached=True, ranks=ranks)
                else:
                    ranges = {}
                    run()
                cache = [(out, kw) for out, (_, kw) in zip(outputs, cache)]
            kept = swapper.settle(mods, ranges, home, folder, results)
            stats.forward_s += time.perf_counter() - t1
            if store is not None:
                t2 = time.perf_counter()
                store.save_block(i, kept, [h for h, _ in cache])
                stats.resume_io_s += time.perf_counter() - t2
            bar.update(1)
            bar.set_postfix(bar_postfix(ranks, device))
        bar.close()
        del cache
    inside = set().union(*per_block)
    outside = {n: lin for n, lin in targets.items() if n not in inside}
    if outside:
        t3 = time.perf_counter()
        mods = {}
        for n, lin in outside.items():
            with onloaded(lin, execution_device(lin)):
                mods[n] = swapper.swap(n, lin)
        only = {k for n, m in mods.items() for k in _act_quantizers(n, m)}
        ranges = compute_encodings(model, samples, config.quant_scheme, config.percentile,
                                   config.calibration_batch_size, skip_unreached=True, only=only, ranks=ranks)
        for n, mod in mods.items():  # they stay where they are
            swapper.settle({n: mod}, ranges, execution_device(mod), None, results)
        stats.forward_s += time.perf_counter() - t3
    if store is not None:
        store.finish()
    return results, stats
