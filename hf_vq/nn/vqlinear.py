"""VQLinear: a Linear whose weight is stored as GPTVQ codebook indices + (compressed) codebooks.

All state is integer persistent buffers (see hf_vq.algorithms.gptvq for the layout), so save/reload is exact and
dtype casts cannot touch the codebooks. ``forward(x) == F.linear(x, W_dq.to(x.dtype), bias)``.

Fast path: small batches go through the kernels of hf_vq.nn.kernel_registry (storage "vq"; on CPU the C kernel of
hf_vq/nn/vq_kernel.py, built on first use with the system C compiler, which works directly from one uint8 index per
vector and fp32 codebooks: ~9 MiB for 4096x4096 at 2D/6-bit, against 64 MiB dense fp32). A kernel's prepared layout
is built once and dropped whenever the stored tensors change (``.to()``, ``load_state_dict``, a swapped buffer).
Set ``VQLinear.fast_decode = False`` (or ``HF_VQ_KERNELS=exact``) to switch kernels off.
Every other call decodes the weight once per (dtype, device) and caches it (``cache_decoded``), then runs the plain
dense GEMM: fast prefill at the cost of a dense copy in RAM (the saved checkpoint stays at ``bits_per_value()``).
Set ``VQLinear.cache_decoded = False`` to decode on every such call instead (then only the kernel layout stays).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hf_vq.formats.vq import VQLayout, VQWeight, decode_weight
import hf_vq.nn.vq_kernel as vq_kernel
from hf_vq.nn import kernel_registry
from hf_vq.nn.base import QuantizedLinearMixin
from hf_vq.nn.records import (VQ_SCHEMA, check_finite_positive, check_fp16_bits, check_tensor_layout, validate_record,
                              vq_rules)
from hf_vq.nn.registry import register_format, register_layer_type


@register_layer_type("vq")
class VQLinear(QuantizedLinearMixin, nn.Module):
    tensor_names = ("vq_indices", "vq_codebook", "vq_codebook_scales", "vq_norm_codes", "vq_norm_base")
    cache_decoded = True
    fast_decode = True
    storage, source_buffer = "vq", "vq_indices"

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
        self._kernel_states = kernel_registry.KernelStates()

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

    record_schema, record_rules = VQ_SCHEMA, staticmethod(vq_rules)

    @classmethod
    def from_record(cls, record: dict, dtype=None, where: str = "layer record") -> "VQLinear":
        validate_record(record, cls.record_schema, where, cls.record_rules)
        lay = VQLayout(record["out_features"], record["in_features"], record["vector_dim"], record["index_bits"],
                       record["codebook_bits"], record["rows_per_block"], record["cols_per_block"],
                       record.get("normalize", False))
        return cls(lay, bias=record["bias"], dtype=dtype)

    # ------------------------------------------------------------------ checks of stored tensors
    def check_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Exact dtypes and shapes; finite fp16 codebooks (16-bit), finite positive codebook scales and
        normalization base. Every packed index / code / norm-code pattern is valid (indices address 2^index_bits
        entries), so those need no range check."""
        lay = self.layout
        check_tensor_layout(tensors, lay.tensor_shapes(), where)
        if lay.codebook_bits == 16:
            check_fp16_bits(tensors["vq_codebook"], f"{where}.vq_codebook", positive=False)
        else:
            check_fp16_bits(tensors["vq_codebook_scales"], f"{where}.vq_codebook_scales", positive=True)
        if lay.normalize:
            check_finite_positive(tensors["vq_norm_base"].view(torch.float32), f"{where}.vq_norm_base")

    def check_stored(self, where: str) -> None:
        self.check_tensors(self.stored_tensors(), where)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        present = {k: state_dict[prefix + k] for k in self.layout.tensor_shapes() if prefix + k in state_dict}
        if len(present) == len(self.layout.tensor_shapes()):
            self.check_tensors(present, prefix.rstrip(".") or "state_dict")
        elif present:
            check_tensor_layout(present, {k: v for k, v in self.layout.tensor_shapes().items() if k in present},
                                prefix.rstrip(".") or "state_dict")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._cache = None
        self._kernel_states.clear()

    # ------------------------------------------------------------------ weights
    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return decode_weight(self.layout, self.stored_tensors()).to(dtype)

    # ------------------------------------------------------------------ forward
    def _weight_for(self, dtype: torch.dtype) -> torch.Tensor:
        if not self.cache_decoded:
            return self.dequantize_weight(dtype)
        key = (dtype,) + self._storage_key()
        if self._cache is None or self._cache[0] != key:
            self._cache = None  # free the old copy before decoding a new one
            self._cache = (key, self.dequantize_weight(dtype))
        return self._cache[1]

    def _storage_key(self) -> tuple:
        return (self.vq_indices.device,) + tuple((b.data_ptr(), b._version) for b in self.stored_tensors().values())

    def kernel_weights(self) -> vq_kernel.KernelWeights | None:
        """The CPU kernel's transcoded weights (built once, rebuilt when the stored tensors change); None if the
        kernel cannot serve this layer."""
        return self.kernel_state(vq_kernel.KERNEL)

    def format_weight(self) -> VQWeight:
        return VQWeight(self.layout, self.stored_tensors())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel_forward(x) if self.fast_decode else None
        if y is not None:
            return y
        return F.linear(x, self._weight_for(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    # ------------------------------------------------------------------ AIMET encodings
    def _row_grid(self) -> tuple[list[float], int]:
        """Per output row: the scale of its row block's codebook grid, and the codebook bitwidth."""
        lay = self.layout
        if lay.codebook_bits == 16 or lay.normalize:
            raise ValueError("AIMET VECTOR encodings describe integer codebooks on one grid per row block: export "
                             "needs codebook_bits 4 or 8 and data_normalization=False")
        scales = self.vq_codebook_scales.view(torch.float16).float().reshape(lay.row_blocks, lay.col_blocks)
        per_rb = scales[:, 0]
        if not bool((scales == per_rb[:, None]).all()):
            raise ValueError("this layer's codebooks have one scale each (GPTVQConfig(codebook_scale='codebook')); "
                             "AIMET VECTOR encodings need one per row block: quantize with codebook_scale='row_block'")
        rows = per_rb.repeat_interleave(min(lay.rows_per_block, lay.out_features))[:lay.out_features]
        return rows.tolist(), lay.codebook_bits

    def _vector_fields(self) -> dict:
        lay = self.layout
        return {"rows_per_block": lay.rows_per_block, "cols_per_block": lay.cols_per_block,
                "vector_dim": lay.vector_dim, "vector_stride": 1, "index_bw": lay.index_bits}

    def aimet_param_encodings(self, version: str) -> dict:
        """VECTOR encoding of the weight (AIMET GPTVQ convention: symmetric grid, one scale per output row, equal
        within a row block, plus the VQ shape fields; the codebooks themselves are in the exported weights)."""
        scale, bw = self._row_grid()
        off = -(2 ** (bw - 1))
        if version == "0.6.1":
            n = 2 ** bw - 1
            return {"weight": [{"min": off * s, "max": (off + n) * s, "scale": s, "offset": off, "bitwidth": bw,
                                "dtype": "int", "is_symmetric": "True", **self._vector_fields()} for s in scale]}
        return {"weight": {"dtype": "INT", "bw": bw, "is_sym": True, "scale": scale, "offset": [off] * len(scale),
                           "enc_type": "VECTOR", **self._vector_fields()}}

    def check_aimet_param_encoding(self, local_name: str, enc) -> None:
        """An encoding can only confirm a VQ layer (its codebooks are the weights): shape fields must match."""
        if local_name != "weight" or enc.enc_type != "VECTOR":
            raise ValueError(f"a VQLinear only takes a VECTOR encoding of its weight, got {enc.enc_type} for "
                             f"{local_name!r}")
        ours = self._vector_fields()
        diff = {k: (enc.extra.get(k), v) for k, v in ours.items() if k in enc.extra and enc.extra[k] != v}
        if diff or len(enc.scale) != self.out_features:
            raise ValueError(f"VECTOR encoding does not match this VQLinear: (file, layer) {diff}, "
                             f"{len(enc.scale)} row scales for {self.out_features} rows")

    def load_aimet_param_encoding(self, local_name: str, enc) -> None:
        self.check_aimet_param_encoding(local_name, enc)

    def _apply(self, fn, recurse=True):
        self._cache = None
        self._kernel_states.clear()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        lay = self.layout
        return (f"in_features={lay.in_features}, out_features={lay.out_features}, vector_dim={lay.vector_dim}, "
                f"index_bits={lay.index_bits}, codebook_bits={lay.codebook_bits}, "
                f"block={lay.rows_per_block}x{lay.cols_per_block}, normalize={lay.normalize}, "
                f"bpv={self.bits_per_value():.3f}")


register_format(VQWeight, VQLinear.from_vq)
