"""QuantSim-style simulation for hf_vq (AIMET semantics, docs/aimet-reference.md sections 1-4).

- The "quantsim" algorithm swaps every target Linear for a :class:`~hf_vq.nn.qat.QATLinear` (symmetric min-max
  weights: per channel, blockwise or LPBQ) with activation quantizers on its input and output, then runs
  :func:`compute_encodings` on the calibration windows.
- :func:`compute_encodings`: observers replace fake-quant during the passes (weights stay quantized, so ranges are
  those the deployed model sees). Schemes: ``min_max`` (running min/max), ``percentile`` and ``tf_enhanced`` from a
  2048-bin histogram over the observed range (a second pass). ``tf_enhanced`` picks the (min, max) pair among a grid
  of shrunk ranges that minimises the expected squared error: rounding noise scale^2/12 per in-range value plus
  ``gamma`` (3, as AIMET's SQNR analyzer) times the clipping error of out-of-range values.

The user-facing grid helpers live in hf_vq.model.quantsim, the encodings export in hf_vq.export.quantsim.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
from torch import nn

from hf_vq.pipeline.registry import calibration_samples, register_algorithm
from hf_vq.pipeline.experts import CalibrationExperts
from hf_vq.nn.qat import ActQuantizer, FloatQuantizer, QATLinear
from hf_vq.pipeline.blocks import RunStats
from hf_vq.utils.modules import set_module

logger = logging.getLogger(__name__)
HIST_BINS = 2048
SQNR_GAMMA = 3.0
SQNR_GRID = 32
SQNR_BINS = 512  # AIMET's tf_enhanced histogram size


# --------------------------------------------------------------------------------------------------- algorithm
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


@register_algorithm("quantsim")
def run_quantsim(model, config, targets: dict[str, nn.Linear], progress: bool = True):
    stats = RunStats()
    t0 = time.perf_counter()
    results, originals = {}, {}
    # fused MoE experts are stored as QuantExperts: QuantSim weight grids, no activation quantizers inside them
    expert_members = {n for n in targets
                      if isinstance(model.get_submodule(n.rsplit(".", 2)[0]) if n.count(".") >= 2 else None,
                                    CalibrationExperts)}
    for name, lin in targets.items():
        originals[name] = lin
        acts = name not in expert_members
        spec = config.spec_for(name)
        if spec.group_size == -1:
            gran, block = "per_channel", lin.in_features
        else:
            gran = "lpbq" if config.weight_granularity == "lpbq" else "blockwise"
            block = spec.group_size
        if gran == "lpbq" and lin.in_features % block:
            raise ValueError(f"{name}: LPBQ block_size {block} does not divide in_features {lin.in_features} "
                             "(AIMET requires equal blocks)")
        mod = QATLinear(lin.weight.data, None if lin.bias is None else lin.bias.data, spec.bits, gran, block,
                        config.decompressed_bits,
                        make_act_quantizer(config) if acts and config.quantize_inputs else None,
                        make_act_quantizer(config) if acts and config.quantize_outputs else None)
        set_module(model, name, mod)
        results[name] = _Built(mod)
    stats.quantize_s = time.perf_counter() - t0
    if config.needs_calibration:
        t1 = time.perf_counter()
        samples = calibration_samples(model, config)
        ranges = compute_encodings(model, samples, config.quant_scheme, config.percentile,
                                   config.calibration_batch_size, skip_unreached=True)
        stats.forward_s = time.perf_counter() - t1
        # modules the calibration data never reaches (a vision tower under text-only calibration, an expert no token
        # was routed to) have no activation ranges: they stay in float, and the run report lists them
        for name in list(results):
            mod = results[name].module
            quantizers = [f"{name}.{q}" for q in ("input_quantizer", "output_quantizer")
                          if isinstance(getattr(mod, q, None), ActQuantizer)]
            if any(q not in ranges for q in quantizers):
                set_module(model, name, originals[name])
                del results[name]
    for name in expert_members & set(results):
        results[name] = results[name].module.affine_weight()  # what fuse() stores
    if expert_members:
        logger.info("QuantSim: %d fused-expert projections get QuantSim weight grids, without activation quantizers",
                    len(expert_members))
    return results, stats


# ----------------------------------------------------------------------------------------------- calibration
class _Observer:
    def __init__(self):
        self.lo, self.hi = float("inf"), float("-inf")
        self.hist: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.hist is None:
            lo, hi = torch.aminmax(x)  # one pass; bf16/fp16 extremes are exact in float
            self.lo = min(self.lo, float(lo))
            self.hi = max(self.hi, float(hi))
        else:
            self.hist += torch.histc(x.float().clamp(self.lo, self.hi), HIST_BINS, self.lo, self.hi).cpu()

    def start_histogram(self) -> None:
        self.lo, self.hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if self.hi <= self.lo:
            self.hi = self.lo + 1e-8
        self.hist = torch.zeros(HIST_BINS, dtype=torch.float64)


def percentile_range(hist: torch.Tensor, lo: float, hi: float, p: float) -> tuple[float, float]:
    cdf = hist.cumsum(0) / hist.sum()
    edges = torch.linspace(lo, hi, hist.numel() + 1, dtype=torch.float64)
    q = p / 100.0
    i_lo = int(torch.searchsorted(cdf, torch.tensor(1.0 - q, dtype=torch.float64)))
    i_hi = int(torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64)))
    return float(edges[min(i_lo, hist.numel() - 1)]), float(edges[min(i_hi + 1, hist.numel())])


def sqnr_range(hist: torch.Tensor, lo: float, hi: float, bits: int, gamma: float = SQNR_GAMMA,
               grid: int = SQNR_GRID) -> tuple[float, float]:
    """(min, max) minimising rounding noise + gamma * clipping noise over a grid of shrunk ranges."""
    h = hist.to(torch.float64)
    if h.numel() > SQNR_BINS and h.numel() % SQNR_BINS == 0:
        h = h.reshape(SQNR_BINS, -1).sum(1)
    width = (hi - lo) / h.numel()
    centers = lo + (torch.arange(h.numel(), dtype=torch.float64) + 0.5) * width
    f = torch.linspace(1.0 / grid, 1.0, grid, dtype=torch.float64)
    mins = (lo * f)[:, None, None]
    maxs = (hi * f)[None, :, None]
    scale = (maxs - mins) / (2**bits - 1)
    c = centers[None, None, :]
    clip = (c - c.clamp(mins, maxs)) ** 2
    inside = (c >= mins) & (c <= maxs)
    noise = (h * torch.where(inside, scale**2 / 12, gamma * clip)).sum(-1)
    i = int(torch.argmin(noise))
    return float(lo * f[i // grid]), float(hi * f[i % grid])


def _forward_fn(data, batch_size: int) -> Callable[[nn.Module], None]:
    if callable(data):
        return data
    ids = torch.as_tensor(data)

    def run(model):
        device = next(model.parameters()).device
        for start in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
    return run


@torch.no_grad()
def compute_encodings(model: nn.Module, data: torch.Tensor | Callable[[nn.Module], Any], quant_scheme: str = "min_max",
                      percentile: float = 99.99, batch_size: int = 8,
                      skip_unreached: bool = False) -> dict[str, tuple[float, float]]:
    """Set the range of every int activation quantizer of ``model`` from calibration data.

    ``data``: token ids [n, L], or a callback ``fn(model)`` running the forward passes (AIMET's
    forward_pass_callback; called twice for histogram schemes). Returns {quantizer name: (min, max)}.
    Quantizers the data never reaches raise, or with ``skip_unreached`` are left without a range, logged and absent
    from the result.
    """
    if quant_scheme not in ("min_max", "tf_enhanced", "percentile"):
        raise ValueError(f"quant_scheme must be 'min_max', 'tf_enhanced' or 'percentile', got {quant_scheme!r}")
    quantizers = {n: m for n, m in model.named_modules() if isinstance(m, ActQuantizer)}
    if not quantizers:
        return {}
    run = _forward_fn(data, batch_size)
    observers = {n: _Observer() for n in quantizers}
    was_training = model.training
    model.eval()
    try:
        for n, q in quantizers.items():
            q.observer = observers[n]
        run(model)
        missing = [n for n, o in observers.items() if o.hi < o.lo]
        if missing and not skip_unreached:
            raise RuntimeError(f"{len(missing)} activation quantizers saw no data (e.g. {missing[0]})")
        if missing:
            logger.warning("hf_vq QuantSim: %d activation quantizers saw no calibration data and are skipped: %s",
                           len(missing), ", ".join(missing))
            for n in missing:
                quantizers.pop(n).observer = None
                del observers[n]
        if quant_scheme != "min_max":
            for o in observers.values():
                o.start_histogram()
            run(model)
    finally:
        for q in quantizers.values():
            q.observer = None
        model.train(was_training)
    ranges = {}
    for n, q in quantizers.items():
        o = observers[n]
        if quant_scheme == "min_max":
            lo, hi = o.lo, o.hi
        elif quant_scheme == "percentile":
            lo, hi = percentile_range(o.hist, o.lo, o.hi, percentile)
        else:
            lo, hi = sqnr_range(o.hist, o.lo, o.hi, q.bits)
        q.set_range(lo, hi)
        ranges[n] = (float(q.min), float(q.max))
    return ranges
