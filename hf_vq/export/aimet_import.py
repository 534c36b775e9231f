"""Applying AIMET encodings (parsed by hf_vq.export.encodings_reader) to hf_vq layers; see hf_vq.export.aimet.
Every refusal raises EncodingsError (a ValueError), before anything in the model is modified."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from hf_vq.nn.qlinear import QuantLinear
from hf_vq.formats import blockwise
from hf_vq.formats.packing import pack

from hf_vq.export.aimet_common import _ONNX_SUFFIX, VERSIONS
from hf_vq.export.encodings_reader import (Encodings, EncodingsError, ParamEncoding,  # noqa: F401 (re-exported)
                                           read_encodings)
from hf_vq.utils.io import MAX_JSON_BYTES

logger = logging.getLogger(__name__)


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
        raise EncodingsError(f"{name}: VECTOR encodings cannot be applied to an affine QuantLinear")
    if enc.bitwidth != mod.bits:
        raise EncodingsError(f"{name}: encoding has {enc.bitwidth}-bit codes, layer has {mod.bits} bits")
    if bool(enc.is_sym) != bool(mod.sym):
        raise EncodingsError(f"{name}: encoding is_sym={enc.is_sym}, layer sym={mod.sym}")
    scale, offset, _ = enc.resolve(mod.out_features, mod.in_features)
    gs, go = blockwise.groups_from_blocks(scale, offset, mod.g_idx, mod.scales.shape[1])
    maxq = 2**mod.bits - 1
    if bool((go > 0).any()) or bool((go < -maxq).any()):
        raise EncodingsError(f"{name}: offsets must lie in [-{maxq}, 0] for {mod.bits}-bit codes")
    if not bool(torch.isfinite(gs).all()) or not bool((gs > 0).all()):
        raise EncodingsError(f"{name}: scales must be finite and positive")
    stored = gs.to(mod.scales.dtype)
    lost = ~torch.isfinite(stored) | (stored <= 0)  # 1e10 -> fp16 inf, 1e-30 -> fp16 0
    if bool(lost.any()):
        r, g = (int(i) for i in lost.nonzero()[0])
        raise EncodingsError(f"{name}: scale {float(gs[r, g]):.7g} (row {r}, group {g}) becomes "
                             f"{float(stored[r, g])!r} in {mod.scales.dtype}, the layer's scale dtype")
    if not bool((stored.float() == gs).all()):
        rel = float(((stored.float() - gs).abs() / gs).max())
        if require_exact:
            raise EncodingsError(f"{name}: scales are not exact in {mod.scales.dtype} (max relative change {rel:.2e})")
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
                   require_exact: bool = False, max_bytes: int = MAX_JSON_BYTES) -> Encodings:
    """Read ``path`` and apply its param encodings to ``model``'s hf_vq layers (model=None: parse only).

    Names may carry a wrapper prefix (``strip_prefix="m."``) and sim.onnx.export's ``.weight_0`` suffix. With
    ``strict`` a name that is not in the model, or not an hf_vq quantized layer (an embedding, a norm), raises;
    otherwise it is listed in ``result.skipped``. Activation encodings are returned but not applied. Files larger
    than ``max_bytes`` are refused unread.
    """
    enc = read_encodings(path, max_bytes=max_bytes)
    if model is None:
        return enc
    if enc.version not in VERSIONS:
        raise EncodingsError(f"{path}: version {enc.version} can be read (read_encodings) but not applied; "
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
                raise EncodingsError(f"{name}: {reason}" if local else reason)
            enc.skipped[name] = reason
            continue
        hook = getattr(mod, "load_aimet_param_encoding", None)
        check = getattr(mod, "check_aimet_param_encoding", None)
        try:
            if callable(hook) and callable(check):
                check(local, p)  # layers with their own hook validate before anything is modified
            prepared = None if callable(hook) else prepare_quantlinear(mod, p, f"{mname}.{local}", require_exact)
        except EncodingsError:
            raise
        except ValueError as e:  # a layer's or the grid helpers' own check: one error type for callers
            raise EncodingsError(str(e)) from None
        plan.append((name, mod, local, p, prepared))
    for name, mod, local, p, prepared in plan:  # everything validated: now modify
        if prepared is None:
            mod.load_aimet_param_encoding(local, p)
        else:
            commit_quantlinear(mod, prepared)
        enc.applied.append(name)
    return enc
