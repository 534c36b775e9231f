"""Sibling projections that read the same input computed by one kernel call on a decode row
(hf_vq/nn/shared_input.py): equal to one call per layer bit for bit, for affine and VQ layers, and only for the
same unchanged input and current weights."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_vq
from hf_vq.model.optimize import SHARED_INPUTS
from tests.test_decode_step_kernels import groups_of, load, tiny_llama, ungroup


@pytest.fixture(autouse=True)
def auto_kernels(monkeypatch):
    monkeypatch.setenv("HF_VQ_KERNELS", "auto")
    monkeypatch.delenv("HF_VQ_NATIVE_ISA", raising=False)


def test_grouped_projections_equal_one_call_each_bit_for_bit(tmp_path):
    path = tiny_llama(tmp_path, attention_bias=True, mlp_bias=True)
    model = load(path, quantization_config=hf_vq.RTNConfig(bits=4, group_size=32))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 1, 96)
    with torch.no_grad():
        grouped = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
        assert len(groups_of(model)) == 4
        group = attn.q_proj._shared_input[0]
        # the members' states are views into the joined one: nothing is stored twice
        joined = group.fused.codes
        for m in (attn.q_proj, attn.k_proj, attn.v_proj):
            st = m._kernel_states.states[(group.kernel.name, None)][1]
            assert st.codes.untyped_storage().data_ptr() == joined.untyped_storage().data_ptr()
        ungroup(model)
        alone = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    for a, b in zip(grouped, alone):
        assert a.shape == b.shape and torch.equal(a, b)


def test_a_group_serves_only_the_same_unchanged_input(tmp_path):
    model = load(tiny_llama(tmp_path), quantization_config=hf_vq.RTNConfig(bits=4, group_size=32))
    mlp = model.model.layers[1].mlp
    g = torch.Generator().manual_seed(5)
    x, other = torch.randn(1, 1, 96, generator=g), torch.randn(1, 1, 96, generator=g)
    with torch.no_grad():
        gate_x = mlp.gate_proj(x)
        x.mul_(2)                                    # changed in place after the group computed both outputs
        up_2x = mlp.up_proj(x)
        gate_o = mlp.gate_proj(other)                # a sibling waited for its input; another one came
        up_o = mlp.up_proj(other)
        ungroup(model)
        assert torch.equal(up_2x, mlp.up_proj(x)) and torch.equal(gate_o, mlp.gate_proj(other))
        assert torch.equal(up_o, mlp.up_proj(other)) and torch.equal(gate_x, mlp.gate_proj(x / 2))


def test_new_weights_reach_a_group(tmp_path):
    model = load(tiny_llama(tmp_path), quantization_config=hf_vq.RTNConfig(bits=4, group_size=32))
    x = torch.randn(1, 1, 96)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        before = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]     # the group joins with layer 0's codes
        attn.k_proj.load_state_dict(model.model.layers[1].self_attn.k_proj.state_dict())   # new codes: it joins again
        got = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
        ungroup(model)
        want = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    assert not torch.equal(before[1], got[1])
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_siblings_of_different_widths_run_on_their_own(tmp_path):
    # k_proj at 8 bits: the kernel cannot join 8-bit and 4-bit codes, so each projection keeps its own call
    cfg = hf_vq.RTNConfig(bits=4, group_size=32, module_overrides={r".*k_proj": {"bits": 8}})
    model = load(tiny_llama(tmp_path), quantization_config=cfg)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 1, 96)
    with torch.no_grad():
        got = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
        ungroup(model)
        want = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_the_sibling_table_names_real_projections():
    names = {n for group in SHARED_INPUTS for n in group}
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2)
    layer = dict(LlamaForCausalLM(cfg).model.layers[0].named_modules())
    assert {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"} <= set(layer)
    assert {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"} <= names


def test_grouped_vq_projections_equal_one_call_each_bit_for_bit(tmp_path, calib_ids):
    # row blocks of 24 rows: tiles of 16 and 8, so the joined layout's tiles carry their own row counts
    cfg = hf_vq.GPTVQConfig(vector_dim=2, index_bits=4, rows_per_block=24, cols_per_block=32, codebook_bits=8,
                            kmeans_iterations=3, dataset=calib_ids, num_samples=4, seq_len=32)
    model = load(tiny_llama(tmp_path), quantization_config=cfg)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    x = torch.randn(1, 1, 96)
    with torch.no_grad():
        grouped = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), mlp.gate_proj(x), mlp.up_proj(x)]
        assert len(groups_of(model)) == 4 and attn.q_proj._shared_input[0].kernel.name == "native-vq-int8"
        ungroup(model)
        alone = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), mlp.gate_proj(x), mlp.up_proj(x)]
    for a, b in zip(grouped, alone):
        assert a.shape == b.shape and torch.equal(a, b)
