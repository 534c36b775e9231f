"""GPTVQ config."""

from __future__ import annotations

from hf_vq.config.base import HfVQConfig
from hf_vq.formats.vq import VQLayout


class GPTVQConfig(HfVQConfig):
    """GPTVQ (van Baalen et al. 2024): vector quantization with Hessian-weighted codebooks and GPTQ error feedback.

    ``vector_dim`` adjacent input columns form a vector; each ``rows_per_block`` x ``cols_per_block`` group of the weight
    has a codebook of ``2**index_bits`` centroids stored at ``codebook_bits`` (4/8 = int with an fp16 scale, 16 = fp16).
    ``codebook_scale``: "row_block" (default) gives all codebooks of a row block one scale, AIMET's convention, so
    the model exports as AIMET VECTOR encodings; "codebook" gives each codebook its own (a slightly finer grid, not
    exportable to AIMET). Shapes the blocks do not divide get shorter last blocks. See ``bits_per_value``.
    ``finetune_iterations`` > 0 adds blockwise codebook fine-tuning after each decoder block (Adam at ``finetune_lr``
    on the codebooks, indices fixed, matching the FP block's output; hf_vq/algorithms/vq_finetune.py): not in the
    paper, it helps most at ~2 bits per value.
    """

    method = "gptvq"
    valid_vector_dims = (1, 2, 4)
    valid_codebook_bits = (4, 8, 16)
    valid_inits = ("mahalanobis", "kpp")
    valid_codebook_scales = ("row_block", "codebook")

    def __init__(self, vector_dim: int = 2, index_bits: int = 6, codebook_bits: int = 8, rows_per_block: int = 32,
                 cols_per_block: int = 256, kmeans_iterations: int = 100, percdamp: float = 0.01,
                 hessian_weighted_lookup: bool = True, codebook_update: bool = True, codebook_update_steps: int = 8,
                 data_normalization: bool = False, init: str = "mahalanobis", block_size: int = 128,
                 true_sequential: bool = True, codebook_scale: str = "row_block", finetune_iterations: int = 0,
                 finetune_lr: float = 1e-4, **kwargs):
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
        self.codebook_scale = codebook_scale
        self.finetune_iterations = finetune_iterations
        self.finetune_lr = finetune_lr
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
        if not isinstance(self.finetune_iterations, int) or self.finetune_iterations < 0:
            raise ValueError(f"finetune_iterations must be a non-negative integer, got {self.finetune_iterations!r}")
        if not isinstance(self.finetune_lr, (int, float)) or not self.finetune_lr > 0:
            raise ValueError(f"finetune_lr must be a positive number, got {self.finetune_lr!r}")
        if not isinstance(self.kmeans_iterations, int) or self.kmeans_iterations < 0:
            raise ValueError(f"kmeans_iterations must be a non-negative integer, got {self.kmeans_iterations!r}")
        if not (0.0 < float(self.percdamp) < 1.0):
            raise ValueError(f"percdamp must be in (0, 1), got {self.percdamp!r}")
        if self.init not in self.valid_inits:
            raise ValueError(f"init must be one of {self.valid_inits}, got {self.init!r}")
        if self.codebook_scale not in self.valid_codebook_scales:
            raise ValueError(f"codebook_scale must be one of {self.valid_codebook_scales}, got {self.codebook_scale!r}")
        for name in ("hessian_weighted_lookup", "codebook_update", "data_normalization", "true_sequential"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def layout(self, out_features: int, in_features: int):
        return VQLayout(out_features, in_features, self.vector_dim, self.index_bits, self.codebook_bits,
                        self.rows_per_block, self.cols_per_block, self.data_normalization)

    def bits_per_value(self, out_features: int | None = None, in_features: int | None = None) -> float:
        """Stored bits per weight (indices, codebooks, their scales, normalization) of one layer of this shape; by
        default a layer of exactly one codebook group. Equals the saved tensor bytes * 8 / weights."""
        n = out_features if out_features is not None else self.rows_per_block
        k = in_features if in_features is not None else self.cols_per_block
        return self.layout(n, k).bits_per_value()
