"""Block-by-block calibration runner.

Capture the inputs of decoder block 0 (with the kwargs the model passes it), then for each block: accumulate the
input Hessian of its Linear layers, quantize them, and replay the quantized block to produce the next block's inputs.
Memory: one block's calibration activations plus the model.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from hf_vq.algorithms.hessian import HessianAccumulator, output_error
from hf_vq.formats.state import to_device
from hf_vq.pipeline import distributed
from hf_vq.pipeline.experts import ExpertPass, regroup
from hf_vq.pipeline.placement import SPILL_DIR, disk_offload_folder, execution_device, move, onloaded, resolve_device
from hf_vq.pipeline.resume import ResumeStore, SpilledResult, fingerprint, save_results

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated decoder blocks: the ModuleList of same-class children holding the most Linear parameters."""
    best, best_size = None, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        size = sum(l.weight.numel() for b in mod for l in b.modules() if isinstance(l, nn.Linear))
        if size > best_size:
            best, best_size = (name, mod), size
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of repeated decoder blocks with Linear layers; "
                         "block-by-block calibration does not support this architecture")
    return best


@dataclass
class RunStats:
    forward_s: float = 0.0
    quantize_s: float = 0.0
    resume_io_s: float = 0.0
    resumed_blocks: int = 0  # blocks taken from resume_dir instead of being run
    processes: int = 1  # torch.distributed ranks that shared the calibration windows
    windows: int = 0  # calibration windows this process ran
    layers: dict[str, float] = field(default_factory=dict)  # relative output error per layer


def capture_block_inputs(model: nn.Module, block: nn.Module, samples: torch.Tensor, batch_size: int, autocast):
    """Run the model on calibration windows up to ``block`` and keep its inputs: a list of (hidden, kwargs)."""
    captured = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kw["use_cache"] = False
        kw.pop("past_key_values", None)
        kw.pop("past_key_value", None)
        captured.append((hidden.detach(), kw))
        raise _StopForward

    device = execution_device(model)
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, samples.shape[0], batch_size):
            ids = samples[start:start + batch_size].to(device)
            with contextlib.suppress(_StopForward), autocast():
                model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return captured


def block_prefix(prefix: str, i: int) -> str:
    """Name prefix of decoder block ``i`` under the block list ``prefix``."""
    return f"{prefix}.{i}." if prefix else f"{i}."


def last_target_block(prefix: str, n_blocks: int, targets) -> int:
    """Index of the last block holding a layer of ``targets`` (-1 if none): later blocks need no calibration pass."""
    return max((i for i in range(n_blocks) for n in targets if n.startswith(block_prefix(prefix, i))), default=-1)


def _run_block(block, hidden, kwargs):
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockProbe:
    """What one calibration sample shows about a block's structure."""
    groups: list[list[str]]        # Linears in execution order, grouped by shared input (q/k/v, o, gate/up, down)
    shared_input: list[bool]       # per group: all members read the same tensor
    tails: dict[str, tuple]        # child -> (Linear whose output is the child's output, rebuild of the child output)


def probe_block(block: nn.Module, linears: dict[str, nn.Linear], hidden, kwargs, autocast) -> BlockProbe:
    """Run ``block`` on one sample and record execution order, shared inputs and which child returns a Linear's output
    unchanged (attention returns o_proj's, the MLP down_proj's): such a child's output can be computed from that
    Linear's inputs alone once all its Linears are quantized."""
    order: list[tuple[str, torch.Tensor]] = []
    lin_out: list[tuple[str, torch.Tensor]] = []  # references keep ids unique while probing
    child_out: dict[str, object] = {}
    handles = []
    for name, lin in linears.items():
        def pre(_m, args, _name=name):
            order.append((_name, args[0]))  # the tensor itself: a freed input's address can be reused

        def post(_m, _args, out, _name=name):
            lin_out.append((_name, out))
        handles += [lin.register_forward_pre_hook(pre), lin.register_forward_hook(post)]
    for c, child in block.named_children():
        handles.append(child.register_forward_hook(lambda _m, _a, out, _c=c: child_out.__setitem__(_c, out)))
    try:
        with torch.no_grad(), autocast():
            _run_block(block, hidden[:1], _slice_kwargs(kwargs, 1))
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    shared: list[bool] = []
    last_input = None
    seen = set()
    for name, x in order:
        if name in seen:
            continue
        seen.add(name)
        if groups and x is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
            shared.append(True)
        last_input = x
    missing = [n for n in linears if n not in seen]
    if missing:
        groups.append(missing)
        shared.append(False)
    tails = {}
    for c, out in child_out.items():
        first, rest = (out, None) if isinstance(out, torch.Tensor) else (out[0], tuple(out[1:])) \
            if isinstance(out, (tuple, list)) and out else (None, None)
        owner = next((n for n, o in lin_out if o is first), None) if first is not None else None
        if owner and owner.split(".")[0] == c and (rest is None or all(r is None for r in rest)):
            tails[c] = (owner, (lambda t: t) if rest is None else (lambda t, _r=rest, _k=type(out): _k((t, *_r))))
    return BlockProbe(groups, shared, tails)


def _slice_kwargs(kwargs: dict, n: int) -> dict:
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > 1:
            out[k] = v[:n]
        elif isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            out[k] = tuple(t[:n] if t.dim() > 0 and t.shape[0] > 1 else t for t in v)
        else:
            out[k] = v
    return out


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
    fp_outputs)``, when given, runs once a block's layers are quantized, before the replay; ``fp_outputs`` are the
    block's outputs with its original weights on the same inputs, and it returns replacement results (or None).
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
    if ranks.active and block_hook is not None:
        raise NotImplementedError("block-level fine-tuning (GPTVQ finetune_iterations) runs in one process only; "
                                  "run without torch.distributed or with finetune_iterations=0")
    store = None
    if resume_dir is not None:
        model_config = getattr(getattr(model, "config", None), "to_dict", dict)()
        for key in ("use_cache", "quantization_config"):  # set by the quantizer around the run, not the model's own
            model_config.pop(key, None)
        store = ResumeStore(resume_dir, fingerprint(resume_key or {}, model_config, targets, samples, ranks.world),
                            ranks.rank)
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
        t0 = time.perf_counter()
        stored, hidden = store.load(done_before)
        for j in range(done_before + 1):
            mine = [n for n in stored if n.startswith(block_prefix(prefix, j))]
            results.update({n: to_device(stored.pop(n), execution_device(blocks[j])) for n in mine})
            spill(blocks[j], f"block-{j:05d}", mine, results)
        cache = [(h, kw) for h, (_, kw) in zip(hidden, cache)]
        start = stats.resumed_blocks = done_before + 1
        stats.resume_io_s += time.perf_counter() - t0
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
        for n in linears:
            results[n] = to_device(results[n], home)
        if store is not None:
            t0 = time.perf_counter()
            store.save_block(i, {n: results[n] for n in linears}, [hidden for hidden, _ in cache])
            stats.resume_io_s += time.perf_counter() - t0
        spill(block, f"block-{i:05d}", list(linears), results)
        bar.update(1)
        postfix = {"err": f"{max(stats.layers[n] for n in linears) if linears else 0:.4f}"}
        if ranks.active:
            postfix["rank"] = f"{ranks.rank}/{ranks.world}"
        if device.type == "cuda":
            postfix["mem"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}GiB"
        bar.set_postfix(postfix)
    bar.close()
    if store is not None:
        store.finish()
    return results, stats


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
            new = block_hook(i, block, local, mine, cache, fp_outputs)
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
        src = distributed.owner(index, ranks)
        if ranks.rank != src:
            outs = [None] * len(names)
        elif quantize_shared_fn is not None and len(names) > 1:
            outs = quantize_shared_fn(fulls, [local[n] for n in names], h)
        else:
            outs = [quantize_fn(f, local[n], h) for f, n in zip(fulls, names)]
        if ranks.active:
            outs = [to_device(distributed.broadcast_result(o, src, ranks), h.device) for o in outs]
        for n, full, original, result in zip(names, fulls, originals, outs):
            lin = local[n]
            lin.weight.data.copy_(result.dequantize().to(lin.weight.dtype))
            err = output_error(original, lin.weight.data, h, max_rows=LOG_ERROR_ROWS)
            stats.layers[full] = err
            results[full] = result
            logger.info("%s: relative output error %.5f", full, err)
    return solved + len(by_hessian)


class _FrozenChildren:
    """Outputs of block children whose Linears are all quantized are fixed (groups run in execution order, so their
    inputs are fixed too): record them once, then stub those children in later passes instead of recomputing them."""

    def __init__(self, block: nn.Module, local: dict[str, nn.Linear], tails: dict | None = None):
        self.children = dict(block.named_children())
        self.members = {c: [n for n in local if n.split(".")[0] == c] for c in self.children}
        self.tails = tails or {}
        self.outputs: dict[str, list] = {}
        self.recording: dict[str, list] = {}

    def capture_target(self, group: list[str], done_after: set[str]) -> str | None:
        """The child whose output is the output of ``group``'s last Linear and that is finished once ``group`` is:
        keeping that Linear's inputs gives the child's output without running it again."""
        for c, (owner, _) in self.tails.items():
            if owner == group[-1] and c not in self.outputs and all(n in done_after for n in self.members[c]):
                return c
        return None

    def synthesize(self, child: str, linear: nn.Linear, inputs: list[torch.Tensor]) -> None:
        rebuild = self.tails[child][1]
        self.outputs[child] = [rebuild(linear(x)) for x in inputs]

    def prepare(self, done: set[str]) -> None:
        self.recording = {c: [] for c, names in self.members.items()
                          if names and c not in self.outputs and all(n in done for n in names)}

    @contextlib.contextmanager
    def stubbed(self, batch: int, record: bool = False):
        handles = []
        for c, outs in self.outputs.items():
            self.children[c].forward = (lambda *a, _o=outs[batch], **k: _o)
        if record:
            for c, outs in self.recording.items():
                handles.append(self.children[c].register_forward_hook(lambda _m, _a, out, _l=outs: _l.append(out)))
        try:
            yield
        finally:
            for c in self.outputs:
                del self.children[c].forward
            for h in handles:
                h.remove()

    def commit(self, n_batches: int) -> None:
        # a child the early stop cut short is not recorded
        self.outputs.update({c: outs for c, outs in self.recording.items() if len(outs) == n_batches})
        self.recording = {}


@torch.no_grad()
def collect_hessians(block: nn.Module, linears: dict[str, nn.Linear], inputs, autocast=contextlib.nullcontext,
                     first_token_weight: float = 1.0):
    """Input Hessians of ``linears`` (names local to ``block``) over cached block inputs [(hidden, kwargs), ...]."""
    out = {}
    for group in regroup(block, [list(linears)], [False])[0]:  # fused experts: gate_up, then down
        out.update(_collect_hessians(block, {n: linears[n] for n in group}, inputs, autocast, RunStats(),
                                     _FrozenChildren(block, linears), first_token_weight=first_token_weight)[0])
    return out


def _collect_hessians(block, group: dict[str, nn.Linear], cache, autocast, stats: RunStats, frozen: _FrozenChildren,
                      skip: set[str] = frozenset(), capture: str | None = None, first_token_weight: float = 1.0,
                      ranks: distributed.Ranks = distributed.Ranks()):
    """One pass of the block over the calibration inputs, stopping after the group's last layer has run.

    Layers in ``skip`` return zeros instead of computing (nothing reads them before the stop); the inputs of
    ``capture`` are kept per batch and returned with the Hessians."""
    accs: dict[str, HessianAccumulator] = {}
    seen_inputs: dict[str, torch.Tensor] = {}  # layer -> its input this batch (layers reading one tensor share H)
    experts = ExpertPass(block, list(group), first_token_weight)  # fused experts collect their own statistics
    tracked = (set(group) - experts.members) | set(experts.modules)
    remaining = set(tracked)
    captured: list[torch.Tensor] = []
    handles = []
    t0 = time.perf_counter()

    def experts_done(_m, _a, _o, _name):
        remaining.discard(_name)
        if not remaining:
            raise _StopForward
    for cname, mod in experts.modules.items():
        handles.append(mod.register_forward_hook(lambda m, a, o, _n=cname: experts_done(m, a, o, _n)))
    for name, lin in group.items():
        if name in experts.members:
            continue
        def hook(_m, args, _name=name):
            x = args[0]
            owner = next((o for o, seen in seen_inputs.items() if seen is x and o in accs), None)
            if owner is None:
                acc = accs.setdefault(_name, HessianAccumulator(x.shape[-1], x.device, first_token_weight))
                acc.add(x)
                seen_inputs[_name] = x
            else:
                accs.setdefault(_name, accs[owner])
            if _name == capture:
                captured.append(x)
            remaining.discard(_name)
            if not remaining:
                raise _StopForward
        handles.append(lin.register_forward_pre_hook(hook))
    for name in skip:
        lin = group[name]
        lin.forward = lambda x, _n=lin.out_features: x.new_zeros(*x.shape[:-1], _n)
    try:
        for j, (hidden, kw) in enumerate(cache):
            remaining.update(tracked)
            seen_inputs.clear()
            experts.begin_batch(hidden)
            with contextlib.suppress(_StopForward), autocast(), frozen.stubbed(j, record=True):
                _run_block(block, hidden, kw)
        out = experts.hessians(distributed.all_reduce_sum if ranks.active else None)
    finally:
        experts.close()
        for h in handles:
            h.remove()
        for name in skip:
            del group[name].forward
    frozen.commit(len(cache))
    stats.forward_s += time.perf_counter() - t0
    if ranks.active:
        distributed.reduce_accumulators(accs.values())  # sums and counts of every rank's windows
    finalized: dict[int, torch.Tensor] = {}
    for name in group:
        if name in experts.members:
            continue
        acc = accs.get(name)
        if acc is None:
            raise RuntimeError(f"layer {name} never ran during calibration")
        if id(acc) not in finalized:
            finalized[id(acc)] = acc.finalize()
        out[name] = finalized[id(acc)]
    return out, captured
