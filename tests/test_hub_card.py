"""Model card rendering and the checked loader of hf_vq.hub, on a tiny random Llama (no network)."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_vq
from hf_vq.hub import LOAD_HINT, quantization_summary, render_model_card


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(d)
    (d / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny base\n")
    return d


@pytest.fixture(scope="module")
def qmodel(base_dir):
    return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=hf_vq.RTNConfig(bits=4, group_size=32))


def test_card_metadata_and_body(qmodel, base_dir, tmp_path):
    card = render_model_card(qmodel, "testorg/tiny-base", metrics={"wikitext ppl": 12.3456}, calibration=None,
                             plot_path=tmp_path / "ppl.png", repo_id="testorg/tiny-rtn")
    assert isinstance(card, ModelCard)
    data = card.data.to_dict()
    assert {"quantized", "hf_vq", "hf_vq-rtn", "4-bit"} <= set(data["tags"])
    assert data["base_model"] == "testorg/tiny-base" and data["base_model_relation"] == "quantized"
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0"  # from the base model's local README (name_or_path)
    text = card.text
    assert "pip install hf_vq" in text and "import hf_vq" in text and LOAD_HINT in text
    assert 'from_pretrained("testorg/tiny-rtn")' in text
    # every saved quantization parameter except the per-layer record appears in the table
    params = qmodel.config.quantization_config.to_dict()
    params.pop("layers")
    for key in params:
        assert f"| `{key}` |" in text, key
    assert "| `group_size` | `32` |" in text and "| `method` | `rtn` |" in text
    assert "| wikitext ppl | 12.35 |" in text and "![evaluation plot](ppl.png)" in text
    assert "no calibration data" in text
    # the card survives a save/load round trip with the same metadata
    card.save(tmp_path / "README.md")
    assert ModelCard.load(tmp_path / "README.md").data.to_dict() == data


def test_bits_per_weight_matches_checkpoint(qmodel, tmp_path):
    qmodel.save_pretrained(tmp_path)
    layers = qmodel.config.quantization_config.layers
    weights = sum(r["in_features"] * r["out_features"] for r in layers.values())
    bits = 0
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        for key in f.keys():
            if key.rsplit(".", 1)[0] in layers:
                t = f.get_tensor(key)
                bits += t.numel() * t.element_size() * 8
    s = quantization_summary(qmodel)
    assert s["bits_per_weight"] == pytest.approx(bits / weights)
    assert 4.0 < s["bits_per_weight"] < 6.0  # 4-bit codes + group scales/zeros at g32
    assert s["n_quantized"] == len(layers) == 14 and s["bits_label"] == "4-bit"
    assert s["quantized_bytes"] < s["float_bytes"]


def test_card_without_base_model_or_metrics(qmodel):
    card = render_model_card(qmodel, None)
    assert card.data.base_model is None and "## Evaluation" not in card.text
    assert "<repo_id>" in card.text


def test_render_rejects_float_model(base_dir):
    plain = AutoModelForCausalLM.from_pretrained(base_dir)
    with pytest.raises(ValueError, match="not an hf_vq-quantized model"):
        render_model_card(plain, None)


def test_checked_loader(qmodel, base_dir, tmp_path):
    with pytest.raises(ValueError, match="is not an hf_vq checkpoint.*no quantization_config"):
        hf_vq.AutoQuantizedModelForCausalLM.from_pretrained(base_dir)
    qmodel.save_pretrained(tmp_path)
    model = hf_vq.AutoQuantizedModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.arange(16)[None]
    assert torch.equal(model(ids).logits, qmodel(ids).logits)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "gptq"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quant_method='gptq'"):
        hf_vq.AutoQuantizedModelForCausalLM.from_pretrained(tmp_path)


def test_card_for_weight_only_quantsim_model(base_dir):
    # QuantSim layers list activation-quantizer tensors too; the card's bit rate counts only the stored weight tensors
    cfg = hf_vq.QuantSimConfig(weight_bits=8, weight_granularity="per_channel", activation_bits=None)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=cfg)
    s = quantization_summary(model)
    assert 8.0 < s["bits_per_weight"] < 9.0  # 8-bit codes + one fp16 scale and zero per row of 64-128 weights
    assert "quantsim" in str(render_model_card(model, base_model=None))


SWEEP = [{"label": "RTN 4-bit g128", "bits_per_value": 4.25, "ppl": 31.44},
         {"label": "RTN 3-bit g128", "bits_per_value": 3.25, "ppl": 97.7},
         {"label": "GPTQ 4-bit g128", "bits_per_value": 4.25, "ppl": 26.1}]


def test_card_with_sweep_plot(qmodel, tmp_path):
    png = tmp_path / "ppl_vs_bits.png"
    card = render_model_card(qmodel, "testorg/tiny-base", plot_path=png, sweep=SWEEP, fp_ppl=24.18)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (600, 400)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ppl_vs_bits.png"]  # no temp file left behind
    text = card.text
    assert "![perplexity vs bits per value](ppl_vs_bits.png)" in text  # relative link: the PNG sits beside README.md
    assert "## Evaluation" in text and "| float (unquantized) | | 24.18 |" in text
    for row in ("| RTN 4-bit g128 | 4.250 | 31.44 |", "| RTN 3-bit g128 | 3.250 | 97.7 |",
                "| GPTQ 4-bit g128 | 4.250 | 26.1 |"):
        assert row in text, row


def test_sweep_input_errors(qmodel, tmp_path):
    with pytest.raises(ValueError, match="needs plot_path"):
        render_model_card(qmodel, None, sweep=SWEEP, fp_ppl=24.18)
    with pytest.raises(ValueError, match="row 1 needs label, bits_per_value and ppl"):
        render_model_card(qmodel, None, plot_path=tmp_path / "p.png", sweep=[SWEEP[0], {"label": "x", "ppl": 3.0}])
    with pytest.raises(ValueError, match="finite and > 0"):
        render_model_card(qmodel, None, plot_path=tmp_path / "p.png", sweep=[{**SWEEP[0], "ppl": float("nan")}])
    with pytest.raises(ValueError, match="sweep is empty"):
        render_model_card(qmodel, None, plot_path=tmp_path / "p.png", sweep=[])
    with pytest.raises(ValueError, match="fp_ppl must be"):
        render_model_card(qmodel, None, plot_path=tmp_path / "p.png", sweep=SWEEP, fp_ppl=0.0)
    assert not (tmp_path / "p.png").exists()
    # push_quantized draws the plot itself: an explicit card or plot_path with a sweep is ambiguous (fails before I/O)
    with pytest.raises(ValueError, match="sweep draws the card's plot"):
        hf_vq.push_quantized(qmodel, "testorg/x", card=render_model_card(qmodel, None), sweep=SWEEP)


def test_plot_without_matplotlib(qmodel, tmp_path, monkeypatch):
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "hf_vq\[plot\]"'):
        render_model_card(qmodel, None, plot_path=tmp_path / "p.png", sweep=SWEEP, fp_ppl=24.18)
    assert render_model_card(qmodel, None).text  # cards without a sweep never need it


def test_default_template_is_model_cards_source():
    from pathlib import Path

    from hf_vq.hub import TEMPLATE_NAME, default_template

    src = Path(__file__).resolve().parent.parent / "model_cards" / TEMPLATE_NAME
    assert default_template() == src.read_text(encoding="utf-8")
