"""Quantization configs: one registered quant method ("hf_vq"), one class per algorithm (see base.py), each with a
declarative field schema (schema.py); invalid values raise ConfigError."""

from hf_vq.config.adascale import AdaScaleConfig
from hf_vq.config.base import FORMAT_VERSION, LOADING_NOTE, QUANT_METHOD, HfVQConfig, LayerSpec
from hf_vq.config.gptq import GPTQConfig, RTNConfig
from hf_vq.config.gptvq import GPTVQConfig
from hf_vq.config.quantsim import QuantSimConfig
from hf_vq.config.schema import ConfigError, Field, Schema

__all__ = ["HfVQConfig", "LayerSpec", "RTNConfig", "GPTQConfig", "GPTVQConfig", "AdaScaleConfig", "QuantSimConfig",
           "ConfigError", "Field", "Schema", "QUANT_METHOD", "FORMAT_VERSION", "LOADING_NOTE"]
