"""Sharing hf_vq models through a real Hub-compatible server on 127.0.0.1 (olah + write front, see hub_server/).

The client side is the real code: huggingface_hub's upload (preupload, LFS batch + PUT, NDJSON commit), cache and
ETag handling, and transformers' push_to_hub / from_pretrained.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import hf_vq
from hf_vq.integrations.quantizer import HfVQQuantizer

IDS = torch.arange(3, 35)[None]


def _tiny_llama_dir(path, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _quantize(path, bits=4):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=hf_vq.RTNConfig(bits=bits, group_size=32))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def api(hub):
    return HfApi(endpoint=hub.endpoint)


@pytest.fixture(scope="module")
def base(hub, api, tmp_path_factory):
    """A float base model on the hub (with a licensed card) and its RTN 4-bit g32 quantization."""
    d = _tiny_llama_dir(tmp_path_factory.mktemp("base"))
    (d / "README.md").write_text("---\nlicense: mit\n---\n# tiny base\n")
    api.create_repo("testorg/tiny-base")
    api.upload_folder(repo_id="testorg/tiny-base", folder_path=d)
    model = _quantize(d)
    return model, _logits(model)


def test_server_error_codes(hub, api, base):
    assert api.repo_exists("testorg/tiny-base") and not api.repo_exists("testorg/nope")
    assert api.file_exists("testorg/tiny-base", "config.json")
    assert not api.file_exists("testorg/tiny-base", "nope.json")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("testorg/tiny-base", "nope.json")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("testorg/nope", "config.json")


def test_push_to_hub_roundtrip(hub, api, base):
    model, ref = base
    model.push_to_hub("testorg/tiny-rtn")
    files = set(api.list_repo_files("testorg/tiny-rtn"))
    assert {"config.json", "model.safetensors", "README.md"} <= files
    loaded = AutoModelForCausalLM.from_pretrained("testorg/tiny-rtn")
    assert isinstance(loaded.hf_quantizer, HfVQQuantizer)
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"
    assert torch.equal(_logits(loaded), ref)


def test_sharded_roundtrip(hub, api, base):
    model, ref = base
    model.push_to_hub("testorg/tiny-rtn-sharded", max_shard_size="60KB")
    files = set(api.list_repo_files("testorg/tiny-rtn-sharded"))
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert "model.safetensors.index.json" in files and len(shards) >= 3, shards
    loaded = AutoModelForCausalLM.from_pretrained("testorg/tiny-rtn-sharded")
    assert torch.equal(_logits(loaded), ref)
    # push_quantized replaces the shards with one file in a single commit (no stale shards left behind)
    hf_vq.push_quantized(model, "testorg/tiny-rtn-sharded", base_model="testorg/tiny-base")
    files = set(api.list_repo_files("testorg/tiny-rtn-sharded"))
    assert {f for f in files if "safetensors" in f} == {"model.safetensors"}
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained("testorg/tiny-rtn-sharded")), ref)


def test_revisions(hub, api, base, tmp_path):
    model4, ref4 = base
    first = model4.push_to_hub("testorg/tiny-rtn-revs").oid
    model8 = _quantize(_tiny_llama_dir(tmp_path / "fp", seed=1), bits=8)
    ref8 = _logits(model8)
    assert not torch.equal(ref8, ref4)
    second = model8.push_to_hub("testorg/tiny-rtn-revs").oid
    assert first != second and api.model_info("testorg/tiny-rtn-revs").sha == second
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained("testorg/tiny-rtn-revs")), ref8)
    old = AutoModelForCausalLM.from_pretrained("testorg/tiny-rtn-revs", revision=first)
    assert old.config.quantization_config.bits == 4
    assert torch.equal(_logits(old), ref4)


def _tiny_tokenizer():
    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate("the a of and to in".split())}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def test_push_quantized_card_encodings_tokenizer(hub, api, base, tmp_path):
    model, ref = base
    enc_dir = tmp_path / "enc"
    enc_dir.mkdir()
    # two valid (empty) documents in both layouts: push_quantized only uploads files that parse as encodings
    encodings = {"model.encodings": {"version": "1.0.0", "activation_encodings": [], "param_encodings": []},
                 "lm_head.encodings": {"version": "0.6.1", "activation_encodings": {}, "param_encodings": {}}}
    for name, obj in encodings.items():
        (enc_dir / name).write_text(json.dumps(obj))
    (enc_dir / "notes.txt").write_text("not an encodings file, not uploaded")
    info = hf_vq.push_quantized(model, "testorg/tiny-rtn-card", tokenizer=_tiny_tokenizer(), encodings_dir=enc_dir,
                                base_model="testorg/tiny-base", metrics={"ppl@512": 123.4})
    # one commit on top of the repo's initial commit holds everything
    repo = hub.mirrors / "models" / "testorg" / "tiny-rtn-card"
    log = subprocess.run(["git", "log", "--format=%H"], cwd=repo, capture_output=True, text=True, check=True)
    assert log.stdout.split()[0] == info.oid and len(log.stdout.split()) == 2
    files = set(api.list_repo_files("testorg/tiny-rtn-card"))
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "model.encodings",
            "lm_head.encodings"} <= files and "notes.txt" not in files

    card = ModelCard.load("testorg/tiny-rtn-card")
    assert {"quantized", "hf_vq"} <= set(card.data.tags)
    assert card.data.base_model == "testorg/tiny-base"
    assert card.data.license == "mit"  # inherited from the base model's card on the hub
    for needle in ("pip install hf_vq", "import hf_vq", "| `method` | `rtn` |", "| `bits` | `4` |",
                   "| `group_size` | `32` |", "bits per weight, stored", "| ppl@512 | 123.4 |",
                   'from_pretrained("testorg/tiny-rtn-card")'):
        assert needle in card.text, needle

    assert hf_vq.load_encodings_from_hub("testorg/tiny-rtn-card") == encodings
    assert hf_vq.load_encodings_from_hub("testorg/tiny-rtn-card", revision=info.oid) == encodings
    loaded = hf_vq.AutoQuantizedModelForCausalLM.from_pretrained("testorg/tiny-rtn-card")
    assert torch.equal(_logits(loaded), ref)
    assert AutoTokenizer.from_pretrained("testorg/tiny-rtn-card").convert_tokens_to_ids("and") == 5
    with pytest.raises(ValueError, match="is not an hf_vq checkpoint"):
        hf_vq.AutoQuantizedModelForCausalLM.from_pretrained("testorg/tiny-base")

    (enc_dir / "bad.encodings").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="not a JSON encodings file"):
        hf_vq.push_quantized(model, "testorg/tiny-rtn-card", encodings_dir=enc_dir)


def test_push_with_sweep_uploads_plot(hub, api, base):
    """A run that measured several settings pushes the perplexity-vs-bits PNG with the card, linked from it."""
    model, _ = base
    sweep = [{"label": "rtn 4-bit", "bits_per_value": 4.25, "ppl": 31.4},
             {"label": "gptq 3-bit", "bits_per_value": 3.25, "ppl": 45.0}]
    hf_vq.push_quantized(model, "testorg/tiny-rtn-sweep", base_model="testorg/tiny-base", sweep=sweep, fp_ppl=24.2)
    assert "ppl_vs_bits.png" in set(api.list_repo_files("testorg/tiny-rtn-sweep"))
    png = Path(hf_hub_download("testorg/tiny-rtn-sweep", "ppl_vs_bits.png")).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    card = ModelCard.load("testorg/tiny-rtn-sweep")
    assert "ppl_vs_bits.png" in card.text and "gptq 3-bit" in card.text


def test_load_without_import_hf_vq(hub, base):
    """What a user without hf_vq sees: transformers' warning names the quant method; the card says what to do."""
    base[0].push_to_hub("testorg/tiny-rtn-noimport")
    hf_vq.push_quantized(base[0], "testorg/tiny-rtn-noimport", base_model="testorg/tiny-base")
    script = textwrap.dedent("""
        import sys
        from huggingface_hub import ModelCard
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained("testorg/tiny-rtn-noimport")
        assert "hf_vq" not in sys.modules
        print("LAYER", type(m.model.layers[0].self_attn.q_proj).__name__, getattr(m, "hf_quantizer", None))
        print("CARD", ModelCard.load("testorg/tiny-rtn-noimport").text)
    """)
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "warning", "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    # transformers 5.23 does not raise: it skips the config and random-initializes the quantized layers
    assert "Unknown quantization type, got hf_vq" in out.stderr
    assert "LAYER Linear None" in out.stdout
    card = out.stdout.split("CARD", 1)[1]
    assert "Requires the `hf_vq` package" in card and "pip install hf_vq" in card and "import hf_vq" in card



def test_push_and_reload_example(hub, base, tmp_path):
    from examples import push_and_reload

    model, _ = base
    model.save_pretrained(tmp_path / "q")
    r = push_and_reload.main(["--model", str(tmp_path / "q"), "--repo-id", "testorg/example-push",
                              "--base-model", "testorg/tiny-base"])
    assert r["identical_logits"] is True
    assert r["encodings_files"] == ["model.encodings"]


def test_cli_quantize_push_to_hub(hub, tmp_path):
    d = _tiny_llama_dir(tmp_path / "base")
    _tiny_tokenizer().save_pretrained(d)
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_dummy_test_token",
           "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "hf_vq.cli", "quantize", str(d), "--method", "rtn", "--group-size", "32",
                        "--out", str(tmp_path / "out"), "--push-to-hub", "testorg/cli-push"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["layers"] == 14
    again = AutoModelForCausalLM.from_pretrained("testorg/cli-push")
    assert isinstance(again.model.layers[0].mlp.up_proj, hf_vq.QuantLinear)


def test_push_quantized_moe_roundtrip(hub, api, tmp_path):
    """Quantized fused experts (Qwen3-MoE, GPTQ) go up with push_quantized and come back with a plain
    from_pretrained(repo_id): same logits, experts still quantized, the card says what was left float."""
    from tests.arch_models import configs, save_tiny

    cls, cfg = configs()["qwen3_moe"]
    save_tiny("qwen3_moe", cls, cfg, tmp_path / "moe")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", quantization_config=hf_vq.GPTQConfig(
        dataset=[torch.randint(3, 100, (64,)) for _ in range(8)], num_samples=8, seq_len=32, group_size=32))
    ref = _logits(model)
    hf_vq.push_quantized(model, "testorg/tiny-moe-gptq")
    loaded = AutoModelForCausalLM.from_pretrained("testorg/tiny-moe-gptq")
    experts = loaded.model.layers[0].mlp.experts
    assert type(experts).__name__ == "QuantExperts" and experts.specs["down"]["bits"] == 4
    assert torch.equal(_logits(loaded), ref)
    card = ModelCard.load("testorg/tiny-moe-gptq").content
    assert "affine_experts" in card and "`model.layers.*.mlp.gate` (router)" in card
