"""AdaScale config."""

from __future__ import annotations

from hf_vq.config.base import HfVQConfig


class AdaScaleConfig(HfVQConfig):
    """AdaScale (AIMET; FlexRound scales + OmniQuant learnable clipping): per block, train element-wise (s2) and
    per-channel (s3) weight scales and clipping (gamma, beta) so the quantized block matches the FP block output
    (blockwise distillation, MSE, Adam with cosine decay); folded into a plain affine grid (no inference cost).

    ``weight_granularity``: "group" (hf_vq groups, sym or asym), "blockwise" (AIMET min-max blocks of ``group_size``,
    which must divide in_features) or "lpbq" (symmetric blocks with int * per-channel scales, ``decompressed_bw``).
    ``init``: "rtn" or "gptq" (GPTQ's rounding as the starting point; not with lpbq). ``fp_input_prob``: chance that
    an element of a block input comes from the FP model instead of the quantized one. One Adam step uses one batch of
    ``batch_size`` calibration sequences (cycled in a seeded order); ``percdamp`` is GPTQ's damping for init="gptq".
    ``activation_cache_dir``: keep the block inputs/targets of the calibration set on disk there (safetensors, removed
    afterwards) instead of in CPU memory; not saved with the model.
    """

    method = "adascale"
    valid_inits = ("rtn", "gptq")
    valid_granularities = ("group", "blockwise", "lpbq")

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, num_iterations: int = 1500,
                 batch_size: int = 1, lr_scales: float = 5e-4, lr_clip: float = 1e-3, init: str = "rtn",
                 fp_input_prob: float = 0.5, weight_granularity: str = "group", decompressed_bw: int = 8,
                 percdamp: float = 0.01, activation_cache_dir: str | None = None, **kwargs):
        self.num_iterations = num_iterations
        self.batch_size = batch_size
        self.lr_scales = lr_scales
        self.lr_clip = lr_clip
        self.init = init
        self.fp_input_prob = fp_input_prob
        self.weight_granularity = weight_granularity
        self.decompressed_bw = decompressed_bw
        self.percdamp = percdamp
        self.activation_cache_dir = None if activation_cache_dir is None else str(activation_cache_dir)
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
