"""``export_checkpoint``: write an affine-quantized hf_vq model in a format that other software loads without hf_vq.

Formats (one module each): ``compressed-tensors`` (pack-quantized: transformers, vLLM), ``gptq`` (AutoGPTQ/GPTQModel
layout: transformers' GPTQ path, vLLM, TGI) and ``gguf`` (llama.cpp). The exported codes and scales are hf_vq's own:
a layer the target cannot represent exactly raises :class:`ExportError` naming the layer and the reason. Only with
``requantize=True`` is such a layer rounded onto the target grid (GGUF only), and the report gives the added error.

The output is a complete model folder, written beside ``out_dir`` and renamed into place when complete: config.json
(with the target's ``quantization_config``), tokenizer files, the weights, and a README.md saying how it was made.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from hf_vq.export import compressed_tensors, gguf, gptq
from hf_vq.export.common import ExportError, ExportReport, affine_layers, reads_whole_model, write_folder

logger = logging.getLogger(__name__)
WRITERS = {"compressed-tensors": compressed_tensors.write, "gptq": gptq.write, "gguf": gguf.write}
__all__ = ["ExportError", "ExportReport", "WRITERS", "export_checkpoint"]


@reads_whole_model
def export_checkpoint(model: nn.Module, out_dir: str | os.PathLike, format: str, *, tokenizer=None,
                      requantize: bool = False, dtype: torch.dtype | str | None = None,
                      overwrite: bool = False, gguf_pre_tokenizer: str = "default") -> ExportReport:
    """Write ``model`` (affine hf_vq layers: GPTQ, RTN, AdaScale, QuantSim weights) to ``out_dir`` in ``format``:
    "compressed-tensors", "gptq" or "gguf". ``tokenizer``: saved with the export (default: the tokenizer files of
    the model's source folder). ``dtype``: cast of the float tensors (default: as in the model; GGUF: F16 matrices,
    F32 vectors). ``requantize``: round layers the format can't hold exactly onto its grid (GGUF) instead of raising.
    ``gguf_pre_tokenizer``: llama.cpp's pre-tokenizer name for the GGUF metadata (e.g. "smollm", "llama-bpe").
    Returns an :class:`ExportReport`."""
    if format not in WRITERS:
        raise ValueError(f"format must be one of {sorted(WRITERS)}, got {format!r}")
    if isinstance(dtype, str):
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
        dtype = getattr(torch, dtype)
    if not isinstance(requantize, bool):
        raise ValueError(f"requantize must be True or False, got {requantize!r}")
    options = {"pre_tokenizer": gguf_pre_tokenizer} if format == "gguf" else {}
    layers = affine_layers(model)
    report = ExportReport(format, Path(out_dir), layers=len(layers))
    write_folder(out_dir, overwrite, lambda tmp: WRITERS[format](model, layers, tmp, report, tokenizer=tokenizer,
                                                                 dtype=dtype, requantize=requantize, **options))
    report.files = sorted(p.name for p in Path(out_dir).iterdir())
    logger.info("hf_vq export: %d layers to %s (%s)%s", len(layers), out_dir, format,
                f", {len(report.requantized)} re-quantized" if report.requantized else "")
    return report
