"""The decode step's kernels beyond the quantized layers: RMSNorm (csrc/rms_norm.c), one-query attention
(csrc/decode_attention.c), rotary embeddings (csrc/rope.c) and the attention module's decode step
(model/decode_step.py), each against an independent computation, and the quantizer wiring them into a loaded model
of every architecture. Grouped projections: tests/test_shared_input.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

import hf_vq
from hf_vq.model.attention import NAME, sdpa_with_decode_kernel
from hf_vq.nn import kernel_native_attention, kernel_native_norm
from hf_vq.nn.attention import decode_attention
from hf_vq.nn.norm import KernelRMSNorm, adopt_rms_norm
from tests.arch_models import configs, save_tiny


@pytest.fixture(autouse=True)
def auto_kernels(monkeypatch):
    monkeypatch.setenv("HF_VQ_KERNELS", "auto")
    monkeypatch.delenv("HF_VQ_NATIVE_ISA", raising=False)


def test_kernels_build_here():
    assert kernel_native_norm.LIBRARY.load() is not None, "`cc` exists: a build failure is a bug"
    assert kernel_native_attention.LIBRARY.load() is not None


# ---------------------------------------------------------------- RMSNorm

def llama_formula(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm written out in float64 where it computes in fp32, with its two roundings."""
    xd = x.double()
    h = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (w.double() * h.double()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 5, 7), (2, 33), (4, 1, 16)])
def test_rms_norm_kernel_matches_the_formula(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 4).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(dtype)
    y = kernel_native_norm.run(kernel_native_norm.prepare(w), x, 1e-6)
    ref = llama_formula(x, w, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    # fp32 sums in another order than float64: at most one rounding step of the dtype apart, and mostly equal
    ulp = 2.0 ** -7 if dtype is torch.bfloat16 else 2.0 ** -21
    assert bool(((y.double() - ref.double()).abs() <= ulp * ref.double().abs() + 1e-30).all())
    if dtype is torch.bfloat16:   # the two bf16 roundings hide the fp32 summation order almost everywhere
        assert (y == ref).double().mean() > 0.9


@pytest.mark.parametrize("cls", [LlamaRMSNorm, Qwen3RMSNorm])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adopted_norm_gives_its_own_output_and_gradients(cls, dtype):
    norm = cls(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    plain = cls(48, eps=1e-5).to(dtype)
    plain.load_state_dict(norm.state_dict())
    weight = norm.weight
    assert adopt_rms_norm(norm)
    assert isinstance(norm, cls) and isinstance(norm, KernelRMSNorm) and norm.weight is weight
    assert list(norm.state_dict()) == ["weight"]
    x = (torch.randn(1, 1, 48) * 2).to(dtype)   # one row: the kernel's input
    with torch.no_grad():
        got, ref = norm(x), plain(x)
        many = (torch.randn(2, 3, 48) * 2).to(dtype)
        assert torch.equal(norm(many), plain(many)), "more rows keep the module's own forward, bit for bit"
    ulp = 2.0 ** -7 if dtype is torch.bfloat16 else 2.0 ** -21
    assert bool(((got.double() - ref.double()).abs() <= ulp * ref.double().abs() + 1e-30).all())
    # with gradients the module's own forward runs: the same graph as the plain module
    xg = x.clone().requires_grad_(True)
    norm(xg).float().square().sum().backward()
    xp = x.clone().requires_grad_(True)
    plain(xp).float().square().sum().backward()
    assert torch.equal(xg.grad, xp.grad) and torch.equal(norm.weight.grad, plain.weight.grad)


def test_exact_kernels_run_the_module_s_own_norm(monkeypatch):
    norm = LlamaRMSNorm(40).to(torch.bfloat16)
    plain = LlamaRMSNorm(40).to(torch.bfloat16)
    assert adopt_rms_norm(norm)
    monkeypatch.setenv("HF_VQ_KERNELS", "exact")
    x = torch.randn(1, 40).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(norm(x), plain(x))


def test_norms_with_another_formula_are_left_alone():
    gemma = GemmaRMSNorm(32)   # weight * (1 + w): another formula, found by running it
    with torch.no_grad():
        gemma.weight.normal_()
    assert not adopt_rms_norm(gemma) and type(gemma) is GemmaRMSNorm
    assert not adopt_rms_norm(nn.LayerNorm(32))


# ---------------------------------------------------------------- decode attention

def reference_attention(q, k, v, mask, scale):
    """float64 softmax attention with grouped heads repeated: [B, Hq, 1, D] -> [B, 1, Hq, D]."""
    rep = q.shape[1] // k.shape[1]
    kd, vd = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    s = (q.double() @ kd.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ vd).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# also: several chunks of 256 positions, more query heads per key/value head than one pass takes (8), a head dim
# with a tail after its 16-float vectors
@pytest.mark.parametrize("B,Hq,Hkv,L,D", [(1, 9, 3, 64, 64), (2, 8, 8, 17, 128), (1, 4, 1, 1, 32), (3, 6, 2, 70, 72),
                                         (1, 20, 2, 600, 72), (2, 16, 1, 300, 128), (1, 2, 1, 513, 8)])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_matches_float64(dtype, B, Hq, Hkv, L, D, masked):
    g = torch.Generator().manual_seed(B * Hq * L + D)
    # the layouts transformers hands over: q as a transposed view, k/v as a prefix of a longer (static) cache
    q = torch.randn(B, 1, Hq, D, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(B, Hkv, L + 5, D, generator=g).to(dtype)[:, :, :L]
    v = torch.randn(B, Hkv, L + 5, D, generator=g).to(dtype)[:, :, :L]
    mask = None
    if masked:
        mask = torch.rand(B, 1, 1, L, generator=g) > 0.4
        mask[..., 0] = True
    out = decode_attention(q, k, v, mask, D ** -0.5)
    ref = reference_attention(q, k, v, mask, D ** -0.5)
    assert out.shape == (B, 1, Hq, D) and out.dtype == dtype and out.is_contiguous()
    tol = 2.0 ** -8 * ref.abs() + 1e-6 if dtype is torch.bfloat16 else 1e-5 * ref.abs() + 1e-6
    assert bool(((out.double() - ref).abs() <= tol).all())


def test_a_row_with_every_key_masked_gives_zeros():
    q, k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    mask = torch.zeros(1, 1, 1, 5, dtype=torch.bool)
    assert torch.equal(decode_attention(q, k, v, mask, 0.25), torch.zeros(1, 1, 2, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunks_with_every_key_masked_drop_out_of_the_result(dtype):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, 1, 64, generator=g).to(dtype), torch.randn(1, 2, 700, 64, generator=g).to(dtype),
               torch.randn(1, 2, 700, 64, generator=g).to(dtype))
    mask = torch.zeros(1, 1, 1, 700, dtype=torch.bool)
    mask[..., 300:310] = True   # positions of the second chunk of 256 only
    ref = reference_attention(q, k, v, mask, 0.125)
    tol = 2.0 ** -8 * ref.abs() + 1e-6 if dtype is torch.bfloat16 else 1e-5 * ref.abs() + 1e-6
    assert bool(((decode_attention(q, k, v, mask, 0.125).double() - ref).abs() <= tol).all())


def test_a_mask_of_its_own_per_head():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 6, 1, 64, generator=g), torch.randn(1, 2, 300, 64, generator=g),
               torch.randn(1, 2, 300, 64, generator=g))
    mask = torch.rand(1, 6, 1, 300, generator=g) > 0.5
    mask[..., 0] = True
    ref = reference_attention(q, k, v, mask, 0.125)
    assert bool(((decode_attention(q, k, v, mask, 0.125).double() - ref).abs() <= 1e-5 * ref.abs() + 1e-6).all())


def test_keys_after_the_last_attended_one_are_not_read():
    # a static cache: positions past the current one are masked and hold whatever the buffer held (here NaN)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 6, 1, 64, generator=g)
    k, v = torch.full((1, 2, 300, 64), float("nan")), torch.full((1, 2, 300, 64), float("nan"))
    k[:, :, :40], v[:, :, :40] = torch.randn(1, 2, 40, 64, generator=g), torch.randn(1, 2, 40, 64, generator=g)
    mask = torch.zeros(1, 1, 1, 300, dtype=torch.bool)
    mask[..., :40] = True
    ref = reference_attention(q, k[:, :, :40], v[:, :, :40], None, 0.125)
    assert bool(((decode_attention(q, k, v, mask, 0.125).double() - ref).abs() <= 1e-5 * ref.abs() + 1e-6).all())


def test_two_threads_give_the_one_thread_result():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 8, 1, 64, generator=g), torch.randn(2, 4, 1200, 64, generator=g),
               torch.randn(2, 4, 1200, 64, generator=g))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode_attention(q, k, v, None, 0.125)
        torch.set_num_threads(2)   # 2 * 4 heads * 1200 keys * 64 > the parallel threshold
        two = decode_attention(q, k, v, None, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


class Heads(nn.Module):
    num_key_value_groups = 3
    training = False


def test_calls_the_kernel_does_not_serve_run_transformers_sdpa():
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(1, 6, 4, 16, generator=g), torch.randn(1, 2, 4, 16, generator=g), torch.randn(1, 2, 4, 16,
                                                                                                            generator=g)
    module = Heads()
    # prefill (4 query positions), an additive float mask, gradients: transformers' own function, bit for bit
    want, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.25, is_causal=True)
    got, _ = sdpa_with_decode_kernel(module, q, k, v, None, scaling=0.25, is_causal=True)
    assert torch.equal(got, want)
    q1 = q[:, :, :1]
    additive = torch.zeros(1, 1, 1, 4)
    want, _ = sdpa_attention_forward(module, q1, k, v, additive, scaling=0.25)
    got, _ = sdpa_with_decode_kernel(module, q1, k, v, additive, scaling=0.25)
    assert torch.equal(got, want)
    assert decode_attention(q1.requires_grad_(True), k, v, None, 0.25) is None
    with pytest.raises(ValueError, match="softcap"):
        sdpa_with_decode_kernel(module, q1.detach(), k, v, None, softcap=30.0)


# ---------------------------------------------------------------- the quantizer wires them in

def tiny_llama(tmp_path, **overrides):
    torch.manual_seed(0)
    cfg = dict(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=1, tie_word_embeddings=True, max_position_embeddings=256)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(tmp_path / "float")
    return tmp_path / "float"


def load(path, dtype=torch.float32, **kw):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).eval()


def groups_of(model):
    return {id(m._shared_input[0]): m._shared_input[0] for m in model.modules()
            if m.__dict__.get("_shared_input") is not None}


def ungroup(model):
    for m in model.modules():
        m.__dict__.pop("_shared_input", None)


def decode_logits(model, ids, steps=4, **kw):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kw)
    return torch.stack(out.logits), out.sequences


def test_a_loaded_model_gets_the_decode_kernels_and_keeps_its_logits(tmp_path):
    path = tiny_llama(tmp_path)
    model = load(path, quantization_config=hf_vq.RTNConfig(bits=4, group_size=32))
    assert model.config._attn_implementation == NAME
    assert model.hf_vq_decode_kernels == {"head": "lm_head", "rms_norms": 5, "shared_input_groups": 4,
                                          "decode_attention": True, "decode_step_attention": 2,
                                          "decode_step_layers": 2, "decode_step_stack": 1}
    assert sum(isinstance(m, KernelRMSNorm) for m in model.modules()) == 5   # 2 per layer + the final one
    assert len(groups_of(model)) == 4                                           # q/k/v and gate/up per layer
    assert all(not m._kernel_states.states for g in groups_of(model).values() for m in g.modules), \
        "nothing is prepared before the first decode row"
    ids = torch.randint(2, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    fast, seq = decode_logits(model, ids)
    for cache in ("dynamic", "static"):
        assert torch.equal(decode_logits(model, ids, cache_implementation=cache)[1], seq)

    # the same model with torch's SDPA, its own RMSNorm and one call per projection: the same decode up to fp32
    # rounding (the quantized layers run the same kernel either way)
    plain = strip_decode_kernels(load(path, quantization_config=hf_vq.RTNConfig(bits=4, group_size=32)))
    ref, ref_seq = decode_logits(plain, ids)
    assert torch.equal(seq, ref_seq)
    assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_quantsim_models_keep_torch_s_parts(tmp_path, calib_ids):
    sim = load(tiny_llama(tmp_path), quantization_config=hf_vq.QuantSimConfig(dataset=calib_ids, num_samples=4,
                                                                                seq_len=32))
    assert sim.config._attn_implementation == "sdpa"
    assert not any(isinstance(m, KernelRMSNorm) for m in sim.modules())


# ---------------------------------------------------------------- the attention module's decode step

def test_rope_kernel_matches_transformers_rotary():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from hf_vq.nn.attention import rotate_one_position
    g = torch.Generator().manual_seed(6)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(2, 1, 5, 24, generator=g).to(dtype).transpose(1, 2)        # [B, H, 1, D] view
        k = torch.randn(2, 1, 3, 24, generator=g).to(dtype).transpose(1, 2)
        ang = torch.rand(2, 1, 12, generator=g) * 6
        cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype)
        sin = torch.cat([ang.sin(), ang.sin()], -1).to(dtype)
        want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
        got_q = rotate_one_position(q.squeeze(2), cos.squeeze(1), sin.squeeze(1))
        got_k = rotate_one_position(k.squeeze(2), cos.squeeze(1), sin.squeeze(1))
        # the same three roundings as transformers' bf16 ops: equal bit for bit
        assert torch.equal(got_q, want_q.squeeze(2)) and torch.equal(got_k, want_k.squeeze(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_attention_gives_the_module_s_own_tokens(tmp_path, dtype):
    path = tiny_llama(tmp_path)
    model = load(path, dtype=dtype, quantization_config=hf_vq.RTNConfig(bits=4, group_size=32))
    for layer in model.model.layers:   # the attention's own step, not the layer's (which calls no attention module)
        layer.__class__ = layer.hf_vq_own_class
    attn = model.model.layers[1].self_attn
    assert model.hf_vq_decode_kernels["decode_step_attention"] == 2
    assert attn.hf_vq_decode_checked is False, "checked at the first decode step, not at load"
    ids = torch.randint(2, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    fast, seq = decode_logits(model, ids)
    assert attn.hf_vq_decode_checked is True and type(attn).__mro__[1].__name__ == "DecodeStepAttention"
    static, static_seq = decode_logits(model, ids, cache_implementation="static")
    for layer in model.model.layers:
        layer.self_attn.__class__ = layer.self_attn.hf_vq_own_class
        layer.__class__ = layer.hf_vq_own_class
    own, own_seq = decode_logits(model, ids)
    assert torch.equal(seq, own_seq) and torch.equal(static_seq, own_seq)
    tol = 2.0 ** -7 if dtype is torch.bfloat16 else 1e-5
    assert torch.allclose(fast, own, rtol=tol, atol=tol * float(own.abs().max()))
    assert torch.allclose(static, own, rtol=tol, atol=tol * float(own.abs().max()))


def test_an_attention_with_another_forward_keeps_it(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=256)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "qwen3")
    model = load(tmp_path / "qwen3", quantization_config=hf_vq.RTNConfig(bits=4, group_size=32))
    attn = model.model.layers[0].self_attn
    own_class = attn.hf_vq_own_class
    ids = torch.randint(2, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    seq = decode_logits(model, ids, steps=2)[1]
    # Qwen3 normalizes q and k before the rotation: the first decode step's comparison hands its forward back
    assert type(attn) is own_class and "hf_vq_decode_checked" not in attn.__dict__
    assert torch.equal(decode_logits(model, ids, steps=2)[1], seq)


def test_calls_the_decode_step_does_not_know_take_the_own_forward(tmp_path):
    model = load(tiny_llama(tmp_path), quantization_config=hf_vq.RTNConfig(bits=4, group_size=32))
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 1, 96)
    # an unknown keyword: the own forward runs, and it rejects what it does not take either
    with torch.no_grad(), pytest.raises(TypeError):
        attn(hidden_states=x, position_embeddings=None, attention_mask=None, key_value_states=x)
    assert attn.hf_vq_decode_checked is False


def strip_decode_kernels(model):
    """Undo what decode_kernels did: torch's SDPA, the modules' own norms and attention forwards, one call per layer."""
    ungroup(model)
    for m in model.modules():
        if "hf_vq_own_class" in m.__dict__:
            m.__class__ = m.hf_vq_own_class
        elif isinstance(m, KernelRMSNorm):
            m.__class__ = type(m).__mro__[2]
    if model.config._attn_implementation == NAME:
        model.set_attn_implementation("sdpa")
    return model


@pytest.mark.parametrize("arch", sorted(configs()))
def test_every_architecture_decodes_as_without_the_decode_kernels(arch, tmp_path):
    cls, cfg = configs()[arch]
    save_tiny(arch, cls, cfg, tmp_path / arch)
    model = load(tmp_path / arch, quantization_config=hf_vq.RTNConfig(bits=4, group_size=32))
    ids = torch.randint(2, 100, (1, 6), generator=torch.Generator().manual_seed(2))
    fast, seq = decode_logits(model, ids, steps=5)
    strip_decode_kernels(model)
    ref, ref_seq = decode_logits(model, ids, steps=5)
    assert torch.equal(seq, ref_seq)
    assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
