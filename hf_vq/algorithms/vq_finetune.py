"""Blockwise codebook fine-tuning for GPTVQ (as AQLM does for its codebooks): with the indices fixed, Adam on the
codebooks of a whole decoder block to match the FP block's output on the same (quantized-model) input, then the
codebooks are stored again at ``codebook_bits``. Layer-wise GPTVQ only sees each layer's own ||(W - Q)X||^2; this
step lets the codebooks of one block correct each other's errors."""

from __future__ import annotations

import torch
from torch import nn

from hf_vq.algorithms.distill import distill_block
from hf_vq.algorithms.gptvq import (VQWeight, _element_codebook, decode_codebooks, encode_codebooks, norm_scales,
                                    quantize_codebooks)
from hf_vq.quant.packing import unpack


class VQCodebookLinear(nn.Module):
    """Stand-in for an nn.Linear during fine-tuning: weight = codebook[index] (* normalization), codebooks trainable."""

    def __init__(self, linear: nn.Linear, vq: VQWeight):
        super().__init__()
        lay = vq.layout
        self.layout, self.bias = lay, linear.bias
        self.codebook = nn.Parameter(decode_codebooks(lay, vq.tensors["vq_codebook"],
                                                      vq.tensors.get("vq_codebook_scales")).to(linear.weight.device))
        idx = unpack(vq.tensors["vq_indices"], lay.index_bits, lay.nvec).long()
        self.register_buffer("flat", (_element_codebook(lay, lay.out_features, idx.device) * lay.k + idx)
                             .to(linear.weight.device))
        norm = (norm_scales(lay, vq.tensors["vq_norm_codes"], vq.tensors["vq_norm_base"]) if lay.normalize else None)
        self.register_buffer("norm", None if norm is None else norm.to(linear.weight.device))
        self.other = {k: v for k, v in vq.tensors.items() if k not in ("vq_codebook", "vq_codebook_scales")}

    def weight(self) -> torch.Tensor:
        lay = self.layout
        w = self.codebook.reshape(-1, lay.vector_dim)[self.flat].reshape(lay.out_features, lay.padded_in)
        if self.norm is not None:
            w = w * self.norm
        return w[:, :lay.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def to_vq(self, codebook_scale: str) -> VQWeight:
        """Store the trained codebooks at the layout's codebook bits (same scale sharing as gptvq_quantize)."""
        lay = self.layout
        share = lay.col_blocks if codebook_scale == "row_block" else 1
        qv, qs = quantize_codebooks(self.codebook.detach().float().cpu(), lay.codebook_bits, share)
        tensors = dict(self.other)
        tensors.update(encode_codebooks(qv, qs, lay.codebook_bits))
        return VQWeight(lay, tensors)


def finetune_vq_block(block: nn.Module, local: dict[str, nn.Linear], results: dict[str, VQWeight], inputs, kwargs,
                      targets, *, iterations: int, lr: float, codebook_scale: str, generator: torch.Generator,
                      desc: str = "", progress: bool = True) -> tuple[dict[str, VQWeight], float, float]:
    """Fine-tune the codebooks of ``results`` (name relative to ``block`` -> VQWeight of ``local[name]``) so the block
    maps ``inputs`` to ``targets``. Returns (new VQWeights, first loss, final training loss)."""
    stand_ins = {n: VQCodebookLinear(local[n], vq) for n, vq in results.items()}
    params = [m.codebook for m in stand_ins.values()]
    first, last = distill_block(block, stand_ins, [{"params": params, "lr": lr}], inputs, inputs, kwargs, targets,
                                num_iterations=iterations, fp_input_prob=0.0, generator=generator, desc=desc,
                                progress=progress)
    return {n: m.to_vq(codebook_scale) for n, m in stand_ins.items()}, first, last
