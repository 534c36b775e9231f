"""Quantized weights as (JSON-able header, flat tensor dict) and back: for resumable runs (safetensors files) and for
sending a layer's result between torch.distributed ranks, without pickle."""

from __future__ import annotations

import dataclasses

import torch

from hf_vq.formats.affine import AffineWeight
from hf_vq.formats.vq import VQLayout, VQWeight


class StateError(ValueError):
    pass


def to_state(result) -> tuple[dict, dict[str, torch.Tensor]]:
    if isinstance(result, AffineWeight):
        header = {"kind": "affine", "bits": result.bits, "group_size": result.group_size, "sym": result.sym}
        return header, {"codes": result.codes, "scales": result.scales, "zeros": result.zeros, "g_idx": result.g_idx}
    if isinstance(result, VQWeight):
        info = {k: float(v) for k, v in result.info.items()}
        return {"kind": "vq", "layout": dataclasses.asdict(result.layout), "info": info}, dict(result.tensors)
    if isinstance(result, dict) and all(isinstance(v, torch.Tensor) for v in result.values()):
        return {"kind": "tensors"}, dict(result)  # e.g. a QuantSim layer's activation ranges
    raise StateError(f"no serialized form for {type(result).__name__}")


def from_state(header: dict, tensors: dict[str, torch.Tensor]):
    kind = header.get("kind")
    try:
        if kind == "affine":
            return AffineWeight(tensors["codes"], tensors["scales"], tensors["zeros"], tensors["g_idx"],
                                int(header["bits"]), int(header["group_size"]), bool(header["sym"]))
        if kind == "vq":
            return VQWeight(VQLayout(**header["layout"]), dict(tensors), dict(header.get("info", {})))
        if kind == "tensors":
            return dict(tensors)
    except (KeyError, TypeError) as e:
        raise StateError(f"malformed {kind} state: {e}") from None
    raise StateError(f"unknown quantized-weight kind {kind!r}")


def to_device(result, device):
    """The same result with its tensors on ``device``."""
    header, tensors = to_state(result)
    return from_state(header, {k: v.to(device) for k, v in tensors.items()})
