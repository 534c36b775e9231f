"""The base of every hf_vq config: one registered quant method ("hf_vq"), one subclass per algorithm.

Each class declares its fields in a :class:`~hf_vq.config.schema.Schema` (``schema``): construction, ``from_dict``
and attribute assignment check every value against it, and a field a class does not take is refused with
:class:`ConfigError`. Configs serialize to plain JSON; the algorithm is recorded as ``method`` so that a reload
(``from_pretrained(dir)`` with no config) dispatches to the right class.
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from hf_vq.config.schema import (Bool, ConfigError, Field, Float, GroupSize, Instance, Int, Optional, Overrides,
                                 Records, Schema, Str, StrList, show)

QUANT_METHOD = "hf_vq"
FORMAT_VERSION = 1
VALID_BITS = (2, 3, 4, 8)
LM_HEAD_BITS = (4, 8)

# Written into config.json: transformers without the plug-in skips this config and loads random weights, silently.
LOADING_NOTE = "pip install hf_vq, then `import hf_vq` before from_pretrained (or use hf_vq.AutoQuantizedModelForCausalLM)"
NOTES = ("calibration", "loading")  # notes for people in config.json; ignored on load


@dataclass
class LayerSpec:
    """Resolved quantization settings for one Linear layer (None: the method has no affine grid, e.g. GPTVQ)."""

    bits: int | None
    group_size: int | None
    sym: bool | None


class FormatVersion(Int):
    def __init__(self):
        super().__init__(lo=1, what=f"an integer in 1..{FORMAT_VERSION}")

    def __call__(self, name, value, where=""):
        value = super().__call__(name, value, where)
        if value > FORMAT_VERSION:
            raise ConfigError(f"checkpoint {name} {value} is newer than this hf_vq supports ({FORMAT_VERSION}); "
                              "upgrade hf_vq", field=name)
        return value


class Device(Str):
    """"auto" or a torch device string ("cpu", "cuda", "cuda:1", ...)."""

    def __init__(self):
        super().__init__()
        self.what = "'auto' or a torch device such as 'cpu' or 'cuda:0'"

    def __call__(self, name, value, where=""):
        value = super().__call__(name, value, where)
        if value != "auto":
            try:
                torch.device(value)
            except (RuntimeError, ValueError):
                raise ConfigError(f"{name} must be {self.what}, got {value!r}", field=name) from None
        return value


BITS = Int(choices=VALID_BITS)
GRID_OVERRIDES = {"bits": BITS, "group_size": GroupSize(), "sym": Bool(), "skip": Bool()}
DATASET = Instance((str, os.PathLike, list, tuple, torch.Tensor, torch.utils.data.DataLoader),
                   "a list of texts, a text file/folder or datasets name, token ids (a tensor or a list of "
                   "tensors/dicts) or a DataLoader")
TOKENIZER = Instance((str, os.PathLike), "a tokenizer object or a tokenizer path/name", callable_ok=True)

# Calibration fields: taken by every method that runs the model on data (all but RTN).
CALIBRATION_FIELDS = ("dataset", "tokenizer", "num_samples", "seq_len", "seed", "dataset_config", "dataset_split",
                      "text_column", "calibration_batch_size", "calibration_dtype", "first_token_weight",
                      "expert_calibration", "min_expert_tokens", "quantization_device", "resume_dir")
EXPERT_CALIBRATION_MODES = ("routed", "all")

BASE_SCHEMA = Schema(dict(
    bits=Field(BITS, 4, doc="bits per weight"),
    group_size=Field(GroupSize(), 128, doc="input columns per scale/zero group; -1 = per output channel"),
    sym=Field(Bool(), False, doc="symmetric grid (no zero-point)"),
    modules_to_not_convert=Field(Optional(StrList()), None, doc="kept in float; default: lm_head, tied embeddings"),
    module_overrides=Field(Overrides(GRID_OVERRIDES), {}, doc="{regex: {bits, group_size, sym, skip}}; last wins"),
    dataset=Field(Optional(DATASET), None, saved="text", doc="calibration data"),
    tokenizer=Field(Optional(TOKENIZER), None, saved="text", doc="default: the model's own path"),
    num_samples=Field(Int(1), 128, doc="calibration windows"),
    seq_len=Field(Int(1), 2048, doc="tokens per calibration window"),
    seed=Field(Int(0, hi=2**32 - 1, what="an integer in [0, 2**32)"), 0, doc="window sampling and method seeds"),
    dataset_config=Field(Optional(Str()), None, doc="datasets config name"),
    dataset_split=Field(Str(), "train", doc="datasets split"),
    text_column=Field(Str(), "text", doc="datasets text column"),
    calibration_batch_size=Field(Int(1), 8, doc="windows per forward pass"),
    calibration_dtype=Field(Str(("float32", "bfloat16")), "float32", doc="autocast dtype of the forward passes"),
    clip_search=Field(Bool(), False, doc="grid search of a per-row range shrink factor (GPTQ reference's 'mse')"),
    first_token_weight=Field(Optional(Float(lo=0.0), what="None (automatic) or a finite number >= 0"), None,
                             doc="Hessian weight of each window's first token (the attention sink); None: seq_len / 32, "
                                 "at least 1; 1 gives the reference GPTQ Hessian"),
    expert_calibration=Field(Str(EXPERT_CALIBRATION_MODES), "routed",
                             doc="fused MoE experts: Hessians from the tokens routed to each expert ('routed') or from "
                                 "every calibration token ('all'; the block output still follows the router)"),
    min_expert_tokens=Field(Float(lo=0.0), 0.01,
                            doc="routed mode: an expert routed fewer tokens (a fraction of the calibration tokens "
                                "if < 1, else a count) gets all-token Hessians; listed in the run report"),
    quantization_device=Field(Optional(Device()), None, saved="never",
                              doc="where each decoder block is calibrated and quantized, one at a time ('cuda:0', "
                                  "'cpu', 'auto'); default: where the block is"),
    resume_dir=Field(Optional(Instance((str, os.PathLike), "a folder path")), None, saved="never",
                     doc="store finished blocks there; a rerun with the same config continues after them"),
    lm_head_bits=Field(Optional(Int(choices=LM_HEAD_BITS), what=f"None (float) or one of {LM_HEAD_BITS}"), None,
                       doc="the output head (lm_head) on a symmetric grid of this many bits; None: kept in float. A "
                           "tied head is untied: the input embedding stays float, the saved config has "
                           "tie_word_embeddings=False. RTN rounds it; the calibrating methods run GPTQ on a Hessian "
                           "from one whole-model pass over the calibration windows"),
    lm_head_group_size=Field(GroupSize(), -1, doc="input columns per lm_head scale; -1 = per output channel"),
    quantize_vision=Field(Bool(), False, doc="multimodal models: also quantize the vision tower (default: the "
                                             "language model only)"),
    layers=Field(Optional(Records()), None, doc="filled after quantization: the per-layer skeleton a reload rebuilds"),
    format_version=Field(FormatVersion(), FORMAT_VERSION, doc="checkpoint layout version"),
))


def _same(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - an arbitrary object's __eq__ may raise or be ambiguous
        return False


def _prefixed(cls: type, e: ConfigError) -> ConfigError:
    msg = str(e)
    return e if msg.startswith(cls.__name__) else ConfigError(f"{cls.__name__}: {msg}", field=e.field)


class HfVQConfig(QuantizationConfigMixin):
    """Base class of every hf_vq config. Use a subclass (RTNConfig, GPTQConfig, ...); fields are keyword-only and
    listed in the class's ``schema`` (``inspect.signature(cls)`` shows them with their defaults)."""

    method: ClassVar[str] = ""
    _registry: ClassVar[dict[str, type["HfVQConfig"]]] = {}
    valid_bits: ClassVar[tuple[int, ...]] = VALID_BITS
    schema: ClassVar[Schema] = BASE_SCHEMA
    derived: ClassVar[tuple[str, ...]] = ()  # read-only properties also written to config.json
    # (field, why it has no effect, test on the config): a non-default value that has no effect warns at construction
    inert: ClassVar[tuple] = (
        ("min_expert_tokens", "the few-token fallback applies to expert_calibration='routed' only",
         lambda c: c.expert_calibration != "routed"),
        ("lm_head_group_size", "lm_head_bits is None (the head stays in float)", lambda c: c.lm_head_bits is None),
    )

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _finish_class(cls)
        if cls.method:
            HfVQConfig._registry[cls.method] = cls

    def __init__(self, /, *args, **kwargs):
        cls = type(self)
        try:
            if args:
                raise ConfigError(f"pass config fields by keyword (got {len(args)} positional argument(s))")
            cls._take_saved_notes(kwargs)
            unknown = [k for k in kwargs if k not in cls.schema.fields]
            if unknown:
                raise cls._unknown_fields(unknown)
            object.__setattr__(self, "quant_method", QUANT_METHOD)
            for name, f in cls.schema.fields.items():
                value = kwargs[name] if name in kwargs else copy.deepcopy(f.default)
                object.__setattr__(self, name, f.validate(name, value))
            self.validate()
        except ConfigError as e:
            raise _prefixed(cls, e) from None
        object.__setattr__(self, "_ready", True)
        for name, why, no_effect in cls.inert:
            if name in cls.schema.fields and name in kwargs and \
                    not _same(kwargs[name], cls.schema.fields[name].default) and no_effect(self):
                warnings.warn(f"{cls.__name__}: {name}={show(kwargs[name])} has no effect: {why}", stacklevel=2)

    @classmethod
    def _take_saved_notes(cls, kwargs: dict) -> None:
        """Pop the keys to_dict writes besides the fields (quant_method, method, notes) and check them."""
        qm = kwargs.pop("quant_method", QUANT_METHOD)
        if not isinstance(qm, str) or qm != QUANT_METHOD:
            raise ConfigError(f"quant_method must be {QUANT_METHOD!r}, got {show(qm)}", field="quant_method")
        method = kwargs.pop("method", None)
        if method is not None and (not isinstance(method, str) or method != cls.method):
            raise ConfigError(f"config says method={show(method)} but was loaded as {cls.__name__}", field="method")
        for note in NOTES:
            value = kwargs.pop(note, None)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{note} must be a string note, got {show(value)}", field=note)

    @classmethod
    def _unknown_fields(cls, names: list[str]) -> ConfigError:
        parts, rest = [], []
        for name in names:
            owners = [c.__name__ for c in HfVQConfig._registry.values() if name in c.schema.fields]
            if name in cls.schema.refused:
                parts.append(f"{cls.__name__} does not take {name!r}: {cls.schema.refused[name]}")
            elif owners or name in cls.derived:
                parts.append(f"{cls.__name__} does not take {name!r} (a field of {', '.join(owners) or 'no config'})")
            else:
                rest.append(name)
        if rest:
            parts.append(f"{cls.__name__} got unknown arguments: {sorted(rest)}")
        return ConfigError("; ".join(parts), field=names[0])

    def __setattr__(self, name: str, value: Any) -> None:
        cls = type(self)
        f = cls.schema.fields.get(name)
        if f is None:
            if name.startswith("_") or (name == "quant_method" and isinstance(value, str) and value == QUANT_METHOD):
                object.__setattr__(self, name, value)
                return
            raise _prefixed(cls, cls._unknown_fields([name]))
        try:
            value = f.validate(name, value)
            if not self.__dict__.get("_ready"):
                object.__setattr__(self, name, value)
                return
            old = self.__dict__[name]
            object.__setattr__(self, name, value)
            try:
                self.validate()  # cross-field rules hold after every assignment
            except ConfigError:
                object.__setattr__(self, name, old)
                raise
        except ConfigError as e:
            raise _prefixed(cls, e) from None

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        """Cross-field rules (each field's own type and range are checked by the schema). Raises ConfigError."""
        head_bits = self.__dict__.get("lm_head_bits")
        skipped = self.__dict__.get("modules_to_not_convert") or []
        if head_bits is not None and "lm_head" in skipped:
            raise ConfigError(f"lm_head_bits={head_bits} quantizes lm_head, which modules_to_not_convert keeps in "
                              "float: drop one of them", field="lm_head_bits")

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
        spec = {k: getattr(self, k, None) for k in ("bits", "group_size", "sym")}
        for pattern, override in self.module_overrides.items():
            if re.search(pattern, module_name):
                if override.get("skip"):
                    return None
                spec.update({k: v for k, v in override.items() if k != "skip"})
        return LayerSpec(**spec)

    # ------------------------------------------------------------ serialization
    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        """Rebuild a config from its config.json dict, dispatching on ``method``. Fields older versions wrote for
        every method are accepted where they do not apply (they had no effect; a non-default value warns), and
        derived fields must agree with the fields they derive from."""
        try:
            if not isinstance(config_dict, Mapping):
                raise ConfigError(f"an hf_vq quantization config must be a dict, got {type(config_dict).__name__}")
            d = dict(config_dict)
            bad = [k for k in d if not isinstance(k, str)]
            if bad:
                raise ConfigError(f"config keys must be strings, got {show(bad[0])}")
            method = d.get("method", cls.method)
            if not isinstance(method, str) or method not in HfVQConfig._registry:
                raise ConfigError(f"unknown hf_vq method {show(method)}; known: {sorted(HfVQConfig._registry)}",
                                  field="method")
            target = HfVQConfig._registry[method]
            derived = {k: d.pop(k) for k in target.derived if k in d}
            for key in [k for k in d if k in BASE_SCHEMA.fields and k not in target.schema.fields]:
                value = d.pop(key)
                if not _same(value, BASE_SCHEMA.fields[key].default):
                    warnings.warn(f"hf_vq config field {key}={show(value)} does not apply to {target.__name__}; "
                                  "ignored (it had no effect when the model was quantized)", stacklevel=2)
            config = target(**d)
            for key, value in derived.items():
                if not _same(value, getattr(config, key)):
                    raise ConfigError(f"{key}={show(value)} contradicts the fields it derives from "
                                      f"({target.__name__} gives {getattr(config, key)!r})", field=key)
            for key in list(kwargs):
                if key in target.schema.fields:
                    setattr(config, key, kwargs.pop(key))
        except ConfigError as e:
            raise _prefixed(cls, e) from None
        return (config, kwargs) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"quant_method": self.quant_method}
        for name, f in type(self).schema.fields.items():
            value = self.__dict__[name]
            if f.saved == "always" or (f.saved == "text" and isinstance(value, str)):
                out[name] = copy.deepcopy(value)
        for name in type(self).derived:
            out[name] = getattr(self, name)
        out["method"] = self.method
        out["calibration"] = self.describe_calibration()
        out["loading"] = LOADING_NOTE
        return out

    def __iter__(self):
        yield from self.to_dict().items()

    def describe_calibration(self) -> str | None:
        d = self.__dict__.get("dataset")
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
        runtime = {n for n, f in type(self).schema.fields.items() if f.saved != "always"}
        for k, v in self.__dict__.items():
            new.__dict__[k] = v if k in runtime else copy.deepcopy(v, memo)
        return new

    def __eq__(self, other):
        return type(self) is type(other) and self.to_dict() == other.to_dict()


def _finish_class(cls: type[HfVQConfig]) -> None:
    """Check that the schema's defaults pass their own checks and expose the fields as the class's signature."""
    cls.schema.check_defaults(cls.__name__)
    params = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=f.default)
              for n, f in cls.schema.fields.items()]
    cls.__signature__ = inspect.Signature(params)


_finish_class(HfVQConfig)
