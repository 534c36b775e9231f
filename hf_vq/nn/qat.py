"""QuantSim-style modules: fake-quantized Linear for QAT, its folded inference form, activation quantizers.

- ``QATLinear``: trainable latent weight + learnable weight scale (symmetric signed grid), straight-through rounding
  (LSQ-style gradients reach the scale). The scale is learned in log space (``log_scale``) so one Trainer learning
  rate moves every scale by the same relative amount, however small it is. The scale used in the forward is rounded to fp16 (straight-through) so the
  folded :class:`QuantSimLinear` (fp16 scales, like QuantLinear) computes exactly the same weight. Granularities:
  per channel, blockwise (a shorter last block is allowed) and LPBQ (learnable per-channel scale x fixed int block
  scales in [1, 2^(dbw - bw)]). Its ``state_dict`` holds the latents; ``folded_state_dict(model)`` gives the
  checkpoint form, and ``load_state_dict`` accepts that form too (rebuilding latents: Trainer resume).
- ``QuantSimLinear`` (layer type "quantsim"): a QuantLinear with optional input/output activation quantizers.
- ``ActQuantizer``: AIMET asymmetric affine fake-quant on the unsigned grid [0, 2^bw - 1] with learnable ``min`` /
  ``max`` (fp32 Parameters, kept fp32 under ``model.to(dtype)``); ``FloatQuantizer``: a cast to fp16 / bf16.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn

from hf_vq.formats import blockwise
from hf_vq.formats.affine import FP16_MIN_SCALE, SCALE_DTYPE, AffineWeight, fp16_up, group_index, round_ste
from hf_vq.formats.encodings import affine_encoding
from hf_vq.nn.qlinear import QuantLinear
from hf_vq.nn.records import (QUANTSIM_SCHEMA, WEIGHT_GRANULARITIES, check_finite_positive, quantsim_rules,
                              validate_record)
from hf_vq.nn.registry import register_layer_type
from hf_vq.utils.modules import set_module

def _keep_fp32(module: nn.Module, fn, names) -> None:
    """Re-apply ``fn`` to the tensors ``names`` of ``module`` for device only (model.to(bf16) keeps them fp32)."""
    for n in names:
        t = module._parameters.get(n)
        if t is not None and t.dtype != torch.float32:
            probe = fn(torch.empty(0))
            module._parameters[n] = nn.Parameter(t.data.float().to(probe.device), requires_grad=t.requires_grad)


# ---------------------------------------------------------------------------------------- activation quantizers
class ActQuantizer(nn.Module):
    """Asymmetric int fake-quant: scale = (max - min)/(2^bw - 1), offset = round(min/scale) in [-(2^bw - 1), 0],
    x_hat = (clamp(round(x/scale) - offset, 0, 2^bw - 1) + offset) * scale (AIMET's exported convention)."""

    kind = "int"

    def __init__(self, bits: int = 16):
        super().__init__()
        if bits not in (4, 8, 16):
            raise ValueError(f"activation bits must be 4, 8 or 16, got {bits!r}")
        self.bits = bits
        self.min = nn.Parameter(torch.zeros((), dtype=torch.float32))
        self.max = nn.Parameter(torch.zeros((), dtype=torch.float32))
        self.observer = None  # set by quantsim.compute_encodings: observe, do not quantize
        self.enabled = True

    def spec(self) -> dict:
        return {"kind": "int", "bits": self.bits}

    @property
    def initialized(self) -> bool:
        return bool(self.max.detach() > self.min.detach())

    @torch.no_grad()
    def set_range(self, lo: float, hi: float) -> None:
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)  # the grid always contains 0
        if hi - lo < 1e-8:
            hi = lo + 1e-8
        self.min.fill_(lo)
        self.max.fill_(hi)

    def grid(self):
        """(scale, offset) as differentiable tensors."""
        qmax = 2**self.bits - 1
        scale = ((self.max - self.min) / qmax).clamp(min=1e-10)
        offset = torch.clamp(round_ste(self.min / scale), -qmax, 0)
        return scale, offset

    @torch.no_grad()
    def encoding(self) -> dict:
        scale, offset = self.grid()
        return {"bits": self.bits, "scale": float(scale), "offset": int(offset), "min": float(offset * scale),
                "max": float((offset + 2**self.bits - 1) * scale)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(x)
            return x
        if not self.enabled:
            return x
        if not self.initialized:
            raise RuntimeError("activation quantizer has no encoding: run hf_vq.compute_encodings first")
        scale, offset = self.grid()
        xf = x.float()
        q = torch.clamp(round_ste(xf / scale) - offset, 0, 2**self.bits - 1)
        return ((q + offset) * scale).to(x.dtype)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        _keep_fp32(self, fn, ("min", "max"))
        return self

    def extra_repr(self) -> str:
        return f"bits={self.bits}, min={float(self.min.detach()):.4g}, max={float(self.max.detach()):.4g}"


class FloatQuantizer(nn.Module):
    """Floating-point activation 'quantizer': a round trip through fp16 (or bf16); gradients pass the cast."""

    kind = "float"
    DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

    def __init__(self, dtype: str = "float16"):
        super().__init__()
        if dtype not in self.DTYPES:
            raise ValueError(f"float activation dtype must be one of {sorted(self.DTYPES)}, got {dtype!r}")
        self.dtype_name = dtype
        self.observer = None
        self.enabled = True

    def spec(self) -> dict:
        return {"kind": "float", "dtype": self.dtype_name}

    @property
    def bits(self) -> int:
        return 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None or not self.enabled:
            return x
        return x.to(self.DTYPES[self.dtype_name]).to(x.dtype)

    def extra_repr(self) -> str:
        return self.dtype_name


def build_act_quantizer(spec: dict | None) -> nn.Module | None:
    if spec is None:
        return None
    if spec.get("kind") == "int":
        return ActQuantizer(spec["bits"])
    if spec.get("kind") == "float":
        return FloatQuantizer(spec.get("dtype", "float16"))
    raise ValueError(f"unknown activation quantizer spec {spec!r}")


def _spec(q: nn.Module | None) -> dict | None:
    return None if q is None else q.spec()


# ------------------------------------------------------------------------------------------ inference module
@register_layer_type("quantsim")
class QuantSimLinear(QuantLinear):
    """QuantLinear (symmetric weight grid) with optional activation quantizers on its input and output."""

    tensor_names = QuantLinear.tensor_names + ("input_quantizer.min", "input_quantizer.max",
                                               "output_quantizer.min", "output_quantizer.max")
    exact_decode = True  # a simulation: no bf16 decode kernel, identical to the QAT forward it was folded from

    def __init__(self, *args, input_quantizer: nn.Module | None = None, output_quantizer: nn.Module | None = None,
                 granularity: str = "per_channel", decompressed_bits: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.input_quantizer = input_quantizer
        self.output_quantizer = output_quantizer
        self.granularity, self.decompressed_bits = granularity, decompressed_bits

    def layer_record(self) -> dict:
        return {**super().layer_record(), "granularity": self.granularity, "decompressed_bits": self.decompressed_bits,
                "input_quantizer": _spec(self.input_quantizer), "output_quantizer": _spec(self.output_quantizer)}

    record_schema, record_rules = QUANTSIM_SCHEMA, staticmethod(quantsim_rules)

    @classmethod
    def from_record(cls, record: dict, dtype=None, where: str = "layer record") -> "QuantSimLinear":
        validate_record(record, cls.record_schema, where, cls.record_rules)
        return cls(record["in_features"], record["out_features"], record["bits"], record["group_size"],
                   bias=record["bias"], sym=record["sym"], dtype=dtype,
                   input_quantizer=build_act_quantizer(record.get("input_quantizer")),
                   output_quantizer=build_act_quantizer(record.get("output_quantizer")),
                   granularity=record.get("granularity", "per_channel"),
                   decompressed_bits=record.get("decompressed_bits"))

    def check_stored(self, where: str) -> None:
        super().check_stored(where)
        for side in ("input_quantizer", "output_quantizer"):
            q = getattr(self, side)
            for p in ("min", "max"):
                t = getattr(q, p, None) if q is not None else None
                if isinstance(t, torch.Tensor):
                    check_finite_positive(t.detach(), f"{where}.{side}.{p}", positive=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        y = super().forward(x)
        return y if self.output_quantizer is None else self.output_quantizer(y)


# -------------------------------------------------------------------------------------------------- QAT module
class QATLinear(nn.Module):
    """Fake-quantized Linear for QAT; ``fold()`` returns the equivalent QuantSimLinear (identical forward)."""

    layer_type = "quantsim"  # its checkpoint (folded) form; reload builds a QuantSimLinear
    GRANULARITIES = WEIGHT_GRANULARITIES

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int, granularity: str = "per_channel",
                 block_size: int = 64, decompressed_bits: int = 8, input_quantizer: nn.Module | None = None,
                 output_quantizer: nn.Module | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.latent = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.input_quantizer = input_quantizer
        self.output_quantizer = output_quantizer
        self.set_weight_grid(bits, granularity, block_size, decompressed_bits)

    # ----------------------------------------------------------------------------------------- grid setup
    @torch.no_grad()
    def set_weight_grid(self, bits: int, granularity: str, block_size: int = 64, decompressed_bits: int = 8):
        """(Re)initialize the weight quantizer from the latent with AIMET's symmetric min-max rule."""
        if granularity not in self.GRANULARITIES:
            raise ValueError(f"granularity must be one of {self.GRANULARITIES}, got {granularity!r}")
        k = self.in_features
        self.bits, self.granularity = int(bits), granularity
        self.block = k if granularity == "per_channel" else int(block_size)
        self.decompressed_bits = int(decompressed_bits) if granularity == "lpbq" else None
        w = self.latent.detach()
        dev = w.device
        self._buffers.pop("int_scale", None)
        if granularity == "lpbq":
            aw = blockwise.lpbq_affine_weight(w, self.bits, self.block, self.decompressed_bits)  # checks divisibility
            pc, ints = blockwise.factor_lpbq(aw.scales.float(), self.bits, self.decompressed_bits)
            self.log_scale = nn.Parameter(torch.log(pc[:, None]).to(dev))
            self.register_buffer("int_scale", ints.to(dev), persistent=False)
        else:
            raw, _ = blockwise.minmax_grid(self._padded(w), self.bits, True, (1, self.block))
            self.log_scale = nn.Parameter(torch.log(fp16_up(raw)).to(dev))

    def _padded(self, w: torch.Tensor) -> torch.Tensor:
        extra = (-self.in_features) % self.block
        return F.pad(w, (0, extra)) if extra else w

    @property
    def scale(self) -> torch.Tensor:
        """Learnable scale: per channel/block, or LPBQ's per-channel float scale [out, 1]."""
        return torch.exp(self.log_scale)

    @property
    def group_size(self) -> int:
        return -1 if self.granularity == "per_channel" else self.block

    # ---------------------------------------------------------------------------------------------- math
    def block_scale(self) -> torch.Tensor:
        """[out, n_blocks] scales actually used (fp16-exact, straight-through w.r.t. the learnable scale)."""
        if self.granularity == "lpbq":
            pc = self.scale.clamp(min=2.0**-24)
            exact = _fp16_exact_nearest(pc.detach(), self.decompressed_bits - self.bits)
            return (pc + (exact - pc).detach()) * self.int_scale
        s = self.scale.clamp(min=FP16_MIN_SCALE)
        return s + (s.detach().to(SCALE_DTYPE).float() - s).detach()

    def _codes(self, scale: torch.Tensor, ste: bool) -> torch.Tensor:
        """Signed codes [out, in] (float) of the latent on the grid ``scale`` [out, n_blocks]."""
        w = self._padded(self.latent)
        n = w.shape[1] // self.block
        x = w.reshape(self.out_features, n, self.block) / scale[:, :, None]
        r = round_ste(x) if ste else torch.round(x)
        q = torch.clamp(r, -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1)
        return q, n

    def weight_qdq(self) -> torch.Tensor:
        s = self.block_scale()
        q, n = self._codes(s, ste=True)
        return (q * s[:, :, None]).reshape(self.out_features, n * self.block)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.weight_qdq()
        y = F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return y if self.output_quantizer is None else self.output_quantizer(y)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        _keep_fp32(self, fn, ("latent", "log_scale"))  # bf16 latents/scales would move the grid
        return self

    # ------------------------------------------------------------------------------------------- folding
    @torch.no_grad()
    def affine_weight(self) -> AffineWeight:
        s = self.block_scale().detach()
        q, _ = self._codes(s, ste=False)
        zero = 2 ** (self.bits - 1)
        codes = (q.reshape(self.out_features, -1)[:, : self.in_features] + zero)
        return AffineWeight(codes, s, torch.full_like(s, zero), group_index(self.in_features, self.group_size,
                                                                              s.device), self.bits, self.group_size,
                            True)

    @torch.no_grad()
    def fold(self) -> QuantSimLinear:
        mod = QuantSimLinear.from_affine(self.affine_weight(), self.bias,
                                         input_quantizer=copy.deepcopy(self.input_quantizer),
                                         output_quantizer=copy.deepcopy(self.output_quantizer),
                                         granularity=self.granularity, decompressed_bits=self.decompressed_bits)
        for q in (mod.input_quantizer, mod.output_quantizer):
            if q is not None:
                q.requires_grad_(False)
        return mod

    @classmethod
    def from_quantlinear(cls, mod: QuantLinear) -> "QATLinear":
        """QAT module whose latent is ``mod``'s dequantized weight on ``mod``'s grid (symmetric layers only)."""
        if not mod.sym:
            raise ValueError("QAT needs a symmetric weight grid (AIMET-style); this layer is asymmetric")
        gran = getattr(mod, "granularity", "per_channel" if mod.group_size == -1 else "blockwise")
        new = cls(mod.dequantize_weight(torch.float32), mod.bias, mod.bits, gran,
                  mod.group_size if mod.group_size != -1 else 64, getattr(mod, "decompressed_bits", None) or 8,
                  copy.deepcopy(getattr(mod, "input_quantizer", None)),
                  copy.deepcopy(getattr(mod, "output_quantizer", None)))
        new._load_grid(mod.scales.float())
        return new

    @torch.no_grad()
    def _load_grid(self, scales: torch.Tensor) -> None:
        """Set the learnable scale from stored per-group scales [out, G] (checkpoint form)."""
        if self.granularity == "lpbq":
            f = blockwise.factor_lpbq(scales, self.bits, self.decompressed_bits)
            if f is None:
                raise ValueError("stored scales are not an LPBQ grid")
            self.log_scale.data.copy_(torch.log(f[0][:, None]))
            self.int_scale.copy_(f[1])
        else:
            self.log_scale.data.copy_(torch.log(scales))

    def layer_record(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "sym": True, "bias": self.bias is not None,
                "granularity": self.granularity, "decompressed_bits": self.decompressed_bits,
                "input_quantizer": _spec(self.input_quantizer), "output_quantizer": _spec(self.output_quantizer)}

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        return self.fold().to_linear(dtype)

    def bits_per_value(self) -> float:
        return self.fold().bits_per_value()  # what save_pretrained stores

    def aimet_param_encodings(self, version: str) -> dict:
        dbw = self.decompressed_bits or 8
        return {"weight": affine_encoding(self.fold(), "weight", version, decompressed_bw=dbw)}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        folded = [k for k in ("qweight", "scales", "qzeros", "g_idx") if prefix + k in state_dict]
        if not folded:
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        # checkpoint (folded) form, possibly split over shards: rebuild the latent once every piece arrived
        pending = self.__dict__.setdefault("_pending", {})
        pending.update({k: state_dict[prefix + k] for k in folded})
        if prefix + "bias" in state_dict and self.bias is not None:
            self.bias.data.copy_(state_dict[prefix + "bias"])
        if {"qweight", "scales", "qzeros", "g_idx"} <= set(pending):
            ref = QuantLinear(self.in_features, self.out_features, self.bits, self.group_size, bias=False, sym=True)
            try:  # refuse (not cast) wrong dtypes, and out-of-range values, before they reach the latent
                ref.check_tensors(pending, prefix.rstrip(".") or "state_dict")
            except ValueError:
                pending.clear()
                raise
            for k in ("qweight", "scales", "qzeros", "g_idx"):
                getattr(ref, k).copy_(pending[k])
            with torch.no_grad():
                self.latent.copy_(ref.dequantize_weight(torch.float32))
                self._load_grid(ref.scales.float())
            pending.clear()


def _fp16_exact_nearest(pc: torch.Tensor, int_bits: int) -> torch.Tensor:
    """Nearest value with <= 11 - int_bits significant bits on the 2^-24 grid: every int*pc (int <= 2^int_bits) is
    then exact in fp16 (same set as blockwise._fp16_exact_per_channel, which rounds up)."""
    keep = 11 - int_bits
    m, e = torch.frexp(pc.clamp(min=2.0**-24))
    pc = torch.ldexp(torch.round(m * 2**keep) / 2**keep, e)
    return torch.round(pc * 2**24).clamp(min=1) / 2**24


# ----------------------------------------------------------------------------------------------- model helpers
def qat_modules(model: nn.Module) -> dict[str, QATLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QATLinear)}


@torch.no_grad()
def folded_state_dict(model: nn.Module, loaded=None) -> dict[str, torch.Tensor] | None:
    """``model.state_dict()`` with every QATLinear replaced by its folded QuantSimLinear tensors (no ``*.latent``,
    ``*.log_scale``); None when the model has no QAT layer. ``loaded(module)``: a context in which the module's
    tensors are readable (modules offloaded to disk keep them on the meta device)."""
    mods = qat_modules(model)
    if not mods:
        return None
    sd = model.state_dict()
    for name, mod in mods.items():
        prefix = f"{name}." if name else ""
        for k in [k for k in sd if k.startswith(prefix) and "." not in k[len(prefix):]]:
            del sd[k]
        for k in [k for k in sd if k.startswith(prefix + "input_quantizer.") or k.startswith(prefix + "output_quantizer.")]:
            del sd[k]
        with loaded(mod) if loaded is not None else contextlib.nullcontext():
            folded = mod.fold().state_dict()
        for k, v in folded.items():
            sd[prefix + k] = v
    return sd


def prepare_qat(model: nn.Module) -> nn.Module:
    """Turn a reloaded model's QuantSimLinear layers back into QATLinear (latent = stored quantized weight)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantSimLinear):
            set_module(model, name, QATLinear.from_quantlinear(mod))
    return model
