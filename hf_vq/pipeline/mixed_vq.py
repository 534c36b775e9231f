"""GPTVQ candidates for mixed precision (``GPTVQConfig(average_bits=...)``): what a setting stores and the output
error it leaves.

A setting is (vector_dim, index_bits, rows_per_block); the other layout fields are the config's. Row blocks are
independent given the Hessian (each has its own codebooks, its rows their own GPTQ error feedback), so a candidate is
measured on an evenly strided subset of whole row blocks, quantized exactly as the real run quantizes those blocks,
and its errors stand for all rows. Each candidate has its own subset: the blocks differ in height.
"""

from __future__ import annotations

import torch

from hf_vq.algorithms.gptvq import gptvq_quantize
from hf_vq.pipeline.gptvq import vq_options


def vq_cost(config, out_features: int, in_features: int, setting: dict) -> float:
    """Stored bits of a VQLinear with this setting (indices, codebooks, their scales, normalization)."""
    return config.layout(out_features, in_features, setting).bits_per_value() * out_features * in_features


def block_rows(n: int, rows_per_block: int, limit: int) -> torch.Tensor:
    """Rows of an evenly strided subset of whole row blocks, about ``limit`` rows (at least one block); all rows
    when the layer has at most ``limit`` rows or is a single block."""
    r = min(rows_per_block, n)
    full = n // r
    want = max(1, round(limit / r))
    if n <= limit or full <= want:
        return torch.arange(n)
    picks = torch.linspace(0, full - 1, want).round().long().unique()
    return (picks[:, None] * r + torch.arange(r)).reshape(-1)


def vq_candidate_errors(weights: dict[str, torch.Tensor], h: torch.Tensor, cands: list[dict], config,
                        score: torch.Tensor | dict[str, torch.Tensor], limit: int) -> dict[str, dict]:
    """Per layer: {"rows": [rows of candidate j], "errors": [d S d^T of those rows under candidate j], "energy"
    (w S w^T of every row), "out_features"}; S: ``score`` (one matrix, or one per layer)."""
    options = vq_options(config)
    out = {}
    for name, weight in weights.items():
        s = (score[name] if isinstance(score, dict) else score).float()
        w = weight.float()
        rows, errors = [], []
        for c in cands:
            r = block_rows(w.shape[0], c["rows_per_block"], limit).to(w.device)
            sub = w[r]
            vq = gptvq_quantize(sub, h, vector_dim=c["vector_dim"], index_bits=c["index_bits"],
                                rows_per_block=c["rows_per_block"], **options)
            d = sub - vq.dequantize().to(sub.device)
            rows.append(r.cpu())
            errors.append((d @ s * d).sum(1).double().cpu())
        out[name] = {"rows": rows, "errors": errors, "energy": (w @ s * w).sum(1).double().cpu(),
                     "out_features": w.shape[0]}
    return out
