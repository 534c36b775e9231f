"""hf_vq: GPTQ / GPTVQ / AdaScale / QuantSim quantization inside transformers' from_pretrained.

``import hf_vq`` registers quant method "hf_vq" with transformers.
"""

from transformers.quantizers import register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from hf_vq.config import (QUANT_METHOD, AdaScaleConfig, ConfigError, GPTQConfig, GPTVQConfig, HfVQConfig,
                          QuantSimConfig, RTNConfig)
from hf_vq.model.eval import evaluate_perplexity
from hf_vq.model.optimize import optimize
from hf_vq.model.safe_save import save_pretrained_safely
from hf_vq.export.aimet import load_encodings
from hf_vq.export.checkpoint import ExportError, export_checkpoint
from hf_vq.export.onnx import export_onnx
from hf_vq.hub import AutoQuantizedModelForCausalLM, load_encodings_from_hub, push_quantized, render_model_card
from hf_vq.nn.qat import prepare_qat
from hf_vq.nn.qlinear import QuantLinear
from hf_vq.nn.vqlinear import VQLinear
from hf_vq.integrations.peft import load_lora, merge_and_dequantize, prepare_lora  # noqa: F401 (peft imported lazily)
from hf_vq.integrations.quantizer import HfVQQuantizer
from hf_vq.integrations.lm_eval import evaluate  # lm-evaluation-harness (imported when called)
from hf_vq.export.quantsim import export_encodings
from hf_vq.model.quantsim import (set_activation_quantizers_to_float, set_blockwise_quantization_for_weights,
                                  set_grouped_blockwise_quantization_for_weights)
from hf_vq.pipeline.act_ranges import compute_encodings

if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(HfVQConfig)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(HfVQQuantizer)

from hf_vq.utils.version import __version__  # noqa: E402
__all__ = [
    "optimize",
    "HfVQConfig", "RTNConfig", "GPTQConfig", "GPTVQConfig", "AdaScaleConfig", "QuantSimConfig", "ConfigError",
    "QuantLinear", "VQLinear", "HfVQQuantizer", "evaluate_perplexity", "evaluate",
    "export_encodings", "load_encodings", "export_onnx", "export_checkpoint", "ExportError", "compute_encodings",
    "prepare_qat",
    "set_blockwise_quantization_for_weights", "set_grouped_blockwise_quantization_for_weights",
    "set_activation_quantizers_to_float",
    "AutoQuantizedModelForCausalLM", "push_quantized", "load_encodings_from_hub", "render_model_card",
    "save_pretrained_safely",
]
