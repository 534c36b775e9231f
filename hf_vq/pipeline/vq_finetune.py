"""Blockwise codebook fine-tuning for GPTVQ (as AQLM does for its codebooks): with the indices fixed, Adam on the
codebooks of a whole decoder block to match the FP block's output on the same (quantized-model) input, then the
codebooks are stored again at ``codebook_bits``. Layer-wise GPTVQ only sees each layer's own ||(W - Q)X||^2; this
step lets the codebooks of one block correct each other's errors."""

from __future__ import annotations

import torch
from torch import nn

from hf_vq.formats.vq import (VQWeight, assemble_weight, codebook_rows, decode_codebooks, encode_codebooks,
                              store_codebooks, stored_norm)
from hf_vq.pipeline import distributed
from hf_vq.pipeline.distill import distill_block


class VQCodebookLinear(nn.Module):
    """Stand-in for an nn.Linear during fine-tuning: the weight VQWeight decodes to, with trainable codebooks."""

    def __init__(self, linear: nn.Linear, vq: VQWeight):
        super().__init__()
        lay, dev = vq.layout, linear.weight.device
        self.layout, self.bias = lay, linear.bias
        self.codebook = nn.Parameter(decode_codebooks(lay, vq.tensors["vq_codebook"],
                                                      vq.tensors.get("vq_codebook_scales")).to(dev))
        self.register_buffer("rows", codebook_rows(lay, vq.tensors).to(dev))
        norm = stored_norm(lay, vq.tensors)
        self.register_buffer("norm", None if norm is None else norm.to(dev))
        self.other = {k: v for k, v in vq.tensors.items() if k not in ("vq_codebook", "vq_codebook_scales")}

    def weight(self) -> torch.Tensor:
        return assemble_weight(self.layout, self.codebook, self.rows, self.norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def to_vq(self, codebook_scale: str) -> VQWeight:
        """The trained codebooks stored at the layout's codebook bits, as gptvq_quantize stores them."""
        qv, qs = store_codebooks(self.layout, self.codebook.detach().float().cpu(), codebook_scale)
        return VQWeight(self.layout, {**self.other, **encode_codebooks(qv, qs, self.layout.codebook_bits)})


def finetune_vq_block(block: nn.Module, local: dict[str, nn.Linear], results: dict[str, VQWeight], inputs, kwargs,
                      targets, *, iterations: int, lr: float, codebook_scale: str, generator: torch.Generator,
                      desc: str = "", progress: bool = True,
                      ranks: distributed.Ranks = distributed.Ranks()) -> tuple[dict[str, VQWeight], float, float]:
    """Fine-tune the codebooks of ``results`` (name relative to ``block`` -> VQWeight of ``local[name]``) so the block
    maps ``inputs`` to ``targets`` (gradients averaged over ``ranks`` under torch.distributed). Returns (new
    VQWeights, first loss, final training loss)."""
    stand_ins = {n: VQCodebookLinear(local[n], vq) for n, vq in results.items()}
    params = [m.codebook for m in stand_ins.values()]
    first, last = distill_block(block, stand_ins, [{"params": params, "lr": lr}], inputs, inputs, kwargs, targets,
                                num_iterations=iterations, fp_input_prob=0.0, generator=generator, desc=desc,
                                progress=progress, ranks=ranks)
    return {n: m.to_vq(codebook_scale) for n, m in stand_ins.items()}, first, last
