"""What a mixed-precision model stores per layer: the per-layer-type table and the bits-by-depth series of its card."""

from __future__ import annotations

import re

from torch import nn

from hf_vq.nn.registry import LAYER_TYPES


def _setting(mod: nn.Module) -> str:
    if getattr(mod, "bits", None) is not None:
        group = getattr(mod, "group_size", None)
        return f"{mod.bits}-bit" + (f" g{group}" if group not in (None, -1) else " per channel")
    lay = getattr(mod, "layout", None) or next(iter(getattr(mod, "layouts", {}).values()), None)
    if getattr(lay, "vector_dim", None) is not None:  # GPTVQ: the fields an average_bits run chooses
        return f"{lay.vector_dim}D {lay.index_bits}-bit index, {lay.rows_per_block} rows"
    return mod.layer_type


def layer_bits(model: nn.Module) -> dict[str, tuple[str, float, int]]:
    """{layer: (setting, stored bits per weight, weights)} of every quantized module."""
    out = {}
    for name, mod in model.named_modules():
        if getattr(mod, "layer_type", None) in LAYER_TYPES:
            weights = mod.num_weights() if hasattr(mod, "num_weights") else mod.in_features * mod.out_features
            out[name] = (_setting(mod), mod.bits_per_value(), weights)
    return out


def layer_kind(name: str) -> str:
    """A layer's name with its block index folded into ``*``: ``model.layers.*.mlp.down_proj``."""
    return re.sub(r"\.\d+(\.|$)", r".*\1", name, count=1)


def depth(name: str) -> int | None:
    m = re.search(r"\.(\d+)(\.|$)", name)
    return int(m.group(1)) if m else None


def bits_by_type(model: nn.Module) -> list[tuple[str, str, float]]:
    """Rows (layer kind, how many layers got each setting, mean stored bits per weight over that kind)."""
    kinds: dict[str, list[tuple[str, float, int]]] = {}
    for name, rec in layer_bits(model).items():
        kinds.setdefault(layer_kind(name), []).append(rec)
    rows = []
    for kind, recs in kinds.items():
        counts: dict[str, int] = {}
        for setting, _, _ in recs:
            counts[setting] = counts.get(setting, 0) + 1
        mean = sum(b * w for _, b, w in recs) / sum(w for _, _, w in recs)
        rows.append((kind, ", ".join(f"{s} x{c}" for s, c in sorted(counts.items())), mean))
    return rows


def bits_by_depth(model: nn.Module) -> dict[str, list[tuple[int, float]]]:
    """{layer kind: [(block index, stored bits per weight), ...]} of the layers inside numbered blocks."""
    out: dict[str, list[tuple[int, float]]] = {}
    for name, (_, bits, _) in layer_bits(model).items():
        d = depth(name)
        if d is not None:
            out.setdefault(layer_kind(name), []).append((d, bits))
    return {k: sorted(v) for k, v in out.items()}
