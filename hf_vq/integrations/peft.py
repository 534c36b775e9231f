"""PEFT LoRA on hf_vq-quantized models (QLoRA-style: the quantized weights stay frozen, only adapters train).

peft only wraps ``nn.Linear``-like layers out of the box; our quantized modules (QuantLinear / QuantSimLinear /
VQLinear / QATLinear) are registered through peft's custom-module mechanism (``LoraConfig._register_custom_module``),
which lives on the config object and is not saved with the adapter. So use the helpers here instead of calling
``get_peft_model`` / ``PeftModel.from_pretrained`` with a bare config:

    model = hf_vq.prepare_lora(quantized_model, LoraConfig(r=8, target_modules="all-linear"))
    ...train, model.save_pretrained(adapter_dir)...
    model = hf_vq.load_lora(freshly_loaded_quantized_model, adapter_dir)

Merging: a LoRA delta cannot be added exactly to integer codes, so ``merge()`` / ``merge_and_unload()`` on a
quantized layer raise. ``merge_and_dequantize(peft_model)`` gives a plain floating-point transformers model
(quantization config removed) with the adapters merged; re-quantize it with hf_vq if needed.

peft is an optional dependency: it is imported on first use only.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

MERGE_ERROR = ("cannot merge a LoRA adapter into an integer-quantized hf_vq layer (the sum is not on the quantization "
               "grid): keep the adapter separate, or call hf_vq.merge_and_dequantize(peft_model) for a floating-point "
               "model with the adapter merged")


def _require_peft():
    try:
        import peft  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("LoRA on hf_vq models needs peft: pip install 'hf_vq[peft]'") from e


def quantized_module_types() -> tuple[type, ...]:
    from hf_vq.nn.qat import QATLinear
    from hf_vq.nn.qlinear import QuantLinear  # QuantSimLinear is a subclass
    from hf_vq.nn.vqlinear import VQLinear

    return (QuantLinear, VQLinear, QATLinear)


class _FrozenLinearFn(torch.autograd.Function):
    """``module(x)`` for a frozen quantized Linear whose backward re-dequantizes the weight instead of autograd
    keeping a dequantized copy per layer alive until backward (QLoRA's memory saving); also gives a gradient through
    QuantLinear's CPU int4 decode kernel, which has no derivative."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        ctx.module = module
        with torch.no_grad():
            return module(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        w = ctx.module.dequantize_weight(grad_out.dtype)
        return grad_out @ w, None


def _base_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from hf_vq.nn.qlinear import QuantLinear
    from hf_vq.nn.vqlinear import VQLinear

    # exact types only: QuantSimLinear's activation quantizers and QATLinear's latent need real autograd
    plain = type(base) in (QuantLinear, VQLinear) and not any(p.requires_grad for p in base.parameters())
    if plain and torch.is_grad_enabled() and x.requires_grad:
        return _FrozenLinearFn.apply(x, base)
    return base(x)


@functools.cache
def _layer_class() -> type:
    _require_peft()
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import check_adapters_to_merge

    class QuantLoraLinear(nn.Module, LoraLayer):
        """LoRA around a frozen hf_vq quantized Linear: ``base(x) + scaling * B(A(dropout(x)))``."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                     **kwargs):
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            _check_supported(config)
            base = self.get_base_layer()
            if not hasattr(base, "qweight") and next(base.parameters(), None) is None:
                # peft's _replace_module takes the device from `qweight` or the first parameter, and a bias-free
                # VQLinear has neither: a temporary alias, removed by prepare_lora / load_lora (_drop_aliases)
                base.__dict__["qweight"] = next(base.buffers())
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config,
                              target_name=kwargs.get("target_name", ""))

        def _get_in_out_features(self, module):
            return module.in_features, module.out_features

        def resolve_lora_variant(self, *, config, **kwargs):
            _check_supported(config)
            return None

        def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
            _check_supported(config)  # also reached when a second adapter is added to this layer
            super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
            # peft places adapters by the base's `weight`/`qweight`; VQLinear / QATLinear have neither
            dev = next((t.device for t in self.get_base_layer().state_dict().values()), None)
            if dev is not None:
                self._move_adapter_to_device_of_base_layer(adapter_name, device=dev)

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            self._check_forward_args(x, *args, **kwargs)
            adapter_names = kwargs.pop("adapter_names", None)
            if self.disable_adapters:
                if self.merged:
                    self.unmerge()
                return self.base_layer(x, *args, **kwargs)
            if adapter_names is not None:
                return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
            if self.merged:
                return self.base_layer(x, *args, **kwargs)
            result = _base_forward(self.base_layer, x)
            out_dtype = result.dtype
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                lora_A, lora_B = self.lora_A[name], self.lora_B[name]
                xa = self._cast_input_dtype(x, lora_A.weight.dtype)
                result = result + lora_B(lora_A(self.lora_dropout[name](xa))) * self.scaling[name]
            return result.to(out_dtype)

        # ------------------------------------------------------------------ merging (float bases only)
        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            a, b = self.lora_A[adapter].weight.float(), self.lora_B[adapter].weight.float()
            return (b @ a) * self.scaling[adapter]

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            adapter_names = check_adapters_to_merge(self, adapter_names)
            if not adapter_names:
                return
            base = self.get_base_layer()
            if not isinstance(base, nn.Linear):  # still quantized
                raise ValueError(MERGE_ERROR)
            for name in adapter_names:
                if name not in self.lora_A:
                    continue
                w = base.weight.data.float() + self.get_delta_weight(name).to(base.weight.device)
                if safe_merge and not torch.isfinite(w).all():
                    raise ValueError(f"NaNs detected in the merged weights; adapter {name} seems to be broken")
                base.weight.data = w.to(base.weight.dtype)
                if self.lora_bias[name]:
                    base.bias.data += (self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype)
                self.merged_adapters.append(name)

        def unmerge(self) -> None:
            base = self.get_base_layer()
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                if name in self.lora_A:
                    w = base.weight.data.float() - self.get_delta_weight(name).to(base.weight.device)
                    base.weight.data = w.to(base.weight.dtype)
                    if self.lora_bias[name]:
                        base.bias.data -= (self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype)

        def __repr__(self) -> str:
            return "hf_vq.lora." + super().__repr__()

    QuantLoraLinear.__module__ = __name__
    return QuantLoraLinear


def _check_supported(config) -> None:
    init = config.init_lora_weights
    if init not in (True, False, "gaussian"):
        raise ValueError(f"init_lora_weights={init!r} needs the base layer's float weight; hf_vq quantized layers "
                         "support init_lora_weights=True, False or 'gaussian'")
    for flag in ("use_dora", "use_qalora"):
        if getattr(config, flag, False):
            raise ValueError(f"{flag}=True is not supported on hf_vq quantized layers (plain LoRA only)")
    for field in ("velora_config", "kasa_config"):
        if getattr(config, field, None) is not None:
            raise ValueError(f"{field} is not supported on hf_vq quantized layers (plain LoRA only)")


def _drop_aliases(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, quantized_module_types()):
            m.__dict__.pop("qweight", None)


def __getattr__(name: str):
    if name == "QuantLoraLinear":
        return _layer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_lora_modules(lora_config):
    """Register the LoRA layer for every hf_vq quantized module type on ``lora_config`` (in place; returned)."""
    cls = _layer_class()
    lora_config._register_custom_module({t: cls for t in quantized_module_types()})
    return lora_config


def _expand_all_linear(model: nn.Module, lora_config) -> None:
    """peft's "all-linear" only sees nn.Linear: expand it to the quantized layers too (output head excluded)."""
    target = lora_config.target_modules
    if not (isinstance(target, str) and target.lower() == "all-linear"):
        return
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if isinstance(m, (nn.Linear,) + quantized_module_types()) and m is not out}
    if not names:
        raise ValueError("target_modules='all-linear' matched no linear or quantized layer in this model")
    lora_config.target_modules = names


def prepare_lora(model: nn.Module, lora_config, **kwargs):
    """``peft.get_peft_model`` for an hf_vq-quantized model: registers our layers and expands "all-linear".

    Only the LoRA parameters are trainable; the quantized buffers are never touched. ``kwargs`` go to
    ``get_peft_model`` (e.g. ``adapter_name``)."""
    _require_peft()
    from peft import get_peft_model

    register_lora_modules(lora_config)
    _expand_all_linear(model, lora_config)
    peft_model = get_peft_model(model, lora_config, **kwargs)
    _drop_aliases(peft_model)
    return peft_model


def load_lora(model: nn.Module, adapter_path, is_trainable: bool = False, **kwargs):
    """``PeftModel.from_pretrained`` for an hf_vq-quantized model (the saved LoRA config cannot carry our custom
    layer registration, so it is re-added here)."""
    _require_peft()
    from peft import LoraConfig, PeftModel

    config = LoraConfig.from_pretrained(adapter_path, **{k: kwargs[k] for k in ("subfolder", "revision")
                                                         if k in kwargs})
    register_lora_modules(config)
    peft_model = PeftModel.from_pretrained(model, adapter_path, is_trainable=is_trainable, config=config, **kwargs)
    _drop_aliases(peft_model)
    return peft_model


def merge_and_dequantize(peft_model, dtype: torch.dtype | None = None) -> nn.Module:
    """A plain floating-point model: every quantized layer dequantized (``dtype``, default the model's), the quantization
    config removed, then the LoRA adapters merged in fp32 and cast to that dtype. The peft model is consumed."""
    base = peft_model.get_base_model()
    if getattr(base, "hf_quantizer", None) is not None:
        base.dequantize(dtype)
    else:
        from hf_vq.model.convert import dequantize_model

        dequantize_model(base, dtype)
    return peft_model.merge_and_unload()
