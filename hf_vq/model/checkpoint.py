"""Checks of a saved hf_vq checkpoint around transformers' loading, so that nothing wrong loads silently.

Before loading (model skeleton on meta): ``validate_layer_records`` checks config.json's per-layer records against
each layer type's schema; ``check_checkpoint`` reads only the safetensors headers and requires every quantized tensor
with exactly its shape and dtype (transformers would cast a float32 ``qweight``, or only warn and leave random values).
Checkpoint keys are matched to module names through transformers' own key renaming (its conversion mapping, as
``from_pretrained`` applies it: Gemma3's ``language_model.model.*``, Mixtral's ``block_sparse_moe.*``, ...).

After loading: ``check_loaded`` runs each layer's value-range checks on the loaded tensors (finite positive scales,
zero-points inside the grid, ``g_idx`` in range, ...) and, when the checkpoint carries checksums, compares the sha256
of each quantized tensor's bytes. The range checks cannot see a flipped bit that leaves a value valid; only the
checksum does. Checksums are written when asked (``model.hf_quantizer.save_checksums = True`` or
``hf_vq.save_pretrained_safely(..., checksums=True)``) into the safetensors header metadata under ``hf_vq.sha256``.
They detect corruption, not tampering: whoever can rewrite the tensors can rewrite the header.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Callable

import torch
from torch import nn

import hf_vq.nn  # noqa: F401  (registers the layer types)
from hf_vq.nn.records import CheckpointError, validate_record
from hf_vq.pipeline import placement
from hf_vq.nn.registry import LAYER_TYPES

CHECKSUM_KEY = "hf_vq.sha256"
_SHA256 = re.compile(r"[0-9a-f]{64}")
# safetensors header dtype names
_ST_DTYPES = {torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
              torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
              torch.bool: "BOOL"}


def _where(name: str) -> str:
    return f"config.json quantization_config.layers[{name!r}]"


def validate_layer_records(layers: Any) -> None:
    """Every record an object of a known layer type that satisfies that type's schema (errors name the layer and the
    field: ``layers['model.layers.0.mlp.up_proj'].bits: expected an integer, got a string '4'``)."""
    if not isinstance(layers, dict):
        raise CheckpointError(f"config.json quantization_config.layers: expected an object {{layer name: record}}, "
                              f"got {type(layers).__name__}")
    for name, record in layers.items():
        where = _where(name)
        if not isinstance(record, dict):
            raise CheckpointError(f"{where}: expected an object (a layer record), got {type(record).__name__}")
        kind = record.get("type")
        cls = LAYER_TYPES.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise CheckpointError(f"{where}.type: unknown quantized layer type {kind!r} (known: {sorted(LAYER_TYPES)});"
                                  " written by a newer hf_vq?")
        schema = getattr(cls, "record_schema", None)
        if schema is not None:
            validate_record(record, schema, where, getattr(cls, "record_rules", None))


def expected_tensors(model: nn.Module, layers: dict[str, dict[str, Any]]
                     ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    out = {}
    for name in layers:
        mod = model.get_submodule(name)
        for key, t in mod.state_dict(keep_vars=True).items():
            out[f"{name}.{key}"] = (tuple(t.shape), t.dtype)
    return out


def quantized_tensor_keys(layers: dict[str, dict[str, Any]], available) -> list[str]:
    """The stored quantized tensors (each layer type's ``tensor_names``) among the keys ``available``."""
    keys = []
    for name, record in layers.items():
        cls = LAYER_TYPES.get(record.get("type")) if isinstance(record, dict) else None
        keys += [k for k in (f"{name}.{t}" for t in getattr(cls, "tensor_names", ())) if k in available]
    return keys


def checkpoint_renamer(model: nn.Module, hf_quantizer=None) -> Callable[[str], str | None]:
    """checkpoint key -> the model key from_pretrained loads it into (transformers' renamings and prefix handling);
    None for keys that a converter merges into another tensor (fused experts), which are not ours."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model, None, hf_quantizer)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)

    def rename(key: str) -> str | None:
        # the order of core_model_loading.convert_and_load_state_dict_in_model
        new, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if new not in meta and key in meta:
            new, pattern = rename_source_key(key, [], [], prefix, meta)
        return new if pattern is None else None

    return rename


def _parse_checksums(raw: str, file: str) -> dict[str, str]:
    try:
        sums = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{file}: header metadata {CHECKSUM_KEY} is not JSON ({e})") from None
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) and _SHA256.fullmatch(v)
                                             for k, v in sums.items()):
        raise CheckpointError(f"{file}: header metadata {CHECKSUM_KEY} must map tensor names to sha256 hex digests")
    return sums


def check_checkpoint(model: nn.Module, layers: dict, checkpoint_files: list[str] | None,
                     hf_quantizer=None) -> dict[str, str]:
    """Fail loudly when the checkpoint's quantized tensors disagree with the config in name, shape or dtype; returns
    the checksums the checkpoint carries ({} when none). Reads headers only."""
    if not checkpoint_files:
        return {}
    files = [f for f in checkpoint_files if str(f).endswith(".safetensors")]
    if len(files) != len(checkpoint_files):
        raise CheckpointError("hf_vq checkpoints load from safetensors only; found "
                              f"{[str(f) for f in checkpoint_files if not str(f).endswith('.safetensors')]}")
    from safetensors import safe_open

    rename = checkpoint_renamer(model, hf_quantizer)
    found: dict[str, tuple[tuple[int, ...], str, str]] = {}
    checksums: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            raw = (sf.metadata() or {}).get(CHECKSUM_KEY)
            if raw is not None:
                checksums.update(_parse_checksums(raw, str(f)))
            for key in sf.keys():
                target = rename(key)
                if target is not None:
                    sl = sf.get_slice(key)
                    found[target] = (tuple(sl.get_shape()), sl.get_dtype(), key)
    expected = expected_tensors(model, layers)
    strict = set(quantized_tensor_keys(layers, expected))
    problems = []
    for key, (shape, dtype) in expected.items():
        if key not in found:
            problems.append(f"missing {key}")
            continue
        f_shape, f_dtype, ckpt_key = found[key]
        named = key if ckpt_key == key else f"{key} (saved as {ckpt_key})"
        if f_shape != shape:
            problems.append(f"{named}: checkpoint shape {list(f_shape)}, config expects {list(shape)}")
        elif key in strict and f_dtype != _ST_DTYPES.get(dtype):
            problems.append(f"{named}: stored as {f_dtype}, expected {_ST_DTYPES.get(dtype, dtype)} (not cast)")
    quant_suffixes = tuple(f".{n}" for cls in LAYER_TYPES.values() for n in getattr(cls, "tensor_names", ()))
    for key in found:
        if quant_suffixes and key.endswith(quant_suffixes) and key not in expected:
            problems.append(f"unexpected quantized tensor {key} (not in config.json's layers)")
    if checksums:
        unlisted = sorted(strict - set(checksums))
        if unlisted:
            problems.append(f"{CHECKSUM_KEY} lists no checksum for {unlisted[:3]}"
                            + (f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else ""))
    if problems:
        head = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"checkpoint does not match its hf_vq quantization config: {head}")
    return {k: v for k, v in checksums.items() if k in strict}


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of the tensor's bytes (C order, native little-endian), as they are stored in safetensors."""
    t = t.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(t.view(torch.uint8).numpy()).hexdigest()


def checksum_metadata(state_dict: dict[str, torch.Tensor], layers: dict) -> dict[str, str]:
    """Safetensors header metadata with the sha256 of every quantized tensor about to be saved."""
    keys = quantized_tensor_keys(layers or {}, state_dict)
    return {CHECKSUM_KEY: json.dumps({k: tensor_sha256(state_dict[k]) for k in keys}, sort_keys=True)}


def check_loaded(model: nn.Module, layers: dict, checksums: dict[str, str] | None = None) -> None:
    """After loading: each quantized layer's value checks on its loaded tensors, then the checksums if any."""
    for name in layers:
        module = model.get_submodule(name)
        check = getattr(module, "check_stored", None)
        if callable(check):
            with placement.onloaded(module, placement.execution_device(module)):  # disk-offloaded: read it back
                check(name)
    if checksums:
        by_module: dict[str, list[str]] = {}
        for k in checksums:
            by_module.setdefault(k.rpartition(".")[0], []).append(k)
        bad = []
        for owner, keys in by_module.items():  # a disk-offloaded module is read back once for all its tensors
            module = model.get_submodule(owner)
            with placement.onloaded(module, placement.execution_device(module)):
                bad += [k for k in keys if tensor_sha256(getattr(module, k.rpartition(".")[2])) != checksums[k]]
        if bad:
            raise CheckpointError(f"checksum mismatch for {len(bad)} quantized tensors (first: {bad[0]}): the weights "
                                  "changed after they were saved (corrupted or edited file)")
