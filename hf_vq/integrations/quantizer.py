"""The HfQuantizer for quant_method "hf_vq": wiring into transformers' from_pretrained / save_pretrained / Trainer.

Quantize-at-load: fp weights load into plain nn.Linear, then the after-load hook calibrates and swaps modules.
Reload: the before-load hook rebuilds the exact quantized skeleton from config.json and checks the checkpoint.
"""

from __future__ import annotations

import logging

from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AutoHfQuantizer

from hf_vq.config import QUANT_METHOD, HfVQConfig
from hf_vq.model import checkpoint, convert, offload, targets
from hf_vq.model.optimize import decode_kernels
from hf_vq.model.quantsim import refresh_layer_records
from hf_vq.nn.qat import folded_state_dict
from hf_vq.pipeline import placement

logger = logging.getLogger(__name__)


def _same_config(saved, passed: HfVQConfig) -> bool:
    """The checkpoint's own config handed back (lm-eval's HFLM rebuilds it with AutoQuantizationConfig): loading
    goes on as without it."""
    try:
        saved = type(passed).from_dict(dict(saved)) if isinstance(saved, dict) else saved
        return isinstance(saved, type(passed)) and saved.to_dict() == passed.to_dict()
    except (ValueError, TypeError):   # another method or fields this class refuses: a different config
        return False


def _refuse_requantization(merge):
    """transformers keeps a checkpoint's own quantization config and ignores (with a warning) one passed to
    from_pretrained; for an hf_vq checkpoint that would silently skip the quantization the user asked for. The
    checkpoint's own config passed back is not a request to re-quantize and loads as usual."""
    def merged(cls, quantization_config, quantization_config_from_args):
        saved = (quantization_config.get("quant_method") if isinstance(quantization_config, dict)
                 else getattr(quantization_config, "quant_method", None))
        if (saved == QUANT_METHOD and isinstance(quantization_config_from_args, HfVQConfig)
                and not _same_config(quantization_config, quantization_config_from_args)):
            method = (quantization_config.get("method") if isinstance(quantization_config, dict)
                      else getattr(quantization_config, "method", None))
            raise ValueError(
                f"this checkpoint is already quantized by hf_vq (method {method!r}); a quantization_config "
                f"({type(quantization_config_from_args).__name__}) cannot re-quantize it. Load it without "
                "quantization_config, or quantize the original float model")
        return merge(cls, quantization_config, quantization_config_from_args)
    merged._hf_vq_guard = True
    return merged


if not getattr(AutoHfQuantizer.merge_quantization_configs, "_hf_vq_guard", False):
    AutoHfQuantizer.merge_quantization_configs = classmethod(
        _refuse_requantization(AutoHfQuantizer.merge_quantization_configs.__func__))


class HfVQQuantizer(HfQuantizer):
    requires_calibration = False  # True would forbid quantizing at load
    required_packages = ["torch"]

    def __init__(self, quantization_config: HfVQConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []
        self.last_run: dict | None = None
        # save_pretrained writes a sha256 of every quantized tensor into the safetensors header (hf_vq.model.checkpoint);
        # a reload of such a checkpoint verifies them and keeps writing them
        self.save_checksums = False
        self._checksums: dict[str, str] = {}

    def validate_environment(self, *args, **kwargs):
        pass  # any device_map, disk offload included: blocks are onloaded one at a time (hf_vq.pipeline.placement)

    def update_dtype(self, dtype):
        return dtype

    def _process_model_before_weight_loading(self, model, dtype=None, checkpoint_files=None, **kwargs):
        cfg: HfVQConfig = self.quantization_config
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, cfg.modules_to_not_convert, getattr(model, "_keep_in_fp32_modules", None))
        if self.pre_quantized:
            if not cfg.layers:
                raise ValueError("this checkpoint's hf_vq config has no 'layers' record: it was not produced by a "
                                 "completed hf_vq quantization and cannot be loaded")
            convert.build_skeleton(model, cfg.layers, dtype)
            targets.add_init_placeholders(model)  # until loading ends (GPT-2's _init_weights reads .weight)
            self._checksums = checkpoint.check_checkpoint(model, cfg.layers, checkpoint_files, self)
            self.save_checksums = self.save_checksums or bool(self._checksums)

    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg: HfVQConfig = self.quantization_config
        if hasattr(model, "add_model_tags"):
            model.add_model_tags(["hf_vq", "quantized"])  # reach the Hub card on a plain push_to_hub
        if self.pre_quantized:
            targets.remove_init_placeholders(model)
            checkpoint.check_loaded(model, cfg.layers, self._checksums)  # value ranges (+ checksums): before any use
            offload.offload_loaded(model, cfg.layers)  # disk-placed quantized tensors stay on disk
            self._decode_kernels(model)
            return model
        use_cache = getattr(model.config, "use_cache", None)
        if use_cache is not None:
            model.config.use_cache = False
        try:
            self.last_run = convert.quantize_model(model, cfg, self.modules_to_not_convert)
        finally:
            if use_cache is not None:
                model.config.use_cache = use_cache
        self._decode_kernels(model)
        return model

    def _decode_kernels(self, model) -> None:
        # QuantSim models simulate a deployment target: their float layers keep torch's own GEMM
        if self.quantization_config.method != "quantsim":
            model.hf_vq_decode_kernels = decode_kernels(model)

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True  # hf_vq's kernels are torch custom ops: torch.compile keeps them whole (hf_vq.optimize)

    @property
    def is_qat_trainable(self) -> bool:
        return True  # full fine-tuning without PEFT (QATLinear latents; other layers train as usual)

    def get_state_dict_and_metadata(self, model):
        """Fold QAT latents into integer codes (no ``*.latent`` keys); None = plain ``model.state_dict()``. With
        ``save_checksums`` the header metadata carries the sha256 of every quantized tensor."""
        state_dict = folded_state_dict(model, loaded=lambda m: placement.onloaded(m, placement.execution_device(m)))
        if state_dict is not None:
            refresh_layer_records(model)
        if not self.save_checksums:
            return state_dict, {}
        sd = state_dict if state_dict is not None else model.state_dict()
        return state_dict, checkpoint.checksum_metadata(sd, self.quantization_config.layers)

    def _dequantize(self, model, dtype=None):
        return convert.dequantize_model(model, dtype)
