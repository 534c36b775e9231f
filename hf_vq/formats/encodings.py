"""AIMET encoding entries of an affine weight grid (0.6.1 and 1.0.0 layouts): plain dicts from the stored scales."""

from __future__ import annotations

import torch

from hf_vq.formats import blockwise


def _entry_1_0_0(name, bits, sym, scale, offset, enc_type, **extra) -> dict:
    scale = scale.tolist() if isinstance(scale, torch.Tensor) else scale
    offset = offset.tolist() if isinstance(offset, torch.Tensor) else offset
    entry = {"name": name, "dtype": "INT", "bw": int(bits), "is_sym": bool(sym),
             "scale": [float(x) for x in scale], "offset": [int(x) for x in offset], "enc_type": enc_type}
    entry.update(extra)
    return entry


def _entries_0_6_1(bits, sym, scale, offset) -> list[dict]:
    n = 2**bits - 1
    return [{"min": float(o) * float(s), "max": (float(o) + n) * float(s), "scale": float(s), "offset": int(o),
             "bitwidth": int(bits), "dtype": "int", "is_symmetric": str(bool(sym))}
            for s, o in zip(scale.tolist(), offset.tolist())]


def affine_encoding(mod, name: str, version: str = "1.0.0", lpbq: bool | str = "auto",
                         decompressed_bw: int = 8, split_uneven_groups: bool = True):
    """The encoding of one affine weight (1.0.0: entry dict; 0.6.1: list of dicts). ``mod`` has QuantLinear's stored
    tensors and fields: scales, qzeros, g_idx, bits, sym, group_size, in_features."""
    block, scale, offset = blockwise.blocks_from_groups(mod.scales, mod.qzeros, mod.g_idx)
    gs = mod.in_features if mod.group_size == -1 else mod.group_size
    nb = scale.shape[1]
    if nb > 1 and block != gs and not split_uneven_groups:
        raise ValueError(f"{name}: group_size {gs} does not tile its {mod.in_features} input columns into equal AIMET "
                         f"blocks; pass split_uneven_groups=True to export blocks of {block} with repeated scales")
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ValueError(f"{name}: scales must be finite and positive to export")
    if version == "0.6.1":
        return _entries_0_6_1(mod.bits, mod.sym, scale.flatten(), offset.flatten())
    if nb == 1:
        return _entry_1_0_0(name, mod.bits, mod.sym, scale[:, 0], offset[:, 0], "PER_CHANNEL")
    if lpbq and mod.sym:
        factored = blockwise.factor_lpbq(scale, mod.bits, decompressed_bw)
        if factored is not None:
            pc, ints = factored
            return _entry_1_0_0(name, decompressed_bw, True, pc, [-(2 ** (decompressed_bw - 1))] * len(pc), "LPBQ",
                                block_size=int(block), compressed_bw=int(mod.bits),
                                per_block_int_scale=[int(x) for x in ints.flatten().tolist()])
    if lpbq is True:
        raise ValueError(f"{name}: not an LPBQ grid (needs sym=True and scales that factor exactly as int "
                         f"1..{2 ** (decompressed_bw - mod.bits)} x per-channel scale); quantize with "
                         "hf_vq.formats.blockwise.lpbq_affine_weight or use lpbq='auto'")
    return _entry_1_0_0(name, mod.bits, mod.sym, scale.flatten(), offset.flatten(), "PER_BLOCK",
                        block_size=int(block))
