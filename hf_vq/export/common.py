"""What the checkpoint exporters share: the affine layers of a model, its float tensors, tokenizer files, config,
model card, and a folder written beside its destination and moved into place when complete."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from hf_vq.formats.affine import AffineWeight, group_index
from hf_vq.nn.qat import QATLinear
from hf_vq.nn.qlinear import QuantLinear
from hf_vq.nn.registry import LAYER_TYPES
from hf_vq.pipeline import placement
from hf_vq.utils.io import atomic_write_text
from hf_vq.utils.version import __version__

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


class ExportError(ValueError):
    """The model (or one of its layers) cannot be written exactly in the requested format."""


@dataclass
class ExportReport:
    format: str
    out_dir: Path
    layers: int = 0
    files: list[str] = field(default_factory=list)
    requantized: dict[str, float] = field(default_factory=dict)   # layer -> relative weight error added
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "out_dir": str(self.out_dir), "layers": self.layers, "files": self.files,
                "requantized": self.requantized, "notes": self.notes}


@dataclass
class Layer:
    """One quantized Linear as the exporters see it: the hf_vq grid and the module's bias."""

    name: str
    weight: AffineWeight
    bias: torch.Tensor | None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def has_static_groups(self) -> bool:
        """True when column i belongs to group i // group_size (what every target format assumes)."""
        expected = group_index(self.in_features, self.weight.group_size, self.weight.g_idx.device)
        return bool(torch.equal(self.weight.g_idx, expected))

    def dequantize(self) -> torch.Tensor:
        return self.weight.dequantize(torch.float32)


def affine_layers(model: nn.Module) -> dict[str, Layer]:
    """Every hf_vq quantized layer of ``model`` as an affine :class:`Layer`; raises for layers without an affine grid
    (GPTVQ, experts modules, unknown types)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QATLinear):
            mod = mod.fold()
        if isinstance(mod, QuantLinear):
            bias = None if mod.bias is None else mod.bias.detach()
            out[name] = Layer(name, mod.affine_weight(), bias)
        elif getattr(mod, "layer_type", None) in LAYER_TYPES:
            kind = mod.layer_type
            why = ("a vector-quantized (GPTVQ) layer has codebooks, not a per-group scale and zero point"
                   if kind == "vq" else f"hf_vq layer type {kind!r} has no affine export")
            raise ExportError(f"{name}: {why}; the target formats store affine grids only (GPTQ, RTN, AdaScale, "
                              "QuantSim weights)")
    if not out:
        raise ExportError("the model has no hf_vq quantized layer to export")
    return out


def float_state_dict(model: nn.Module, layers: dict[str, Layer], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The model's other tensors (embeddings, norms, float Linears), tied copies dropped, in ``dtype`` if given."""
    prefixes = tuple(f"{n}." for n in layers)
    seen: dict[tuple, str] = {}
    out = {}
    for key, t in model.state_dict().items():
        if key.startswith(prefixes):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:   # tied weights (lm_head = embed_tokens): the reader re-ties them from config
            continue
        seen[ident] = key
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[key] = t.contiguous().cpu()
    return out


def source_dir(model: nn.Module) -> Path | None:
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return Path(path) if path and Path(path).is_dir() else None


def copy_tokenizer(model: nn.Module, tokenizer, out: Path) -> list[str]:
    """Tokenizer files from ``tokenizer`` (saved) or the model's source folder; [] if neither has any."""
    if tokenizer is not None:
        return list(tokenizer.save_pretrained(out))
    src = source_dir(model)
    copied = []
    for name in TOKENIZER_FILES if src else ():
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    return copied


def model_config_dict(model: nn.Module, quantization_config: dict | None, dtype: torch.dtype | None) -> dict:
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    if dtype is not None:
        cfg["dtype"] = str(dtype).removeprefix("torch.")
    return cfg


def hf_vq_summary(model: nn.Module) -> dict[str, Any]:
    qc = getattr(model.config, "quantization_config", None)
    d = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc or {})
    return {k: v for k, v in d.items() if k not in ("layers", "loading")}


def reads_whole_model(export: Callable) -> Callable:
    """An export that reads every quantized tensor: where modules are offloaded to disk (their tensors on the meta
    device), the whole model is loaded into CPU memory for the export and put back afterwards."""
    @functools.wraps(export)
    def run(model: nn.Module, *args, **kwargs):
        offloaded = any(t.is_meta for t in model.state_dict().values())
        with placement.onloaded(model, torch.device("cpu")) if offloaded else contextlib.nullcontext():
            return export(model, *args, **kwargs)
    return run


def write_card(out: Path, model: nn.Module, fmt: str, how_to_load: str, report: ExportReport) -> None:
    summary = hf_vq_summary(model)
    settings = ", ".join(f"{k}={v}" for k, v in summary.items() if v is not None and k != "quant_method")
    lines = [f"# {out.name}", "",
             f"Quantized with hf_vq {__version__} ({summary.get('method', '?')}: {settings}) from "
             f"`{getattr(model, 'name_or_path', '') or 'a local model'}`, exported by `hf_vq.export_checkpoint` to "
             f"the **{fmt}** format ({report.layers} quantized layers). The stored codes and scales are the ones "
             "hf_vq computed: the export is exact unless listed below.", "", "## Load", "", how_to_load, ""]
    if report.requantized:
        lines += ["## Re-quantized layers (`requantize=True`)", "", "| layer | relative weight error added |",
                  "|---|---|"] + [f"| {n} | {e:.3g} |" for n, e in report.requantized.items()] + [""]
    if report.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    atomic_write_text(out / "README.md", "\n".join(lines))


def write_json(path: Path, doc: dict) -> None:
    atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_folder(out_dir: str | os.PathLike, overwrite: bool, fill: Callable[[Path], None]) -> Path:
    """Run ``fill(tmp)`` on a fresh sibling folder, then move it to ``out_dir`` (replacing it only if ``overwrite``):
    ``out_dir`` is never seen half-written, and the temp folder is removed on failure."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".export", dir=out.parent))
    old = None
    try:
        fill(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out
