"""Moved to :mod:`hf_vq.model.convert` (model-level operations), :mod:`hf_vq.nn.registry` (layer types) and
:mod:`hf_vq.utils.modules`. Kept so that old imports keep working."""

from hf_vq.model.convert import (build_skeleton, check_checkpoint, dequantize_model, expected_tensors,  # noqa: F401
                                 quantize_model, select_linears)
from hf_vq.nn.registry import LAYER_TYPES, build_module, layer_record, register_layer_type  # noqa: F401
from hf_vq.utils.modules import set_module  # noqa: F401
