"""QuantLinear: a Linear whose weight is stored as packed integer codes on an affine grid.

State (all persistent buffers, so save/reload is exact): ``qweight`` uint8 [N, ceil(K*bits/8)], ``scales`` fp16 [N, G],
``qzeros`` uint8 [N, G], ``g_idx`` int32 [K], optional ``bias``.

Forward: the reference is ``F.linear(x, W_dq)`` with ``W_dq = scales * (codes - zeros)`` in the activation dtype (the
exact path, taken for batches no kernel serves, when autograd needs a backward, with ``HF_VQ_KERNELS=exact`` or
``exact_decode``). Other calls go through the kernels of hf_vq.nn.kernel_registry (storage "affine"), prepared once
per module and dropped whenever the stored tensors change (``.to()``, ``load_state_dict``, a swapped buffer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hf_vq.nn.base import QuantizedLinearMixin
from hf_vq.nn.records import (AFFINE_SCHEMA, check_finite_positive, check_int_range, check_tensor_layout,
                              validate_record)
from hf_vq.nn.registry import register_format, register_layer_type
from hf_vq.nn import kernel_registry
from hf_vq.formats.affine import SCALE_DTYPE, AffineWeight, dequantize_groups, num_groups
from hf_vq.formats.packing import pack, packed_length, unpack


@register_layer_type("affine")
class QuantLinear(QuantizedLinearMixin, nn.Module):
    tensor_names = ("qweight", "scales", "qzeros", "g_idx")
    # True: every call takes the exact dequantized GEMM (QuantSim's folded layers: a simulation stays exact)
    exact_decode = False
    storage, source_buffer = "affine", "qweight"

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = True,
                 sym: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        groups = num_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(out_features, packed_length(in_features, bits),
                                                    dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("qzeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype or torch.float32))
        else:
            self.register_parameter("bias", None)
        self._kernel_states = kernel_registry.KernelStates()

    @classmethod
    def from_affine(cls, aw: AffineWeight, bias: torch.Tensor | None, **kwargs) -> "QuantLinear":
        """A module holding ``aw`` (``kwargs`` go to a subclass's constructor)."""
        n, k = aw.shape
        mod = cls(k, n, aw.bits, aw.group_size, bias=bias is not None, sym=aw.sym, device=aw.codes.device,
                  dtype=bias.dtype if bias is not None else None, **kwargs)
        mod.qweight.copy_(pack(aw.codes, aw.bits))
        mod.scales.copy_(aw.scales)
        mod.qzeros.copy_(aw.zeros)
        mod.g_idx.copy_(aw.g_idx)
        if bias is not None:
            mod.bias.data.copy_(bias.detach())
        return mod

    def layer_record(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "sym": self.sym, "bias": self.bias is not None}

    record_schema = AFFINE_SCHEMA

    @classmethod
    def from_record(cls, record: dict, dtype=None, where: str = "layer record") -> "QuantLinear":
        validate_record(record, cls.record_schema, where)
        return cls(record["in_features"], record["out_features"], record["bits"], record["group_size"],
                   bias=record["bias"], sym=record["sym"], dtype=dtype)

    # ------------------------------------------------------------------ checks of stored tensors
    _AFFINE = ("qweight", "scales", "qzeros", "g_idx")

    def expected_layout(self) -> dict:
        """(shape, dtype) of each stored affine tensor, from this module's record (not from loaded values)."""
        n, k, groups = self.out_features, self.in_features, num_groups(self.in_features, self.group_size)
        return {"qweight": ((n, packed_length(k, self.bits)), torch.uint8), "scales": ((n, groups), SCALE_DTYPE),
                "qzeros": ((n, groups), torch.uint8), "g_idx": ((k,), torch.int32)}

    def check_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Refuse stored tensors this layer cannot hold as they are: wrong dtype/shape, scales that are not finite
        and positive, zero-points outside [0, 2^bits - 1], g_idx outside [0, groups). Every packed code pattern is a
        valid code, so ``qweight`` needs no range check. O(N*G + K): cheap next to reading the weights."""
        check_tensor_layout(tensors, self.expected_layout(), where)
        check_finite_positive(tensors["scales"], f"{where}.scales")
        check_int_range(tensors["qzeros"], 0, 2**self.bits - 1, f"{where}.qzeros")
        check_int_range(tensors["g_idx"], 0, num_groups(self.in_features, self.group_size) - 1, f"{where}.g_idx")

    def check_stored(self, where: str) -> None:
        """check_tensors on this module's own buffers (after a load)."""
        self.check_tensors({n: self._buffers[n] for n in self._AFFINE}, where)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # load_state_dict (Trainer resume, peft) would cast a float32 qweight or accept an out-of-range g_idx
        present = {k: state_dict[prefix + k] for k in self._AFFINE if prefix + k in state_dict}
        if len(present) == len(self._AFFINE):
            self.check_tensors(present, prefix.rstrip(".") or "state_dict")
        elif present:
            check_tensor_layout(present, {k: v for k, v in self.expected_layout().items() if k in present},
                                prefix.rstrip(".") or "state_dict")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._kernel_states.clear()

    # ------------------------------------------------------------------ weights
    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.bits, self.in_features)

    def affine_weight(self) -> AffineWeight:
        return AffineWeight(self.codes(), self.scales, self.qzeros, self.g_idx, self.bits, self.group_size, self.sym)

    format_weight = affine_weight

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_groups(self.codes(), self.scales, self.qzeros, self.g_idx, dtype, self.group_size)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None if self.exact_decode else self.kernel_forward(x)
        if y is not None:
            return y
        return F.linear(x, self.dequantize_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _apply(self, fn, recurse=True):
        # Keep scales in their storage dtype: model.to(bfloat16) must not re-round the quantization grid.
        scales = self._buffers.pop("scales")
        try:
            super()._apply(fn, recurse)
        finally:
            probe = fn(torch.empty(0, dtype=scales.dtype, device=scales.device))
            self._buffers["scales"] = scales.to(probe.device)
        self._kernel_states.clear()
        return self

    def extra_repr(self) -> str:
        g = "channel" if self.group_size == -1 else self.group_size
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group={g}, "
                f"sym={self.sym}, bias={self.bias is not None}")


register_format(AffineWeight, QuantLinear.from_affine)
