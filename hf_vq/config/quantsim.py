"""QuantSim (activation quantization, blockwise/LPBQ weights, QAT) config."""

from __future__ import annotations

from hf_vq.config.base import VALID_BITS, HfVQConfig
from hf_vq.config.schema import Bool, ConfigError, Field, Float, Int, Optional, Str


_HEAD = ("QuantSim quantizes an output head as one of its layers (weight_bits, activation quantizers): on a model "
         "with an untied lm_head, pass modules_to_not_convert without 'lm_head'")


class QuantSimConfig(HfVQConfig):
    """AIMET QuantSim-style simulation: symmetric min-max weights (per channel, blockwise or LPBQ) plus activation
    quantizers on the inputs/outputs of every quantized Linear, encodings computed on calibration data. The loaded
    model is QAT-ready (latent weights, learnable ranges); ``save_pretrained`` folds it into integer codes.

    ``activation_bits=None`` means weight-only; ``activation_dtype="float16"`` casts activations (no calibration).
    ``quant_scheme``: "min_max", "tf_enhanced" (SQNR-based range search) or "percentile" (``percentile``).
    ``bits``, ``group_size`` and ``sym`` are read-only, derived from ``weight_bits``, ``weight_granularity`` and
    ``block_size`` (written to config.json for readers that expect them).
    """

    method = "quantsim"
    valid_granularities = ("per_channel", "blockwise", "lpbq")
    valid_schemes = ("min_max", "tf_enhanced", "percentile")
    derived = ("bits", "group_size", "sym")
    schema = HfVQConfig.schema.without(
        bits="QuantSim's weight bit width is weight_bits",
        group_size="QuantSim's weight blocks are weight_granularity ('blockwise' or 'lpbq') with block_size",
        sym="QuantSim weights are always symmetric",
        clip_search="clip_search is an RTN/GPTQ grid option",
        calibration_dtype="QuantSim runs its calibration passes in the model's dtype",
        first_token_weight="QuantSim computes activation ranges, not Hessians",
        lm_head_bits=_HEAD, lm_head_group_size=_HEAD,
    ).extend(
        weight_bits=Field(Int(choices=VALID_BITS), 8, doc="bits per weight (symmetric grid)"),
        weight_granularity=Field(Str(valid_granularities), "per_channel",
                                 doc="one scale per output channel, per block_size columns ('blockwise'), or "
                                     "'lpbq': integer block scales x a per-channel float scale"),
        block_size=Field(Int(2, what="an integer >= 2"), 64, doc="weight block (blockwise/lpbq)"),
        decompressed_bits=Field(Int(2, hi=16), 8, doc="LPBQ per-channel scale bits"),
        activation_bits=Field(Optional(Int(choices=(8, 16)), what="8, 16 or None (weight-only)"), 16,
                              doc="bits of the activation quantizers; None: weight-only"),
        activation_dtype=Field(Str(("int", "float16", "bfloat16")), "int",
                               doc="'int': integer activation quantizers (calibrated); 'float16'/'bfloat16': a "
                                   "cast, no calibration"),
        quant_scheme=Field(Str(valid_schemes), "min_max",
                           doc="activation ranges: running min/max, 'tf_enhanced' (SQNR-based range search) or "
                               "'percentile'"),
        percentile=Field(Float(50.0, 100.0, lo_open=True), 99.99, doc="the percentile of quant_scheme='percentile'"),
        quantize_inputs=Field(Bool(), True, doc="quantize the input of every quantized Linear"),
        quantize_outputs=Field(Bool(), True, doc="quantize the output of every quantized Linear"),
    )

    @property
    def bits(self) -> int:
        return self.weight_bits

    @property
    def group_size(self) -> int:
        return -1 if self.weight_granularity == "per_channel" else self.block_size

    @property
    def sym(self) -> bool:
        return True

    def validate(self) -> None:
        super().validate()
        if self.weight_granularity == "lpbq":
            if not self.weight_bits < self.decompressed_bits <= 16:
                raise ConfigError(f"decompressed_bits must be an integer in ({self.weight_bits}, 16] for LPBQ, "
                                  f"got {self.decompressed_bits!r}", field="decompressed_bits")
            if self.decompressed_bits - self.weight_bits > 10:
                raise ConfigError("decompressed_bits - weight_bits must be <= 10 (fp16 block scales)",
                                  field="decompressed_bits")
        if self.activation_dtype != "int" and self.activation_bits not in (None, 16):
            raise ConfigError(f"{self.activation_dtype} activations are 16-bit: activation_bits must be 16 or None, "
                              f"got {self.activation_bits!r}", field="activation_bits")
        for pattern, override in self.module_overrides.items():
            if override.get("sym", True) is not True:
                raise ConfigError(f"module_overrides[{pattern!r}]: quantsim weights are symmetric (sym must be True)",
                                  field="module_overrides")

    @property
    def quantizes_activations(self) -> bool:
        return self.activation_bits is not None and (self.quantize_inputs or self.quantize_outputs)

    @property
    def needs_calibration(self) -> bool:
        return self.quantizes_activations and self.activation_dtype == "int"
