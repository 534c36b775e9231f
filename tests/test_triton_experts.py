"""The Triton path of fused experts (QuantExperts, VQExperts) under Triton's CPU interpreter (TRITON_INTERPRET=1,
HF_VQ_KERNELS=triton): the grouped kernels (hf_vq/nn/kernel_triton_experts.py, one launch per projection for all
routed experts) up to 64 rows per expert, the per-expert kernels above, against the exact path (HF_VQ_KERNELS=exact)
with skewed routing: one expert gets most tokens, some get none, an expert-parallel sentinel is skipped.

Tolerance: every expert's projections are within the per-layer bounds of tests/test_triton_kernels.py; the block's
output (two projections, the gate, the routing weights) is compared at 1e-5 of its largest magnitude in fp32 and
2e-3 in fp16 (the exact path rounds the weights and the intermediate activations to fp16, the kernels accumulate in
fp32).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from hf_vq.nn import kernel_triton_affine as kta
from hf_vq.nn import kernel_triton_experts as kte
from hf_vq.nn import kernel_triton_vq as ktv
from hf_vq.nn.experts import QuantExperts
from tests.test_cpu_kernels import act_order_weight
from tests.test_moe import _experts, _quant_experts
from tests.test_triton_kernels import HAS_TRITON, interpreter, triton_kernels  # noqa: F401  (fixtures)
from tests.test_triton_vq import _vq_experts

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture
def launches(monkeypatch):
    """Launches by kind: "grouped", "gemv" and "gemm" (the per-layer kernels)."""
    seen = []
    real_grouped = kte._launch
    monkeypatch.setattr(kte, "_launch", lambda *a: (seen.append("grouped"), real_grouped(*a))[1])
    for mod in (kta, ktv):
        real = mod._launch

        def spy(ns, st, x2, bias, gemm, real=real):
            seen.append("gemm" if gemm else "gemv")
            return real(ns, st, x2, bias, gemm)

        monkeypatch.setattr(mod, "_launch", spy)
    return seen


def skewed_routing(t, n_experts, seed, first_share):
    """Expert 0 in the first slot of ``first_share`` tokens, the others at random, expert n-1 never; one -1."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, n_experts - 1, (t, 2), generator=g)
    idx[:first_share, 0] = 0
    idx[t // 2, 1] = -1
    return idx, torch.softmax(torch.randn(t, 2, generator=g), -1)


def compare(q, hidden, t, seed, first_share, dtype, monkeypatch):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(t, hidden, generator=g) * 0.5).to(dtype)
    idx, w = skewed_routing(t, q.num_experts, seed, first_share)
    with torch.no_grad():
        fast = q(h, idx, w.to(dtype))
        monkeypatch.setenv("HF_VQ_KERNELS", "exact")
        exact = q(h, idx, w.to(dtype))
        monkeypatch.setenv("HF_VQ_KERNELS", "triton")
    assert fast.dtype == dtype and fast.shape == h.shape
    rel = 1e-5 if dtype == torch.float32 else 2e-3
    err = (fast.float() - exact.float()).abs().max()
    assert err <= rel * exact.float().abs().max(), f"{err:.3e} vs max {exact.float().abs().max():.3e}"


CASES = {
    "affine 3-bit g32": lambda: _quant_experts("mixtral", bits=3, group=32),
    "affine 4-bit, biases, transposed (gpt-oss)": lambda: _quant_experts("gpt_oss", bits=4, group=32),
    "vq 2D 8-bit codebooks / 4D fp16 codebooks": _vq_experts,
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("t,first_share", [(1, 1), (5, 5), (24, 20)])
def test_grouped_kernels_match_the_exact_path(case, t, first_share, launches, monkeypatch):
    q, layout = CASES[case]()
    for dtype in (torch.float32, torch.float16):
        before = len(launches)
        compare(q, layout.hidden_size, t, seed=t, first_share=first_share, dtype=dtype, monkeypatch=monkeypatch)
        assert launches[before:] == ["grouped", "grouped"], "one launch per projection for all routed experts"


def test_grouped_act_order_experts(launches, monkeypatch):
    """Every expert with its own act-order column order (the kernel permutes the activations per expert)."""
    mod = _experts("mixtral")
    n_first, hidden, inter = mod.gate_up_proj.shape[1], mod.gate_up_proj.shape[2], mod.down_proj.shape[2]
    firsts = [act_order_weight(n_first, hidden, 3, 32, False, seed=e) for e in range(4)]
    downs = [act_order_weight(hidden, inter, 4, 32, True, seed=10 + e) for e in range(3)]
    downs.append(act_order_weight(hidden, inter, 4, 32, True, seed=20))
    downs[3].g_idx = (torch.arange(inter) // 32).to(torch.int32)   # one expert without act-order
    q = QuantExperts.from_affine(firsts, downs)
    q.attach_float_module(mod)
    compare(q, hidden, 20, seed=3, first_share=12, dtype=torch.float32, monkeypatch=monkeypatch)
    assert launches == ["grouped", "grouped"]
    state = next(s for (name, slot), (_src, s) in q._kernel_states.states.items() if slot == ("gate_up", "grouped"))
    assert state.perm is not None and len({tuple(p.tolist()) for p in state.perm}) == 4


@pytest.mark.parametrize("case", ["affine 3-bit g32", "vq 2D 8-bit codebooks / 4D fp16 codebooks"])
def test_more_rows_than_a_grouped_launch_take_the_per_expert_kernels(case, launches, monkeypatch):
    q, layout = CASES[case]()
    t = kte.MAX_ROWS + 6
    compare(q, layout.hidden_size, t, seed=5, first_share=t, dtype=torch.float32, monkeypatch=monkeypatch)
    assert launches == ["gemm"] * 6, "experts 0, 1, 2 (3 gets no token), both projections, through the tiled GEMMs"


def test_a_grouped_launch_that_fails_falls_back_to_the_per_expert_kernels(monkeypatch, launches):
    monkeypatch.setattr(kte, "_FAILED", set())
    monkeypatch.setattr(kta, "_warned", False)

    def broken(*_args):
        launches.append("grouped")
        raise RuntimeError("simulated: the grouped kernel does not compile here")

    monkeypatch.setattr(kte, "_launch", broken)
    q, layout = _quant_experts("mixtral", bits=4, group=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in (1, 2):
            compare(q, layout.hidden_size, 6, seed=seed, first_share=4, dtype=torch.float32, monkeypatch=monkeypatch)
    assert len([c for c in caught if "hf_vq triton kernel" in str(c.message)]) == 1
    assert launches.count("grouped") == 1, "a failed launch is not retried"
    assert "gemv" in launches, "the per-expert kernels served the calls"
