"""VQLinear: a Linear whose weight is stored as GPTVQ codebook indices + (compressed) codebooks.

All state is integer persistent buffers (see hf_vq.algorithms.gptvq for the layout), so save/reload is exact and
dtype casts cannot touch the codebooks. ``forward(x) == F.linear(x, W_dq.to(x.dtype), bias)``.

Fast path: there is no stock CPU kernel for VQ (the int4/int8 packed kernels need affine grids), and per-call decode
costs a full gather (see benchmarks/gptvq.py). So the weight is decoded once per (dtype, device) and cached
(``cache_decoded``): decode steps then run the plain dense GEMV. This trades the in-RAM memory saving for speed; the
saved checkpoint stays at ``bits_per_value()``. Set ``VQLinear.cache_decoded = False`` to decode on every call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hf_vq.algorithms.gptvq import VQLayout, decode_weight
from hf_vq.convert import register_layer_type
from hf_vq.nn.base import QuantizedLinearMixin


@register_layer_type("vq")
class VQLinear(QuantizedLinearMixin, nn.Module):
    tensor_names = ("vq_indices", "vq_codebook", "vq_codebook_scales", "vq_norm_codes", "vq_norm_base")
    cache_decoded = True

    def __init__(self, layout: VQLayout, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.layout = layout
        self.in_features, self.out_features = layout.in_features, layout.out_features
        for name, (shape, dt) in layout.tensor_shapes().items():
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(layout.out_features, device=device, dtype=dtype or torch.float32))
        else:
            self.register_parameter("bias", None)
        self._cache: tuple | None = None

    @classmethod
    def from_vq(cls, vq, bias: torch.Tensor | None) -> "VQLinear":
        mod = cls(vq.layout, bias=bias is not None, device=vq.tensors["vq_indices"].device,
                  dtype=bias.dtype if bias is not None else None)
        for name, t in vq.tensors.items():
            getattr(mod, name).copy_(t)
        if bias is not None:
            mod.bias.data.copy_(bias.detach())
        return mod

    def layer_record(self) -> dict:
        lay = self.layout
        return {"in_features": lay.in_features, "out_features": lay.out_features, "vector_dim": lay.vector_dim,
                "index_bits": lay.index_bits, "codebook_bits": lay.codebook_bits,
                "rows_per_block": lay.rows_per_block, "cols_per_block": lay.cols_per_block,
                "normalize": lay.normalize, "bias": self.bias is not None}

    @classmethod
    def from_record(cls, record: dict, dtype=None) -> "VQLinear":
        lay = VQLayout(record["out_features"], record["in_features"], record["vector_dim"], record["index_bits"],
                       record["codebook_bits"], record["rows_per_block"], record["cols_per_block"],
                       record.get("normalize", False))
        return cls(lay, bias=record["bias"], dtype=dtype)

    # ------------------------------------------------------------------ weights
    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return decode_weight(self.layout, self.stored_tensors()).to(dtype)

    # ------------------------------------------------------------------ forward
    def _weight_for(self, dtype: torch.dtype) -> torch.Tensor:
        if not self.cache_decoded:
            return self.dequantize_weight(dtype)
        key = (dtype, self.vq_indices.device) + tuple((b.data_ptr(), b._version)
                                                       for b in self.stored_tensors().values())
        if self._cache is None or self._cache[0] != key:
            self._cache = None  # free the old copy before decoding a new one
            self._cache = (key, self.dequantize_weight(dtype))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._weight_for(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _apply(self, fn, recurse=True):
        self._cache = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        lay = self.layout
        return (f"in_features={lay.in_features}, out_features={lay.out_features}, vector_dim={lay.vector_dim}, "
                f"index_bits={lay.index_bits}, codebook_bits={lay.codebook_bits}, "
                f"block={lay.rows_per_block}x{lay.cols_per_block}, normalize={lay.normalize}, "
                f"bpv={self.bits_per_value():.3f}")
