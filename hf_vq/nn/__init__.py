"""Quantized modules. Importing this package registers their layer types and kernels."""

from hf_vq.nn import (kernel_native_affine, kernel_native_dense, kernel_native_vq,  # noqa: F401  (each registers itself)
                      kernel_torch_int4, kernel_torch_int8, kernel_triton_affine, vq_kernel)
from hf_vq.nn import kernel_native_attention, kernel_native_layer, kernel_native_norm, kernel_native_rope  # noqa: F401
from hf_vq.nn import kernel_triton_vq  # noqa: F401
from hf_vq.nn import kernel_triton_experts  # noqa: F401

from hf_vq.nn.experts import QuantExperts, VQExperts
from hf_vq.nn.qat import QATLinear, QuantSimLinear
from hf_vq.nn.qlinear import QuantLinear
from hf_vq.nn.vqlinear import VQLinear

__all__ = ["QuantLinear", "VQLinear", "QATLinear", "QuantSimLinear", "QuantExperts", "VQExperts"]
