"""The output head (``lm_head_bits``): quantized after the method's run, on a symmetric affine grid, for every method.

RTN rounds it (no data). The calibrating methods (GPTQ, GPTVQ, AdaScale) run GPTQ on its input Hessian, taken from
one whole-model pass over the calibration windows through the already quantized model (the inputs the head sees at
inference, as block-by-block GPTQ gives each layer); the pass stops at the head, so no logits are computed. Under
torch.distributed each rank runs its share of the windows and the Hessian is summed over ranks.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from hf_vq.algorithms.gptq import gptq_quantize
from hf_vq.algorithms.hessian import HessianAccumulator, output_error
from hf_vq.algorithms.rtn import rtn_weight
from hf_vq.config import HfVQConfig
from hf_vq.formats.affine import AffineWeight
from hf_vq.pipeline import distributed
from hf_vq.pipeline.placement import execution_device, onloaded
from hf_vq.pipeline.registry import calibration_samples

logger = logging.getLogger(__name__)


ERROR_ROWS = 1024  # the logged error is estimated on this many evenly spaced rows (the head has ~50k-250k)


class _StopForward(Exception):
    pass


@torch.no_grad()
def head_hessian(model: nn.Module, head: nn.Module, samples: torch.Tensor, batch_size: int,
                 compute_dtype: torch.dtype, first_token_weight: float) -> torch.Tensor:
    """Input Hessian of ``head`` over ``samples`` [windows, seq] (this rank's share, summed over ranks)."""
    device = execution_device(model)
    ranks = distributed.current(device)
    samples = distributed.shard(samples, ranks)
    acc = HessianAccumulator(head.in_features, device=execution_device(head), first_token_weight=first_token_weight)

    def hook(_module, args, kwargs):
        x = args[0] if args else kwargs["input"]
        acc.add(x.detach().to(acc.sum.device))
        raise _StopForward

    def autocast():
        if compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=compute_dtype)

    handle = head.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, samples.shape[0], batch_size):
            with contextlib.suppress(_StopForward), autocast():
                model(input_ids=samples[start:start + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    if ranks.active:
        distributed.reduce_accumulators([acc])
    return acc.finalize()


def quantize_head(model: nn.Module, config: HfVQConfig, head: nn.Linear) -> tuple[AffineWeight, float | None]:
    """``head`` (an nn.Linear) on the config's lm_head grid; returns (weight, relative output error or None)."""
    bits, group_size = config.lm_head_bits, config.lm_head_group_size
    with onloaded(head, execution_device(head)):
        weight = head.weight.data
        if not config.needs_calibration:
            return rtn_weight(weight, bits, group_size, True, getattr(config, "clip_search", False)), None
        h = head_hessian(model, head, calibration_samples(model, config),
                         getattr(config, "calibration_batch_size", None) or getattr(config, "batch_size", 1),
                         getattr(torch, getattr(config, "calibration_dtype", "float32")), config.sink_weight())

        def solve():
            return [gptq_quantize(weight, h, bits, group_size, True, getattr(config, "percdamp", 0.01),
                                  getattr(config, "act_order", True), getattr(config, "block_size", 128),
                                  getattr(config, "clip_search", False))]
        # one rank solves, the others receive its result: every rank holds the same head
        result = distributed.solved_by_owner(0, distributed.current(h.device), solve, 1, weight.device)[0]
        err = output_error(weight.float(), result.dequantize().to(weight.device), h, max_rows=ERROR_ROWS)
    logger.info("hf_vq: lm_head %d-bit (group %d): relative output error %.5f", bits, group_size, err)
    return result, err
