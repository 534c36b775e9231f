"""Quantization configs: one registered quant method ("hf_vq"), one class per algorithm.

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
_RUNTIME_FIELDS = ("dataset", "tokenizer")


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
        if self.calibration_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"calibration_dtype must be 'float32' or 'bfloat16', got {self.calibration_dtype!r}")

    def _check_grid(self, bits, group_size, where):
        if bits not in self.valid_bits:
            raise ValueError(f"bits must be one of {self.valid_bits}{where}, got {bits!r}")
        if not isinstance(group_size, int) or (group_size != -1 and group_size < 2):
            raise ValueError(f"group_size must be -1 (per channel) or an integer >= 2{where}, got {group_size!r}")

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


class RTNConfig(HfVQConfig):
    """Round-to-nearest affine weight quantization (no calibration data)."""

    method = "rtn"

    @property
    def needs_calibration(self) -> bool:
        return False


class GPTQConfig(HfVQConfig):
    """GPTQ (Frantar et al. 2022): Hessian-aware rounding with error feedback, per layer, block by block."""

    method = "gptq"

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, percdamp: float = 0.01,
                 act_order: bool = True, true_sequential: bool = True, block_size: int = 128, **kwargs):
        self.percdamp = percdamp
        self.act_order = act_order
        self.true_sequential = true_sequential
        self.block_size = block_size
        super().__init__(bits=bits, group_size=group_size, sym=sym, **kwargs)

    def validate(self) -> None:
        super().validate()
        if not (0.0 < float(self.percdamp) < 1.0):
            raise ValueError(f"percdamp must be in (0, 1), got {self.percdamp!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")


class GPTVQConfig(HfVQConfig):
    """GPTVQ (van Baalen et al. 2024): vector quantization with Hessian-weighted codebooks and GPTQ error feedback.

    ``vector_dim`` adjacent input columns form a vector; each ``rows_per_block`` x ``cols_per_block`` group of the weight
    has a codebook of ``2**index_bits`` centroids stored at ``codebook_bits`` (4/8 = int with one fp16 scale per
    codebook, 16 = fp16). Shapes the blocks do not divide get shorter last blocks. See ``bits_per_value``.
    """

    method = "gptvq"
    valid_vector_dims = (1, 2, 4)
    valid_codebook_bits = (4, 8, 16)
    valid_inits = ("mahalanobis", "kpp")

    def __init__(self, vector_dim: int = 2, index_bits: int = 6, codebook_bits: int = 8, rows_per_block: int = 32,
                 cols_per_block: int = 256, kmeans_iterations: int = 100, percdamp: float = 0.01,
                 hessian_weighted_lookup: bool = True, codebook_update: bool = True, codebook_update_steps: int = 8,
                 data_normalization: bool = False, init: str = "mahalanobis", block_size: int = 128,
                 true_sequential: bool = True, **kwargs):
        self.vector_dim = vector_dim
        self.index_bits = index_bits
        self.codebook_bits = codebook_bits
        self.rows_per_block = rows_per_block
        self.cols_per_block = cols_per_block
        self.kmeans_iterations = kmeans_iterations
        self.percdamp = percdamp
        self.hessian_weighted_lookup = hessian_weighted_lookup
        self.codebook_update = codebook_update
        self.codebook_update_steps = codebook_update_steps
        self.data_normalization = data_normalization
        self.init = init
        self.block_size = block_size
        self.true_sequential = true_sequential
        super().__init__(**kwargs)

    def validate(self) -> None:
        super().validate()
        if self.vector_dim not in self.valid_vector_dims:
            raise ValueError(f"vector_dim must be one of {self.valid_vector_dims}, got {self.vector_dim!r}")
        if not isinstance(self.index_bits, int) or not 1 <= self.index_bits <= 8:
            raise ValueError(f"index_bits must be an integer in 1..8 (codebooks of 2..256 entries), got {self.index_bits!r}")
        if self.codebook_bits not in self.valid_codebook_bits:
            raise ValueError(f"codebook_bits must be one of {self.valid_codebook_bits} (16 = fp16 codebooks), "
                             f"got {self.codebook_bits!r}")
        for name in ("rows_per_block", "cols_per_block", "block_size", "codebook_update_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.cols_per_block % self.vector_dim:
            raise ValueError(f"cols_per_block ({self.cols_per_block}) must be a multiple of vector_dim "
                             f"({self.vector_dim}): a vector may not straddle two codebooks")
        if not isinstance(self.kmeans_iterations, int) or self.kmeans_iterations < 0:
            raise ValueError(f"kmeans_iterations must be a non-negative integer, got {self.kmeans_iterations!r}")
        if not (0.0 < float(self.percdamp) < 1.0):
            raise ValueError(f"percdamp must be in (0, 1), got {self.percdamp!r}")
        if self.init not in self.valid_inits:
            raise ValueError(f"init must be one of {self.valid_inits}, got {self.init!r}")
        for name in ("hessian_weighted_lookup", "codebook_update", "data_normalization", "true_sequential"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def layout(self, out_features: int, in_features: int):
        from hf_vq.algorithms.gptvq import VQLayout

        return VQLayout(out_features, in_features, self.vector_dim, self.index_bits, self.codebook_bits,
                        self.rows_per_block, self.cols_per_block, self.data_normalization)

    def bits_per_value(self, out_features: int | None = None, in_features: int | None = None) -> float:
        """Stored bits per weight (indices, codebooks, their scales, normalization) of one layer of this shape; by
        default a layer of exactly one codebook group. Equals the saved tensor bytes * 8 / weights."""
        n = out_features if out_features is not None else self.rows_per_block
        k = in_features if in_features is not None else self.cols_per_block
        return self.layout(n, k).bits_per_value()


class AdaScaleConfig(HfVQConfig):
    """AdaScale (AIMET; FlexRound scales + OmniQuant learnable clipping): per block, train element-wise (s2) and
    per-channel (s3) weight scales and clipping (gamma, beta) so the quantized block matches the FP block output
    (blockwise distillation, MSE, Adam with cosine decay); folded into a plain affine grid (no inference cost).

    ``weight_granularity``: "group" (hf_vq groups, sym or asym), "blockwise" (AIMET min-max blocks of ``group_size``,
    which must divide in_features) or "lpbq" (symmetric blocks with int * per-channel scales, ``decompressed_bw``).
    ``init``: "rtn" or "gptq" (GPTQ's rounding as the starting point; not with lpbq). ``fp_input_prob``: chance that
    an element of a block input comes from the FP model instead of the quantized one. One Adam step uses one batch of
    ``batch_size`` calibration sequences (cycled in a seeded order); ``percdamp`` is GPTQ's damping for init="gptq".
    """

    method = "adascale"
    valid_inits = ("rtn", "gptq")
    valid_granularities = ("group", "blockwise", "lpbq")

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, num_iterations: int = 1500,
                 batch_size: int = 1, lr_scales: float = 5e-4, lr_clip: float = 1e-3, init: str = "rtn",
                 fp_input_prob: float = 0.5, weight_granularity: str = "group", decompressed_bw: int = 8,
                 percdamp: float = 0.01, **kwargs):
        self.num_iterations = num_iterations
        self.batch_size = batch_size
        self.lr_scales = lr_scales
        self.lr_clip = lr_clip
        self.init = init
        self.fp_input_prob = fp_input_prob
        self.weight_granularity = weight_granularity
        self.decompressed_bw = decompressed_bw
        self.percdamp = percdamp
        super().__init__(bits=bits, group_size=group_size, sym=sym, **kwargs)

    def validate(self) -> None:
        super().validate()
        for name in ("num_iterations", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "num_iterations" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'num_iterations' else 'positive'} "
                                 f"integer, got {value!r}")
        for name in ("lr_scales", "lr_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not isinstance(self.fp_input_prob, (int, float)) or not 0.0 <= self.fp_input_prob <= 1.0:
            raise ValueError(f"fp_input_prob must be in [0, 1], got {self.fp_input_prob!r}")
        if self.init not in self.valid_inits:
            raise ValueError(f"init must be one of {self.valid_inits}, got {self.init!r}")
        if self.weight_granularity not in self.valid_granularities:
            raise ValueError(f"weight_granularity must be one of {self.valid_granularities}, "
                             f"got {self.weight_granularity!r}")
        if not (0.0 < float(self.percdamp) < 1.0):
            raise ValueError(f"percdamp must be in (0, 1), got {self.percdamp!r}")
        if self.weight_granularity == "lpbq":
            specs = [self.sym] + [o.get("sym", self.sym) for o in self.module_overrides.values()]
            if not all(specs):
                raise ValueError("weight_granularity='lpbq' needs sym=True (LPBQ grids are symmetric)")
            if self.init == "gptq":
                raise ValueError("init='gptq' is not supported with weight_granularity='lpbq' (GPTQ's scales are not "
                                 "int x per-channel); use init='rtn'")
            bits = [self.bits] + [o.get("bits", self.bits) for o in self.module_overrides.values()]
            if not isinstance(self.decompressed_bw, int) or any(self.decompressed_bw <= b for b in bits) \
                    or self.decompressed_bw - min(bits) > 10:
                raise ValueError(f"decompressed_bw must be an integer > bits and <= bits + 10, got "
                                 f"{self.decompressed_bw!r}")
            if self.group_size == -1:
                raise ValueError("weight_granularity='lpbq' needs a block size (group_size), not -1")


class QuantSimConfig(HfVQConfig):
    """AIMET QuantSim-style simulation: symmetric min-max weights (per channel, blockwise or LPBQ) plus activation
    quantizers on the inputs/outputs of every quantized Linear, encodings computed on calibration data. The loaded
    model is QAT-ready (latent weights, learnable ranges); ``save_pretrained`` folds it into integer codes.

    ``activation_bits=None`` means weight-only; ``activation_dtype="float16"`` casts activations (no calibration).
    ``quant_scheme``: "min_max", "tf_enhanced" (SQNR-based range search) or "percentile" (``percentile``).
    """

    method = "quantsim"
    valid_granularities = ("per_channel", "blockwise", "lpbq")
    valid_schemes = ("min_max", "tf_enhanced", "percentile")

    def __init__(self, weight_bits: int = 8, weight_granularity: str = "per_channel", block_size: int = 64,
                 decompressed_bits: int = 8, activation_bits: int | None = 16, activation_dtype: str = "int",
                 quant_scheme: str = "min_max", percentile: float = 99.99, quantize_inputs: bool = True,
                 quantize_outputs: bool = True, **kwargs):
        self.weight_bits = weight_bits
        self.weight_granularity = weight_granularity
        self.block_size = block_size
        self.decompressed_bits = decompressed_bits
        self.activation_bits = activation_bits
        self.activation_dtype = activation_dtype
        self.quant_scheme = quant_scheme
        self.percentile = percentile
        self.quantize_inputs = quantize_inputs
        self.quantize_outputs = quantize_outputs
        for derived in ("bits", "group_size", "sym"):  # written by to_dict, derived from the fields above
            kwargs.pop(derived, None)
        group = -1 if weight_granularity == "per_channel" else block_size
        super().__init__(bits=weight_bits, group_size=group if isinstance(group, int) else -1, sym=True, **kwargs)

    def validate(self) -> None:
        if self.weight_granularity not in self.valid_granularities:
            raise ValueError(f"weight_granularity must be one of {self.valid_granularities}, "
                             f"got {self.weight_granularity!r}")
        if self.weight_granularity != "per_channel" and (
                not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 2):
            raise ValueError(f"block_size must be an integer >= 2, got {self.block_size!r}")
        super().validate()
        if self.weight_granularity == "lpbq":
            if not isinstance(self.decompressed_bits, int) or not self.weight_bits < self.decompressed_bits <= 16:
                raise ValueError(f"decompressed_bits must be an integer in ({self.weight_bits}, 16] for LPBQ, "
                                 f"got {self.decompressed_bits!r}")
            if self.decompressed_bits - self.weight_bits > 10:
                raise ValueError("decompressed_bits - weight_bits must be <= 10 (fp16 block scales)")
        if self.activation_dtype not in ("int", "float16", "bfloat16"):
            raise ValueError(f"activation_dtype must be 'int', 'float16' or 'bfloat16', got {self.activation_dtype!r}")
        if self.activation_dtype == "int":
            if self.activation_bits not in (None, 8, 16):
                raise ValueError(f"activation_bits must be 8, 16 or None (weight-only), got {self.activation_bits!r}")
        elif self.activation_bits not in (None, 16):
            raise ValueError(f"{self.activation_dtype} activations are 16-bit: activation_bits must be 16 or None, "
                             f"got {self.activation_bits!r}")
        if self.quant_scheme not in self.valid_schemes:
            raise ValueError(f"quant_scheme must be one of {self.valid_schemes}, got {self.quant_scheme!r}")
        if not isinstance(self.percentile, (int, float)) or not 50.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile!r}")
        for name in ("quantize_inputs", "quantize_outputs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for pattern, override in self.module_overrides.items():
            if override.get("sym", True) is not True:
                raise ValueError(f"module_overrides[{pattern!r}]: quantsim weights are symmetric (sym must be True)")

    @property
    def quantizes_activations(self) -> bool:
        return self.activation_bits is not None and (self.quantize_inputs or self.quantize_outputs)

    @property
    def needs_calibration(self) -> bool:
        return self.quantizes_activations and self.activation_dtype == "int"
