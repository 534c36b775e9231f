"""GPTVQ's C loops (csrc/vq_assign.c: the fused EM step and the error-feedback block) give bit-identical results to
the torch loops they replace: same centroids, assignments, codebooks and indices."""

from __future__ import annotations

import pytest
import torch

from hf_vq.algorithms import gptvq


KERNEL = gptvq._assign_kernel


@pytest.fixture
def torch_loops(monkeypatch):
    """torch_loops(True): gptvq runs its torch loops only (as on a machine without a C compiler); False: the C ones."""
    def use(enabled: bool):
        monkeypatch.setattr(gptvq, "_assign_kernel", (lambda *a: None) if enabled else KERNEL)
    return use


def _problem(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(768, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g))
    return torch.randn(n, k, generator=g) * 0.05, 2 * x.T @ x / x.shape[0]


def test_kernel_is_built():
    assert gptvq.LIBRARY.load() is not None  # `cc` exists on every machine this suite runs on


@pytest.mark.parametrize("init", ["mahalanobis", "kpp"])
def test_fused_em_matches_torch_em(torch_loops, init):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 700, 2, generator=g)
    w = torch.rand(5, 700, 2, generator=g)
    w[:, -40:] = 0.0  # padding
    runs = []
    for torch_path in (False, True):
        torch_loops(torch_path)
        runs.append(gptvq.weighted_kmeans(x, w, 16, iterations=30, init=init,
                                          generator=torch.Generator().manual_seed(0)))
    (c_k, i_k), (c_t, i_t) = runs
    assert torch.equal(i_k, i_t)
    assert torch.equal(c_k, c_t)
    assert i_k.unique().numel() > 8  # a real clustering, not a collapsed one


@pytest.mark.parametrize("d,rows,cols,norm,n,k", [
    (2, 32, 64, False, 96, 192),   # several row and column blocks
    (1, 16, 32, False, 40, 70),    # a partial row block and a partial last column block
    (4, 32, 64, True, 64, 128),    # data normalization scales
])
def test_c_error_feedback_matches_torch_loop(torch_loops, d, rows, cols, norm, n, k):
    w, h = _problem(n, k, seed=d)
    kw = dict(vector_dim=d, index_bits=4, rows_per_block=rows, cols_per_block=cols, kmeans_iterations=10,
              data_normalization=norm, block_size=32)
    results = []
    for torch_path in (False, True):
        torch_loops(torch_path)
        results.append(gptvq.gptvq_quantize(w, h, **kw))
    kernel, plain = results
    assert kernel.tensors.keys() == plain.tensors.keys()
    for name, t in plain.tensors.items():
        assert torch.equal(kernel.tensors[name], t), name
    assert kernel.info == plain.info
    # and a real quantization: nearer the weight than zero is (16 centroids: 4-d vectors get 1 bit per weight)
    err = (kernel.dequantize().float() - w).norm() / w.norm()
    assert 0.0 < err < 0.9
