"""QuantSim-style simulation for hf_vq (AIMET semantics, docs/aimet-reference.md sections 1-4).

- The "quantsim" algorithm swaps every target Linear for a :class:`~hf_vq.nn.qat.QATLinear` (symmetric min-max
  weights: per channel, blockwise or LPBQ) with activation quantizers on its input and output, then runs
  :func:`compute_encodings` on the calibration windows.
- :func:`compute_encodings`: observers replace fake-quant during the passes (weights stay quantized, so ranges are
  those the deployed model sees). Schemes: ``min_max`` (running min/max), ``percentile`` and ``tf_enhanced`` from a
  2048-bin histogram over the observed range (a second pass). ``tf_enhanced`` picks the (min, max) pair among a grid
  of shrunk ranges that minimises the expected squared error: rounding noise scale^2/12 per in-range value plus
  ``gamma`` (3, as AIMET's SQNR analyzer) times the clipping error of out-of-range values.
- Config helpers with AIMET's argument conventions (``arg`` = module types, module instances or a predicate):
  :func:`set_blockwise_quantization_for_weights`, :func:`set_grouped_blockwise_quantization_for_weights`,
  :func:`set_activation_quantizers_to_float`. Weight grids are re-initialized at once (min-max from the latent).
- :func:`export_encodings`: hf_vq.export.aimet's exporter plus activation encodings (torch names
  ``<module>.input`` / ``<module>.output``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable

import torch
from torch import nn

from hf_vq.algorithms.registry import calibration_samples, register_algorithm
from hf_vq.convert import layer_record, set_module
from hf_vq.nn.qat import ActQuantizer, FloatQuantizer, QATLinear, QuantSimLinear
from hf_vq.sequential import RunStats

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
    results = {}
    for name, lin in targets.items():
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
                        make_act_quantizer(config) if config.quantize_inputs else None,
                        make_act_quantizer(config) if config.quantize_outputs else None)
        set_module(model, name, mod)
        results[name] = _Built(mod)
    stats.quantize_s = time.perf_counter() - t0
    if config.needs_calibration:
        t1 = time.perf_counter()
        samples = calibration_samples(model, config)
        compute_encodings(model, samples, config.quant_scheme, config.percentile, config.calibration_batch_size)
        stats.forward_s = time.perf_counter() - t1
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
                      percentile: float = 99.99, batch_size: int = 8) -> dict[str, tuple[float, float]]:
    """Set the range of every int activation quantizer of ``model`` from calibration data.

    ``data``: token ids [n, L], or a callback ``fn(model)`` running the forward passes (AIMET's
    forward_pass_callback; called twice for histogram schemes). Returns {quantizer name: (min, max)}.
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
        if missing:
            raise RuntimeError(f"{len(missing)} activation quantizers saw no data (e.g. {missing[0]})")
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


# ------------------------------------------------------------------------------------------- config helpers
def _select(model: nn.Module, arg) -> list[tuple[str, nn.Module]]:
    """Quantized layers matching AIMET's ``arg``: a list of module types, of module instances, or a predicate."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (QATLinear, QuantSimLinear))]
    if callable(arg) and not isinstance(arg, type):
        return [(n, m) for n, m in layers if arg(m)]
    items = list(arg) if isinstance(arg, Iterable) else [arg]
    if items and all(isinstance(a, type) for a in items):
        types = tuple(items)
        # quantized layers stand for the nn.Linear they replaced
        return [(n, m) for n, m in layers if isinstance(m, types) or nn.Linear in types]
    if all(isinstance(a, nn.Module) for a in items):
        ids = {id(a) for a in items}
        found = [(n, m) for n, m in layers if id(m) in ids]
        if len(found) != len(ids):
            raise ValueError("some module instances are not quantized layers of this model")
        return found
    raise ValueError("arg must be a list of module types, a list of module instances, or a callable(module) -> bool")


def _qat(model: nn.Module, name: str, mod: nn.Module) -> QATLinear:
    if isinstance(mod, QuantSimLinear):
        mod = QATLinear.from_quantlinear(mod)
        set_module(model, name, mod)
    return mod


def _in_block(block_size) -> int:
    if isinstance(block_size, int):
        return block_size
    bs = [int(b) for b in block_size]
    if len(bs) != 2 or bs[0] != 1:
        raise ValueError(f"block_size for a Linear weight must be an int or (1, in_block), got {block_size!r}")
    return bs[1]


def _set_weights(model, arg, bitwidth, symmetric, block_size, granularity, decompressed_bw=8) -> list[str]:
    if not symmetric:
        raise ValueError("hf_vq quantsim weights are symmetric: pass symmetric=True")
    block = _in_block(block_size)
    done = []
    for name, mod in _select(model, arg):
        b = mod.in_features if block == -1 else block
        if mod.in_features % b:
            raise ValueError(f"{name}: block size {b} does not divide in_features {mod.in_features}")
        mod = _qat(model, name, mod)
        mod.set_weight_grid(bitwidth, "per_channel" if b == mod.in_features and granularity == "blockwise"
                            else granularity, b, decompressed_bw)
        done.append(name)
    refresh_layer_records(model)
    return done


def set_blockwise_quantization_for_weights(model: nn.Module, arg, bitwidth: int, symmetric: bool,
                                           block_size) -> list[str]:
    """Blockwise symmetric weights (int ``block_size`` along the input channels) for the matching layers."""
    return _set_weights(model, arg, bitwidth, symmetric, block_size, "blockwise")


def set_grouped_blockwise_quantization_for_weights(model: nn.Module, arg, bitwidth: int, symmetric: bool,
                                                   decompressed_bw: int, block_size, block_grouping=-1) -> list[str]:
    """LPBQ weights: int block scales of ``decompressed_bw - bitwidth`` bits x one float scale per output channel
    (``block_grouping=-1``; 1 means plain blockwise; other groupings are not supported)."""
    grouping = block_grouping if isinstance(block_grouping, int) else list(block_grouping)[-1]
    if grouping == 1:
        return set_blockwise_quantization_for_weights(model, arg, bitwidth, symmetric, block_size)
    if grouping != -1:
        raise ValueError(f"block_grouping must be -1 (one group per output channel) or 1, got {block_grouping!r}")
    if decompressed_bw <= bitwidth:
        raise ValueError(f"decompressed_bw ({decompressed_bw}) must be > bitwidth ({bitwidth})")
    return _set_weights(model, arg, bitwidth, symmetric, block_size, "lpbq", decompressed_bw)


def set_activation_quantizers_to_float(model: nn.Module, arg, exponent_bits: int | None = None,
                                       mantissa_bits: int | None = None, dtype: torch.dtype | None = None) -> list[str]:
    """Replace the input/output quantizers of the matching layers with fp16 (or bf16) casts."""
    if dtype is None:
        dtype = {(5, 10): torch.float16, (8, 7): torch.bfloat16}.get((exponent_bits, mantissa_bits))
    names = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
    if dtype not in names:
        raise ValueError("only float16 (5/10) and bfloat16 (8/7) activations are supported; pass dtype= or "
                         f"exponent_bits/mantissa_bits (got {dtype}, {exponent_bits}/{mantissa_bits})")
    done = []
    for name, mod in _select(model, arg):
        for attr in ("input_quantizer", "output_quantizer"):
            if getattr(mod, attr) is not None:
                setattr(mod, attr, FloatQuantizer(names[dtype]))
        done.append(name)
    refresh_layer_records(model)
    return done


def refresh_layer_records(model: nn.Module) -> None:
    """Rewrite config.layers for quantsim layers from the modules (their grids may have been changed)."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    layers = getattr(qc, "layers", None)
    if not isinstance(layers, dict):
        return
    for name, mod in model.named_modules():
        if isinstance(mod, (QATLinear, QuantSimLinear)):
            layers[name] = layer_record(mod)


# ---------------------------------------------------------------------------------------------------- export
def activation_quantizers(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(layer name, "input" | "output", quantizer) for every activation quantizer, in module order."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, (QATLinear, QuantSimLinear)):
            for side in ("input", "output"):
                q = getattr(mod, f"{side}_quantizer")
                if q is not None:
                    out.append((name, side, q))
    return out


def activation_entry(q: nn.Module, name: str, version: str):
    """1.0.0: entry dict; 0.6.1: list with one dict (AIMET layouts)."""
    if isinstance(q, FloatQuantizer):
        extra = {"exponent_bits": 8, "mantissa_bits": 7} if q.dtype_name == "bfloat16" else {}
        if version == "0.6.1":
            return [{"bitwidth": 16, "dtype": "float", **extra}]
        return {"name": name, "dtype": "FLOAT", "bw": 16, "enc_type": "PER_TENSOR", **extra}
    if not q.initialized:
        raise ValueError(f"{name}: activation quantizer has no encoding (run compute_encodings)")
    e = q.encoding()
    if version == "0.6.1":
        return [{"min": e["min"], "max": e["max"], "scale": e["scale"], "offset": e["offset"], "bitwidth": e["bits"],
                 "dtype": "int", "is_symmetric": "False"}]
    return {"name": name, "dtype": "INT", "bw": e["bits"], "is_sym": False, "scale": [e["scale"]],
            "offset": [e["offset"]], "enc_type": "PER_TENSOR"}


def quantizer_args(model: nn.Module) -> dict:
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if getattr(qc, "method", None) != "quantsim":
        return {}
    acts = activation_quantizers(model)
    is_float = any(isinstance(q, FloatQuantizer) for _, _, q in acts)
    bits = [m.bits for m in model.modules() if isinstance(m, (QATLinear, QuantSimLinear))]
    return {"quant_scheme": qc.quant_scheme, "activation_bitwidth": qc.activation_bits or 16,
            "param_bitwidth": max(bits) if bits else qc.weight_bits,
            "dtype": "float" if is_float and qc.activation_dtype != "int" else "int", "is_symmetric": True}


def export_encodings(model: nn.Module, out_dir, version: str = "1.0.0", filename_prefix: str = "model", **kwargs):
    """hf_vq.export.aimet.export_encodings plus the activation encodings of quantsim layers (torch names
    ``<module>.input`` / ``<module>.output``). Same arguments and return value."""
    from hf_vq.export import aimet

    args = {**quantizer_args(model), **(kwargs.pop("quantizer_args", None) or {})}
    acts = {f"{n}.{side}": activation_entry(q, f"{n}.{side}", version) for n, side, q in activation_quantizers(model)}
    return aimet.export_encodings(model, out_dir, version, filename_prefix, quantizer_args=args,
                                  activation_encodings=acts, **kwargs)
