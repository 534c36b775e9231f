"""Quantized modules. Importing this package registers their layer types."""

from hf_vq.nn.qlinear import QuantLinear

__all__ = ["QuantLinear"]
