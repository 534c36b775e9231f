"""Blockwise distillation: Adam on a decoder block whose Linears are temporarily replaced by trainable stand-ins, to
match cached target outputs. Shared by AdaScale (learned scales / clipping) and GPTVQ's codebook fine-tuning."""

from __future__ import annotations

import math

import torch
from torch import nn

from hf_vq.pipeline import distributed
from hf_vq.pipeline.blocks import _run_block
from hf_vq.utils.modules import set_module


class EarlyStop:
    """Says when a loss has stopped falling: the losses are averaged over consecutive windows of ``window`` steps, and
    training stops at the end of the first window whose mean is not below the previous window's mean by more than
    ``margin`` (relative). With ``window`` a multiple of the number of calibration batches (visited once each per
    pass, in a shuffled order) every window sees the same batches, so batch-to-batch spread does not look like
    progress or stagnation."""

    def __init__(self, window: int, margin: float):
        if window < 1 or not 0.0 <= margin < 1.0:
            raise ValueError(f"early stop needs window >= 1 and 0 <= margin < 1, got {window}, {margin}")
        self.window, self.margin = window, margin
        self.previous: float | None = None
        self.total, self.count = 0.0, 0

    @classmethod
    def over_passes(cls, num_batches: int, margin: float, min_steps: int = 16) -> "EarlyStop":
        """Windows of whole passes over ``num_batches`` batches, at least ``min_steps`` steps long: each window sees
        every batch."""
        return cls(num_batches * -(-min_steps // num_batches), margin)

    def update(self, loss: float) -> bool:
        """Record one step's loss; True when training should stop after it."""
        self.total += loss
        self.count += 1
        if self.count < self.window:
            return False
        mean, self.total, self.count = self.total / self.count, 0.0, 0
        stop = self.previous is not None and mean > (1.0 - self.margin) * self.previous
        self.previous = mean
        return stop


def distill_block(block: nn.Module, stand_ins: dict[str, nn.Module], param_groups: list[dict], fp_inputs, q_inputs,
                  kwargs, targets, *, num_iterations: int, fp_input_prob: float, generator: torch.Generator,
                  desc: str = "", progress: bool = True, autocast_dtype: torch.dtype | None = None,
                  early_stop: EarlyStop | None = None, history: list[float] | None = None,
                  ranks: distributed.Ranks = distributed.Ranks()) -> tuple[float, float]:
    """Swap ``stand_ins`` (name relative to ``block`` -> module) into ``block`` and run ``num_iterations`` Adam steps
    (``param_groups`` as for torch.optim.Adam, cosine decay to 0) on the MSE between ``targets[j]`` and the block run
    on a mixed input: each element from ``fp_inputs[j]`` with probability ``fp_input_prob``, else from
    ``q_inputs[j]``. Batches (indexable, with ``kwargs[j]``) are visited in a seeded random order. The original
    modules are put back afterwards.

    ``autocast_dtype`` (e.g. torch.bfloat16): run the block's forward and backward under autocast (the trained
    parameters and the loss stay float32). ``early_stop``: stop before ``num_iterations`` once it says the loss has
    stopped falling. ``history``: each step's loss is appended to it. Under torch.distributed (``ranks``) each rank
    steps on its own batch and the gradients and losses are averaged over ranks, so the parameters (and any early
    stop) stay the same on every rank: a step sees ``world`` batches. Returns (first loss, mean loss of the last 10%
    of the steps run)."""
    from tqdm.auto import tqdm

    if num_iterations == 0:
        return float("nan"), float("nan")
    originals = {n: block.get_submodule(n) for n in stand_ins}
    for n, m in stand_ins.items():
        set_module(block, n, m)
    params = [p for g in param_groups for p in g["params"]]
    device = params[0].device
    # fused: one kernel per step instead of about ten passes over every parameter (s2 has one per weight)
    opt = torch.optim.Adam(param_groups, fused=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=num_iterations, eta_min=0.0)
    autocast = torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)
    order: list[int] = []
    losses = [] if history is None else history
    start = len(losses)
    bar = tqdm(range(num_iterations), desc=desc, disable=not progress, leave=False, unit="it")
    try:
        with torch.enable_grad():
            for _ in bar:
                if not order:
                    order = torch.randperm(len(targets), generator=generator).tolist()
                j = order.pop()
                if fp_input_prob >= 1.0:
                    x = fp_inputs[j]
                elif fp_input_prob <= 0.0:
                    x = q_inputs[j]
                else:
                    fp_hidden, q_hidden = fp_inputs[j], q_inputs[j]
                    mask = torch.rand(fp_hidden.shape, generator=generator) < fp_input_prob
                    x = torch.where(mask, fp_hidden, q_hidden)
                with autocast:
                    out = _run_block(block, x.to(device), kwargs[j])
                loss = nn.functional.mse_loss(out.float(), targets[j].to(out.device).float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                loss = loss.detach()
                if ranks.active:
                    distributed.average_gradients(params, ranks)
                    loss = distributed.all_reduce(loss.clone()) / ranks.world
                opt.step()
                sched.step()
                losses.append(float(loss))
                bar.set_postfix(loss=f"{losses[-1]:.3g}")
                if early_stop is not None and early_stop.update(losses[-1]):
                    break
    finally:
        for n, m in originals.items():
            set_module(block, n, m)
    run = losses[start:]
    tail = run[-max(1, math.ceil(len(run) / 10)):]
    return run[0], sum(tail) / len(tail)


@torch.no_grad()
def block_mse(block: nn.Module, batches, targets, ranks: distributed.Ranks = distributed.Ranks()) -> float:
    """Mean MSE of the block's outputs on ``batches`` ((hidden, kwargs) pairs) against ``targets``, over the batches
    of every rank: the number training is judged by."""
    total = torch.zeros(2, dtype=torch.float64)
    for (hidden, kw), target in zip(batches, targets):
        out = _run_block(block, hidden, kw)
        total[0] += float(nn.functional.mse_loss(out.float(), target.to(out.device).float()))
        total[1] += 1
    if ranks.active:
        distributed.all_reduce(total)
    return float(total[0] / total[1])
