"""Quantized fused mixture-of-experts weights (transformers 5 ``*Experts`` modules): QuantExperts (affine integer
codes: RTN, GPTQ, AdaScale) and VQExperts (GPTVQ codebooks).

Both keep the experts forward contract ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) ->
[T, H]`` and compute only the experts the router chose, decoding one expert's weight at a time (QuantExperts runs
each expert's rows through the kernels of hf_vq.nn.kernel_registry when one serves them, prepared per expert on
first use and dropped when the stored tensors change).

Layout: every expert has a first projection ``gate_up`` ([2I, H]; ``up`` [I, H] for ungated experts) and ``down``
[H, I], each stored like its Linear counterpart (QuantLinear / VQLinear) with a leading expert dimension:
``<proj>_qweight`` uint8 [E, N, packed K], ``<proj>_scales`` fp16 [E, N, G], ``<proj>_qzeros`` uint8 [E, N, G],
``<proj>_g_idx`` int32 [E, K] (affine), ``<proj>_vq_*`` (VQ), plus optional float biases ``<proj>_bias`` [E, N]. The
names never start with ``gate_up_proj``/``down_proj``: transformers' checkpoint converters match those prefixes and
would try to split the codes. Rows keep the original output order (gpt-oss's interleaved gate/up rows stay
interleaved), so the original module's gate function applies unchanged.

The activation between the projections comes from the original float module (its ``_apply_gate``, or ``act_fn`` for
ungated experts): ``attach_float_module`` keeps that module, with its parameters on ``meta``, outside the state dict;
``dequantize()`` fills a copy of it with the dequantized weights.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from hf_vq.nn import kernel_registry
from hf_vq.nn.expert_groups import ExpertGroups
from hf_vq.formats.affine import SCALE_DTYPE, AffineWeight, dequantize_groups, num_groups
from hf_vq.formats.packing import pack, packed_length, unpack
from hf_vq.formats.vq import VQLayout, VQWeight, decode_weight
from hf_vq.nn.records import (CheckpointError, Field, check_finite_positive, check_fp16_bits, check_int_range,
                              validate_record)
from hf_vq.nn.registry import register_layer_type

_PROJECTIONS = ("gate_up", "up", "down")
# config.json record: the experts' shape, plus one storage spec per projection (checked in check_record)
_SHAPE_SCHEMA = {"num_experts": Field("int", minimum=1), "hidden_size": Field("int", minimum=1),
                 "intermediate_size": Field("int", minimum=1), "gated": Field("bool"), "transposed": Field("bool"),
                 "bias": Field("bool")}


class FusedExperts(nn.Module):
    """What both storages share: shape, biases, the original module, the routed forward, ``dequantize()``.
    A subclass stores per-projection weights and implements ``dequantize_expert`` and ``spec``."""

    spec_schema: dict = {}

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, gated: bool, transposed: bool,
                 bias: bool, device=None, dtype=None):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gated, self.transposed, self.has_bias = gated, transposed, bias
        self.first = "gate_up" if gated else "up"
        # projection -> (out rows, in columns)
        self.shapes = {self.first: (2 * intermediate_size if gated else intermediate_size, hidden_size),
                       "down": (hidden_size, intermediate_size)}
        if bias:
            for p, (n, _k) in self.shapes.items():
                setattr(self, f"{p}_bias", nn.Parameter(torch.zeros(num_experts, n, device=device,
                                                                    dtype=dtype or torch.float32)))
        self.__dict__["_float_module"] = None

    # ------------------------------------------------------------------ records
    def layer_record(self) -> dict:
        return {"num_experts": self.num_experts, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "gated": self.gated, "transposed": self.transposed,
                "bias": self.has_bias, "gate_up": self.spec(self.first), "down": self.spec("down")}

    @classmethod
    def check_record(cls, record: dict, where: str = "layer record") -> None:
        """A clear error naming the field for a malformed record (before anything is allocated)."""
        if not isinstance(record, dict):
            raise CheckpointError(f"{where}: expected an object (a layer record), got {type(record).__name__}")
        validate_record({k: v for k, v in record.items() if k not in ("gate_up", "down")}, _SHAPE_SCHEMA, where)
        for p in ("gate_up", "down"):
            if p not in record:
                raise CheckpointError(f"{where}.{p}: missing (required)")
            validate_record(record[p], cls.spec_schema, f"{where}.{p}")

    @classmethod
    def from_record(cls, record: dict, dtype=None, where: str = "layer record"):
        cls.check_record(record, where)
        return cls(record["num_experts"], record["hidden_size"], record["intermediate_size"], record["gate_up"],
                   record["down"], gated=record["gated"], transposed=record["transposed"], bias=record["bias"],
                   dtype=dtype)

    def _set_biases(self, biases) -> None:
        if biases is not None:
            getattr(self, f"{self.first}_bias").data.copy_(biases[0].detach())
            self.down_bias.data.copy_(biases[1].detach())

    # ------------------------------------------------------------------ the original module
    def attach_float_module(self, module: nn.Module) -> None:
        """Keep the original experts module (parameters moved to meta) for its gate function and ``dequantize()``."""
        template = copy.copy(module)
        template._buffers, template._modules = dict(module._buffers), dict(module._modules)
        template._parameters = {n: None if p is None else nn.Parameter(torch.empty(p.shape, dtype=p.dtype,
                                                                                     device="meta"), p.requires_grad)
                                for n, p in module._parameters.items()}
        self.__dict__["_float_module"] = template

    def _template(self) -> nn.Module:
        t = self.__dict__.get("_float_module")
        if t is None:
            raise RuntimeError(f"{type(self).__name__} has no float experts module attached (attach_float_module): "
                               "it was not built by hf_vq.model, so its gate function and float class are unknown")
        return t

    # ------------------------------------------------------------------ weights
    def dequantize_expert(self, proj: str, expert: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {n: self._buffers[n] for n in self.tensor_names if self._buffers.get(n) is not None}

    def num_weights(self) -> int:
        return self.num_experts * sum(n * k for n, k in self.shapes.values())

    def bits_per_value(self) -> float:
        """Stored bits per expert weight (biases excluded)."""
        return 8.0 * sum(b.numel() * b.element_size() for b in self.stored_tensors().values()) / self.num_weights()

    def dequantize(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The original fused float experts module, holding the dequantized weights."""
        template = self._template()
        float_mod = copy.deepcopy(template)
        device = next(iter(self.stored_tensors().values())).device
        for proj in self.shapes:
            pname = f"{proj}_proj"
            dt = dtype or template._parameters[pname].dtype
            w = torch.stack([self.dequantize_expert(proj, e, dt) for e in range(self.num_experts)])
            if self.transposed:
                w = w.transpose(1, 2)
            float_mod._parameters[pname] = nn.Parameter(w.contiguous().to(device), requires_grad=False)
            if self.has_bias:
                b = getattr(self, f"{proj}_bias").detach()
                float_mod._parameters[f"{pname}_bias"] = nn.Parameter(b.to(dtype or b.dtype).clone(),
                                                                      requires_grad=False)
        return float_mod

    to_linear = dequantize  # what hf_vq's model-level dequantize calls on every quantized module

    # ------------------------------------------------------------------ forward
    storage = ""              # the kernel registry's storage format of one expert's projection
    exact_decode = False      # True: every call takes the exact dequantized path
    _source_buffer = ""       # the per-projection buffer whose replacement invalidates prepared kernels

    def expert_weight(self, proj: str, expert: int):
        """One expert's projection as an hf_vq.formats object (what kernels prepare from)."""
        raise NotImplementedError

    def _fast_project(self, proj: str, expert: int, x: torch.Tensor) -> torch.Tensor | None:
        if self.exact_decode:
            return None
        states = self.__dict__.setdefault("_kernel_states", kernel_registry.KernelStates())
        for kernel in kernel_registry.candidates(self.storage, x.device.type, x.shape[0]):
            state = states.get(kernel, (proj, expert), self._buffers[f"{proj}_{self._source_buffer}"],
                               lambda: kernel.prepare(self.expert_weight(proj, expert)))
            if state is not None:
                return kernel.run(state, x, None)
        return None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.__dict__.pop("_kernel_states", None)

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_kernel_states", None)
        return super()._apply(fn, recurse)

    def _project(self, proj: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        bias = getattr(self, f"{proj}_bias")[expert].to(x.dtype) if self.has_bias else None
        if not (torch.is_grad_enabled() and x.requires_grad):  # fast kernels have no backward
            y = self._fast_project(proj, expert, x)
            if y is not None:
                return y if bias is None else y + bias
        return F.linear(x, self.dequantize_expert(proj, expert, x.dtype), bias)

    def _grouped_forward(self, hidden_states, groups: ExpertGroups, top_k_weights, activation):
        """Both projections of every routed expert in one kernel launch each (a grouped kernel of the registry's
        ``<storage>_experts``), or None when none serves this call."""
        states = self.__dict__.setdefault("_kernel_states", kernel_registry.KernelStates())
        rows = max(groups.counts, default=0)
        for kernel in kernel_registry.candidates(f"{self.storage}_experts", hidden_states.device.type, rows):
            prepared = [states.get(kernel, (p, "grouped"), self._buffers[f"{p}_{self._source_buffer}"],
                                   lambda p=p: kernel.prepare([self.expert_weight(p, e)
                                                               for e in range(self.num_experts)]))
                        for p in (self.first, "down")]
            if None in prepared:
                continue
            token, slot = groups.pairs()
            y = kernel.run(prepared[0], hidden_states[token], groups)
            if y is None:
                return None
            h = activation(self._grouped_bias(self.first, y, groups))
            y = kernel.run(prepared[1], h, groups)
            if y is None:
                return None
            y = self._grouped_bias("down", y, groups) * top_k_weights[token, slot, None]
            return torch.zeros_like(hidden_states).index_add_(0, token, y.to(hidden_states.dtype))
        return None

    def _grouped_bias(self, proj: str, y: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
        if not self.has_bias:
            return y
        return y + getattr(self, f"{proj}_bias")[groups.expert_of_rows(y.device)].to(y.dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        template = self._template()
        activation = template._apply_gate if self.gated else template.act_fn
        groups = ExpertGroups(top_k_index, self.num_experts)
        if not self.exact_decode and not (torch.is_grad_enabled() and hidden_states.requires_grad):
            out = self._grouped_forward(hidden_states, groups, top_k_weights, activation)
            if out is not None:
                return out
        out = torch.zeros_like(hidden_states)
        for e, count in enumerate(groups.counts):
            if not count:
                continue
            token, slot = groups.tokens(e)
            h = activation(self._project(self.first, e, hidden_states[token]))
            y = self._project("down", e, h) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        parts = [f"{p}: {n}x{k} {self.spec(p)}" for p, (n, k) in self.shapes.items()]
        return f"experts={self.num_experts}, " + ", ".join(parts) + (", bias" if self.has_bias else "")


def _same(ws: list, key, what: str) -> None:
    kinds = {key(w) for w in ws}
    if len(kinds) != 1:
        raise ValueError(f"fused experts: all experts' {what} weights must share one storage layout, got "
                         f"{sorted(map(str, kinds))}")


@register_layer_type("affine_experts")
class QuantExperts(FusedExperts):
    tensor_names = tuple(f"{p}_{s}" for p in _PROJECTIONS for s in ("qweight", "scales", "qzeros", "g_idx"))
    spec_schema = {"bits": Field("int", minimum=2, maximum=8), "group_size": Field("int", minimum=1, also=(-1,)),
                   "sym": Field("bool")}
    storage, _source_buffer = "affine", "qweight"

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, gate_up: dict, down: dict,
                 gated: bool = True, transposed: bool = False, bias: bool = False, device=None, dtype=None):
        super().__init__(num_experts, hidden_size, intermediate_size, gated, transposed, bias, device, dtype)
        self.specs = {self.first: dict(gate_up), "down": dict(down)}
        for p, (n, k) in self.shapes.items():
            bits, g = self.specs[p]["bits"], num_groups(k, self.specs[p]["group_size"])
            self.register_buffer(f"{p}_qweight", torch.zeros(num_experts, n, packed_length(k, bits), dtype=torch.uint8,
                                                             device=device))
            self.register_buffer(f"{p}_scales", torch.zeros(num_experts, n, g, dtype=SCALE_DTYPE, device=device))
            self.register_buffer(f"{p}_qzeros", torch.zeros(num_experts, n, g, dtype=torch.uint8, device=device))
            self.register_buffer(f"{p}_g_idx", torch.zeros(num_experts, k, dtype=torch.int32, device=device))

    def spec(self, proj: str) -> dict:
        return dict(self.specs[proj])

    @classmethod
    def from_affine(cls, gate_up: list[AffineWeight], down: list[AffineWeight], gated: bool = True,
                    transposed: bool = False, biases: tuple[torch.Tensor, torch.Tensor] | None = None) -> "QuantExperts":
        """Stack per-expert AffineWeights (first projection [N, H] and down [H, I], in [out, in] layout)."""
        if len(gate_up) != len(down) or not gate_up:
            raise ValueError(f"fused experts need one gate_up and one down weight per expert, got {len(gate_up)} "
                             f"and {len(down)}")
        spec = {}
        for p, ws in (("gate_up", gate_up), ("down", down)):
            _same(ws, lambda w: (w.bits, w.group_size, w.sym, w.shape), p)
            spec[p] = {"bits": ws[0].bits, "group_size": ws[0].group_size, "sym": ws[0].sym}
        hidden, inter = down[0].shape
        mod = cls(len(gate_up), hidden, inter, spec["gate_up"], spec["down"], gated=gated, transposed=transposed,
                  bias=biases is not None, device=gate_up[0].codes.device,
                  dtype=biases[0].dtype if biases is not None else None)
        for p, ws in ((mod.first, gate_up), ("down", down)):
            bits = mod.specs[p]["bits"]
            getattr(mod, f"{p}_qweight").copy_(torch.stack([pack(w.codes, bits) for w in ws]))
            getattr(mod, f"{p}_scales").copy_(torch.stack([w.scales for w in ws]))
            getattr(mod, f"{p}_qzeros").copy_(torch.stack([w.zeros for w in ws]))
            getattr(mod, f"{p}_g_idx").copy_(torch.stack([w.g_idx for w in ws]))
        mod._set_biases(biases)
        return mod

    def affine_weight(self, proj: str, expert: int) -> AffineWeight:
        s = self.specs[proj]
        codes = unpack(getattr(self, f"{proj}_qweight")[expert], s["bits"], self.shapes[proj][1])
        return AffineWeight(codes, getattr(self, f"{proj}_scales")[expert], getattr(self, f"{proj}_qzeros")[expert],
                            getattr(self, f"{proj}_g_idx")[expert], s["bits"], s["group_size"], s["sym"])

    def dequantize_expert(self, proj: str, expert: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One expert's weight of projection ``proj`` ("gate_up"/"up" or "down") in [out, in] layout."""
        aw = self.affine_weight(proj, expert)
        return dequantize_groups(aw.codes, aw.scales, aw.zeros, aw.g_idx, dtype, aw.group_size)

    def check_stored(self, where: str) -> None:
        """Value ranges of the loaded tensors: finite positive scales, zero-points and g_idx inside their grids."""
        for p, (_n, k) in self.shapes.items():
            bits, gs = self.specs[p]["bits"], self.specs[p]["group_size"]
            check_finite_positive(getattr(self, f"{p}_scales"), f"{where}.{p}_scales")
            check_int_range(getattr(self, f"{p}_qzeros"), 0, 2**bits - 1, f"{where}.{p}_qzeros")
            check_int_range(getattr(self, f"{p}_g_idx"), 0, num_groups(k, gs) - 1, f"{where}.{p}_g_idx")

    expert_weight = affine_weight

    def _apply(self, fn, recurse=True):
        # scales stay in their storage dtype (model.to(bfloat16) must not re-round the grid), as in QuantLinear
        scales = {n: self._buffers.pop(n) for n in list(self._buffers) if n.endswith("_scales")}
        try:
            super()._apply(fn, recurse)
        finally:
            for n, s in scales.items():
                probe = fn(torch.empty(0, dtype=s.dtype, device=s.device))
                self._buffers[n] = s.to(probe.device)
        return self


_VQ_FIELDS = ("vector_dim", "index_bits", "codebook_bits", "rows_per_block", "cols_per_block", "normalize")


@register_layer_type("vq_experts")
class VQExperts(FusedExperts):
    """GPTVQ experts: every expert's projection is a VQ weight of one layout (its own codebooks)."""

    tensor_names = tuple(f"{p}_{s}" for p in _PROJECTIONS for s in ("vq_indices", "vq_codebook", "vq_codebook_scales",
                                                                    "vq_norm_codes", "vq_norm_base"))
    spec_schema = {"vector_dim": Field("int", choices=(1, 2, 4)), "index_bits": Field("int", minimum=1, maximum=8),
                   "codebook_bits": Field("int", choices=(4, 8, 16)), "rows_per_block": Field("int", minimum=1),
                   "cols_per_block": Field("int", minimum=1), "normalize": Field("bool")}

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, gate_up: dict, down: dict,
                 gated: bool = True, transposed: bool = False, bias: bool = False, device=None, dtype=None):
        super().__init__(num_experts, hidden_size, intermediate_size, gated, transposed, bias, device, dtype)
        self.layouts = {}
        for p, spec in ((self.first, gate_up), ("down", down)):
            n, k = self.shapes[p]
            lay = VQLayout(n, k, *(spec[f] for f in _VQ_FIELDS))
            self.layouts[p] = lay
            for name, (shape, dt) in lay.tensor_shapes().items():
                self.register_buffer(f"{p}_{name}", torch.zeros((num_experts, *shape), dtype=dt, device=device))

    @classmethod
    def check_record(cls, record: dict, where: str = "layer record") -> None:
        super().check_record(record, where)
        for p in ("gate_up", "down"):
            if record[p]["cols_per_block"] % record[p]["vector_dim"]:
                raise CheckpointError(f"{where}.{p}: cols_per_block must be a multiple of vector_dim")

    def spec(self, proj: str) -> dict:
        lay = self.layouts[proj]
        return {f: getattr(lay, f) for f in _VQ_FIELDS}

    @classmethod
    def from_vq(cls, gate_up: list[VQWeight], down: list[VQWeight], gated: bool = True, transposed: bool = False,
                biases: tuple[torch.Tensor, torch.Tensor] | None = None) -> "VQExperts":
        spec = {}
        for p, ws in (("gate_up", gate_up), ("down", down)):
            _same(ws, lambda w: w.layout, p)
            spec[p] = {f: getattr(ws[0].layout, f) for f in _VQ_FIELDS}
        hidden, inter = down[0].layout.out_features, down[0].layout.in_features
        device = gate_up[0].tensors["vq_indices"].device
        mod = cls(len(gate_up), hidden, inter, spec["gate_up"], spec["down"], gated=gated, transposed=transposed,
                  bias=biases is not None, device=device, dtype=biases[0].dtype if biases is not None else None)
        for p, ws in ((mod.first, gate_up), ("down", down)):
            for name in mod.layouts[p].tensor_shapes():
                getattr(mod, f"{p}_{name}").copy_(torch.stack([w.tensors[name] for w in ws]))
        mod._set_biases(biases)
        return mod

    storage, _source_buffer = "vq", "vq_indices"

    def _tensors(self, proj: str, expert: int) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"{proj}_{name}")[expert] for name in self.layouts[proj].tensor_shapes()}

    def expert_weight(self, proj: str, expert: int) -> VQWeight:
        return VQWeight(self.layouts[proj], self._tensors(proj, expert))

    def dequantize_expert(self, proj: str, expert: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return decode_weight(self.layouts[proj], self._tensors(proj, expert)).to(dtype)

    def check_stored(self, where: str) -> None:
        for p, lay in self.layouts.items():
            if lay.codebook_bits == 16:
                check_fp16_bits(getattr(self, f"{p}_vq_codebook"), f"{where}.{p}_vq_codebook", positive=False)
            else:
                check_fp16_bits(getattr(self, f"{p}_vq_codebook_scales"), f"{where}.{p}_vq_codebook_scales",
                                positive=True)
            if lay.normalize:
                check_finite_positive(getattr(self, f"{p}_vq_norm_base").view(torch.float32),
                                      f"{where}.{p}_vq_norm_base")
