"""hf_vq.optimize on a tiny quantized Llama: pinned kernels, static KV cache and torch.compile give the eager model's
tokens and logits; a compile that fails falls back with one warning; packing never leaks into the checkpoint."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_vq
from hf_vq.nn import kernel_native_affine as native


def quantized(tiny_llama_dir, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype,
                                                quantization_config=hf_vq.RTNConfig(bits=4, group_size=32)).eval()


def generate(model, ids, n=12):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.scores)


@pytest.fixture
def prompt():
    return torch.randint(2, 128, (1, 10), generator=torch.Generator().manual_seed(0))


def test_static_cache_and_pinned_kernels_give_the_eager_tokens(tiny_llama_dir, prompt):
    eager = quantized(tiny_llama_dir)
    seq, scores = generate(eager, prompt)
    fast = hf_vq.optimize(quantized(tiny_llama_dir), static_cache=True)
    report = fast.hf_vq_optimize
    assert report["kernels"] == {"native-affine": 14, "native-dense": 1} and report["static_cache"] and not report["compiled"]
    assert fast.generation_config.cache_implementation == "static"
    seq2, scores2 = generate(fast, prompt)
    assert torch.equal(seq, seq2)
    # same kernels, same rounding: the padded static cache changes only the order of the softmax sums
    torch.testing.assert_close(scores2, scores, rtol=1e-5, atol=1e-5)


def test_by_default_a_model_with_the_one_call_decode_step_keeps_the_dynamic_cache(tiny_llama_dir, prompt):
    from hf_vq.model.decode_stack import DecodeStackModel

    eager = quantized(tiny_llama_dir)
    seq, scores = generate(eager, prompt)
    fast = hf_vq.optimize(quantized(tiny_llama_dir))
    report = fast.hf_vq_optimize
    assert isinstance(fast.model, DecodeStackModel) and report["decode"]["decode_step_stack"] == 1
    assert not report["static_cache"] and fast.generation_config.cache_implementation != "static"
    assert fast.model.hf_vq_stack_checked is True   # the warm-up ran the one-call step
    seq2, scores2 = generate(fast, prompt)
    assert torch.equal(seq, seq2) and torch.equal(scores2, scores)



def test_by_default_a_model_without_the_one_call_decode_step_gets_the_static_cache(tmp_path):
    from tests.test_decode_stack import sliding_window_model

    report = hf_vq.optimize(quantized(sliding_window_model(tmp_path / "mistral"))).hf_vq_optimize
    assert report["decode"]["decode_step_stack"] == 0 and report["static_cache"] is True


def test_compiled_decode_gives_the_eager_logits(tiny_llama_dir, prompt):
    seq, scores = generate(quantized(tiny_llama_dir), prompt)
    fast = hf_vq.optimize(quantized(tiny_llama_dir), compile="always")
    report = fast.hf_vq_optimize
    assert report["compiled"] and report["warmup_s"] > 0 and not fast.generation_config.disable_compile
    assert report["eager_ms_per_token"] > 0 and report["compiled_ms_per_token"] > 0
    seq2, scores2 = generate(fast, prompt)
    assert torch.equal(seq, seq2)
    # inductor fuses the float ops around the kernels (norms, rotary, softmax): fp32 reassociation only
    torch.testing.assert_close(scores2, scores, rtol=1e-4, atol=1e-4)


def test_a_failing_compile_falls_back_to_eager_with_one_warning(tiny_llama_dir, prompt, monkeypatch):
    seq, _ = generate(quantized(tiny_llama_dir), prompt)

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler for inductor")

    monkeypatch.setattr(torch, "compile", broken_compile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = hf_vq.optimize(quantized(tiny_llama_dir), compile=True)
    relevant = [w for w in caught if "hf_vq.optimize" in str(w.message)]
    assert len(relevant) == 1 and "stays eager" in str(relevant[0].message)
    assert not fast.hf_vq_optimize["compiled"]
    seq2, _ = generate(fast, prompt)
    assert torch.equal(seq, seq2)


def test_compile_keeps_the_faster_decode_step(tiny_llama_dir, prompt):
    """compile=True times both steps in the warm-up and keeps the compiled one only where it is faster; the other
    choice warns once, and either way generate() gives the eager tokens."""
    seq, _ = generate(quantized(tiny_llama_dir), prompt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = hf_vq.optimize(quantized(tiny_llama_dir), compile=True, warmup_tokens=6)
    report = fast.hf_vq_optimize
    eager, compiled = report["eager_ms_per_token"], report["compiled_ms_per_token"]
    assert eager > 0 and compiled > 0
    assert report["compiled"] == (compiled <= eager)
    assert fast.generation_config.disable_compile == (not report["compiled"])
    relevant = [str(w.message) for w in caught if "hf_vq.optimize" in str(w.message)]
    assert len(relevant) == (0 if report["compiled"] else 1)
    assert all("stays eager" in m and f"{compiled:.2f} ms" in m for m in relevant)
    seq2, _ = generate(fast, prompt)
    assert torch.equal(seq, seq2)


def test_compile_takes_only_known_values(tiny_llama_dir):
    with pytest.raises(ValueError, match="compile must be"):
        hf_vq.optimize(quantized(tiny_llama_dir), compile="yes")


def test_packing_does_not_change_the_checkpoint(tiny_llama_dir, prompt, tmp_path):
    model = hf_vq.optimize(quantized(tiny_llama_dir), warmup_tokens=0)
    with torch.no_grad():
        before = model(prompt).logits
    model.save_pretrained(tmp_path)
    keys = set(__import__("safetensors.torch", fromlist=["load_file"]).load_file(tmp_path / "model.safetensors"))
    assert not any("kernel" in k or "packed" in k for k in keys)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        after = reloaded(prompt).logits
    assert torch.equal(before, after), "the reloaded model packs the same codes into the same kernel"
    assert native.last_isa == native.best_isa()
