"""GPTVQ config."""

from __future__ import annotations

from hf_vq.config.base import HfVQConfig
from hf_vq.config.gptq import PERCDAMP
from hf_vq.config.mixed import MIXED_INERT, VQ_VECTOR_DIMS, VQMixedPrecision, vq_fields
from hf_vq.config.schema import Bool, ConfigError, Field, Float, Int, Overrides, Str
from hf_vq.formats.vq import VQLayout

_AFFINE_ONLY = ("GPTVQ has no affine grid: its size is set by vector_dim, index_bits and codebook_bits "
                "(bits_per_value())")


class GPTVQConfig(VQMixedPrecision, HfVQConfig):
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
    valid_vector_dims = VQ_VECTOR_DIMS
    valid_codebook_bits = (4, 8, 16)
    valid_inits = ("mahalanobis", "kpp")
    valid_codebook_scales = ("row_block", "codebook")
    schema = HfVQConfig.schema.without(
        bits=_AFFINE_ONLY, group_size="GPTVQ groups are rows_per_block x cols_per_block",
        sym="GPTVQ codebooks have no symmetric grid", clip_search="clip_search is an RTN/GPTQ grid option",
    ).extend(
        module_overrides=Field(Overrides({"skip": Bool()}), {}, doc="{regex: {'skip': True}} keeps layers in float"),
        vector_dim=Field(Int(choices=valid_vector_dims), 2,
                         doc="adjacent input columns quantized together as one vector"),
        index_bits=Field(Int(1, hi=8, what="an integer in 1..8 (codebooks of 2..256 entries)"), 6,
                         doc="bits per vector index: each codebook has 2**index_bits centroids"),
        codebook_bits=Field(Int(choices=valid_codebook_bits,
                                what=f"one of {valid_codebook_bits} (16 = fp16 codebooks)"), 8,
                            doc="storage of the codebook entries: 4/8 = integers with an fp16 scale, 16 = fp16"),
        rows_per_block=Field(Int(1), 32, doc="output rows that share one codebook"),
        cols_per_block=Field(Int(1), 256, doc="input columns that share one codebook (a multiple of vector_dim)"),
        kmeans_iterations=Field(Int(0), 100, doc="Hessian-weighted EM iterations per codebook"),
        percdamp=PERCDAMP,
        hessian_weighted_lookup=Field(Bool(), True,
                                      doc="pick each vector's centroid by the Hessian-weighted distance (False: plain "
                                          "squared distance)"),
        codebook_update=Field(Bool(), True,
                              doc="after assignment, refine the codebooks against the layer's Hessian loss (kept only "
                                  "when the loss drops)"),
        codebook_update_steps=Field(Int(1), 8, doc="optimizer steps of the codebook update"),
        data_normalization=Field(Bool(), False,
                                 doc="4-bit log2 scale per row and 64 columns before vector quantization (GPTVQ "
                                     "paper, appendix H); adds stored bits"),
        init=Field(Str(valid_inits), "mahalanobis",
                   doc="codebook initialization: 'mahalanobis' (evenly spaced ranks of the distance to the mean) or "
                       "'kpp' (k-means++ seeding)"),
        block_size=Field(Int(1), 128, doc="columns per lazy GPTQ error-feedback update block"),
        true_sequential=Field(Bool(), True, doc="quantize a block's layer groups in execution order"),
        codebook_scale=Field(Str(valid_codebook_scales), "row_block",
                             doc="'row_block': one scale for all codebooks of a row block (exports as AIMET VECTOR "
                                 "encodings); 'codebook': one scale per codebook (finer, not AIMET-exportable)"),
        finetune_iterations=Field(Int(0), 0,
                                  doc="Adam steps of blockwise codebook fine-tuning after each decoder block (indices "
                                      "fixed, matching the float block's output); 0: off"),
        finetune_lr=Field(Float(0.0, 1.0, lo_open=True), 1e-4, doc="learning rate of the codebook fine-tuning"),
        **vq_fields(),
    )

    inert = HfVQConfig.inert + MIXED_INERT + (
        ("finetune_lr", "it is the learning rate of finetune_iterations, which is 0", lambda c: not c.finetune_iterations),
        ("codebook_update_steps", "codebook_update is False", lambda c: not c.codebook_update),
    )

    def validate(self) -> None:
        super().validate()
        if self.cols_per_block % self.vector_dim:
            raise ConfigError(f"cols_per_block ({self.cols_per_block}) must be a multiple of vector_dim "
                              f"({self.vector_dim}): a vector may not straddle two codebooks", field="cols_per_block")

    def layout(self, out_features: int, in_features: int, setting: dict | None = None):
        """The storage layout of a layer of this shape; ``setting`` ({vector_dim, index_bits, rows_per_block}: a
        candidate or an allocation entry) in place of the config's own."""
        s = {"vector_dim": self.vector_dim, "index_bits": self.index_bits, "rows_per_block": self.rows_per_block,
             **(setting or {})}
        return VQLayout(out_features, in_features, s["vector_dim"], s["index_bits"], self.codebook_bits,
                        s["rows_per_block"], self.cols_per_block, self.data_normalization)

    def bits_per_value(self, out_features: int | None = None, in_features: int | None = None) -> float:
        """Stored bits per weight (indices, codebooks, their scales, normalization) of one layer of this shape; by
        default a layer of exactly one codebook group. Equals the saved tensor bytes * 8 / weights."""
        n = out_features if out_features is not None else self.rows_per_block
        k = in_features if in_features is not None else self.cols_per_block
        return self.layout(n, k).bits_per_value()
