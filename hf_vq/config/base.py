"""The base of every hf_vq config: one registered quant method ("hf_vq"), one subclass per algorithm.

Every config is validated when built and serializes to plain JSON. The algorithm is recorded as ``method`` so that a
reload (``from_pretrained(dir)`` with no config) dispatches to the right class.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "hf_vq"
FORMAT_VERSION = 1

# Written into config.json: transformers without the plug-in skips this config and loads random weights, silently.
LOADING_NOTE = "pip install hf_vq, then `import hf_vq` before from_pretrained (or use hf_vq.AutoQuantizedModelForCausalLM)"

# Runtime-only fields: shared by reference on deepcopy and never written to config.json.
_RUNTIME_FIELDS = ("dataset", "tokenizer", "activation_cache_dir")  # not written to config.json


@dataclass
class LayerSpec:
    """Resolved quantization settings for one Linear layer."""

    bits: int
    group_size: int
    sym: bool


class HfVQConfig(QuantizationConfigMixin):
    """Base class of every hf_vq config. Use a subclass (RTNConfig, GPTQConfig, ...)."""

    method: ClassVar[str] = ""
    _registry: ClassVar[dict[str, type["HfVQConfig"]]] = {}
    valid_bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 8)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.method:
            HfVQConfig._registry[cls.method] = cls

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = False,
        modules_to_not_convert: list[str] | None = None,
        module_overrides: dict[str, dict[str, Any]] | None = None,
        dataset: Any = None,
        tokenizer: Any = None,
        num_samples: int = 128,
        seq_len: int = 2048,
        seed: int = 0,
        dataset_config: str | None = None,
        dataset_split: str = "train",
        text_column: str = "text",
        calibration_batch_size: int = 8,
        calibration_dtype: str = "float32",
        clip_search: bool = False,
        first_token_weight: float | None = None,
        layers: dict[str, dict[str, Any]] | None = None,
        format_version: int = FORMAT_VERSION,
        **kwargs,
    ):
        kwargs.pop("quant_method", None)
        saved_method = kwargs.pop("method", None)
        kwargs.pop("calibration", None)
        kwargs.pop("loading", None)
        if saved_method is not None and saved_method != self.method:
            raise ValueError(f"config says method={saved_method!r} but was loaded as {type(self).__name__}")
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unknown arguments: {sorted(kwargs)}")
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert is not None else None
        self.module_overrides = dict(module_overrides or {})
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.seed = seed
        self.dataset_config = dataset_config
        self.dataset_split = dataset_split
        self.text_column = text_column
        self.calibration_batch_size = calibration_batch_size
        self.calibration_dtype = calibration_dtype
        # grid search of a per-row range shrink factor (the GPTQ reference's "mse" option)
        self.clip_search = clip_search
        # weight of each calibration window's first token (the attention sink) in the Hessians; see sink_weight()
        self.first_token_weight = first_token_weight
        # Filled after quantization: the exact per-layer skeleton a reload rebuilds.
        self.layers = layers
        self.format_version = format_version
        self.validate()

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        self._check_grid(self.bits, self.group_size, "")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"checkpoint format_version {self.format_version} is newer than this hf_vq supports ({FORMAT_VERSION}); "
                "upgrade hf_vq"
            )
        for pattern, override in self.module_overrides.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"module_overrides pattern {pattern!r} is not a valid regex: {e}") from None
            unknown = set(override) - {"bits", "group_size", "sym", "skip"}
            if unknown:
                raise ValueError(f"module_overrides[{pattern!r}] has unknown keys {sorted(unknown)}; "
                                 "allowed: bits, group_size, sym, skip")
            self._check_grid(override.get("bits", self.bits), override.get("group_size", self.group_size),
                             f" in module_overrides[{pattern!r}]")
        for name, value in (("num_samples", self.num_samples), ("seq_len", self.seq_len),
                            ("calibration_batch_size", self.calibration_batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        w = self.first_token_weight
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf")):
            raise ValueError(f"first_token_weight must be None (automatic) or a finite number >= 0, got {w!r}")
        if self.calibration_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"calibration_dtype must be 'float32' or 'bfloat16', got {self.calibration_dtype!r}")

    def _check_grid(self, bits, group_size, where):
        if bits not in self.valid_bits:
            raise ValueError(f"bits must be one of {self.valid_bits}{where}, got {bits!r}")
        if not isinstance(group_size, int) or (group_size != -1 and group_size < 2):
            raise ValueError(f"group_size must be -1 (per channel) or an integer >= 2{where}, got {group_size!r}")

    def sink_weight(self) -> float:
        """Hessian weight of each calibration window's first token. Every later token attends to it (attention sink)
        and its activations are massive, so at weight 1 a long window under-represents it: on SmolLM2, GPTQ 4-bit
        with 8 x 2048 calibration windows gave ppl@2048 (8 windows, FP 21.91) 26.65 at weight 1, 23.93 at 16, 23.54
        at 64 and 35.8 at 0; 32 x 512 windows gave 24.78 at 1, 23.52 at 4, 23.46 at 16. The default (None)
        gives the first token seq_len / 32 (a 1/32 share of each window's weight), never less than 1."""
        if self.first_token_weight is not None:
            return float(self.first_token_weight)
        return max(1.0, self.seq_len / 32)

    @property
    def needs_calibration(self) -> bool:
        return True

    # ------------------------------------------------------------ per-layer specs
    def spec_for(self, module_name: str) -> LayerSpec | None:
        """Settings for one Linear by name: the last matching override wins; None means keep it in float."""
        spec = {"bits": self.bits, "group_size": self.group_size, "sym": self.sym}
        for pattern, override in self.module_overrides.items():
            if re.search(pattern, module_name):
                if override.get("skip"):
                    return None
                spec.update({k: v for k, v in override.items() if k != "skip"})
        return LayerSpec(**spec)

    # ------------------------------------------------------------ serialization
    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        config_dict = dict(config_dict)
        method = config_dict.get("method", cls.method)
        target = HfVQConfig._registry.get(method)
        if target is None:
            raise ValueError(f"unknown hf_vq method {method!r}; known: {sorted(HfVQConfig._registry)}")
        config = target(**config_dict)
        for key in list(kwargs):
            if hasattr(config, key):
                setattr(config, key, kwargs.pop(key))
        return (config, kwargs) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in _RUNTIME_FIELDS}
        out["method"] = self.method
        out["calibration"] = self.describe_calibration()
        out["loading"] = LOADING_NOTE
        if isinstance(self.dataset, str):
            out["dataset"] = self.dataset
        if isinstance(self.tokenizer, str):
            out["tokenizer"] = self.tokenizer
        return out

    def describe_calibration(self) -> str | None:
        d = self.dataset
        if d is None:
            return None
        if isinstance(d, str):
            what = d
        elif isinstance(d, (list, tuple)):
            what = f"{len(d)} in-memory items"
        else:
            what = type(d).__name__
        return f"{what}; {self.num_samples} x {self.seq_len} tokens, seed {self.seed}"

    def __deepcopy__(self, memo):
        # from_pretrained deep-copies the config: share the tokenizer and dataset instead of copying them.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = v if k in _RUNTIME_FIELDS else copy.deepcopy(v, memo)
        return new

    def __eq__(self, other):
        return type(self) is type(other) and self.to_dict() == other.to_dict()
