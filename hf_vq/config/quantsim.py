"""QuantSim (activation quantization, blockwise/LPBQ weights, QAT) config."""

from __future__ import annotations

from hf_vq.config.base import HfVQConfig


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
