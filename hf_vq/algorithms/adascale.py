"""AdaScale's trainable weight quantizer (AIMET AdaScale = FlexRound scales + OmniQuant learnable weight clipping).

Forward weight of one Linear ``W`` [N, K] on an affine grid with per-group scale/zero ([N, G], groups along K):

    W' = W / (exp(s2) * exp(s3))                      s2: element-wise, s3: per output channel
    scale = fp16(grid(gamma, beta))                    LWC: range ends scaled by 2*sigmoid(gamma|beta) (1 at init)
    q = clamp(round(W' / scale) + zero, 0, 2^b - 1)    straight-through rounding
    W_hat = (q - zero) * scale

Every parameter starts at 0, so the first forward is exactly the initial grid (RTN, or GPTQ's codes). Scales are
rounded to fp16 in the forward (straight-through) and zeros are integers, so :meth:`AdaScaleQuantizer.fold` returns
an :class:`~hf_vq.formats.affine.AffineWeight` whose dequantized weight is bit-identical to the trained forward weight.

Grids ("granularity"): "group" = hf_vq's min-max groups (sym or asym); "blockwise" = AIMET min-max blocks (equal
blocks along K); "lpbq" = AIMET LPBQ, symmetric blocks whose scales stay ``int * per_channel`` (int in
[1, 2^(dbw-b)]) during training, so the folded layer exports as an exact LPBQ encoding.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from hf_vq.formats import blockwise
from hf_vq.formats.affine import (FP16_MIN_SCALE, AffineWeight, fp16_up, grid_params, group_index, num_groups,
                                round_ste)

GRANULARITIES = ("group", "blockwise", "lpbq")
def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 value in the forward, identity gradient."""
    return x + (x.to(torch.float16).float() - x).detach()


def initial_grid(w: torch.Tensor, bits: int, group_size: int, sym: bool, granularity: str = "group",
                 decompressed_bw: int = 8):
    """RTN starting grid: (scale [N, G] fp16-exact, zero [N, G]) for the granularity."""
    n, k = w.shape
    w = w.detach().float()
    if granularity == "group":
        gs = k if group_size == -1 else group_size
        pairs = [grid_params(w[:, s:s + gs], bits, sym) for s in range(0, k, gs)]
        return torch.stack([p[0] for p in pairs], 1), torch.stack([p[1] for p in pairs], 1)
    block = k if group_size == -1 else group_size
    if granularity == "lpbq":
        aw = blockwise.lpbq_affine_weight(w, bits, block, decompressed_bw)
        return aw.scales.float(), aw.zeros.float()
    if granularity != "blockwise":
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    scale, offset = blockwise.minmax_grid(w, bits, sym, (1, block))
    scale = fp16_up(scale)
    if sym:
        return scale, -offset
    # asymmetric: the zero point on the fp16 scale (the range still contains 0)
    zero = torch.round(-blockwise.block_reduce(w, (1, block), torch.amin).clamp(max=0) / scale).clamp(0, 2**bits - 1)
    return scale, zero


def check_layout(shape, group_size: int, granularity: str, name: str = "layer") -> None:
    """AIMET blocks must divide the input dimension (a shorter last group is an hf_vq-only layout)."""
    k = shape[1]
    if granularity != "group" and group_size != -1 and k % group_size:
        raise ValueError(f"{name}: {granularity} block size {group_size} does not divide in_features={k}; "
                         "use weight_granularity='group' (allows a shorter last group) or another block size")


def _scaled(w: torch.Tensor, s2: torch.Tensor, s3: torch.Tensor) -> torch.Tensor:
    """W / (exp(s2) exp(s3)), in place on a new tensor (no autograd)."""
    return torch.sub(-s3, s2).exp_().mul_(w)  # s3 is per channel: negating it is free


def _rounded(x, z, maxq: int):
    """clamp(round(x), -z, maxq - z); maximum/minimum: clamp with tensor bounds is many times slower on CPU."""
    c = torch.round(x)
    torch.maximum(c, -z, out=c)
    return torch.minimum(c, maxq - z, out=c)


def _ste_forward(w, s2, s3, s, z, maxq: int):
    """(dequantized weight, u / s) for ``u = w / (exp(s2) exp(s3))``; the forward and fold both use it, so their
    rounding is identical whichever version (eager or compiled) runs."""
    x = _scaled(w, s2, s3).div_(s)
    return _rounded(x, z, maxq).mul_(s), x


def _ste_backward(g, x, s, z, maxq: int):
    """Gradients (s2, s3, s, z) of the straight-through forward, from ``x = u / s``: the rounding counts as identity
    where it is not clamped. Float masks only (bool tensors take slow paths on CPU); per-group sums taken once."""
    c = _rounded(x, z, maxq)
    keep = torch.sub(c, torch.round(x)).abs_().neg_().add_(1.0).clamp_(min=0.0)  # 1 where not clamped, else 0
    gk = keep.mul_(g)
    dz = (gk.sum(-1, keepdim=True) - g.sum(-1, keepdim=True)).mul_(s)
    gkx = gk.mul_(x)  # dL/du = g where kept, and u = x * s
    gkx_sum = gkx.sum(-1, keepdim=True)
    ds = torch.linalg.vecdot(g, c)[..., None] - gkx_sum
    ds3 = -(gkx_sum * s).sum((1, 2), keepdim=True)
    return gkx.mul_(-s), ds3, ds, dz  # d/ds2 of u = -u


class QuantKernels:
    """The element-wise forward/backward of the quantizer, eager or through torch.compile (one fused loop instead of
    a dozen passes over each weight: ~2.5x faster forward + backward on a CPU core, for a one-off compile of ~20 s;
    dynamic shapes, so one compile serves every layer). A compiled call that fails (no C++ compiler or triton, an
    unsupported backend) warns and falls back to the eager functions for good."""

    def __init__(self, compile: bool = False):
        self.compiled = compile
        self.forward, self.backward = _ste_forward, _ste_backward
        if compile:
            self.forward = torch.compile(_ste_forward, dynamic=True)
            self.backward = torch.compile(_ste_backward, dynamic=True)

    def __call__(self, which: str, *args):
        try:
            return getattr(self, which)(*args)
        except Exception as e:  # any compiler failure; a real error in the math re-raises from the eager call
            if not self.compiled:
                raise
            warnings.warn(f"AdaScale: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); running eager")
            self.compiled = False
            self.forward, self.backward = _ste_forward, _ste_backward
            return getattr(self, which)(*args)


EAGER = QuantKernels(compile=False)
_COMPILED: list[QuantKernels] = []


def compiled_kernels() -> QuantKernels:
    """One compiled instance per process: every quantizer (and every block) shares its compile."""
    if not _COMPILED:
        _COMPILED.append(QuantKernels(compile=True))
    return _COMPILED[0]


class _QuantSTE(torch.autograd.Function):
    """``(clamp(round(u/s) + z, 0, maxq) - z) * s`` with ``u = w * exp(-(s2 + s3))`` and straight-through rounding,
    in fewer passes over the weight than autograd's version (same gradients:
    tests/test_adascale.py::test_fused_ste_matches_autograd)."""

    @staticmethod
    def forward(ctx, w, s2, s3, s, z, maxq, kernels):
        out, x = kernels("forward", w, s2, s3, s, z, maxq)
        ctx.save_for_backward(x, s, z)
        ctx.maxq, ctx.kernels = maxq, kernels
        return out

    @staticmethod
    def backward(ctx, g):
        x, s, z = ctx.saved_tensors
        ds2, ds3, ds, dz = ctx.kernels("backward", g.contiguous(), x, s, z, ctx.maxq)
        return None, ds2, ds3, ds, dz, None, None


def reference_forward(qz: "AdaScaleQuantizer") -> torch.Tensor:
    """The quantizer's forward written with plain autograd ops (for tests)."""
    scale, zero = qz.grid()
    s, z = scale[..., None], zero[..., None]
    w = torch.clamp(round_ste(qz.w3 * torch.exp(-(qz.s2 + qz.s3)) / s) + z, 0, qz.maxq) - z
    w = w * s
    return w.reshape(w.shape[0], -1)[:, :qz.k]


class AdaScaleQuantizer(nn.Module):
    """Trainable quantizer of one weight. ``weight`` is the tensor being rounded (the FP weight, or for a GPTQ start a
    copy moved into GPTQ's rounding cells); ``scale0``/``zero0`` the starting grid [N, G]."""

    def __init__(self, weight: torch.Tensor, scale0: torch.Tensor, zero0: torch.Tensor, bits: int, group_size: int,
                 sym: bool, granularity: str = "group", decompressed_bw: int = 8):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if granularity == "lpbq" and not sym:
            raise ValueError("LPBQ grids are symmetric")
        n, k = weight.shape
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.granularity, self.decompressed_bw = granularity, decompressed_bw
        self.maxq = 2**bits - 1
        self.register_buffer("scale0", scale0.detach().float().clone())
        self.register_buffer("zero0", zero0.detach().float().clone())
        self.register_buffer("g_idx", group_index(k, group_size, weight.device).long())
        if self.scale0.shape != (n, num_groups(k, group_size)):
            raise ValueError(f"grid shape {tuple(self.scale0.shape)} does not match weight {n}x{k}, group {group_size}")
        # groups as a [N, G, gs] view (zero padding for a shorter last group): broadcasting instead of gathers
        self.k, self.gs = k, (k if group_size == -1 else group_size)
        pad = self.scale0.shape[1] * self.gs - k
        self.register_buffer("w3", nn.functional.pad(weight.detach().float(), (0, pad)).clone().view(n, -1, self.gs))
        zeros = dict(device=weight.device, dtype=torch.float32)
        self.s2 = nn.Parameter(torch.zeros(self.w3.shape, **zeros))  # padded entries get no gradient
        self.s3 = nn.Parameter(torch.zeros(n, 1, 1, **zeros))
        self.gamma = nn.Parameter(torch.zeros_like(self.scale0))
        self.beta = nn.Parameter(torch.zeros_like(self.scale0))
        self.kernels = EAGER  # compiled_kernels() for long runs

    def clip_params(self) -> list[nn.Parameter]:
        return [self.gamma, self.beta]

    def scale_params(self) -> list[nn.Parameter]:
        return [self.s2, self.s3]

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group (scale, zero) [N, G] after learned clipping; scales fp16-exact, zeros integer."""
        fg, fb = 2 * torch.sigmoid(self.gamma), 2 * torch.sigmoid(self.beta)
        if self.sym:
            zero = self.zero0
            raw = (self.scale0 * (fg + fb) / 2).clamp(min=FP16_MIN_SCALE)
            if self.granularity == "lpbq":
                return self._lpbq(raw), zero
            return fp16_ste(raw), zero
        wmax = (self.maxq - self.zero0) * self.scale0 * fg
        wmin = -self.zero0 * self.scale0 * fb
        scale = fp16_ste(((wmax - wmin) / self.maxq).clamp(min=FP16_MIN_SCALE))
        zero = torch.clamp(round_ste(-wmin / scale), 0, self.maxq)
        return scale, zero

    def _lpbq(self, raw: torch.Tensor) -> torch.Tensor:
        levels = 2 ** (self.decompressed_bw - self.bits)
        pc = raw.amax(1) / levels
        pc = pc + (blockwise._fp16_exact_per_channel(pc.detach(), self.decompressed_bw - self.bits) - pc).detach()
        ints = torch.clamp(round_ste(raw / pc[:, None]), 1, levels)
        return ints * pc[:, None]

    def forward(self) -> torch.Tensor:
        scale, zero = self.grid()
        w = _QuantSTE.apply(self.w3, self.s2, self.s3, scale[..., None], zero[..., None], self.maxq, self.kernels)
        w = w.view(w.shape[0], -1)
        return w if w.shape[1] == self.k else w[:, :self.k]  # a no-op slice would still cost a copy in backward

    @torch.no_grad()
    def fold(self) -> AffineWeight:
        """The trained forward weight as a plain AffineWeight (codes, fp16 scales, integer zeros)."""
        scale, zero = self.grid()
        x = self.kernels("forward", self.w3, self.s2, self.s3, scale[..., None], zero[..., None], self.maxq)[1]
        codes = torch.clamp(torch.round(x) + zero[..., None], 0, self.maxq)
        return AffineWeight(codes.reshape(codes.shape[0], -1)[:, :self.k], scale, zero, self.g_idx, self.bits,
                            self.group_size, self.sym)


def quantizer_from_rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool, granularity: str = "group",
                       decompressed_bw: int = 8) -> AdaScaleQuantizer:
    scale0, zero0 = initial_grid(w, bits, group_size, sym, granularity, decompressed_bw)
    return AdaScaleQuantizer(w, scale0, zero0, bits, group_size, sym, granularity, decompressed_bw)


def quantizer_from_affine(w: torch.Tensor, start: AffineWeight, granularity: str = "group",
                          max_frac: float = 0.45) -> AdaScaleQuantizer:
    """Start from a given rounding (e.g. GPTQ's): ``w`` is moved into the start's rounding cells (keeping its
    fractional position, clamped to within ``max_frac`` of the cell centre) so the first forward equals ``start``
    exactly while s2/s3 still see how far each weight is from a rounding boundary."""
    scale, zero = start.scales.float(), start.zeros.float()
    g = start.g_idx.long()
    s, z = scale[:, g], zero[:, g]
    q = start.codes.float()
    frac = ((w.float() / s + z) - q).clamp(-max_frac, max_frac)
    # codes GPTQ clamped at the grid ends: a weight beyond the end stays beyond it (still rounds to the end code)
    frac = torch.where((q == 0) & (frac < 0), ((w.float() / s + z) - q).clamp(max=0), frac)
    frac = torch.where((q == 2**start.bits - 1) & (frac > 0), ((w.float() / s + z) - q).clamp(min=0), frac)
    base = (q - z + frac) * s
    return AdaScaleQuantizer(base, scale, zero, start.bits, start.group_size, start.sym, granularity)


class AdaScaleLinear(nn.Module):
    """Stand-in for an nn.Linear during training: the weight comes from the trainable quantizer."""

    def __init__(self, linear: nn.Linear, quantizer: AdaScaleQuantizer):
        super().__init__()
        self.linear = linear
        self.quantizer = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.quantizer().to(x.dtype), self.linear.bias)
