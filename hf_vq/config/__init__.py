"""Quantization configs: one registered quant method ("hf_vq"), one class per algorithm (see base.py)."""

from hf_vq.config.adascale import AdaScaleConfig
from hf_vq.config.base import FORMAT_VERSION, LOADING_NOTE, QUANT_METHOD, HfVQConfig, LayerSpec
from hf_vq.config.gptq import GPTQConfig, RTNConfig
from hf_vq.config.gptvq import GPTVQConfig
from hf_vq.config.quantsim import QuantSimConfig

__all__ = ["HfVQConfig", "LayerSpec", "RTNConfig", "GPTQConfig", "GPTVQConfig", "AdaScaleConfig", "QuantSimConfig",
           "QUANT_METHOD", "FORMAT_VERSION", "LOADING_NOTE"]
