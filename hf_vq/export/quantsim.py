"""AIMET encodings of QuantSim models: hf_vq.export.aimet's exporter plus the activation encodings of the quantsim
layers (torch names ``<module>.input`` / ``<module>.output``)."""

from __future__ import annotations

from torch import nn

from hf_vq.export import aimet
from hf_vq.nn.qat import FloatQuantizer, QATLinear, QuantSimLinear


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
    args = {**quantizer_args(model), **(kwargs.pop("quantizer_args", None) or {})}
    acts = {f"{n}.{side}": activation_entry(q, f"{n}.{side}", version) for n, side, q in activation_quantizers(model)}
    return aimet.export_encodings(model, out_dir, version, filename_prefix, quantizer_args=args,
                                  activation_encodings=acts, **kwargs)
