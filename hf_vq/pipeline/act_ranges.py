"""Activation ranges for QuantSim (AIMET semantics, docs/aimet-reference.md sections 1-4).

Observers replace fake-quant during the calibration passes (weights stay quantized, so ranges are those the deployed
model sees). Schemes: ``min_max`` (running min/max), ``percentile`` and ``tf_enhanced`` from a 2048-bin histogram over
the observed range (a second pass). ``tf_enhanced`` picks the (min, max) pair among a grid of shrunk ranges that
minimises the expected squared error: rounding noise scale^2/12 per in-range value plus ``gamma`` (3, as AIMET's SQNR
analyzer) times the clipping error of out-of-range values. Under torch.distributed each rank observes its shard of the
calibration windows and the ranges and histograms are reduced over ranks, so every rank sets the same ranges.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from hf_vq.nn.qat import ActQuantizer
from hf_vq.pipeline import distributed

logger = logging.getLogger(__name__)
HIST_BINS = 2048
SQNR_GAMMA = 3.0
SQNR_GRID = 32
SQNR_BINS = 512  # AIMET's tf_enhanced histogram size


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
                      percentile: float = 99.99, batch_size: int = 8, skip_unreached: bool = False,
                      only: set[str] | None = None,
                      ranks: distributed.Ranks = distributed.Ranks()) -> dict[str, tuple[float, float]]:
    """Set the range of every int activation quantizer of ``model`` from calibration data.

    ``data``: token ids [n, L], or a callback ``fn(model)`` running the forward passes (AIMET's
    forward_pass_callback; called twice for histogram schemes). Returns {quantizer name: (min, max)}.
    Quantizers the data never reaches raise, or with ``skip_unreached`` are left without a range, logged and absent
    from the result. ``only``: calibrate just these quantizers (by name); the others pass activations through
    unquantized meanwhile, as they do while observing.
    """
    quantizers = {n: m for n, m in model.named_modules() if isinstance(m, ActQuantizer)}
    others = []
    if only is not None:
        others = [m for n, m in quantizers.items() if n not in only and m.enabled]
        quantizers = {n: m for n, m in quantizers.items() if n in only}
    if not quantizers:
        return {}
    run = _forward_fn(data, batch_size)
    was_training = model.training
    model.eval()
    try:
        for m in others:
            m.enabled = False
        return observe_ranges(quantizers, lambda: run(model), quant_scheme, percentile, skip_unreached, ranks)
    finally:
        for m in others:
            m.enabled = True
        model.train(was_training)


@torch.no_grad()
def observe_ranges(quantizers: dict[str, ActQuantizer], run: Callable[[], None], quant_scheme: str = "min_max",
                   percentile: float = 99.99, skip_unreached: bool = False,
                   ranks: distributed.Ranks = distributed.Ranks()) -> dict[str, tuple[float, float]]:
    """Set the ranges of ``quantizers`` from what they see while ``run()`` does the calibration forward passes (once,
    twice for histogram schemes); see compute_encodings."""
    if quant_scheme not in ("min_max", "tf_enhanced", "percentile"):
        raise ValueError(f"quant_scheme must be 'min_max', 'tf_enhanced' or 'percentile', got {quant_scheme!r}")
    quantizers = dict(quantizers)
    observers = {n: _Observer() for n in quantizers}
    try:
        for n, q in quantizers.items():
            q.observer = observers[n]
        run()
        if ranks.active:  # the extremes over every rank's windows; a rank that saw nothing keeps (inf, -inf)
            ends = torch.tensor([[-o.lo, o.hi] for o in observers.values()], dtype=torch.float64)
            distributed.all_reduce(ends, op="MAX")
            for o, (neg_lo, hi) in zip(observers.values(), ends.tolist()):
                o.lo, o.hi = -neg_lo, hi
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
            run()
            if ranks.active and observers:
                hists = torch.stack([o.hist for o in observers.values()])
                distributed.all_reduce(hists)
                for o, h in zip(observers.values(), hists):
                    o.hist = h
    finally:
        for q in quantizers.values():
            q.observer = None
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
