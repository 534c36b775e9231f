"""The GPTQ checkpoint (AutoGPTQ / GPTQModel ``checkpoint_format: "gptq"``), read by transformers' GPTQ path
(with gptqmodel), vLLM and TGI.

Per layer: ``qweight`` int32 [in*b/32, out] (codes packed along the input, LSB first), ``qzeros`` int32
[G, out*b/32] holding zero - 1 (the v1 convention; readers add 1 back), ``scales`` fp16 [G, out], ``g_idx`` int32
[in] = i // group_size. hf_vq's act-order keeps static groups, so ``desc_act`` is false and readers need no
permutation. A zero point of 0 has no v1 encoding: such a layer raises (export it as compressed-tensors).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from hf_vq.export.common import (ExportError, ExportReport, Layer, copy_tokenizer, float_state_dict,
                                 model_config_dict, write_card, write_json)
from hf_vq.formats.packing import pack
from hf_vq.utils.version import __version__

BITS = (2, 3, 4, 8)
LOAD = """```python
from transformers import AutoModelForCausalLM   # needs optimum + gptqmodel; hf_vq is not needed
model = AutoModelForCausalLM.from_pretrained("<this folder>")
```
vLLM: `vllm serve <this folder>` (4-bit and 8-bit symmetric). GPTQModel: `GPTQModel.load("<this folder>")`."""


def _int32_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, n] codes -> [rows, n*bits/32] int32 words of the LSB-first bit stream (hf_vq's byte packing read as
    little-endian int32)."""
    return pack(codes, bits).contiguous().view(torch.int32)   # _check: n * bits is a multiple of 32


def _check(layer: Layer) -> None:
    w = layer.weight
    if w.bits not in BITS:
        raise ExportError(f"{layer.name}: {w.bits}-bit has no GPTQ checkpoint layout (bits {BITS})")
    if not layer.has_static_groups():
        raise ExportError(f"{layer.name}: g_idx is not i // group_size (desc_act=False needs static groups)")
    for what, n in (("in_features", layer.in_features), ("out_features", layer.out_features)):
        if n * w.bits % 32:
            raise ExportError(f"{layer.name}: {what}={n} x {w.bits} bits is not a whole number of int32 words")
    if bool((w.zeros == 0).any()):
        raise ExportError(f"{layer.name}: a zero point of 0 cannot be stored in the GPTQ v1 format (it stores "
                          "zero - 1); export this model with format='compressed-tensors'")


def _refuse_head(model, layers: dict[str, Layer]) -> None:
    """transformers reads GPTQ checkpoints through optimum, which replaces only the Linears inside the decoder blocks:
    a quantized output head would be left a float Linear without weights (random). Refused by name."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    name = next((n for n, m in model.named_modules() if head is not None and m is head and n), None)
    if name in layers:
        raise ExportError(f"{name}: a quantized output head is not read by transformers' GPTQ path (optimum replaces "
                          "only the Linears inside the decoder blocks; the head would load with random weights); "
                          "export with format='compressed-tensors' or 'gguf', or quantize with lm_head_bits=None")


def write(model, layers: dict[str, Layer], out: Path, report: ExportReport, *, tokenizer, dtype, requantize) -> None:
    _refuse_head(model, layers)
    settings = {(lay.weight.bits, lay.weight.group_size, lay.weight.sym) for lay in layers.values()}
    if len(settings) > 1:
        raise ExportError(f"the GPTQ config holds one bits/group_size/sym for all layers; this model mixes "
                          f"{sorted(settings)} (export it with format='compressed-tensors')")
    bits, group_size, sym = settings.pop()
    tensors = float_state_dict(model, layers, dtype)
    for name, layer in layers.items():
        _check(layer)
        w = layer.weight
        tensors[f"{name}.qweight"] = _int32_words(w.codes.cpu(), bits).t().contiguous()
        tensors[f"{name}.qzeros"] = _int32_words((w.zeros.to(torch.int16) - 1).to(torch.uint8).t().cpu(),
                                                  bits).contiguous()
        tensors[f"{name}.scales"] = w.scales.t().to(torch.float16).cpu().contiguous()
        tensors[f"{name}.g_idx"] = w.g_idx.to(torch.int32).cpu().contiguous()
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.to(torch.float16).cpu().contiguous()
    qc = getattr(model.config, "quantization_config", None)
    in_block = _modules_in_block(model, layers)
    quant = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False, "sym": sym,
             "true_sequential": bool(getattr(qc, "true_sequential", True)),
             "damp_percent": float(getattr(qc, "percdamp", 0.01)), "static_groups": True,
             "checkpoint_format": "gptq", "format": "gptq", "pack_dtype": "int32", "lm_head": "lm_head" in layers,
             "meta": {"quantizer": [f"hf_vq:{__version__}"], "static_groups": True,
                      "hf_vq_method": getattr(qc, "method", None)}}
    if in_block is not None:
        quant["modules_in_block_to_quantize"] = in_block
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json(out / "config.json", model_config_dict(model, quant, dtype))
    write_json(out / "quantize_config.json", quant)
    copy_tokenizer(model, tokenizer, out)
    write_card(out, model, "GPTQ (checkpoint_format gptq)", LOAD, report)


def _modules_in_block(model, layers: dict[str, Layer]) -> list[list[str]] | None:
    """None when every Linear inside the decoder blocks is quantized (readers assume so); else the quantized names
    relative to a block, which readers use to leave the others dense."""
    float_in_block = [n for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and n not in layers and ".layers." in n]
    if not float_in_block:
        return None
    local = sorted({n.split(".layers.", 1)[1].split(".", 1)[1] for n in layers if ".layers." in n})
    return [local]
