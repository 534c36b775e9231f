import os

# Bit-exact comparisons need a fixed reduction order: no dynamic thread counts under load.
os.environ.setdefault("OMP_DYNAMIC", "FALSE")
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import hf_vq  # noqa: F401  (registers the quant method)

WORDS = ("the a of and to in is was it he she that his her you for on with as at by not but be had have this from "
         "which or an were are all one their they been so if no when would there who will more said what out up into "
         "do could my than then them can only other new some time these two may first any like now very also over").split()


@pytest.fixture
def exact_kernels(monkeypatch):
    """Every quantized layer runs the dequantized reference forward (HF_VQ_KERNELS=exact): for tests that compare a
    model's logits with another reader of the same weights, or with its dequantized copy. The kernels' own error
    against that reference is bounded in tests/test_cpu_kernels.py and tests/test_vq_int8_kernel.py."""
    monkeypatch.setenv("HF_VQ_KERNELS", "exact")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    vocab = {"[UNK]": 0, "[EOS]": 1}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def random_text(n_words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g)
    return " ".join(WORDS[i] for i in idx.tolist())


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama with tied embeddings and a hidden size no group of 64 divides (like SmolLM2's 576 / 128)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=256)
    model = LlamaForCausalLM(cfg)
    d = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def calib_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (16, 64), generator=g)


# Property-based tests (hypothesis): "ci" (the default, run by `make test`) keeps a bounded, derandomized example
# count; HYPOTHESIS_PROFILE=extended runs 5000 examples per property. No example database is written into the tree.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("extended", max_examples=5000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
