"""``hf-vq info DIR``: what a saved hf_vq checkpoint holds, read from config.json and the safetensors headers.

No weights are loaded: the model is built on the meta device from config.json, the quantized layers from the
config's layer records, and the checkpoint's tensors are checked against them by name, shape and dtype.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from hf_vq.cli.common import use_help_format

HELP = "show what an hf_vq checkpoint holds: method, bits per weight, layers kept in float and why, size"

# settings shown for each method besides the fields that differ from their defaults
MAIN_SETTINGS = {
    "rtn": ("bits", "group_size", "sym"),
    "gptq": ("bits", "group_size", "sym", "act_order", "percdamp"),
    "gptvq": ("vector_dim", "index_bits", "codebook_bits", "rows_per_block", "cols_per_block"),
    "adascale": ("bits", "group_size", "sym", "weight_granularity", "num_iterations"),
    "quantsim": ("weight_bits", "weight_granularity", "block_size", "activation_bits", "activation_dtype"),
}
NOT_SETTINGS = ("quant_method", "method", "layers", "calibration", "loading", "format_version")
HEAD = "output head"


def add_info_args(i: argparse.ArgumentParser) -> None:
    use_help_format(i, HELP)
    i.add_argument("model", help="folder of an hf_vq checkpoint (save_pretrained output)")
    i.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")


def _settings(cfg) -> dict:
    """The method's main settings and every field that differs from its default."""
    fields = type(cfg).schema.fields
    main = MAIN_SETTINGS.get(cfg.method, ())
    return {k: v for k, v in cfg.to_dict().items()
            if k not in NOT_SETTINGS and (k in main or (k in fields and v != fields[k].default))}


def _meta_model(directory: Path):
    """The float model of config.json on the meta device (no weights read)."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        if cls is not None:
            return cls._from_config(config)
        return AutoModelForCausalLM.from_config(config)


def _float_reasons(model, cfg, skip: list[str], layers: dict) -> dict[str, str]:
    """{module: why it is float} for every weight-bearing module the checkpoint keeps in float."""
    from torch import nn

    from hf_vq.model import targets

    head = targets.output_head(model)
    plan = targets.plan_targets(model, cfg, skip + ([head] if head and getattr(cfg, "lm_head_bits", None) else []))
    floats = {n: r for n, r in plan.floats.items() if n not in layers}
    for name in [*plan.linears, *plan.experts]:
        if name not in layers:
            floats[name] = "not quantized by the run (e.g. not reached by calibration)"
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    for name, reason in list(floats.items()):
        if name == head:
            floats[name] = f"{HEAD} (tied to the input embedding)" if tied else \
                f"{HEAD} (kept in float; --lm-head-bits quantizes it)"
        elif reason == targets.EXCLUDED and isinstance(model.get_submodule(name), nn.Embedding):
            floats[name] = targets.EMBEDDING
    return dict(sorted(floats.items()))


def _safetensors_headers(directory: Path) -> dict[str, tuple[list[int], str]]:
    from safetensors import safe_open

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                sl = sf.get_slice(key)
                out[key] = (list(sl.get_shape()), sl.get_dtype())
    return out


_ST_BYTES = {"U8": 1, "I8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def checkpoint_info(directory: str | Path) -> dict:
    """What the checkpoint in ``directory`` holds (the dict ``hf-vq info --json`` prints)."""
    import torch

    from hf_vq.config import QUANT_METHOD, HfVQConfig
    from hf_vq.integrations.quantizer import HfVQQuantizer
    from hf_vq.model import convert
    from hf_vq.model.checkpoint import check_checkpoint, checkpoint_renamer, quantized_tensor_keys
    from hf_vq.utils.io import read_json

    d = Path(directory)
    if not (d / "config.json").is_file():
        raise ValueError(f"{d}: no config.json here; pass the folder of a saved hf_vq checkpoint")
    raw = read_json(d / "config.json", what="config.json")
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{d}: not an hf_vq checkpoint (config.json has no hf_vq quantization_config)")
    cfg = HfVQConfig.from_dict(qc)
    if not cfg.layers:
        raise ValueError(f"{d}: config.json's hf_vq config lists no quantized layers ('layers')")
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{d}: no safetensors weight files")

    model = _meta_model(d)
    quantizer = HfVQQuantizer(cfg)
    skip = quantizer.get_modules_to_not_convert(model, cfg.modules_to_not_convert,
                                                getattr(model, "_keep_in_fp32_modules", None))
    floats = _float_reasons(model, cfg, skip, cfg.layers)
    dtype = getattr(model.config, "dtype", None) or torch.float32
    with torch.device("meta"):
        convert.build_skeleton(model, cfg.layers, dtype if isinstance(dtype, torch.dtype) else torch.float32)
    check_checkpoint(model, cfg.layers, [str(f) for f in files], quantizer)  # names, shapes and dtypes

    layers, weights, bits = {}, 0, 0.0
    for name, record in cfg.layers.items():
        m = model.get_submodule(name)
        n = m.num_weights() if hasattr(m, "num_weights") else m.in_features * m.out_features
        bpw = m.bits_per_value()
        layers[name] = {"type": record.get("type"), "weights": n, "bits_per_weight": bpw,
                        **{k: record[k] for k in ("bits", "group_size", "sym", "index_bits", "vector_dim")
                           if record.get(k) is not None}}
        weights += n
        bits += bpw * n
    by_type: dict[str, int] = {}
    for rec in layers.values():
        by_type[rec["type"]] = by_type.get(rec["type"], 0) + 1

    rename = checkpoint_renamer(model, quantizer)  # checkpoint key -> module key (e.g. Gemma3's language_model)
    nbytes = {(rename(k) or k): _ST_BYTES.get(dt, 0) * _numel(shape)
              for k, (shape, dt) in _safetensors_headers(d).items()}
    quant_keys = set(quantized_tensor_keys(cfg.layers, nbytes))
    float_tensor_bytes = sum(b for k, b in nbytes.items() if k not in quant_keys)
    disk = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    return {
        "path": str(d),
        "method": cfg.method,
        "settings": _settings(cfg),
        "quantized_layers": len(layers),
        "quantized_by_type": by_type,
        "bits_per_weight": bits / weights,
        "quantized_weights": weights,
        "float": floats,
        "size_on_disk_bytes": disk,
        "safetensors_bytes": sum(f.stat().st_size for f in files),
        "quantized_tensor_bytes": sum(nbytes[k] for k in quant_keys),
        "float_tensor_bytes": float_tensor_bytes,
        "layers": layers,
    }


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _fold(names: list[str]) -> list[str]:
    """Names that differ only in block index folded into one: model.layers.*.mlp.down_proj (24)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", name), []).append(name)
    return [f"{p} ({len(ns)})" if len(ns) > 1 else ns[0] for p, ns in groups.items()]


def format_info(info: dict) -> str:
    lines = [f"checkpoint: {info['path']}", f"method: {info['method']}"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in info["settings"].items()]
    types = ", ".join(f"{n} {t}" for t, n in info["quantized_by_type"].items())
    lines.append(f"quantized layers: {info['quantized_layers']} ({types})")
    bpw = [rec["bits_per_weight"] for rec in info["layers"].values()]
    spread = f" (per layer {min(bpw):.3f} to {max(bpw):.3f})" if max(bpw) - min(bpw) > 1e-9 else ""
    lines.append(f"bits per weight of the quantized layers: {info['bits_per_weight']:.3f}{spread}")
    by_reason: dict[str, list[str]] = {}
    for name, reason in info["float"].items():
        by_reason.setdefault(reason, []).append(name)
    lines.append(f"kept in float: {len(info['float'])} weight-bearing modules" + (":" if by_reason else ""))
    for reason, names in by_reason.items():
        lines.append(f"  {reason}: {', '.join(_fold(names))}")
    lines.append(f"size on disk: {_size(info['size_on_disk_bytes'])} (weights {_size(info['safetensors_bytes'])}: "
                 f"quantized tensors {_size(info['quantized_tensor_bytes'])}, float tensors "
                 f"{_size(info['float_tensor_bytes'])})")
    return "\n".join(lines)


def cmd_info(args):
    info = checkpoint_info(args.model)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
