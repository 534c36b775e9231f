"""The model-level decode step (model/decode_stack.py): all layers of a decode token in one C call give the tokens,
logits and cache of the layers' own steps; every call it does not take runs the model's own forward; a model
whose own forward differs keeps it."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import hf_vq
from hf_vq.model.decode_stack import DecodeStackModel
from hf_vq.nn import kernel_native_layer
from tests.arch_models import configs, save_tiny
from tests.test_decode_step_kernels import decode_logits, load, strip_decode_kernels, tiny_llama

RTN = dict(bits=4, group_size=32)


@pytest.fixture(autouse=True)
def auto_kernels(monkeypatch):
    monkeypatch.setenv("HF_VQ_KERNELS", "auto")
    monkeypatch.delenv("HF_VQ_NATIVE_ISA", raising=False)


@pytest.fixture
def stack_calls(monkeypatch):
    """How many times the one C call over all layers ran."""
    calls = []
    run = kernel_native_layer.stack

    def counted(*args):
        calls.append(1)
        return run(*args)

    monkeypatch.setattr(kernel_native_layer, "stack", counted)
    return calls


def own_model_forward(model):
    """The same model with the base model's own forward (each layer's own step kept)."""
    model.model.__class__ = model.model.hf_vq_own_class
    return model


def tiny(tmp_path, dtype=torch.float32, **overrides):
    path = tiny_llama(tmp_path, **{"num_hidden_layers": 3, **overrides})
    return load(path, dtype=dtype, quantization_config=hf_vq.RTNConfig(**RTN))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_one_call_gives_the_layers_own_tokens_logits_and_cache(tmp_path, dtype, stack_calls):
    model = tiny(tmp_path, dtype)
    assert model.hf_vq_decode_kernels["decode_step_stack"] == 1 and isinstance(model.model, DecodeStackModel)
    assert model.model.hf_vq_stack_checked is False, "checked at the first decode step it could run, not at load"
    ids = torch.randint(2, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    fast, seq = decode_logits(model, ids, steps=8)
    assert model.model.hf_vq_stack_checked is True
    # 7 decode steps: the first builds the layers' plans through their own steps; the one call runs on the test
    # step and the 6 others
    assert len(stack_calls) == 1 + 6
    own, own_seq = decode_logits(own_model_forward(model), ids, steps=8)
    assert len(stack_calls) == 1 + 6
    assert torch.equal(seq, own_seq) and torch.equal(fast, own)   # the same C layer steps, called from C
    plain = strip_decode_kernels(tiny(tmp_path / "plain", dtype))
    ref, ref_seq = decode_logits(plain, ids, steps=8)
    assert torch.equal(seq, ref_seq)
    tol = 2.0 ** -7 if dtype is torch.bfloat16 else 1e-4
    assert torch.allclose(fast, ref, rtol=tol, atol=tol * float(ref.abs().max()))


def test_the_cache_after_one_call_steps_is_the_layers_own(tmp_path, stack_calls):
    model = tiny(tmp_path)
    ids = torch.randint(2, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    decode_logits(model, ids, steps=3)   # plans built, the one call checked

    def run(m, steps=140):   # past the first buffer's room (128 positions past the prompt): one regrowth
        cache, tok, outs = DynamicCache(config=m.config), ids, []
        with torch.no_grad():
            for _ in range(steps):
                out = m(input_ids=tok, cache=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
                outs.append(out.logits[:, -1])
        return torch.stack(outs), cache

    before = len(stack_calls)
    got, cache = run(model)
    assert len(stack_calls) - before == 139
    want, own_cache = run(own_model_forward(model))
    assert torch.equal(got, want)
    assert cache.get_seq_length() == own_cache.get_seq_length() == 5 + 139
    for a, b in zip(cache.layers, own_cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_calls_the_one_call_does_not_take_run_the_model_s_own_forward(tmp_path, stack_calls):
    model = tiny(tmp_path)
    ids = torch.randint(2, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    _, seq = decode_logits(model, ids, steps=4)
    n = len(stack_calls)
    with torch.no_grad():
        # a padding mask: the layers' own steps take it
        mask = torch.ones_like(ids)
        mask[0, 0] = 0
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert len(stack_calls) == n
        # every layer's output asked for
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, output_hidden_states=True,
                             return_dict_in_generate=True)
        assert len(stack_calls) == n and len(out.hidden_states[-1]) == 3 + 1
        # a batch of two
        model.generate(torch.cat([ids, ids]), max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert len(stack_calls) == n
        # a hook on a layer runs at every token
        seen = []
        handle = model.model.layers[1].register_forward_hook(lambda *a: seen.append(1))
        _, hooked_seq = decode_logits(model, ids, steps=4)
        handle.remove()
        assert len(stack_calls) == n and len(seen) == 4 and torch.equal(hooked_seq, seq)
        # a decode step with gradients on for a weight (generate() turns them off: a plain forward)
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, cache=cache, use_cache=True)
        model.model.norm.weight.requires_grad_(True)
        with torch.enable_grad():
            out = model(input_ids=ids[:, :1], cache=cache, use_cache=True)
        model.model.norm.weight.requires_grad_(False)
        assert len(stack_calls) == n and out.logits.grad_fn is not None
        # and back to the one call
        _, again = decode_logits(model, ids, steps=4)
    assert len(stack_calls) == n + 3 and torch.equal(again, seq)


def test_another_kernel_selection_or_new_weights_leave_the_one_call(tmp_path, stack_calls, monkeypatch):
    model = tiny(tmp_path)
    ids = torch.randint(2, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    fast, seq = decode_logits(model, ids, steps=4)
    n = len(stack_calls)
    monkeypatch.setenv("HF_VQ_KERNELS", "exact")
    exact, exact_seq = decode_logits(model, ids, steps=4)
    assert len(stack_calls) == n
    monkeypatch.setenv("HF_VQ_KERNELS", "auto")
    with torch.no_grad():   # new weights for one projection: its plan and the stack follow them
        down = model.model.layers[2].mlp.down_proj
        down.load_state_dict({k: v.clone() for k, v in model.model.layers[0].mlp.down_proj.state_dict().items()})
    changed, _ = decode_logits(model, ids, steps=4)
    assert len(stack_calls) > n
    own, _ = decode_logits(own_model_forward(model), ids, steps=4)
    assert torch.equal(changed, own) and not torch.equal(changed, fast)


class ScaledOutputLlamaModel:
    """A variant base model whose own forward does more than its layers and norm: it scales the last hidden state."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.last_hidden_state = out.last_hidden_state * 0.5
        return out


def test_a_model_whose_own_forward_differs_keeps_it(tmp_path, stack_calls):
    from hf_vq.nn.base import with_mixin

    model = tiny(tmp_path)
    base = model.model
    own = with_mixin(ScaledOutputLlamaModel, base.hf_vq_own_class)
    base.__class__, base.hf_vq_own_class = with_mixin(DecodeStackModel, own), own
    ids = torch.randint(2, 128, (1, 6), generator=torch.Generator().manual_seed(4))
    fast, seq = decode_logits(model, ids, steps=5)
    assert type(base) is own and "hf_vq_stack_checked" not in base.__dict__
    assert len(stack_calls) == 1   # the test step's
    ref, ref_seq = decode_logits(model, ids, steps=5)
    assert torch.equal(fast, ref) and torch.equal(seq, ref_seq)


def sliding_window_model(path):
    """A tiny Mistral whose layers attend to the last 8 positions only, saved to ``path``."""
    cls, cfg = configs()["mistral"]
    cfg.sliding_window = 8
    save_tiny("mistral", cls, cfg, path)
    return path


def test_a_sliding_window_model_is_not_adopted(tmp_path):
    model = load(sliding_window_model(tmp_path / "mistral"), quantization_config=hf_vq.RTNConfig(**RTN))
    assert model.hf_vq_decode_kernels["decode_step_layers"] == 2
    assert model.hf_vq_decode_kernels["decode_step_stack"] == 0 and not isinstance(model.model, DecodeStackModel)


def test_inference_mode_gives_the_no_grad_tokens_and_a_cache_crosses_modes(tmp_path, stack_calls):
    ids = torch.randint(2, 128, (1, 6), generator=torch.Generator().manual_seed(5))
    _, seq = decode_logits(tiny(tmp_path / "a"), ids, steps=6)
    model, n = tiny(tmp_path / "b"), len(stack_calls)
    with torch.inference_mode():   # from the first call on: inference tensors carry no version counter
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, pad_token_id=0)
    assert torch.equal(out, seq) and len(stack_calls) == n + 1 + 4   # the test step, then the 4 steps after the first

    def steps(cache, tok, count):
        for _ in range(count):
            tok = model(input_ids=tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        return tok

    for first, then in ((torch.inference_mode, torch.no_grad), (torch.no_grad, torch.inference_mode)):
        cache = DynamicCache(config=model.config)
        with first():
            tok = steps(cache, ids, 1)
            tok = steps(cache, tok, 3)
        with then():   # past the cache buffers' first room: they are made again in the other mode
            steps(cache, tok, 130)
        assert cache.get_seq_length() == 6 + 133


def test_two_threads_decoding_with_one_model_get_their_own_tokens(tmp_path, stack_calls):
    import threading

    model = tiny(tmp_path, num_hidden_layers=6)
    prompts = [torch.randint(2, 128, (1, 5 + i), generator=torch.Generator().manual_seed(10 + i)) for i in range(2)]
    alone = [decode_logits(model, p, steps=40)[1] for p in prompts]
    n = len(stack_calls)
    got = [[] for _ in prompts]

    def run(i):
        for _ in range(3):
            got[i].append(decode_logits(model, prompts[i], steps=40)[1])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(stack_calls) - n == 2 * 3 * 39   # every step after the prefill through the one call
    for i, seqs in enumerate(got):
        assert all(torch.equal(s, alone[i]) for s in seqs), f"thread {i}"
