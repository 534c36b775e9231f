"""hf_vq's attention for transformers models: transformers' SDPA attention, with the decode step (one query
position, on CPU) through hf_vq's attention kernels (:func:`hf_vq.nn.attention.decode_attention`).

It is registered in transformers' ``AttentionInterface`` (and its mask interface, with SDPA's masks) as
``"hf_vq_sdpa"``; :func:`use_decode_attention` switches a model that runs SDPA to it. Every call the kernels do not
serve (prefill, gradients, dropout in training, soft-capping, attention sinks, an additive mask, GPU tensors,
``HF_VQ_KERNELS=exact``) runs transformers' own SDPA function unchanged.
"""

from __future__ import annotations

from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from hf_vq.nn.attention import decode_attention

NAME = "hf_vq_sdpa"
_UNSERVED = ("softcap", "s_aux", "sinks", "position_bias", "output_attentions", "head_mask")


def sdpa_with_decode_kernel(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    if (query.shape[2] == 1 and query.device.type == "cpu" and not (dropout and module.training)
            and not any(kwargs.get(k) is not None and kwargs.get(k) is not False for k in _UNSERVED)):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = decode_attention(query, key, value, attention_mask, scale)
        if out is not None:
            return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


AttentionInterface.register(NAME, sdpa_with_decode_kernel)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_decode_attention(model) -> bool:
    """Switch ``model`` from transformers' SDPA attention to ``"hf_vq_sdpa"`` when it runs SDPA, on CPU, through
    transformers' attention interface; returns whether the model runs ``"hf_vq_sdpa"`` (so ``hf_vq.optimize`` on a
    loaded model reports it too). Other implementations are left as chosen."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == NAME:
        return True
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    if any(p.device.type != "cpu" for p in model.parameters()) or not model._can_set_attn_implementation():
        return False
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
