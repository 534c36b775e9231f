"""Integration tests on the real cached assets (fetched on first use into the default cache)."""

from __future__ import annotations

import math

import pytest
import torch

from hf_vq import assets


@pytest.fixture(scope="module")
def model_dir():
    return assets.ensure_smollm2()


@pytest.fixture(scope="module")
def novels():
    return assets.ensure_austen()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_checkpoint_files(model_dir):
    assert assets.is_complete_checkpoint(model_dir)
    size = (model_dir / "model.safetensors").stat().st_size
    assert 530e6 < size < 545e6  # fp32, tied embeddings stored once (doc: 538,090,408 bytes)
    assert "quantization_config" not in (model_dir / "config.json").read_text()


def test_model_loads_plain(model_dir, tokenizer, novels):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert cfg.tie_word_embeddings
    assert getattr(cfg, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.lm_head.weight.dtype == torch.float32
    linears = [m for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 210
    # Real weights, not a random init: perplexity on real text is far below the vocab size.
    text = assets.austen_test_text()
    ids = tokenizer(text[:20000], return_tensors="pt")["input_ids"][:, :256]
    with torch.no_grad():
        loss = model(ids, labels=ids, use_cache=False).loss
    assert math.isfinite(loss.item()) and math.exp(loss.item()) < 200


def test_novels(novels):
    assert set(novels) == set(assets.AUSTEN_NOVELS)
    for path in novels.values():
        assert path.stat().st_size > 300_000
    assert "Emma Woodhouse" in assets.austen_calibration_text()
    assert "It is a truth universally acknowledged" in novels["prideprejudice"].read_text(encoding="utf-8")
    assert "Mansfield" in assets.austen_validation_text()


def test_splits_are_disjoint(novels):
    test, cal = assets.austen_test_text(), assets.austen_calibration_text(extended=True)
    assert not set(assets.CALIBRATION_NOVELS) & {"prideprejudice", "persuasion", "mansfieldpark"}
    assert test.startswith(novels["prideprejudice"].read_text(encoding="utf-8"))
    assert test.index("It is a truth universally acknowledged") < test.index("Sir Walter Elliot")
    long_lines = lambda s: {line for line in s.splitlines() if len(line) >= 30}  # noqa: E731
    assert not long_lines(test) & long_lines(cal)
    assert test[5000:7000] not in cal and cal[5000:7000] not in test


def test_token_counts(tokenizer):
    n_test = len(tokenizer(assets.austen_test_text())["input_ids"])
    n_cal = len(tokenizer(assets.austen_calibration_text())["input_ids"])
    assert n_test == 283_755  # docs/data-and-models.md
    assert 215_000 < n_cal < 230_000
    # the extended calibration set covers 128 x 2048 windows without repeating text
    assert len(tokenizer(assets.austen_calibration_text(extended=True))["input_ids"]) > 128 * 2048
