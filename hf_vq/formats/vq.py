"""The VQ storage format: layout, codebook encode/decode and weight reconstruction (tensors in, tensors out).

What VQLinear saves: ``vq_indices`` packed index_bits codes [N, ceil(nvec*ib/8)]; ``vq_codebook`` [G, k*d] as packed
ints (4/8 bit, with fp16 ``vq_codebook_scales`` [G] stored as int16 bits) or fp16 bits (16); optional data
normalization (GPTVQ paper appendix H): 4-bit log2 scales per row and 64 columns (``vq_norm_codes``) relative to one
fp32 ``vq_norm_base`` (stored as int32 bits). Float tensors are kept as integer bit patterns so that
``model.to(bfloat16)`` or a dtype on reload cannot re-round them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from hf_vq.formats.packing import pack, packed_length, unpack

NORM_BLOCK = 64       # columns per normalization scale (paper: --vq-scaling-blocksize 64)
NORM_BITS = 4


# ---------------------------------------------------------------------------------------------- layout / storage
@dataclass(frozen=True)
class VQLayout:
    out_features: int
    in_features: int
    vector_dim: int
    index_bits: int
    codebook_bits: int
    rows_per_block: int
    cols_per_block: int
    normalize: bool = False

    @property
    def k(self) -> int:
        return 2 ** self.index_bits

    @property
    def nvec(self) -> int:
        return -(-self.in_features // self.vector_dim)

    @property
    def padded_in(self) -> int:
        return self.nvec * self.vector_dim

    @property
    def row_blocks(self) -> int:
        return -(-self.out_features // self.rows_per_block)

    @property
    def col_blocks(self) -> int:
        return -(-self.padded_in // self.cols_per_block)

    @property
    def num_codebooks(self) -> int:
        return self.row_blocks * self.col_blocks

    def tensor_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        g, kd = self.num_codebooks, self.k * self.vector_dim
        out = {"vq_indices": ((self.out_features, packed_length(self.nvec, self.index_bits)), torch.uint8)}
        if self.codebook_bits == 16:
            out["vq_codebook"] = ((g, kd), torch.int16)
        else:
            out["vq_codebook"] = ((g, packed_length(kd, self.codebook_bits)), torch.uint8)
            out["vq_codebook_scales"] = ((g,), torch.int16)
        if self.normalize:
            nblk = -(-self.padded_in // NORM_BLOCK)
            out["vq_norm_codes"] = ((self.out_features, packed_length(nblk, NORM_BITS)), torch.uint8)
            out["vq_norm_base"] = ((1,), torch.int32)
        return out

    def storage_bytes(self) -> int:
        return sum(math.prod(s) * torch.empty(0, dtype=dt).element_size() for s, dt in self.tensor_shapes().values())

    def bits_per_value(self) -> float:
        """Stored bits per weight: indices + codebooks + codebook scales + normalization scales."""
        return 8.0 * self.storage_bytes() / (self.out_features * self.in_features)


def _f16_to_bits(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).view(torch.int16)


def _bits_to_f32(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.float16).float() if x.dtype == torch.int16 else x.view(torch.float32)


def quantize_codebooks(c: torch.Tensor, bits: int, share: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codebooks [G, k, d] -> (integer values as float [G, k, d], fp16-exact scales [G]) or (fp16 values, None).
    ``share`` consecutive codebooks get one scale (a row block's codebooks: AIMET's one grid per row block)."""
    if bits == 16:
        return c.to(torch.float16).float(), None
    qmax = 2 ** (bits - 1) - 1
    amax = c.abs().amax(dim=(1, 2))
    if share > 1:
        amax = amax.reshape(-1, share).amax(dim=1).repeat_interleave(share)
    scale = (amax / qmax).clamp(min=2.0 ** -24).to(torch.float16).float()
    return (c / scale[:, None, None]).round().clamp(-qmax, qmax), scale


def codebook_values(q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return q if scale is None else q * scale[:, None, None]


def encode_codebooks(q: torch.Tensor, scale: torch.Tensor | None, bits: int) -> dict[str, torch.Tensor]:
    g = q.shape[0]
    if bits == 16:
        return {"vq_codebook": _f16_to_bits(q.reshape(g, -1)).contiguous()}
    off = 2 ** (bits - 1)
    return {"vq_codebook": pack((q.reshape(g, -1) + off).to(torch.int32), bits),
            "vq_codebook_scales": _f16_to_bits(scale).contiguous()}


def decode_codebooks(layout: VQLayout, codebook: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    g, k, d = layout.num_codebooks, layout.k, layout.vector_dim
    if layout.codebook_bits == 16:
        return _bits_to_f32(codebook).reshape(g, k, d)
    q = unpack(codebook, layout.codebook_bits, k * d).float() - 2 ** (layout.codebook_bits - 1)
    return codebook_values(q.reshape(g, k, d), _bits_to_f32(scales))


def norm_scales(layout: VQLayout, codes: torch.Tensor, base_bits: torch.Tensor) -> torch.Tensor:
    """Per-element normalization scales [N, padded_in] = base * 2^-code."""
    nblk = -(-layout.padded_in // NORM_BLOCK)
    c = unpack(codes, NORM_BITS, nblk).float()
    s = _bits_to_f32(base_bits) * torch.exp2(-c)
    return s.repeat_interleave(NORM_BLOCK, dim=1)[:, :layout.padded_in]


def element_codebook(layout: VQLayout, rows: int, device) -> torch.Tensor:
    """Codebook id of every vector [rows, nvec]: row block * col_blocks + column block."""
    rb = torch.arange(rows, device=device) // layout.rows_per_block
    cb = torch.arange(layout.nvec, device=device) * layout.vector_dim // layout.cols_per_block
    return rb[:, None] * layout.col_blocks + cb[None, :]


def codebook_rows(layout: VQLayout, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Row of the stacked codebooks [G * k, d] that every vector [N, nvec] decodes to."""
    idx = unpack(tensors["vq_indices"], layout.index_bits, layout.nvec).long()
    return element_codebook(layout, layout.out_features, idx.device) * layout.k + idx


def stored_norm(layout: VQLayout, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Per-element normalization scales [N, padded_in], or None without data normalization."""
    return norm_scales(layout, tensors["vq_norm_codes"], tensors["vq_norm_base"]) if layout.normalize else None


def assemble_weight(layout: VQLayout, codebooks: torch.Tensor, rows: torch.Tensor,
                    norm: torch.Tensor | None) -> torch.Tensor:
    """Weight [N, K] from codebooks [G, k, d], ``codebook_rows`` and ``stored_norm`` (differentiable in codebooks)."""
    w = codebooks.reshape(-1, layout.vector_dim)[rows].reshape(layout.out_features, layout.padded_in)
    if norm is not None:
        w = w * norm
    return w[:, :layout.in_features]


def decode_weight(layout: VQLayout, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fp32 weight [N, K] the stored tensors represent."""
    cbv = decode_codebooks(layout, tensors["vq_codebook"], tensors.get("vq_codebook_scales"))
    return assemble_weight(layout, cbv, codebook_rows(layout, tensors), stored_norm(layout, tensors)).contiguous()


def store_codebooks(layout: VQLayout, codebooks: torch.Tensor, codebook_scale: str):
    """Codebooks [G, k, d] on their ``codebook_bits`` grid: (values, scales) as ``quantize_codebooks``. With
    "row_block" the codebooks of a row block share one scale (AIMET's per-row grid)."""
    share = layout.col_blocks if codebook_scale == "row_block" else 1
    return quantize_codebooks(codebooks, layout.codebook_bits, share)


# ---------------------------------------------------------------------------------------------- quantized weight
@dataclass
class VQWeight:
    layout: VQLayout
    tensors: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)

    def dequantize(self) -> torch.Tensor:
        return decode_weight(self.layout, self.tensors)
