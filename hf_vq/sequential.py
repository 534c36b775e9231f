"""Block-by-block calibration runner.

Capture the inputs of decoder block 0 (with the kwargs the model passes it), then for each block: accumulate the
input Hessian of its Linear layers, quantize them, and replay the quantized block to produce the next block's inputs.
Memory: one block's calibration activations plus the model.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from hf_vq.algorithms.hessian import HessianAccumulator, output_error

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
    layers: dict[str, float] = field(default_factory=dict)  # relative output error per layer


def _first_param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


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

    device = _first_param(model).device
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, samples.shape[0], batch_size):
            ids = samples[start:start + batch_size].to(device)
            with contextlib.suppress(_StopForward), autocast():
                model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return captured


def _run_block(block, hidden, kwargs):
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def sequential_groups(block: nn.Module, linears: dict[str, nn.Linear], hidden, kwargs, autocast) -> list[list[str]]:
    """Linears in execution order, grouped by shared input (q/k/v, then o, then gate/up, then down for Llama)."""
    order: list[tuple[str, tuple]] = []
    handles = []
    for name, lin in linears.items():
        def hook(_m, args, _name=name):
            x = args[0]
            order.append((_name, (x.data_ptr(), tuple(x.shape), x.dtype)))
        handles.append(lin.register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), autocast():
            _run_block(block, hidden[:1], _slice_kwargs(kwargs, 1))
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last_key = None
    seen = set()
    for name, key in order:
        if name in seen:
            continue
        seen.add(name)
        if groups and key == last_key:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_key = key
    missing = [n for n in linears if n not in seen]
    if missing:
        groups.append(missing)
    return groups


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


QuantizeFn = Callable[[str, nn.Linear, torch.Tensor], object]


@torch.no_grad()
def run_sequential(model: nn.Module, samples: torch.Tensor, targets: dict[str, nn.Linear], quantize_fn: QuantizeFn,
                   batch_size: int = 8, true_sequential: bool = True, compute_dtype: torch.dtype = torch.float32,
                   progress: bool = True, reuse_frozen: bool = True) -> tuple[dict[str, object], RunStats]:
    """Quantize ``targets`` (full name -> Linear) block by block. ``quantize_fn(name, linear, H)`` returns an object
    with ``dequantize()``; its result replaces the layer's weight for the rest of the run. Returns those objects.
    ``reuse_frozen`` skips recomputing block children whose layers are all quantized (same result, less work)."""
    from tqdm.auto import tqdm

    stats = RunStats()
    prefix, blocks = find_decoder_blocks(model)
    device = _first_param(blocks[0]).device

    def autocast():
        if compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=compute_dtype)

    t0 = time.perf_counter()
    cache = capture_block_inputs(model, blocks[0], samples, batch_size, autocast)
    stats.forward_s += time.perf_counter() - t0
    results: dict[str, object] = {}
    bar = tqdm(range(len(blocks)), desc="quantizing blocks", disable=not progress, unit="block")
    last = max((i for i in range(len(blocks)) for n in targets if n.startswith(f"{prefix}.{i}." if prefix else f"{i}.")),
               default=-1)
    for i in bar:
        if i > last:
            break  # nothing left to quantize: no need to replay the remaining blocks
        block = blocks[i]
        block_prefix = f"{prefix}.{i}." if prefix else f"{i}."
        linears = {n: m for n, m in targets.items() if n.startswith(block_prefix)}
        if linears:
            local = {n[len(block_prefix):]: m for n, m in linears.items()}
            if true_sequential:
                groups = sequential_groups(block, local, cache[0][0], cache[0][1], autocast)
            else:
                groups = [list(local)]
            frozen = _FrozenChildren(block, local)
            for group in groups:
                if reuse_frozen:
                    frozen.prepare(done={n for n in local if block_prefix + n in results})
                hessians = _collect_hessians(block, {n: local[n] for n in group}, cache, autocast, stats, frozen)
                t1 = time.perf_counter()
                for n in group:
                    full = block_prefix + n
                    lin = local[n]
                    h = hessians[n]
                    original = lin.weight.data.clone()
                    result = quantize_fn(full, lin, h)
                    lin.weight.data.copy_(result.dequantize().to(lin.weight.dtype))
                    err = output_error(original, lin.weight.data, h)
                    stats.layers[full] = err
                    results[full] = result
                    logger.info("%s: relative output error %.5f", full, err)
                stats.quantize_s += time.perf_counter() - t1
                del hessians
        else:
            frozen = None
        t2 = time.perf_counter()
        for j, (hidden, kw) in enumerate(cache):
            with autocast(), (frozen.stubbed(j) if frozen else contextlib.nullcontext()):
                out = _run_block(block, hidden, kw)
            cache[j] = (out.to(hidden.dtype), kw)
        stats.forward_s += time.perf_counter() - t2
        if stats.layers:
            bar.set_postfix(err=f"{max(stats.layers[n] for n in linears) if linears else 0:.4f}")
    return results, stats


class _FrozenChildren:
    """Outputs of block children whose Linears are all quantized are fixed (groups run in execution order, so their
    inputs are fixed too): record them once, then stub those children in later passes instead of recomputing them."""

    def __init__(self, block: nn.Module, local: dict[str, nn.Linear]):
        self.children = dict(block.named_children())
        self.members = {c: [n for n in local if n.split(".")[0] == c] for c in self.children}
        self.outputs: dict[str, list] = {}
        self.recording: dict[str, list] = {}

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
def collect_hessians(block: nn.Module, linears: dict[str, nn.Linear], inputs, autocast=contextlib.nullcontext):
    """Input Hessians of ``linears`` (names local to ``block``) over cached block inputs [(hidden, kwargs), ...]."""
    return _collect_hessians(block, linears, inputs, autocast, RunStats(), _FrozenChildren(block, linears))


def _collect_hessians(block, group: dict[str, nn.Linear], cache, autocast, stats: RunStats,
                      frozen: _FrozenChildren) -> dict[str, torch.Tensor]:
    """One pass of the block over the calibration inputs, stopping after the group's last layer has run."""
    accs: dict[str, HessianAccumulator] = {}
    shared: dict[str, str] = {}
    remaining = set(group)
    handles = []
    t0 = time.perf_counter()
    for name, lin in group.items():
        def hook(_m, args, _name=name):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            owner = next((o for o, k in shared.items() if k == key and o in accs), None)
            if owner is None:
                acc = accs.setdefault(_name, HessianAccumulator(x.shape[-1], x.device))
                acc.add(x)
                shared[_name] = key
            else:
                accs.setdefault(_name, accs[owner])
            remaining.discard(_name)
            if not remaining:
                raise _StopForward
        handles.append(lin.register_forward_pre_hook(hook))
    try:
        for j, (hidden, kw) in enumerate(cache):
            remaining.update(group)
            shared.clear()
            with contextlib.suppress(_StopForward), autocast(), frozen.stubbed(j, record=True):
                _run_block(block, hidden, kw)
    finally:
        for h in handles:
            h.remove()
    frozen.commit(len(cache))
    stats.forward_s += time.perf_counter() - t0
    out = {}
    finalized: dict[int, torch.Tensor] = {}
    for name in group:
        acc = accs.get(name)
        if acc is None:
            raise RuntimeError(f"layer {name} never ran during calibration")
        if id(acc) not in finalized:
            finalized[id(acc)] = acc.finalize()
        out[name] = finalized[id(acc)]
    return out
