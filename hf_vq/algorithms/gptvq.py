"""GPTVQ (van Baalen et al., 2024): vector quantization with Hessian-weighted codebooks and GPTQ error feedback.

Pure tensor math. A weight [N, K] is cut into d-dim vectors of adjacent columns. Each (rows_per_block x cols_per_block)
group has a codebook of 2^index_bits centroids, fitted by Hessian-weighted EM at the start of its column group;
columns are then quantized d at a time with GPTQ error feedback (lazy batches), the codebooks are refined by least
squares on ||(W - Q)X||^2 with fixed assignments (conjugate gradient), and finally stored at ``codebook_bits``.

Returns :class:`hf_vq.formats.vq.VQWeight` (the storage format lives in ``hf_vq.formats.vq``).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from hf_vq.algorithms.hessian import inverse_cholesky_upper, prepare_hessian
from hf_vq.formats.packing import pack
from hf_vq.formats.vq import (NORM_BITS, NORM_BLOCK, VQLayout, VQWeight, codebook_values, encode_codebooks,
                              element_codebook, norm_scales, quantize_codebooks, store_codebooks)
from hf_vq.utils.cbuild import CLibrary

_CHUNK = 1 << 23      # distance-matrix elements evaluated at once


# ---------------------------------------------------------------------------------------------- weighted k-means
def _assign_kernel(x: torch.Tensor, c: torch.Tensor, w: torch.Tensor):
    """The C library where it applies (CPU, float32, weights >= 0: the kernel's min needs them), else None."""
    fits = x.device.type == "cpu" and x.dtype == c.dtype == w.dtype == torch.float32
    return LIBRARY.load() if fits and not bool((w < 0).any()) else None


def _kernel_argmin(lib, x: torch.Tensor, c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    b, m, d = x.shape
    xs, ws, ct = x.contiguous(), w.contiguous(), c.transpose(1, 2).contiguous()
    out = torch.empty(b, m, dtype=torch.long)
    lib.vq_assign(xs.data_ptr(), ws.data_ptr(), ct.data_ptr(), b, m, c.shape[1], d, out.data_ptr(),
                  torch.get_num_threads())
    return out


def weighted_argmin(x: torch.Tensor, c: torch.Tensor, w: torch.Tensor | None = None,
                    use_kernel: bool = True) -> torch.Tensor:
    """argmin_j sum_d w (x - c_j)^2 for x [B, m, d], centroids c [B, k, d], weights broadcastable to x -> [B, m].
    On CPU in float32 a C kernel does it (csrc/vq_assign.c); elsewhere, or without a compiler, batched matmuls."""
    b, m, d = x.shape
    k = c.shape[1]
    w = torch.ones_like(x) if w is None else w.expand(b, m, d)
    lib = _assign_kernel(x, c, w) if use_kernel else None
    if lib is not None:
        return _kernel_argmin(lib, x, c, w)
    rhs = torch.cat((-2 * c, c * c), -1).transpose(1, 2)             # sum w x^2 is constant per vector
    step = max(1, _CHUNK // max(1, b * k))
    out = torch.empty(b, m, dtype=torch.long, device=x.device)
    for s in range(0, m, step):
        ws = w[:, s:s + step]
        out[:, s:s + step] = torch.bmm(torch.cat((ws * x[:, s:s + step], ws), -1), rhs).min(-1).indices
    return out


def _bind(lib):
    lib.vq_assign.restype = None
    lib.vq_assign.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long,
                              ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    lib.vq_em_step.restype = ctypes.c_long
    lib.vq_em_step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long,
                               ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_int]
    lib.vq_gptq_block.restype = None
    lib.vq_gptq_block.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_long,
                                  ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return lib


# EM's assignment step is most of GPTVQ's time: as torch ops it is a [B, m, d+1] x [B, d+1, k] matmul (an inner
# dimension too short to be fast) and a min over k, about 3x slower than one pass in C (48 x 4096 2-d vectors
# against 64 centroids each, 1 thread: 36 ms vs 13 ms).
LIBRARY = CLibrary(Path(__file__).with_name("csrc") / "vq_assign.c", _bind, "GPTVQ assignment kernel")


def weighted_error(x, c, idx, w=None) -> torch.Tensor:
    """sum w (x - c[idx])^2 per batch [B]."""
    q = c.gather(1, idx[..., None].expand_as(x))
    e = (x - q) ** 2
    return (e if w is None else e * w).sum(dim=(1, 2))


def _m_step(x, w, idx, c_old):
    b, m, d = x.shape
    ix = idx[..., None].expand(b, m, d)
    num = torch.zeros_like(c_old).scatter_add_(1, ix, w * x)
    den = torch.zeros_like(c_old).scatter_add_(1, ix, w.expand(b, m, d).contiguous())
    return torch.where(den > 0, num / den.clamp(min=1e-30), c_old)   # empty clusters keep their centroid


def _init_mahalanobis(x, w, k):
    """Sort vectors by Mahalanobis distance to their mean; take k evenly spaced ranks (valid vectors only)."""
    b, m, d = x.shape
    valid = (w > 0).any(-1)
    vf = valid.to(x.dtype)[..., None]
    cnt = vf.sum(1).clamp(min=1)                                           # [B, 1]
    mu = (x * vf).sum(1) / cnt
    xc = (x - mu[:, None]) * vf
    cov = xc.transpose(1, 2) @ xc / cnt[..., None]
    eps = 1e-6 * cov.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-12)
    cov = cov + eps[:, None, None] * torch.eye(d, dtype=x.dtype, device=x.device)
    dist = ((xc @ torch.linalg.inv(cov)) * xc).sum(-1).masked_fill(~valid, float("inf"))
    order = dist.argsort(1)
    ranks = (torch.arange(k, device=x.device)[None] * cnt / k).long()     # [B, k], < count
    return x.gather(1, order.gather(1, ranks)[..., None].expand(b, k, d))


def _init_kpp(x, w, k, generator):
    """k-means++ seeding under the weighted distance."""
    b, m, d = x.shape
    valid = (w > 0).any(-1).to(x.dtype)
    rows = torch.arange(b, device=x.device)
    first = torch.multinomial(valid + (valid.sum(1, keepdim=True) == 0), 1, generator=generator)[:, 0]
    cents = [x[rows, first]]
    dmin = torch.full((b, m), float("inf"), dtype=x.dtype, device=x.device)
    for _ in range(1, k):
        dmin = torch.minimum(dmin, (w * (x - cents[-1][:, None]) ** 2).sum(-1))
        p = dmin * valid
        p = torch.where(p.sum(1, keepdim=True) > 0, p, valid + (valid.sum(1, keepdim=True) == 0))
        cents.append(x[rows, torch.multinomial(p, 1, generator=generator)[:, 0]])
    return torch.stack(cents, 1)


def weighted_kmeans(x: torch.Tensor, w: torch.Tensor, k: int, iterations: int = 100, init: str = "mahalanobis",
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """EM for the weighted objective sum w (x - c)^2, batched over B independent codebooks.

    x, w: [B, m, d] (w = 0 marks padding). Returns centroids [B, k, d] and assignments [B, m]. Stops early when no
    assignment changes (the M-step would then be a fixed point)."""
    w = w.expand_as(x)
    c = _init_kpp(x, w, k, generator) if init == "kpp" else _init_mahalanobis(x, w, k)
    lib = _assign_kernel(x, c, w)
    if lib is not None:
        return _kmeans_kernel(lib, x.contiguous(), w.contiguous(), c, iterations)
    idx = None
    for _ in range(iterations):
        new = weighted_argmin(x, c, w)
        if idx is not None and torch.equal(new, idx):
            break
        idx = new
        c = _m_step(x, w, idx, c)
    if idx is None:
        idx = weighted_argmin(x, c, w)
    return c, idx


def _kmeans_kernel(lib, x, w, c, iterations):
    """weighted_kmeans's loop with each assignment and the M-step's sums in one C pass (csrc/vq_assign.c)."""
    b, m, d = x.shape
    k = c.shape[1]
    idx = None
    num, den = torch.empty(b, k, d), torch.empty(b, k, d)
    for _ in range(iterations):
        new = torch.empty(b, m, dtype=torch.long)
        ct = c.transpose(1, 2).contiguous()
        changed = lib.vq_em_step(x.data_ptr(), w.data_ptr(), ct.data_ptr(), b, m, k, d, new.data_ptr(),
                                 0 if idx is None else idx.data_ptr(), num.data_ptr(), den.data_ptr(),
                                 torch.get_num_threads())
        if idx is not None and changed == 0:
            break
        idx = new
        c = torch.where(den > 0, num / den.clamp(min=1e-30), c)   # empty clusters keep their centroid
    if idx is None:
        idx = _kernel_argmin(lib, x, c, w)
    return c, idx


# ---------------------------------------------------------------------------------------------- GPTVQ
def _quadratic_loss(w0, q, h) -> float:
    e = w0 - q
    return float((e @ h * e).sum())


def _update_codebooks(cq, flat, m, w0, h, steps):
    """Least squares on tr((W0 - Q(C)) H (W0 - Q(C))^T), Q(C) = C[flat] * m, assignments fixed: conjugate gradient."""
    shape = cq.shape
    c = cq.reshape(-1).clone()
    fl = flat.reshape(-1)

    def apply(v):
        return v[flat] * m

    def adjoint(g):
        return torch.zeros_like(c).index_add_(0, fl, (g * m).reshape(-1))

    r = adjoint((w0 - apply(c)) @ h)
    p, rs = r.clone(), float(r.square().sum())
    rs0 = rs
    for _ in range(steps):
        if rs <= 1e-12 * rs0 or rs == 0:
            break
        ap = apply(p)
        aph = ap @ h
        denom = float((ap * aph).sum())
        if denom <= 0:
            break
        alpha = rs / denom
        c += alpha * p
        r -= alpha * adjoint(aph)
        rs_new = float(r.square().sum())
        p = r + (rs_new / rs) * p
        rs = rs_new
    return c.reshape(shape)


@torch.no_grad()
def gptvq_quantize(weight: torch.Tensor, hessian: torch.Tensor, vector_dim: int = 2, index_bits: int = 6,
                   codebook_bits: int = 8, rows_per_block: int = 32, cols_per_block: int = 256,
                   kmeans_iterations: int = 100, percdamp: float = 0.01, hessian_weighted_lookup: bool = True,
                   codebook_update: bool = True, codebook_update_steps: int = 8, data_normalization: bool = False,
                   init: str = "mahalanobis", block_size: int = 128, seed: int = 0,
                   codebook_scale: str = "row_block") -> VQWeight:
    w0, h = prepare_hessian(weight.detach().to(torch.float32), hessian.to(torch.float32))
    n, kin = w0.shape
    lay = VQLayout(n, kin, vector_dim, index_bits, codebook_bits, rows_per_block, cols_per_block, data_normalization)
    d, k, kp, nrb, ncb = vector_dim, lay.k, lay.padded_in, lay.row_blocks, lay.col_blocks
    r = min(rows_per_block, n)              # a block taller than the layer is the whole layer
    np_ = nrb * r
    dev = w0.device
    # pad rows to whole row blocks and columns to whole vectors; padding has zero weight everywhere
    wp = torch.zeros(np_, kp, device=dev)
    wp[:n, :kin] = w0
    hp = torch.eye(kp, device=dev)
    hp[:kin, :kin] = h
    mask = torch.zeros(np_, kp, device=dev)
    mask[:n, :kin] = 1

    tensors: dict[str, torch.Tensor] = {}
    if data_normalization:
        nblk = -(-kp // NORM_BLOCK)
        amax = torch.zeros(np_, nblk * NORM_BLOCK, device=dev)
        amax[:, :kp] = wp.abs()
        amax = amax.view(np_, nblk, NORM_BLOCK).amax(-1)[:n]
        base = amax.max().clamp(min=1e-12).reshape(1)
        codes = (-torch.log2(amax.clamp(min=1e-30) / base)).round().clamp(0, 2 ** NORM_BITS - 1)
        tensors["vq_norm_codes"] = pack(codes.to(torch.int32), NORM_BITS)
        tensors["vq_norm_base"] = base.view(torch.int32).clone()
        s = torch.ones(np_, kp, device=dev)
        s[:n] = norm_scales(lay, tensors["vq_norm_codes"], tensors["vq_norm_base"])
    else:
        s = torch.ones(np_, kp, device=dev)

    u, _ = inverse_cholesky_upper(hp, percdamp)
    dcol = 1.0 / torch.diag(u).square()                        # D = 1 / [H^-1]_qq (GPTQ's per-column loss weight)
    em_w = dcol[None] * s.square() * mask
    look_w = em_w if hessian_weighted_lookup else s.square() * mask
    gen = torch.Generator(device=dev).manual_seed(seed)
    lib = _assign_kernel(wp, wp, look_w)       # checks the lookup weights once, not per column
    block_lib = lib if d <= 8 else None        # the C error-feedback loop keeps a vector on its stack

    idx_all = torch.zeros(np_, lay.nvec, dtype=torch.long, device=dev)
    cq_cols = []
    w = wp.clone()
    step = max(d, block_size // d * d)
    for g0 in range(0, kp, cols_per_block):
        g1 = min(g0 + cols_per_block, kp)
        nv = (g1 - g0) // d
        xs = (w[:, g0:g1] / s[:, g0:g1]).reshape(nrb, r * nv, d)
        c, _ = weighted_kmeans(xs, em_w[:, g0:g1].reshape(nrb, r * nv, d), k, kmeans_iterations, init, gen)
        qv, qs = quantize_codebooks(c, codebook_bits)
        cq = codebook_values(qv, qs)                                             # [nrb, k, d]
        cq_cols.append(cq)
        ct = cq.transpose(1, 2).contiguous()
        for b0 in range(g0, g1, step):
            b1 = min(b0 + step, g1)
            w1 = w[:, b0:b1].clone(memory_format=torch.contiguous_format)
            err = torch.zeros_like(w1)
            u1 = u[b0:b1, b0:b1]
            if block_lib is not None:  # the same loop in C, threads over rows
                u1, s1, lw1 = u1.contiguous(), s[:, b0:b1].contiguous(), look_w[:, b0:b1].contiguous()
                ib = torch.empty(np_, (b1 - b0) // d, dtype=torch.long)
                block_lib.vq_gptq_block(w1.data_ptr(), s1.data_ptr(), lw1.data_ptr(), ct.data_ptr(), u1.data_ptr(),
                                        b1 - b0, np_, b1 - b0, r, k, d, err.data_ptr(), ib.data_ptr(),
                                        torch.get_num_threads())
                idx_all[:, b0 // d:b1 // d] = ib
                w[:, b1:] -= err @ u[b0:b1, b1:]
                continue
            for i in range(0, b1 - b0, d):
                cols = slice(b0 + i, b0 + i + d)
                x = (w1[:, i:i + d] / s[:, cols]).reshape(nrb, r, d)
                lw = look_w[:, cols].reshape(nrb, r, d)
                ix = weighted_argmin(x, cq, lw) if lib is None else _kernel_argmin(lib, x, cq, lw)
                idx_all[:, (b0 + i) // d] = ix.reshape(-1)
                q = cq.gather(1, ix[..., None].expand(nrb, r, d)).reshape(np_, d) * s[:, cols]
                for j in range(d):
                    e = (w1[:, i + j] - q[:, j]) / u1[i + j, i + j]
                    w1[:, i + j:] -= e[:, None] * u1[i + j, i + j:][None, :]
                    err[:, i + j] = e
            w[:, b1:] -= err @ u[b0:b1, b1:]

    # [col block][row block] -> codebook id rb * col_blocks + cb
    cq_all = torch.stack(cq_cols, 1).reshape(nrb * ncb, k, d)
    gid = element_codebook(lay, np_, dev)
    flat = ((gid * k + idx_all)[..., None] * d + torch.arange(d, device=dev)).reshape(np_, kp)
    qv, qs = store_codebooks(lay, cq_all, codebook_scale)
    info = {"loss_before_update": _quadratic_loss(wp, cq_all.reshape(-1)[flat] * s * mask, hp)}
    if codebook_update:
        upd = _update_codebooks(cq_all, flat, s * mask, wp, hp, codebook_update_steps)
        qv2, qs2 = store_codebooks(lay, upd, codebook_scale)
        loss2 = _quadratic_loss(wp, codebook_values(qv2, qs2).reshape(-1)[flat] * s * mask, hp)
        info["loss_after_update"] = loss2
        if loss2 < info["loss_before_update"]:
            qv, qs = qv2, qs2
    tensors.update(encode_codebooks(qv, qs, codebook_bits))
    tensors["vq_indices"] = pack(idx_all[:n], index_bits)
    return VQWeight(lay, tensors, info)
