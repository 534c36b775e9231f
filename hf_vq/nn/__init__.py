"""Quantized modules. Importing this package registers their layer types."""

from hf_vq.nn.qlinear import QuantLinear

__all__ = ["QuantLinear"]
from hf_vq.nn.vqlinear import VQLinear  # noqa: E402,F401
from hf_vq.nn.qat import QATLinear, QuantSimLinear  # noqa: E402,F401
