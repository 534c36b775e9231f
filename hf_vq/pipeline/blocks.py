"""One decoder block at a time: finding the blocks, capturing block 0's inputs, probing a block's structure, and one
calibration pass over a block that collects its Linears' input Hessians (the runner in runner.py drives these)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_vq.algorithms.hessian import HessianAccumulator
from hf_vq.pipeline import distributed
from hf_vq.pipeline.experts import ExpertPass, regroup
from hf_vq.pipeline.placement import execution_device


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


def bar_postfix(ranks, device: torch.device, **extra) -> dict:
    """The progress bar's postfix for a block: ``extra``, the rank under torch.distributed, peak device memory."""
    postfix = dict(extra)
    if ranks.active:
        postfix["rank"] = f"{ranks.rank}/{ranks.world}"
    if device.type == "cuda":
        postfix["mem"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}GiB"
    return postfix


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
                     first_token_weight: float = 1.0, ranks: distributed.Ranks = distributed.Ranks(),
                     token_means: dict | None = None, outputs: list | None = None):
    """Input Hessians of ``linears`` (names local to ``block``) over cached block inputs [(hidden, kwargs), ...]
    (and over every rank's inputs under torch.distributed). ``token_means``: filled with each Linear's plain token
    average H (first token weight 1) beside the weighted H returned (fused experts: their weighted H).
    ``outputs``: filled with the block's output per batch (the pass runs to the block's end instead of stopping after
    the last Linear), so that a caller that changes no weight needs no second pass; left empty for a block with
    fused experts (collected in two passes)."""
    out = {}
    groups = regroup(block, [list(linears)], [False])[0]  # fused experts: gate_up, then down
    for group in groups:
        out.update(_collect_hessians(block, {n: linears[n] for n in group}, inputs, autocast, RunStats(),
                                     _FrozenChildren(block, linears), first_token_weight=first_token_weight,
                                     ranks=ranks, token_means=token_means,
                                     outputs=outputs if len(groups) == 1 else None)[0])
    return out


def _collect_hessians(block, group: dict[str, nn.Linear], cache, autocast, stats: RunStats, frozen: _FrozenChildren,
                      skip: set[str] = frozenset(), capture: str | None = None, first_token_weight: float = 1.0,
                      ranks: distributed.Ranks = distributed.Ranks(), token_means: dict | None = None,
                      outputs: list | None = None):
    """One pass of the block over the calibration inputs, stopping after the group's last layer has run (with
    ``outputs``: running to the end, the block's output per batch appended there).

    Layers in ``skip`` return zeros instead of computing (nothing reads them before the stop); the inputs of
    ``capture`` are kept per batch and returned with the Hessians."""
    stop = outputs is None
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
        if not remaining and stop:
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
                acc = accs.setdefault(_name, HessianAccumulator(x.shape[-1], x.device, first_token_weight,
                                                                split_first=token_means is not None))
                acc.add(x)
                seen_inputs[_name] = x
            else:
                accs.setdefault(_name, accs[owner])
            if _name == capture:
                captured.append(x)
            remaining.discard(_name)
            if not remaining and stop:
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
                result = _run_block(block, hidden, kw)
                if not stop:
                    outputs.append(result.to(hidden.dtype))
        out = experts.hessians(distributed.all_reduce if ranks.active else None)
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
        for acc in {id(a): a for a in accs.values() if a.first is not None}.values():
            distributed.all_reduce(acc.first)
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
        if token_means is not None:
            token_means[name] = acc.token_mean if acc.token_mean is not None else out[name]
    if token_means is not None:
        token_means.update({n: h for n, h in out.items() if n not in token_means})  # fused experts
    return out, captured
