"""from_pretrained quantize-at-load, save_pretrained, reload: on a tiny random Llama."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_vq
from hf_vq.integrations.quantizer import HfVQQuantizer

from tests.conftest import random_text
from tests.runs import rtn_run_recording_hessians


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def gptq_cfg(calib_ids, **kw):
    return hf_vq.GPTQConfig(dataset=calib_ids, num_samples=16, seq_len=64, group_size=64, **kw)


@pytest.fixture(scope="module")
def gptq_model(tiny_llama_dir, calib_ids):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=gptq_cfg(calib_ids))


def test_quantize_at_load_swaps_every_decoder_linear(gptq_model):
    assert isinstance(gptq_model.hf_quantizer, HfVQQuantizer)
    qlinears = [n for n, m in gptq_model.named_modules() if isinstance(m, hf_vq.QuantLinear)]
    assert len(qlinears) == 2 * 7
    # tied lm_head stays in float
    assert isinstance(gptq_model.lm_head, torch.nn.Linear)
    layers = gptq_model.config.quantization_config.layers
    assert set(layers) == set(qlinears)
    # hidden 96 with group 64: a full group and a shorter last one
    assert gptq_model.model.layers[0].self_attn.q_proj.scales.shape == (96, 2)


def test_quantized_model_stays_close_to_float(gptq_model, tiny_llama_dir, calib_ids):
    fp = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = calib_ids[:2]
    a, b = logits(gptq_model, ids), logits(fp, ids)
    rel = (a - b).norm() / b.norm()
    assert 0 < rel < 0.15


def test_save_reload_is_bit_exact(gptq_model, calib_ids, tmp_path):
    gptq_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "hf_vq" and cfg["method"] == "gptq"
    assert "dataset" not in cfg or isinstance(cfg["dataset"], str)  # tensors never reach config.json
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(again.hf_quantizer, HfVQQuantizer)
    assert isinstance(again.config.quantization_config, hf_vq.GPTQConfig)
    assert torch.equal(logits(again, calib_ids[:3]), logits(gptq_model, calib_ids[:3]))


def test_sharded_save_reload(gptq_model, calib_ids, tmp_path):
    gptq_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(again, calib_ids[:2]), logits(gptq_model, calib_ids[:2]))


def test_checkpoint_not_matching_config_raises(gptq_model, tmp_path):
    gptq_model.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    name = "model.layers.0.mlp.down_proj"
    cfg["quantization_config"]["layers"][name]["bits"] = 2  # config now disagrees with the stored tensors
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match its hf_vq quantization config"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_missing_tensor_raises(gptq_model, tmp_path):
    gptq_model.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.self_attn.o_proj.qweight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing model.layers.1.self_attn.o_proj.qweight"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.usefixtures("exact_kernels")
def test_dequantize_gives_plain_linears(tiny_llama_dir, calib_ids):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=gptq_cfg(calib_ids))
    before = logits(model, calib_ids[:2])
    model.dequantize()
    assert not any(isinstance(m, hf_vq.QuantLinear) for m in model.modules())
    assert torch.allclose(logits(model, calib_ids[:2]), before, atol=1e-5)


def test_mixed_precision_overrides_and_skips(tiny_llama_dir, calib_ids, tmp_path):
    cfg = gptq_cfg(calib_ids, bits=4, module_overrides={r"mlp\.down_proj": {"bits": 8, "group_size": -1},
                                                         r"layers\.1\.self_attn\.o_proj": {"skip": True}},
                   modules_to_not_convert=["model.layers.0.self_attn.v_proj"])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)
    down = model.model.layers[0].mlp.down_proj
    assert down.bits == 8 and down.group_size == -1
    assert model.model.layers[0].mlp.up_proj.bits == 4
    assert type(model.model.layers[1].self_attn.o_proj) is torch.nn.Linear
    assert type(model.model.layers[0].self_attn.v_proj) is torch.nn.Linear
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.model.layers[1].mlp.down_proj.bits == 8
    assert torch.equal(logits(again, calib_ids[:2]), logits(model, calib_ids[:2]))


def test_rtn_needs_no_data_and_roundtrips(tiny_llama_dir, calib_ids, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=hf_vq.RTNConfig(bits=3,
                                                                                                   group_size=32))
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(again.config.quantization_config, hf_vq.RTNConfig)
    assert torch.equal(logits(again, calib_ids[:2]), logits(model, calib_ids[:2]))


def test_gptq_from_text_with_tokenizer(tiny_llama_dir, tiny_tokenizer):
    texts = [random_text(400, seed=s) for s in range(3)]
    cfg = hf_vq.GPTQConfig(bits=4, group_size=32, dataset=texts, tokenizer=tiny_tokenizer, num_samples=8, seq_len=32)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)
    assert isinstance(model.model.layers[0].mlp.up_proj, hf_vq.QuantLinear)
    assert model.config.quantization_config.to_dict()["calibration"].startswith("3 in-memory items")


def test_gptq_without_data_fails_clearly(tiny_llama_dir):
    with pytest.raises(ValueError, match="needs calibration data"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=hf_vq.GPTQConfig())


def test_bf16_model_keeps_fp16_scales(gptq_model, calib_ids, tmp_path):
    q = gptq_model.model.layers[0].self_attn.q_proj
    scales = q.scales.clone()
    gptq_model.to(torch.bfloat16)
    try:
        assert q.scales.dtype == torch.float16 and torch.equal(q.scales, scales)
        out = logits(gptq_model, calib_ids[:1])
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    finally:
        gptq_model.to(torch.float32)


def test_reusing_frozen_block_outputs_changes_nothing(tiny_llama_dir, calib_ids):
    """Stubbing already-quantized children (attention) in later passes must not change the Hessians or the codes.

    RTN stands in for the algorithm: its codes ignore the Hessian, so float noise from a different memory layout
    (BLAS kernels may take other paths) cannot cascade through rounding decisions into the next block. A wrong stub
    would change the Hessians by orders of magnitude more than the tolerance.
    """
    def run(reuse):
        return rtn_run_recording_hessians(tiny_llama_dir, calib_ids, reuse)

    (a, ha), (b, hb) = run(True), run(False)
    assert a.keys() == b.keys() and len(a) == 14
    for name in a:
        rel = float((ha[name] - hb[name]).norm() / hb[name].norm())
        assert rel < 1e-4, (name, rel)
        assert torch.equal(a[name].codes, b[name].codes), name
