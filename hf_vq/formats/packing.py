"""Bit packing of integer codes along the last dimension into uint8 (LSB first, value 0 in the lowest bits)."""

from __future__ import annotations

import torch


def packed_length(n: int, bits: int) -> int:
    return -(-n * bits // 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., n] integer codes in [0, 2^bits) -> [..., ceil(n*bits/8)] uint8."""
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    c = codes.to(torch.uint8) if bits <= 8 else codes
    if bits == 8:
        return c.to(torch.uint8).contiguous()
    if bits == 4:
        n = c.shape[-1]
        if n % 2:
            c = torch.nn.functional.pad(c, (0, 1))
        return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()
    bitplanes = (c.to(torch.int32)[..., None] >> torch.arange(bits, device=c.device)) & 1   # [..., n, bits]
    stream = bitplanes.flatten(-2)
    extra = (-stream.shape[-1]) % 8
    if extra:
        stream = torch.nn.functional.pad(stream, (0, extra))
    stream = stream.unflatten(-1, (-1, 8))
    weights = 1 << torch.arange(8, device=c.device, dtype=torch.int32)
    return (stream * weights).sum(-1).to(torch.uint8).contiguous()


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: [..., ceil(n*bits/8)] uint8 -> [..., n] uint8 codes."""
    if bits == 8:
        return packed[..., :n]
    if bits == 4:
        out = torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)
        return out[..., :n]
    stream = (packed.to(torch.int32)[..., None] >> torch.arange(8, device=packed.device)) & 1
    stream = stream.flatten(-2)[..., : n * bits].unflatten(-1, (n, bits))
    weights = 1 << torch.arange(bits, device=packed.device, dtype=torch.int32)
    return (stream * weights).sum(-1).to(torch.uint8)
