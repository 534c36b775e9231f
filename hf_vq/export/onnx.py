"""ONNX export of a quantized hf_vq model with its AIMET encodings file beside it.

Like aimet-torch's ``sim.onnx.export``: the graph is the float graph with quantize-dequantized weights (no QDQ
nodes); the runtime applies the encodings. The model is wrapped to return only the logits and is traced with an
explicit all-ones ``attention_mask`` (inputs ``input_ids``, ``attention_mask``; output ``logits``), with torch's
TorchScript exporter (the dynamo exporter needs onnxscript). Constant folding is off so that every Linear weight
stays an initializer named by its torch parameter name in torch layout [out, in] (consumed through a Transpose);
the param encodings therefore use torch names and per-output-channel order unchanged. Activation encodings are
named by the ONNX tensors that feed (input) and leave (output: the MatMul, or the bias Add) each quantized Linear;
layers sharing an input tensor (q/k/v) write one entry (the first; a warning when their encodings differ).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
from torch import nn

from hf_vq.export import aimet
from hf_vq.export.quantsim import activation_entry, activation_quantizers, quantizer_args
from hf_vq.nn.experts import FusedExperts
from hf_vq.nn.registry import LAYER_TYPES
from hf_vq.utils.io import atomic_output
from hf_vq.utils.modules import set_module
from hf_vq.export.common import reads_whole_model

logger = logging.getLogger(__name__)
_PREFIX = "m."


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def float_export_copy(model: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]]:
    """fp32 copy of ``model`` whose quantized layers are nn.Linear with their quantize-dequantized weights; also
    returns {layer name: original quantized module}."""
    layers = {n: m for n, m in model.named_modules() if getattr(m, "layer_type", None) in LAYER_TYPES}
    if not layers:
        raise ValueError("the model has no hf_vq quantized layer to export")
    clone = copy.deepcopy(model)
    for name in layers:
        set_module(clone, name, clone.get_submodule(name).to_linear(torch.float32))
    return clone.to(torch.float32).eval(), layers


def _rename_initializers(graph, prefix: str) -> None:
    renames = {i.name: i.name[len(prefix):] for i in graph.initializer if i.name.startswith(prefix)}
    for init in graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in renames:
                node.input[k] = renames[name]


def graph_consumers(graph) -> dict[str, list]:
    """Tensor name -> the nodes that read it."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def activation_tensor_names(graph, layer: str, consumers: dict[str, list] | None = None) -> tuple[str, str]:
    """(input tensor, output tensor) of the quantized Linear ``layer`` in ``graph``."""
    weight = f"{layer}.weight"
    consumers = consumers if consumers is not None else graph_consumers(graph)
    users = consumers.get(weight, [])
    if len(users) == 1 and users[0].op_type == "Transpose":
        wt = users[0].output[0]
        users = consumers.get(wt, [])
    else:
        wt = weight
    mm = [n for n in users if n.op_type in ("MatMul", "Gemm")]
    if len(mm) != 1:
        raise ValueError(f"{layer}: cannot find the MatMul/Gemm consuming {weight} in the ONNX graph")
    node = mm[0]
    x = next(i for i in node.input if i != wt)
    y = node.output[0]
    bias = f"{layer}.bias"
    if node.op_type == "MatMul":
        adds = [n for n in consumers.get(y, []) if n.op_type == "Add" and bias in n.input]
        if adds:
            y = adds[0].output[0]
    return x, y


@reads_whole_model
def export_onnx(model: nn.Module, out_dir: str | os.PathLike, filename_prefix: str = "model", seq_len: int = 16,
                version: str = "1.0.0", opset_version: int = 17, dynamic: bool = True) -> Path:
    """Write ``<out_dir>/<prefix>.onnx`` and ``<out_dir>/<prefix>.encodings``; returns the ONNX path."""
    import onnx

    for name, mod in model.named_modules():
        if isinstance(mod, FusedExperts):  # routing is data-dependent: a traced graph would freeze one routing
            raise ValueError(f"export_onnx: {name} is a fused mixture-of-experts module ({type(mod).__name__}); "
                             "its token routing has no static ONNX graph, so MoE models cannot be exported to ONNX")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{filename_prefix}.onnx"
    clone, layers = float_export_copy(model)
    vocab = clone.get_input_embeddings().num_embeddings
    ids = torch.arange(seq_len).remainder(vocab)[None]
    mask = torch.ones_like(ids)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"}} if dynamic else None
    with atomic_output(path) as tmp:   # a failed or killed export never leaves a partial model.onnx
        with torch.no_grad():
            torch.onnx.export(_LogitsOnly(clone), (ids, mask), str(tmp), dynamo=False,
                              input_names=["input_ids", "attention_mask"], output_names=["logits"], dynamic_axes=axes,
                              opset_version=opset_version, do_constant_folding=False)
        del clone
        proto = onnx.load(str(tmp))
        _rename_initializers(proto.graph, _PREFIX)
        initializers = {i.name for i in proto.graph.initializer}
        missing = [n for n in layers if f"{n}.weight" not in initializers]
        if missing:
            raise RuntimeError(f"ONNX graph lacks weight initializers for {len(missing)} layers "
                               f"(e.g. {missing[0]}.weight)")
        onnx.save(proto, str(tmp))
    acts: dict = {}
    quantizers = list(activation_quantizers(model))
    consumers = graph_consumers(proto.graph)
    names = {n: activation_tensor_names(proto.graph, n, consumers) for n in {n for n, _, _ in quantizers}}
    for layer, side, q in quantizers:
        tensor = names[layer][0 if side == "input" else 1]
        entry = activation_entry(q, tensor, version)
        if tensor in acts:
            if acts[tensor] != entry:
                logger.warning("%s: layers sharing this input have different encodings; keeping the first", tensor)
            continue
        acts[tensor] = entry
    aimet.export_encodings(model, out_dir, version, filename_prefix, quantizer_args=quantizer_args(model),
                           activation_encodings=acts)
    return path
