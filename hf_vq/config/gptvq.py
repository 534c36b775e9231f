"""GPTVQ config."""

from __future__ import annotations

from hf_vq.config.base import HfVQConfig
from hf_vq.config.gptq import PERCDAMP
from hf_vq.config.schema import Bool, ConfigError, Field, Float, Int, Overrides, Str
from hf_vq.formats.vq import VQLayout

_AFFINE_ONLY = ("GPTVQ has no affine grid: its size is set by vector_dim, index_bits and codebook_bits "
                "(bits_per_value())")


class GPTVQConfig(HfVQConfig):
    """GPTVQ (van Baalen et al. 2024): vector quantization with Hessian-weighted codebooks and GPTQ error feedback.

    ``vector_dim`` adjacent input columns form a vector; each ``rows_per_block`` x ``cols_per_block`` group of the weight
    has a codebook of ``2**index_bits`` centroids stored at ``codebook_bits`` (4/8 = int with an fp16 scale, 16 = fp16).
    ``codebook_scale``: "row_block" (default) gives all codebooks of a row block one scale, AIMET's convention, so
    the model exports as AIMET VECTOR encodings; "codebook" gives each codebook its own (a slightly finer grid, not
    exportable to AIMET). Shapes the blocks do not divide get shorter last blocks. See ``bits_per_value``.
    ``finetune_iterations`` > 0 adds blockwise codebook fine-tuning after each decoder block (Adam at ``finetune_lr``
    on the codebooks, indices fixed, matching the FP block's output; hf_vq/algorithms/vq_finetune.py): not in the
    paper, it helps most at ~2 bits per value. ``module_overrides`` can only skip layers (``{regex: {"skip": True}}``).
    """

    method = "gptvq"
    valid_vector_dims = (1, 2, 4)
    valid_codebook_bits = (4, 8, 16)
    valid_inits = ("mahalanobis", "kpp")
    valid_codebook_scales = ("row_block", "codebook")
    schema = HfVQConfig.schema.without(
        bits=_AFFINE_ONLY, group_size="GPTVQ groups are rows_per_block x cols_per_block",
        sym="GPTVQ codebooks have no symmetric grid", clip_search="clip_search is an RTN/GPTQ grid option",
    ).extend(
        module_overrides=Field(Overrides({"skip": Bool()}), {}, doc="{regex: {'skip': True}} keeps layers in float"),
        vector_dim=Field(Int(choices=valid_vector_dims), 2),
        index_bits=Field(Int(1, hi=8, what="an integer in 1..8 (codebooks of 2..256 entries)"), 6),
        codebook_bits=Field(Int(choices=valid_codebook_bits,
                                what=f"one of {valid_codebook_bits} (16 = fp16 codebooks)"), 8),
        rows_per_block=Field(Int(1), 32),
        cols_per_block=Field(Int(1), 256),
        kmeans_iterations=Field(Int(0), 100),
        percdamp=PERCDAMP,
        hessian_weighted_lookup=Field(Bool(), True),
        codebook_update=Field(Bool(), True),
        codebook_update_steps=Field(Int(1), 8),
        data_normalization=Field(Bool(), False),
        init=Field(Str(valid_inits), "mahalanobis"),
        block_size=Field(Int(1), 128),
        true_sequential=Field(Bool(), True),
        codebook_scale=Field(Str(valid_codebook_scales), "row_block"),
        finetune_iterations=Field(Int(0), 0),
        finetune_lr=Field(Float(0.0, 1.0, lo_open=True), 1e-4),
    )

    inert = HfVQConfig.inert + (
        ("finetune_lr", "it is the learning rate of finetune_iterations, which is 0", lambda c: not c.finetune_iterations),
        ("codebook_update_steps", "codebook_update is False", lambda c: not c.codebook_update),
    )

    def validate(self) -> None:
        super().validate()
        if self.cols_per_block % self.vector_dim:
            raise ConfigError(f"cols_per_block ({self.cols_per_block}) must be a multiple of vector_dim "
                              f"({self.vector_dim}): a vector may not straddle two codebooks", field="cols_per_block")

    def layout(self, out_features: int, in_features: int):
        return VQLayout(out_features, in_features, self.vector_dim, self.index_bits, self.codebook_bits,
                        self.rows_per_block, self.cols_per_block, self.data_normalization)

    def bits_per_value(self, out_features: int | None = None, in_features: int | None = None) -> float:
        """Stored bits per weight (indices, codebooks, their scales, normalization) of one layer of this shape; by
        default a layer of exactly one codebook group. Equals the saved tensor bytes * 8 / weights."""
        n = out_features if out_features is not None else self.rows_per_block
        k = in_features if in_features is not None else self.cols_per_block
        return self.layout(n, k).bits_per_value()
