"""AdaScale config."""

from __future__ import annotations

import os

from hf_vq.config.base import HfVQConfig
from hf_vq.config.gptq import PERCDAMP
from hf_vq.config.mixed import MixedPrecision, affine_fields
from hf_vq.config.schema import Bool, ConfigError, Field, Float, Instance, Int, Optional, Str

LR = Float(0.0, 1.0, lo_open=True)  # Adam steps on scales near 1: above 1 only diverges


class AdaScaleConfig(MixedPrecision, HfVQConfig):
    """AdaScale (AIMET; FlexRound scales + OmniQuant learnable clipping): per block, train element-wise (s2) and
    per-channel (s3) weight scales and clipping (gamma, beta) so the quantized block matches the FP block output
    (blockwise distillation, MSE, Adam with cosine decay); folded into a plain affine grid (no inference cost).

    ``weight_granularity``: "group" (hf_vq groups, sym or asym), "blockwise" (AIMET min-max blocks of ``group_size``,
    which must divide in_features) or "lpbq" (symmetric blocks with int * per-channel scales, ``decompressed_bw``).
    ``init``: "rtn" or "gptq" (GPTQ's rounding as the starting point; for lpbq, onto the RTN LPBQ grid); None
    (default): "gptq". ``fp_input_prob``: chance that an element of a block input comes from the FP model instead of the
    quantized one. One Adam step uses one batch of ``batch_size`` calibration sequences (cycled in a seeded order);
    ``percdamp`` is GPTQ's damping for init="gptq". ``early_stop_margin``: a block stops training once the mean loss
    of a pass over the calibration batches is not below the previous pass's by more than this fraction (None: always
    run ``num_iterations``). ``train_dtype``: the block's forward/backward during training ("bfloat16" autocast with
    float32 trained parameters, or "float32"); None: bfloat16 where the device has fast bfloat16 matmuls.
    ``compile``: torch.compile the quantizer's element-wise math; None: when the run is long enough for the one-off
    compile to pay for itself. ``activation_cache_dir``: keep the block inputs/targets of the calibration set on disk
    there (safetensors, removed afterwards) instead of in CPU memory; not saved with the model.
    """

    method = "adascale"
    valid_inits = ("rtn", "gptq")
    valid_granularities = ("group", "blockwise", "lpbq")
    schema = HfVQConfig.schema.without(
        clip_search="clip_search is an RTN/GPTQ grid option (AdaScale learns its clipping)",
        calibration_dtype="AdaScale runs its calibration passes in the model's dtype",
        calibration_batch_size="AdaScale batches calibration sequences with batch_size",
    ).extend(
        num_iterations=Field(Int(0), 300, doc="Adam steps per block (at most: see early_stop_margin)"),
        batch_size=Field(Int(1), 1, doc="calibration sequences per Adam step"),
        lr_scales=Field(Optional(LR), None, doc="None: 2e-3 from a GPTQ start, 5e-4 (AIMET's) from RTN"),
        lr_clip=Field(Optional(Float(0.0, 1.0)), None,
                      doc="None: 0 (GPTQ's grid kept) from a GPTQ start, 1e-3 (AIMET's) from RTN; 0: not trained"),
        init=Field(Optional(Str(valid_inits)), None, doc="None: gptq"),
        early_stop_margin=Field(Optional(Float(0.0, 1.0, hi_open=True)), None,
                                doc="stop a block when a pass over the batches lowers the loss by less than this"),
        train_dtype=Field(Optional(Str(("float32", "bfloat16"))), None, doc="None: bfloat16 where fast"),
        compile=Field(Optional(Bool()), None, doc="None: for long runs"),
        fp_input_prob=Field(Float(0.0, 1.0), 0.5,
                            doc="chance that an element of a block's training input comes from the float model "
                                "instead of the quantized one"),
        weight_granularity=Field(Str(valid_granularities), "group",
                                 doc="'group': hf_vq groups (sym or asym); 'blockwise': AIMET min-max blocks of "
                                     "group_size (must divide in_features); 'lpbq': symmetric blocks with integer x "
                                     "per-channel scales (decompressed_bw)"),
        decompressed_bw=Field(Int(2, hi=32), 8, doc="LPBQ per-channel scale bits"),
        percdamp=PERCDAMP,
        activation_cache_dir=Field(Optional(Instance((str, os.PathLike), "a folder path")), None, saved="never",
                                   doc="keep the calibration block inputs/targets on disk there (safetensors, "
                                       "removed afterwards) instead of in CPU memory"),
        **affine_fields(),
    )

    def learning_rates(self) -> tuple[float, float]:
        """(lr_scales, lr_clip). Measured defaults (benchmarks/adascale_step.py --eval-batches, SmolLM2 blocks 2, 10
        and 25, 100 steps): from GPTQ's codes, moving the grid (clipping) undoes GPTQ's error compensation and
        raised held-out block loss at AIMET's 1e-3, so the grid stays and the scales learn at 2e-3; from RTN,
        AIMET's rates."""
        gptq = self.init_method() == "gptq"
        lr_scales = self.lr_scales if self.lr_scales is not None else (2e-3 if gptq else 5e-4)
        lr_clip = self.lr_clip if self.lr_clip is not None else (0.0 if gptq else 1e-3)
        return lr_scales, lr_clip

    def init_method(self) -> str:
        """The starting grid: ``init``, or by default GPTQ's."""
        return self.init or "gptq"

    def validate(self) -> None:
        super().validate()
        if self.weight_granularity != "lpbq":
            return
        if not all([self.sym] + [o.get("sym", self.sym) for o in self.module_overrides.values()]):
            raise ConfigError("weight_granularity='lpbq' needs sym=True (LPBQ grids are symmetric)", field="sym")
        bits = [self.bits] + [o.get("bits", self.bits) for o in self.module_overrides.values()]
        if any(self.decompressed_bw <= b for b in bits) or self.decompressed_bw - min(bits) > 10:
            raise ConfigError(f"decompressed_bw must be an integer > bits and <= bits + 10, got "
                              f"{self.decompressed_bw!r}", field="decompressed_bw")
        if self.group_size == -1 or any(o.get("group_size") == -1 for o in self.module_overrides.values()):
            raise ConfigError("weight_granularity='lpbq' needs a block size (group_size), not -1", field="group_size")
