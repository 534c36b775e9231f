"""Input Hessian H = 2/n * sum x x^T of a Linear layer, accumulated over calibration batches (shared by GPTQ/GPTVQ)."""

from __future__ import annotations

import torch


class HessianAccumulator:
    """``first_token_weight``: weight of each sequence's first token (inputs shaped [batch, seq, features]). That
    token is the attention sink every later token reads; in long windows its plain 1/seq_len share of H is too small
    to keep its (massive) activations well reproduced (see GPTQConfig).

    ``split_first``: keep the first tokens' x x^T apart from the rest, so that after ``finalize`` (which returns the
    weighted H as usual) ``token_mean`` holds the plain token average (every token weight 1) too."""

    def __init__(self, in_features: int, device=None, first_token_weight: float = 1.0, split_first: bool = False):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0
        self.first_token_weight = float(first_token_weight)
        split = split_first and self.first_token_weight != 1.0
        self.first = torch.zeros_like(self.sum) if split else None  # sum of x0 x0^T over the sequences' first tokens
        self.token_mean: torch.Tensor | None = None

    # Above this width only the upper block triangle of x^T x is computed (5/8 of the FLOPs with 4 tiles).
    tile_above = 1024

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        if x.dim() == 3 and self.first is not None:
            x0 = x[:, 0].to(torch.float32)
            self.first.addmm_(x0.T, x0)
        elif x.dim() == 3 and self.first_token_weight != 1.0:
            x0 = x[:, 0].to(torch.float32)
            self.sum.addmm_(x0.T, x0, alpha=self.first_token_weight - 1.0)
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        k = x.shape[1]
        if k < self.tile_above:
            self.sum.addmm_(x.T, x)
        else:
            edges = [k * t // 4 for t in range(5)]
            tiles = [x[:, a:b] for a, b in zip(edges, edges[1:])]
            for i, (a, b) in enumerate(zip(edges, edges[1:])):
                self.sum[a:b, a:].addmm_(tiles[i].T, x[:, a:])
        self.count += x.shape[0]

    def finalize(self) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("no calibration inputs reached this layer")
        if self.sum.shape[0] >= self.tile_above:
            self.sum = torch.triu(self.sum) + torch.triu(self.sum, diagonal=1).T
        if self.first is not None:
            self.token_mean = self.sum * (2.0 / self.count)
            self.sum.add_(self.first, alpha=self.first_token_weight - 1.0)
        elif self.first_token_weight == 1.0:
            self.token_mean = self.sum
        return self.sum.mul_(2.0 / self.count)


def inverse_cholesky_upper(h: torch.Tensor, percdamp: float, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp*I)^-1, raising the damping tenfold until H is positive definite."""
    diag_mean = torch.diag(h).mean().item()
    damp = percdamp * diag_mean
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(max_tries):
        chol, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper, damp
        damp *= 10
    raise RuntimeError(f"Hessian is not positive definite even with damping {damp:.3g}")


def prepare_hessian(w: torch.Tensor, h: torch.Tensor):
    """Zero the weight columns of dead inputs (never active) and give them a unit Hessian diagonal."""
    dead = torch.diag(h) == 0
    if dead.any():
        h = h.clone()
        w = w.clone()
        h[dead, dead] = 1
        w[:, dead] = 0
    return w, h


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor, max_rows: int | None = None) -> float:
    """Relative output error tr(D H D^T) / tr(W H W^T) with D = W - W_hat: the proxy GPTQ minimises.

    Rows contribute independently; ``max_rows`` evaluates an evenly strided subset of at most that many rows (a
    cheap estimate for logging: the full value costs two [rows x k x k] products)."""
    if max_rows is not None and w.shape[0] > max_rows:
        rows = slice(None, None, -(-w.shape[0] // max_rows))
        w, w_hat = w[rows], w_hat[rows]
    d = (w - w_hat).float()
    num = (d @ h * d).sum()
    den = (w.float() @ h * w.float()).sum().clamp(min=1e-20)
    return float(num / den)
