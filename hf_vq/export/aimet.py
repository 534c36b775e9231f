"""AIMET encodings (JSON) export and import for hf_vq models.

``export_encodings(model, out_dir, version="1.0.0" | "0.6.1")`` writes ``<out_dir>/<filename_prefix>.encodings``
with the top-level layout of aimet-torch 2.42.0: ``producer``, ``version``, ``activation_encodings`` (given by
hf_vq.export.quantsim for QuantSim models, else empty), ``param_encodings``, ``excluded_layers`` (Linear modules left in
float),
``quantizer_args`` (quant_scheme "min_max" for RTN, else the hf_vq method name; activation_bitwidth is a placeholder
16). Parameter names are torch names (``model.layers.0.self_attn.q_proj.weight``); scales are per torch output
channel. Offsets follow AIMET: ``x = (q + offset) * scale`` on the unsigned grid, i.e. offset = -zero (-2^(bits-1)
for symmetric layers). Files have one entry per line (json's fast encoder), same JSON content as an indented dump.

QuantLinear (affine) entries, exact to the module's grid (fp16 scales written as their exact float value):

- one group per row -> 1.0.0 ``PER_CHANNEL``; several groups -> ``PER_BLOCK`` with ``block_size`` = group size, or
  ``LPBQ`` when ``lpbq`` allows it and the group scales factor exactly as int * per-channel scale (layers built with
  :func:`hf_vq.formats.blockwise.lpbq_affine_weight` do); 0.6.1 always writes one dict per channel / block.
- A group size that does not divide ``in_features`` (e.g. 576 columns, group 128: last group 64) cannot be one
  AIMET block. With ``split_uneven_groups=True`` (default) the layer is written with the largest block size at which
  every group boundary falls (gcd, here 64), repeating each group's scale: still exact. ``False`` raises instead.

Hook for other layer types: a module that defines ``aimet_param_encodings(version) -> dict`` contributes entries
itself (checked before the built-in QuantLinear handling). It returns ``{param_local_name: encoding}``, where the
encoding is, for "1.0.0", one entry dict in the 1.0.0 layout (``name`` is filled in by the exporter) and, for
"0.6.1", the list of per-channel / per-block dicts. A module with ``layer_type`` registered in hf_vq but neither
case raises TypeError. For import, such a module may define ``load_aimet_param_encoding(local_name, encoding)``
taking a :class:`ParamEncoding`.

``read_encodings(path)`` parses 0.6.1, 1.0.0 and 2.0.0 files (AIMET's own included) into :class:`ParamEncoding`s;
``load_encodings(model, path)`` applies 0.6.1 / 1.0.0 param encodings to the model's hf_vq layers: a QuantLinear
is put on the file's grid (scales/zeros replaced, its current weight re-rounded onto that grid, which keeps the
codes unchanged when the grid is the one the layer already has).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from hf_vq.nn.experts import FusedExperts
from hf_vq.nn.qlinear import QuantLinear
from hf_vq.nn.registry import LAYER_TYPES
from hf_vq.utils.io import atomic_write_text
from hf_vq.utils.version import __version__
from hf_vq.export.aimet_common import _ONNX_SUFFIX, ENC_TYPES, VERSIONS  # noqa: F401
from hf_vq.formats.encodings import affine_encoding
from hf_vq.export.common import reads_whole_model

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------ export
quantlinear_encoding = affine_encoding  # the name this module has always had


def collect_param_encodings(model: nn.Module, version: str = "1.0.0", **kw) -> dict[str, Any]:
    """{param name: encoding} for every hf_vq quantized layer of ``model``."""
    out: dict[str, Any] = {}
    for mname, mod in model.named_modules():
        prefix = f"{mname}." if mname else ""
        hook = getattr(mod, "aimet_param_encodings", None)
        if callable(hook):
            for local, enc in hook(version).items():
                if version == "1.0.0":
                    if not isinstance(enc, dict):
                        raise TypeError(f"{mname}.aimet_param_encodings('1.0.0') must map names to entry dicts")
                    enc = {"name": prefix + local, **{k: v for k, v in enc.items() if k != "name"}}
                elif not isinstance(enc, list):
                    raise TypeError(f"{mname}.aimet_param_encodings('0.6.1') must map names to lists of dicts")
                out[prefix + local] = enc
        elif isinstance(mod, QuantLinear):
            out[prefix + "weight"] = quantlinear_encoding(mod, prefix + "weight", version, **kw)
        elif isinstance(mod, FusedExperts):
            raise ValueError(f"{mname} is a fused mixture-of-experts module ({type(mod).__name__}): AIMET encodings "
                             "describe per-tensor Linear weights and have no entry for 3-D expert weights, so MoE "
                             "models cannot be exported to AIMET encodings")
        elif getattr(mod, "layer_type", None) in LAYER_TYPES:
            raise TypeError(f"{mname}: hf_vq layer type {mod.layer_type!r} has no aimet_param_encodings(version)")
    return out


def _quant_method(model) -> str | None:
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    return qc.get("method") if isinstance(qc, dict) else getattr(qc, "method", None)


@reads_whole_model
def export_encodings(model: nn.Module, out_dir: str | os.PathLike, version: str = "1.0.0",
                     filename_prefix: str = "model", *, lpbq: bool | str = "auto", decompressed_bw: int = 8,
                     split_uneven_groups: bool = True, quantizer_args: dict | None = None,
                     activation_encodings: dict[str, Any] | None = None) -> Path:
    """Write ``<out_dir>/<filename_prefix>.encodings`` (atomic) and return its path. See the module docstring."""
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    if lpbq not in (True, False, "auto"):
        raise ValueError(f"lpbq must be True, False or 'auto', got {lpbq!r}")
    if not filename_prefix or os.sep in filename_prefix:
        raise ValueError(f"filename_prefix must be a plain file name, got {filename_prefix!r}")
    params = collect_param_encodings(model, version, lpbq=lpbq, decompressed_bw=decompressed_bw,
                                     split_uneven_groups=split_uneven_groups)
    if not params:
        raise ValueError("the model has no hf_vq quantized layer to export")
    quantized = {n.rpartition(".")[0] for n in params}
    excluded = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
    bits = [m.bits for m in model.modules() if isinstance(m, QuantLinear)]
    method = _quant_method(model)
    args = {"quant_scheme": "min_max" if method in (None, "rtn") else str(method),
            "param_bitwidth": max(bits) if bits else 8, "activation_bitwidth": 16, "dtype": "int",
            "is_symmetric": all(m.sym for m in model.modules() if isinstance(m, QuantLinear)),
            "per_channel_quantization": True}
    args.update(quantizer_args or {})
    acts = activation_encodings or {}  # {tensor name: entry}, from hf_vq.export.quantsim
    doc = {"producer": {"package": "hf_vq", "version": __version__}, "version": version,
           "activation_encodings": acts if version == "0.6.1" else list(acts.values()),
           "param_encodings": params if version == "0.6.1" else list(params.values()),
           "excluded_layers": excluded, "quantizer_args": args}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{filename_prefix}.encodings"
    atomic_write_text(path, _dumps(doc))
    return path


def _dumps(doc: dict) -> str:
    """Indented top level, one entry per line: json's C encoder only runs without indent (a 30x difference)."""
    def block(v, pad):
        if isinstance(v, list) and v:
            items = [pad + "  " + json.dumps(x, allow_nan=False) for x in v]
        elif isinstance(v, dict) and v:
            items = [f"{pad}  {json.dumps(k)}: {json.dumps(x, allow_nan=False)}" for k, x in v.items()]
        else:
            return json.dumps(v, allow_nan=False)
        o, c = ("[", "]") if isinstance(v, list) else ("{", "}")
        return o + "\n" + ",\n".join(items) + "\n" + pad + c
    return "{\n" + ",\n".join(f"  {json.dumps(k)}: {block(v, '  ')}" for k, v in doc.items()) + "\n}\n"


# the reader lives in its own module; re-exported so callers can keep using hf_vq.export.aimet
from hf_vq.export.aimet_import import Encodings, ParamEncoding, load_encodings, read_encodings  # noqa: E402,F401
