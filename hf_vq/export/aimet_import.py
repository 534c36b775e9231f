"""Reading AIMET encodings (0.6.1, 1.0.0, 2.0.0) and applying them to hf_vq layers; see hf_vq.export.aimet."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hf_vq.nn.qlinear import QuantLinear
from hf_vq.formats import blockwise
from hf_vq.formats.packing import pack

from hf_vq.export.aimet_common import _ONNX_SUFFIX, VERSIONS

logger = logging.getLogger(__name__)


@dataclass
class ParamEncoding:
    """One parsed encoding. ``scale``/``offset`` are flat (channel-major, block-minor) effective values on the
    ``bitwidth``-bit unsigned grid (LPBQ: int * per-channel scale, at the compressed bitwidth; offset -2^(bw-1))."""

    name: str
    enc_type: str | None          # None for 0.6.1 multi-entry lists: channels vs blocks follow from the layer shape
    dtype: str                    # "INT" or "FLOAT"
    bitwidth: int | None
    is_sym: bool | None
    scale: list[float] = field(default_factory=list)
    offset: list[int] = field(default_factory=list)
    block_size: int | None = None
    channels: int | None = None   # known for PER_TENSOR / PER_CHANNEL / LPBQ / 2.0.0
    block_major: bool = False     # scale/offset flattened [n_blocks, C] (PER_BLOCK of a transposed ".weight_0")
    per_channel_scale: list[float] | None = None
    per_block_int_scale: list[int] | None = None
    decompressed_bw: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def resolve(self, out_features: int, in_features: int):
        """(scale [C, nb] fp32, offset [C, nb] int64, block_size) for a [out, in] weight; C is 1 (broadcast) or out."""
        if self.dtype != "INT" or not self.scale:
            raise ValueError(f"{self.name}: {self.dtype} encoding has no integer grid")
        n = len(self.scale)
        if self.channels is not None:
            c = self.channels
            if n % c:
                raise ValueError(f"{self.name}: {n} scales do not split into {c} channels")
            nb = n // c
        elif self.block_size is not None:
            if in_features % self.block_size:
                raise ValueError(f"{self.name}: block_size {self.block_size} does not divide the layer's "
                                 f"{in_features} input columns")
            nb = in_features // self.block_size
            if n % nb:
                raise ValueError(f"{self.name}: {n} scales are not a whole number of channels of {nb} blocks "
                                 f"(layer has {out_features} channels)")
            c = n // nb
        else:  # 0.6.1 list: one dict per channel or per block
            if n % out_features:
                raise ValueError(f"{self.name}: encoding has {n} entries, not a multiple of the layer's "
                                 f"{out_features} channels")
            c, nb = out_features, n // out_features
        if c not in (1, out_features):
            raise ValueError(f"{self.name}: encoding has {c} channels, layer has {out_features}")
        if in_features % nb:
            raise ValueError(f"{self.name}: encoding has {nb} blocks per channel, which do not divide the layer's "
                             f"{in_features} input columns")
        if self.block_size is not None and self.block_size * nb != in_features:
            raise ValueError(f"{self.name}: encoding has {nb} blocks of {self.block_size} columns, layer has "
                             f"{in_features} input columns")
        scale = torch.tensor(self.scale, dtype=torch.float32)
        offset = torch.tensor(self.offset, dtype=torch.int64)
        if self.block_major:
            scale, offset = scale.reshape(nb, c).T, offset.reshape(nb, c).T
        scale = scale.reshape(c, nb).expand(out_features, nb)
        offset = offset.reshape(c, nb).expand(out_features, nb)
        return scale, offset, in_features // nb

    def quantize_dequantize(self, weight: torch.Tensor) -> torch.Tensor:
        """QDQ of a [out, in] weight on this grid (what a runtime does with the exported float weight)."""
        scale, offset, b = self.resolve(*weight.shape)
        return blockwise.quantize_dequantize(weight, scale, offset, self.bitwidth, (1, b))


@dataclass
class Encodings:
    version: str
    params: dict[str, ParamEncoding]
    activations: dict[str, Any]
    producer: dict | None = None
    applied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() == "true"


def _parse_1_0_0(e: dict) -> ParamEncoding:
    dtype = str(e.get("dtype", "INT")).upper()
    dtype = "FLOAT" if dtype in ("FLOAT", "FP") else dtype
    enc = ParamEncoding(e["name"], e.get("enc_type"), dtype, e.get("bw"), e.get("is_sym"),
                        list(e.get("scale", [])), [int(o) for o in e.get("offset", [])], e.get("block_size"))
    if enc.enc_type in ("PER_TENSOR", "PER_CHANNEL", "VECTOR"):
        enc.channels = len(enc.scale) or None
    transposed = bool(_ONNX_SUFFIX.match(enc.name))
    if enc.enc_type == "PER_BLOCK":
        enc.block_major = transposed
    if enc.enc_type == "LPBQ":
        c = len(enc.scale)
        n = len(e["per_block_int_scale"])
        if not c or n % c:
            raise ValueError(f"{enc.name}: {n} per_block_int_scale values for {c} channels")
        ints = torch.tensor(e["per_block_int_scale"], dtype=torch.int64)
        ints = ints.reshape(-1, c).T if transposed else ints.reshape(c, -1)
        # stored channel-major whatever the file's layout
        enc.per_channel_scale, enc.per_block_int_scale = list(enc.scale), ints.flatten().tolist()
        enc.decompressed_bw, enc.bitwidth = e["bw"], e["compressed_bw"]
        pc = torch.tensor(enc.per_channel_scale, dtype=torch.float32)
        enc.scale = blockwise.lpbq_effective_scale(pc, ints).flatten().tolist()
        enc.offset, enc.channels = [-(2 ** (enc.bitwidth - 1))] * n, c
    enc.extra = {k: v for k, v in e.items() if k not in ("name", "dtype", "bw", "is_sym", "scale", "offset",
                                                        "enc_type", "block_size", "compressed_bw",
                                                        "per_block_int_scale")}
    return enc


def _parse_0_6_1(name: str, entries: list) -> ParamEncoding:
    first = entries[0] if entries else {}
    dtype = "FLOAT" if str(first.get("dtype", "int")).lower() == "float" else "INT"
    enc = ParamEncoding(name, "PER_TENSOR" if len(entries) == 1 else None, dtype, first.get("bitwidth"),
                        _bool(first.get("is_symmetric", "False")), [d["scale"] for d in entries if "scale" in d],
                        [int(d["offset"]) for d in entries if "offset" in d])
    vector_keys = ("rows_per_block", "cols_per_block", "vector_dim", "vector_stride", "index_bw")
    if any(k in first for k in vector_keys):
        enc.enc_type, enc.channels = "VECTOR", len(entries)
        enc.extra = {k: first[k] for k in vector_keys if k in first}
    if enc.enc_type == "PER_TENSOR":
        enc.channels = 1
    return enc


def _parse_2_0_0(e: dict) -> ParamEncoding:
    dt = str(e.get("output_dtype", ""))
    m = re.fullmatch(r"(u?)int(\d+)", dt)
    if not m:
        return ParamEncoding(e["name"], "PER_TENSOR", "FLOAT", None, None, extra=dict(e))
    signed, bits = not m.group(1), int(m.group(2))
    if "per_block_int_scale" in e:
        ints = [int(i) for row in e["per_block_int_scale"] for i in row]
        pc = [float(v) for row in e["per_channel_float_scale"] for v in (row if isinstance(row, list) else [row])]
        c = len(e["per_block_int_scale"])
        scale = blockwise.lpbq_effective_scale(torch.tensor(pc), torch.tensor(ints).reshape(c, -1)).flatten()
        return ParamEncoding(e["name"], "LPBQ", "INT", bits, True, scale.tolist(), [-(2 ** (bits - 1))] * len(ints),
                             e.get("block_size"), channels=c, per_channel_scale=pc, per_block_int_scale=ints,
                             extra={"axis": e.get("axis")})
    ys = torch.tensor(e["y_scale"], dtype=torch.float64)
    zp = torch.tensor(e.get("y_zero_point", 0), dtype=torch.int64).expand(ys.shape)
    offset = (-(2 ** (bits - 1)) - zp) if signed else -zp
    enc_type = "PER_BLOCK" if "block_size" in e else ("PER_CHANNEL" if ys.dim() else "PER_TENSOR")
    channels = 1 if ys.dim() == 0 else ys.shape[0]
    return ParamEncoding(e["name"], enc_type, "INT", bits, bool(signed and (zp == 0).all()),
                         ys.flatten().tolist(), offset.flatten().tolist(), e.get("block_size"), channels,
                         extra={"axis": e.get("axis")})


def read_encodings(path: str | os.PathLike) -> Encodings:
    """Parse an AIMET encodings JSON file (0.6.1, 1.0.0 or 2.0.0; also the version-less GPTVQ file)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON encodings file ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: top level must be a JSON object")
    version = doc.get("version")
    if version is None:
        version = "2.0.0" if "encodings" in doc else ("0.6.1" if isinstance(doc.get("param_encodings"), dict)
                                                      else "1.0.0")
    version = str(version)
    if version.startswith("2."):
        params = {e["name"]: _parse_2_0_0(e) for e in doc.get("encodings", [])}
        return Encodings(version, params, {}, doc.get("producer"))
    if version not in VERSIONS:
        raise ValueError(f"{path}: unsupported encodings version {version!r} (supported: 0.6.1, 1.0.0, 2.0.0)")
    pe, ae = doc.get("param_encodings", {}), doc.get("activation_encodings", {})
    if version == "0.6.1":
        if not isinstance(pe, dict):
            raise ValueError(f"{path}: 0.6.1 param_encodings must be an object of name -> list")
        params = {n: _parse_0_6_1(n, v) for n, v in pe.items()}
        acts = dict(ae)
    else:
        if not isinstance(pe, list):
            raise ValueError(f"{path}: 1.0.0 param_encodings must be a list of entries")
        params = {e["name"]: _parse_1_0_0(e) for e in pe}
        acts = {e["name"]: e for e in ae}
    return Encodings(version, params, acts, doc.get("producer"))


def _find_target(modules: dict[str, nn.Module], name: str):
    """(module name, module, local param name) of the hf_vq layer ``name`` refers to, else (None, None, reason)."""
    candidates = [name]
    m = _ONNX_SUFFIX.match(name)
    if m:  # sim.onnx.export names Linear weights "<module>.weight_0"
        candidates.append(m.group(1))
    reason = None
    for cand in candidates:
        mname, _, local = cand.rpartition(".")
        mod = modules.get(mname)
        if mod is None:
            continue
        if callable(getattr(mod, "load_aimet_param_encoding", None)):
            return mname, mod, local
        if isinstance(mod, QuantLinear):
            if local == "weight":
                return mname, mod, local
            reason = reason or f"{cand}: a QuantLinear only has a quantized 'weight'"
        elif local in dict(mod.named_parameters(recurse=False)) or local in dict(mod.named_buffers(recurse=False)):
            reason = reason or f"{cand} belongs to a {type(mod).__name__}, not an hf_vq quantized layer"
    return None, None, reason


@torch.no_grad()
def prepare_quantlinear(mod: QuantLinear, enc: ParamEncoding, name: str, require_exact: bool = False):
    """Validate ``enc`` against ``mod``; returns (packed codes, fp16 scales, zeros) putting ``mod`` on that grid,
    its current weight re-rounded onto it. Nothing is modified."""
    if enc.enc_type == "VECTOR":
        raise ValueError(f"{name}: VECTOR encodings cannot be applied to an affine QuantLinear")
    if enc.bitwidth != mod.bits:
        raise ValueError(f"{name}: encoding has {enc.bitwidth}-bit codes, layer has {mod.bits} bits")
    if bool(enc.is_sym) != bool(mod.sym):
        raise ValueError(f"{name}: encoding is_sym={enc.is_sym}, layer sym={mod.sym}")
    scale, offset, _ = enc.resolve(mod.out_features, mod.in_features)
    gs, go = blockwise.groups_from_blocks(scale, offset, mod.g_idx, mod.scales.shape[1])
    maxq = 2**mod.bits - 1
    if bool((go > 0).any()) or bool((go < -maxq).any()):
        raise ValueError(f"{name}: offsets must lie in [-{maxq}, 0] for {mod.bits}-bit codes")
    if not bool(torch.isfinite(gs).all()) or not bool((gs > 0).all()):
        raise ValueError(f"{name}: scales must be finite and positive")
    stored = gs.to(mod.scales.dtype)
    if not bool((stored.float() == gs).all()):
        rel = float(((stored.float() - gs).abs() / gs).max())
        if require_exact:
            raise ValueError(f"{name}: scales are not exact in {mod.scales.dtype} (max relative change {rel:.2e})")
        logger.warning("%s: scales rounded to %s (max relative change %.2e)", name, mod.scales.dtype, rel)
    w = mod.dequantize_weight(torch.float32)
    g = mod.g_idx.long().cpu()
    zeros = (-go).to(torch.uint8)
    codes = torch.clamp(torch.round(w.cpu() / stored.float()[:, g]) + zeros.float()[:, g], 0, maxq)
    return pack(codes.to(torch.uint8), mod.bits), stored, zeros


@torch.no_grad()
def commit_quantlinear(mod: QuantLinear, prepared) -> None:
    qweight, scales, zeros = prepared
    mod.qweight.copy_(qweight.to(mod.qweight.device))
    mod.scales.copy_(scales.to(mod.scales.device))
    mod.qzeros.copy_(zeros.to(mod.qzeros.device))


def load_encodings(model: nn.Module | None, path: str | os.PathLike, *, strict: bool = True, strip_prefix: str = "",
                   require_exact: bool = False) -> Encodings:
    """Read ``path`` and apply its param encodings to ``model``'s hf_vq layers (model=None: parse only).

    Names may carry a wrapper prefix (``strip_prefix="m."``) and sim.onnx.export's ``.weight_0`` suffix. With
    ``strict`` a name that is not in the model, or not an hf_vq quantized layer (an embedding, a norm), raises;
    otherwise it is listed in ``result.skipped``. Activation encodings are returned but not applied.
    """
    enc = read_encodings(path)
    if model is None:
        return enc
    if enc.version not in VERSIONS:
        raise ValueError(f"{path}: version {enc.version} can be read (read_encodings) but not applied; "
                         "export 0.6.1 or 1.0.0")
    plan = []
    modules = dict(model.named_modules())
    for name, p in enc.params.items():
        local_name = name[len(strip_prefix):] if strip_prefix and name.startswith(strip_prefix) else name
        mname, mod, local = _find_target(modules, local_name)
        if mod is None:
            reason = local or f"unknown parameter name {name!r}: no such module/parameter in the model"
            head, _, rest = local_name.partition(".")
            if not local and rest:
                _, hit, why = _find_target(modules, rest)
                if hit is not None or why:
                    reason += f" (names look prefixed: pass strip_prefix={head + '.'!r})"
            if strict:
                raise ValueError(f"{name}: {reason}" if local else reason)
            enc.skipped[name] = reason
            continue
        hook = getattr(mod, "load_aimet_param_encoding", None)
        check = getattr(mod, "check_aimet_param_encoding", None)
        if callable(hook) and callable(check):
            check(local, p)  # layers with their own hook validate before anything is modified
        prepared = None if callable(hook) else prepare_quantlinear(mod, p, f"{mname}.{local}", require_exact)
        plan.append((name, mod, local, p, prepared))
    for name, mod, local, p, prepared in plan:  # everything validated: now modify
        if prepared is None:
            mod.load_aimet_param_encoding(local, p)
        else:
            commit_quantlinear(mod, prepared)
        enc.applied.append(name)
    return enc
