"""Blockwise distillation: Adam on a decoder block whose Linears are temporarily replaced by trainable stand-ins, to
match cached target outputs. Shared by AdaScale (learned scales / clipping) and GPTVQ's codebook fine-tuning."""

from __future__ import annotations

import math

import torch
from torch import nn

from hf_vq.pipeline.runner import _run_block
from hf_vq.utils.modules import set_module


def distill_block(block: nn.Module, stand_ins: dict[str, nn.Module], param_groups: list[dict], fp_inputs, q_inputs,
                  kwargs, targets, *, num_iterations: int, fp_input_prob: float, generator: torch.Generator,
                  desc: str = "", progress: bool = True) -> tuple[float, float]:
    """Swap ``stand_ins`` (name relative to ``block`` -> module) into ``block`` and run ``num_iterations`` Adam steps
    (``param_groups`` as for torch.optim.Adam, cosine decay to 0) on the MSE between ``targets[j]`` and the block run
    on a mixed input: each element from ``fp_inputs[j]`` with probability ``fp_input_prob``, else from
    ``q_inputs[j]``. Batches (indexable, with ``kwargs[j]``) are visited in a seeded random order. The original
    modules are put back afterwards. Returns (first loss, mean loss of the last 10%)."""
    from tqdm.auto import tqdm

    if num_iterations == 0:
        return float("nan"), float("nan")
    originals = {n: block.get_submodule(n) for n in stand_ins}
    for n, m in stand_ins.items():
        set_module(block, n, m)
    opt = torch.optim.Adam(param_groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=num_iterations, eta_min=0.0)
    device = next(p for g in param_groups for p in g["params"]).device
    order: list[int] = []
    losses = []
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
                out = _run_block(block, x.to(device), kwargs[j])
                loss = nn.functional.mse_loss(out, targets[j].to(out.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.3g}")
    finally:
        for n, m in originals.items():
            set_module(block, n, m)
    tail = losses[-max(1, math.ceil(len(losses) / 10)):]
    return losses[0], sum(tail) / len(tail)
