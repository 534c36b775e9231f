"""export_checkpoint on the real model (SmolLM2-135M GPTQ 4-bit g128, symmetric): the compressed-tensors and GGUF
exports are loaded by transformers in a process that never imports hf_vq and give the hf_vq model's logits; the
GPTQ export holds the same codes when unpacked by compressed-tensors."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_vq
from hf_vq import assets
from tests.test_export_checkpoint import read_logits


@pytest.fixture(scope="module")
def gptq4(tmp_path_factory):
    model_dir = assets.ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = hf_vq.GPTQConfig(bits=4, group_size=128, sym=True, dataset=[assets.austen_calibration_text()],
                           tokenizer=tok, num_samples=8, seq_len=256)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg, dtype=torch.float32)
    ids = tok(assets.austen_test_text()[:3000], return_tensors="pt")["input_ids"][:, :64]
    # the exported weights are checked against hf_vq's dequantized reference forward (no int8 activations)
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setenv("HF_VQ_KERNELS", "exact")
        logits = model(ids).logits
    return model, ids, logits, tmp_path_factory.mktemp("exports")


def test_compressed_tensors_logits_in_transformers(gptq4):
    model, ids, expected, out = gptq4
    report = hf_vq.export_checkpoint(model, out / "ct", "compressed-tensors")
    assert report.layers == 210
    # 576 input columns: group 128 is written as group 64 (4 x 128 + 64 has a partial group); down_proj stays 128
    groups = json.loads((out / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(g["weights"]["group_size"] for g in groups.values()) == [64, 128]
    got = read_logits(out / "ct", ids)
    # the reader dequantizes to the same fp32 weights; only summation order can differ
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-3)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.99


def test_gptq_export_holds_the_codes(gptq4):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    model, _, _, out = gptq4
    hf_vq.export_checkpoint(model, out / "gptq", "gptq")
    layer = model.model.layers[7].self_attn.q_proj
    with safe_open(str(out / "gptq" / "model.safetensors"), "pt") as f:
        qweight = f.get_tensor("model.layers.7.self_attn.q_proj.qweight")
        scales = f.get_tensor("model.layers.7.self_attn.q_proj.scales")
    codes = unpack_from_int32(qweight.t().contiguous(), 4, torch.Size([576, 576])).to(torch.int16) + 8
    assert torch.equal(codes, layer.codes().to(torch.int16))
    assert torch.equal(scales.t(), layer.scales)


def test_gguf_logits_in_transformers(gptq4):
    import gguf

    model, ids, expected, out = gptq4
    hf_vq.export_checkpoint(model, out / "gguf", "gguf", dtype="float32", gguf_pre_tokenizer="smollm")
    reader = gguf.GGUFReader(str(out / "gguf" / "model.gguf"))
    types = {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and "norm" not in t.name}
    assert types == {"Q4_0"}
    got = read_logits(out / "gguf", ids, gguf_file="model.gguf", dtype="float32")
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-3)
