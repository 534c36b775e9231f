"""Several processes (torchrun / accelerate launch), one model each: calibration windows are sharded over the ranks,
each rank runs its shard through the block, the Hessian sums and token counts are all-reduced, each layer is solved
by one rank (layers dealt round-robin) and its result broadcast, so every rank ends with the same quantized model.

gloo on CPU, NCCL on GPU. Without a process group (and without torchrun's environment) nothing here does anything:
a single process computes exactly what it always did.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hf_vq.formats.state import from_state, to_device, to_state


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1


def current(device: torch.device | None = None) -> Ranks:
    """The process group in use; started from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR) if that is
    present and nobody started it yet."""
    if not dist.is_available():
        return Ranks()
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
            return Ranks()
        cuda = device is not None and device.type == "cuda"
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())


def shard(samples: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This rank's calibration windows (every world-th, starting at its rank)."""
    if not ranks.active:
        return samples
    if samples.shape[0] < ranks.world:
        raise ValueError(f"{samples.shape[0]} calibration windows cannot be shared by {ranks.world} processes: use "
                         f"num_samples >= {ranks.world}")
    return samples[ranks.rank::ranks.world]


def _comm_device() -> torch.device:
    """Where collectives run: CPU for gloo, this process's GPU for NCCL."""
    return torch.device("cpu") if dist.get_backend() == "gloo" else torch.device("cuda", torch.cuda.current_device())


def all_reduce(t: torch.Tensor, op: str = "SUM") -> torch.Tensor:
    """``t`` reduced over ranks (``op``: "SUM", "MAX", "MIN"), in place (through CPU for gloo)."""
    buf = t.to(_comm_device())
    dist.all_reduce(buf, op=getattr(dist.ReduceOp, op))
    if buf is not t:
        t.copy_(buf)
    return t


def average_gradients(params, ranks: Ranks) -> None:
    """Each parameter's gradient averaged over ranks, in one collective (a parameter without a gradient on a rank,
    e.g. an expert no token reached there, counts as zero)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce(flat).div_(ranks.world)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g)
        offset += g.numel()


def reduce_accumulators(accs) -> None:
    """Sum HessianAccumulators' sums and counts over ranks (each accumulator once)."""
    for acc in {id(a): a for a in accs}.values():
        all_reduce(acc.sum)
        count = torch.tensor([acc.count], dtype=torch.float64)
        acc.count = int(all_reduce(count).item())


def owner(index: int, ranks: Ranks) -> int:
    return index % ranks.world


def solved_by_owner(index: int, ranks: Ranks, solve, count: int, device: torch.device) -> list:
    """``solve()`` (a list of ``count`` quantized-weight results) run only by the rank that owns set ``index``
    (round-robin), then broadcast: every rank returns the same results, on ``device``."""
    src = owner(index, ranks)
    outs = solve() if ranks.rank == src else [None] * count
    if ranks.active:
        outs = [to_device(broadcast_result(o, src, ranks), device) for o in outs]
    return outs


def broadcast_result(result, src: int, ranks: Ranks):
    """``result`` (a quantized-weight object, present on rank ``src``) on every rank: a JSON header of names, shapes
    and dtypes, then the tensors."""
    if ranks.rank == src:
        header, tensors = to_state(result)
        meta = {"header": header, "tensors": {k: [list(v.shape), str(v.dtype).removeprefix("torch.")]
                                              for k, v in tensors.items()}}
        blob = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        size = torch.tensor([blob.numel()], dtype=torch.int64)
    else:
        size = torch.zeros(1, dtype=torch.int64)
    dev = _comm_device()
    size = size.to(dev)
    dist.broadcast(size, src)
    if ranks.rank != src:
        blob = torch.zeros(int(size.item()), dtype=torch.uint8)
    blob = blob.to(dev)
    dist.broadcast(blob, src)
    meta = json.loads(bytes(blob.cpu().tolist()).decode())
    out = {}
    for name, (shape, dtype) in meta["tensors"].items():
        dtype = getattr(torch, dtype)
        # as raw bytes: gloo has no int16 (GPTVQ's codebooks and scales are int16 bit patterns)
        if ranks.rank == src:
            raw = tensors[name].detach().contiguous().reshape(-1).view(torch.uint8).to(dev)
        else:
            raw = torch.empty(math.prod(shape) * dtype.itemsize, dtype=torch.uint8, device=dev)
        dist.broadcast(raw, src)
        out[name] = raw.view(dtype).reshape(shape)
    return result if ranks.rank == src else from_state(meta["header"], out)
