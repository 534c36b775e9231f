"""The decoder layer's decode step (model/decode_layer.py): the same tokens and logits as the layer's own forward,
its plan following kernel selection, new weights and hooks, and variants keeping their own forward."""

from __future__ import annotations

import pytest
import torch

import hf_vq
from hf_vq.algorithms.rtn import rtn_weight
from hf_vq.formats.vq import VQWeight
from hf_vq.model.decode_layer import DecodeStepLayer, LayerPlan
from hf_vq.nn import kernel_native_affine, kernel_native_layer, kernel_native_vq
from tests.test_decode_step_kernels import decode_logits, load, strip_decode_kernels, tiny_llama
from tests.test_vq_kernel import _random_vq


@pytest.fixture(autouse=True)
def auto_kernels(monkeypatch):
    monkeypatch.setenv("HF_VQ_KERNELS", "auto")
    monkeypatch.delenv("HF_VQ_NATIVE_ISA", raising=False)


def own_layers(model):
    """The same model with its decoder layers' own forwards (attention step, norms and groups kept)."""
    for layer in model.model.layers:
        layer.__class__ = layer.hf_vq_own_class
    return model


RTN = dict(bits=4, group_size=32)
# q and k side by side in the joined output (96 = 6 tiles of 16), and apart (72 rows padded to 80; gate/up 136)
SHAPES = {"adjacent": {}, "padded": dict(hidden_size=72, intermediate_size=136, num_key_value_heads=2)}


def separate_kernels(model):
    """Every layer's plan without its C step (the same plan through one kernel call per part)."""
    for layer in model.model.layers:
        layer.hf_vq_plan.native = None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("step", ["native layer", "separate kernels"])
def test_the_layer_step_gives_the_layer_s_own_tokens(tmp_path, dtype, shape, step):
    path = tiny_llama(tmp_path, **SHAPES[shape])
    model = load(path, dtype=dtype, quantization_config=hf_vq.RTNConfig(**RTN))
    layer = model.model.layers[1]
    assert model.hf_vq_decode_kernels["decode_step_layers"] == 2 and isinstance(layer, DecodeStepLayer)
    assert layer.hf_vq_decode_checked is False, "checked at the first decode step, not at load"
    ids = torch.randint(2, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    fast, seq = decode_logits(model, ids, steps=6)
    assert layer.hf_vq_decode_checked is True and isinstance(layer.hf_vq_plan, LayerPlan)
    assert isinstance(layer.hf_vq_plan.native, kernel_native_layer.NativeLayer)
    if step == "separate kernels":
        separate_kernels(model)
        fast, seq = decode_logits(model, ids, steps=6)
    static, static_seq = decode_logits(model, ids, steps=6, cache_implementation="static")
    if step == "separate kernels":   # the plan held (nothing went stale): still without its C step
        assert layer.hf_vq_plan.native is None
    own, own_seq = decode_logits(own_layers(model), ids, steps=6)
    assert torch.equal(seq, own_seq) and torch.equal(static_seq, own_seq)
    tol = 2.0 ** -7 if dtype is torch.bfloat16 else 1e-5
    for got in (fast, static):
        assert torch.allclose(got, own, rtol=tol, atol=tol * float(own.abs().max()))
    if dtype is torch.float32:   # and the model without any of hf_vq's decode kernels but the quantized layers'
        plain = strip_decode_kernels(load(path, dtype=dtype, quantization_config=hf_vq.RTNConfig(**RTN)))
        ref, ref_seq = decode_logits(plain, ids, steps=6)
        assert torch.equal(seq, ref_seq)
        assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_a_layer_with_another_attention_keeps_its_forward(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=256)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "qwen3")
    model = load(tmp_path / "qwen3", quantization_config=hf_vq.RTNConfig(**RTN))
    layer = model.model.layers[0]
    own_class = layer.hf_vq_own_class
    ids = torch.randint(2, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    seq = decode_logits(model, ids, steps=3)[1]
    # Qwen3 normalizes q and k: the layer's first decode step compares and hands its own forward back
    assert type(layer) is own_class and "hf_vq_plan" not in layer.__dict__
    assert torch.equal(decode_logits(model, ids, steps=3)[1], seq)


def test_the_plan_follows_the_kernel_selection_and_new_weights(tmp_path, monkeypatch):
    path = tiny_llama(tmp_path)
    model = load(path, quantization_config=hf_vq.RTNConfig(**RTN))
    ids = torch.randint(2, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    fast, seq = decode_logits(model, ids)
    layer = model.model.layers[0]
    first_plan = layer.hf_vq_plan

    # exact: no plan (its kernels are gone), the modules' exact forwards, as in a model without decode kernels
    monkeypatch.setenv("HF_VQ_KERNELS", "exact")
    exact = decode_logits(model, ids)[0]
    plain = strip_decode_kernels(load(path, quantization_config=hf_vq.RTNConfig(**RTN)))
    assert torch.equal(exact, decode_logits(plain, ids)[0])
    monkeypatch.setenv("HF_VQ_KERNELS", "auto")
    again, again_seq = decode_logits(model, ids)
    assert layer.hf_vq_plan is not first_plan and torch.equal(again_seq, seq) and torch.equal(again, fast)

    # new weights through load_state_dict (every layer's codes rolled by one row): the next decode uses them
    state = {k: torch.roll(v, 1, 0) if k.endswith("qweight") else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    other = own_layers(load(path, quantization_config=hf_vq.RTNConfig(**RTN)))
    other.load_state_dict(state)
    new, new_ref = decode_logits(model, ids)[0], decode_logits(other, ids)[0]
    assert not torch.allclose(new, fast, rtol=1e-2, atol=1e-2)
    assert torch.allclose(new, new_ref, rtol=1e-5, atol=1e-5 * float(new_ref.abs().max()))


def test_a_hook_registered_after_the_first_decode_step_runs(tmp_path):
    model = load(tiny_llama(tmp_path), quantization_config=hf_vq.RTNConfig(**RTN))
    ids = torch.randint(2, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    fast, seq = decode_logits(model, ids, steps=4)
    seen = []
    handle = model.model.layers[1].mlp.up_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    hooked, hooked_seq = decode_logits(model, ids, steps=4)
    handle.remove()
    assert len(seen) == 4 and torch.equal(hooked_seq, seq)   # the prefill and 3 decode steps
    assert torch.allclose(hooked, fast, rtol=1e-5, atol=1e-5 * float(fast.abs().max()))


def test_a_gptvq_layer_step_gives_the_layer_s_own_tokens(tmp_path, calib_ids):
    cfg = hf_vq.GPTVQConfig(vector_dim=2, index_bits=4, rows_per_block=24, cols_per_block=32, codebook_bits=8,
                            kmeans_iterations=3, dataset=calib_ids, num_samples=4, seq_len=32)
    model = load(tiny_llama(tmp_path), quantization_config=cfg)
    ids = torch.randint(2, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    fast, seq = decode_logits(model, ids, steps=5)
    plan = model.model.layers[0].hf_vq_plan
    assert isinstance(plan.native, kernel_native_layer.NativeLayer) and plan.qkv[0][0].kernel.name == "native-vq-int8"
    own, own_seq = decode_logits(own_layers(model), ids, steps=5)
    assert torch.equal(seq, own_seq)
    assert torch.allclose(fast, own, rtol=1e-5, atol=1e-5 * float(own.abs().max()))


def test_with_gradients_enabled_the_layer_runs_its_own_forward(tmp_path):
    # Qwen2's q/k/v biases are trainable parameters: outside no_grad their gradients must flow
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen2")
    model = load(tmp_path / "qwen2", quantization_config=hf_vq.RTNConfig(**RTN))
    ids = torch.randint(2, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    fast, seq = decode_logits(model, ids, steps=3)
    assert isinstance(model.model.layers[0].hf_vq_plan.native, kernel_native_layer.NativeLayer)   # biases joined
    own, own_seq = decode_logits(own_layers(model), ids, steps=3)
    assert torch.equal(seq, own_seq) and torch.allclose(fast, own, rtol=1e-5, atol=1e-5 * float(own.abs().max()))
    # a decode position with gradients on, the embedding frozen (so the hidden states need no gradient): the
    # layers' own forwards run, and the q/k/v biases get their gradients
    from transformers import DynamicCache
    model = load(tmp_path / "qwen2", quantization_config=hf_vq.RTNConfig(**RTN))
    decode_logits(model, ids, steps=3)   # the layers' first decode step (their check) behind them
    assert isinstance(model.model.layers[0], DecodeStepLayer)
    model.model.embed_tokens.weight.requires_grad_(False)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    model(ids[:, :1], cache=cache, use_cache=True).logits.sum().backward()
    bias = model.model.layers[0].self_attn.q_proj.bias
    assert bias.grad is not None and bool(bias.grad.abs().sum() > 0)


@pytest.mark.parametrize("step", ["native layer", "separate kernels"])
def test_projections_of_different_widths_get_the_layer_step_one_call_each(tmp_path, step):
    # mixed precision: k_proj and up_proj at 8 bits cannot join their 4-bit siblings; each keeps its own call
    cfg = hf_vq.RTNConfig(**RTN, module_overrides={r".*k_proj": {"bits": 8}, r".*up_proj": {"bits": 8}})
    path = tiny_llama(tmp_path, **SHAPES["padded"])
    model = load(path, quantization_config=cfg)
    ids = torch.randint(2, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    fast, seq = decode_logits(model, ids, steps=5)
    plan = model.model.layers[1].hf_vq_plan
    assert len(plan.qkv[0]) == 3 and len(plan.gate_up[0]) == 2
    assert isinstance(plan.native, kernel_native_layer.NativeLayer)
    if step == "separate kernels":
        separate_kernels(model)
        fast, seq = decode_logits(model, ids, steps=5)
    own, own_seq = decode_logits(own_layers(model), ids, steps=5)
    assert torch.equal(seq, own_seq)
    assert torch.allclose(fast, own, rtol=1e-5, atol=1e-5 * float(own.abs().max()))


def test_a_forced_instruction_set_reaches_the_c_step(tmp_path, monkeypatch):
    from hf_vq.nn import kernel_native_affine
    model = load(tiny_llama(tmp_path), quantization_config=hf_vq.RTNConfig(**RTN))
    ids = torch.randint(2, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    fast, seq = decode_logits(model, ids)
    layer = model.model.layers[0]
    first = layer.hf_vq_plan
    monkeypatch.setenv("HF_VQ_NATIVE_ISA", "avx2")
    avx2, avx2_seq = decode_logits(model, ids)
    plan = layer.hf_vq_plan
    want = kernel_native_affine.ISAS["avx2"] if kernel_native_affine.isa_supported("avx2") else 0   # 0: the best
    assert plan is not first and plan.native.layer.q.isa == want
    assert torch.equal(avx2_seq, seq)   # another instruction set: the same int8 products, other float sums
    assert torch.allclose(avx2, fast, rtol=1e-4, atol=1e-4 * float(fast.abs().max()))


def test_prepared_states_are_let_go_with_the_module_s(tmp_path):
    import gc
    import weakref
    model = load(tiny_llama(tmp_path), quantization_config=hf_vq.RTNConfig(**RTN))
    ids = torch.randint(2, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    decode_logits(model, ids)
    layer = model.model.layers[0]
    group = layer.self_attn.q_proj._shared_input[0]
    joined = weakref.ref(group.fused)
    assert layer.hf_vq_plan is not None
    model.to(torch.bfloat16)   # drops every layer's prepared states
    gc.collect()
    assert "hf_vq_plan" not in layer.__dict__ and group.fused is None and joined() is None
    decode_logits(model, ids)   # prepared again at the next decode step
    assert layer.hf_vq_plan.native is not None and group.fused is not None


def test_time_projection_times_the_c_entry_point():
    # the benchmark aid (benchmarks/kernel_speed.py): one-row calls through the projection ABI, timed in C
    aff = kernel_native_affine.prepare(rtn_weight(torch.randn(48, 96), 4, 32, sym=True))
    mod = _random_vq(48, 96, 2, 6, 8, 16, 32, False, bias=False)
    vq = kernel_native_vq.prepare(VQWeight(mod.layout, mod.stored_tensors()))
    x = torch.randn(96)
    for proj in (kernel_native_affine.projection(aff), kernel_native_vq.projection(vq)):
        seconds = kernel_native_layer.time_projection([proj, proj], x, 48, 10)
        assert 0 < seconds < 0.01
    with pytest.raises(ValueError, match="same kernel"):
        kernel_native_layer.time_projection([kernel_native_affine.projection(aff), kernel_native_vq.projection(vq)],
                                            x, 48, 2)
