"""Configs of the affine-grid methods without training: round-to-nearest and GPTQ."""

from __future__ import annotations

from hf_vq.config.base import HfVQConfig


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
