"""Configs of the affine-grid methods without training: round-to-nearest and GPTQ."""

from __future__ import annotations

from hf_vq.config.base import CALIBRATION_FIELDS, HfVQConfig
from hf_vq.config.mixed import MixedPrecision, affine_fields
from hf_vq.config.schema import Bool, Field, Float, Int

PERCDAMP = Field(Float(0.0, 1.0, lo_open=True, hi_open=True), 0.01,
                 doc="Hessian damping, a fraction of its mean diagonal")


class RTNConfig(HfVQConfig):
    """Round-to-nearest affine weight quantization (no calibration data)."""

    method = "rtn"
    schema = HfVQConfig.schema.without(**{k: "round-to-nearest uses no calibration data" for k in CALIBRATION_FIELDS})

    @property
    def needs_calibration(self) -> bool:
        return False


class GPTQConfig(MixedPrecision, HfVQConfig):
    """GPTQ (Frantar et al. 2022): Hessian-aware rounding with error feedback, per layer, block by block."""

    method = "gptq"
    schema = HfVQConfig.schema.extend(
        percdamp=PERCDAMP,
        act_order=Field(Bool(), True, doc="quantize columns in order of decreasing Hessian diagonal (static groups)"),
        true_sequential=Field(Bool(), True, doc="quantize a block's layer groups in execution order"),
        block_size=Field(Int(1), 128, doc="columns per lazy GPTQ update block"),
        **affine_fields(),
    )
