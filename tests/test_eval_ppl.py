"""evaluate_perplexity against an independent computation: transformers' own ``labels=`` loss (the mean NLL of a
window's predicted tokens), averaged over the same non-overlapping windows, then exponentiated."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_vq

from .conftest import random_text


def reference_ppl(model, ids: torch.Tensor, seq_len: int) -> float:
    """exp(mean token NLL) over the full windows of ``ids`` (stride = seq_len), one window at a time through the
    model's ``labels=`` loss; every window predicts seq_len - 1 tokens, so the mean of the window losses is the mean
    over all tokens."""
    n = ids.numel() // seq_len
    losses = []
    with torch.no_grad():
        for w in ids[: n * seq_len].view(n, seq_len):
            losses.append(float(model(input_ids=w[None], labels=w[None]).loss))
    return math.exp(sum(losses) / len(losses))


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


@pytest.mark.parametrize("seq_len,batch_size,max_tokens,max_windows", [
    (64, 1, None, None),      # every full window, the tail dropped
    (64, 3, None, None),      # batched, the last batch short
    (32, 4, 400, None),       # the first 400 tokens only: 12 windows
    (48, 2, None, 5),         # 5 windows
])
def test_matches_the_labels_loss_over_the_same_windows(model, seq_len, batch_size, max_tokens, max_windows):
    ids = torch.randint(2, 128, (1000,), generator=torch.Generator().manual_seed(seq_len))
    got = hf_vq.evaluate_perplexity(model, None, ids, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                                    max_windows=max_windows)
    use = ids[:max_tokens] if max_tokens else ids
    if max_windows:
        use = use[: max_windows * seq_len]
    want = reference_ppl(model, use, seq_len)
    assert got == pytest.approx(want, rel=1e-5)
    # a random tiny model is near uniform over its 128 tokens: the value is a perplexity, not a log or a sum
    assert 50 < got < 400


def test_text_input_is_tokenized_without_special_tokens_and_joined(model, tiny_tokenizer):
    texts = [random_text(300, seed=1), random_text(200, seed=2)]
    ids = torch.tensor(tiny_tokenizer.encode("\n\n".join(texts), add_special_tokens=False))
    got = hf_vq.evaluate_perplexity(model, tiny_tokenizer, texts, seq_len=64, batch_size=2)
    assert got == pytest.approx(reference_ppl(model, ids, 64), rel=1e-5)
    model.train()
    try:
        hf_vq.evaluate_perplexity(model, tiny_tokenizer, texts[0], seq_len=64)
        assert model.training  # the model's mode is restored
    finally:
        model.eval()


def test_fewer_tokens_than_one_window_is_an_error(model):
    with pytest.raises(ValueError, match="fewer than one window of 64"):
        hf_vq.evaluate_perplexity(model, None, torch.arange(2, 60), seq_len=64)
