"""Architecture matrix on tiny random models: every weight-bearing module outside the deliberate exclusions is
quantized (RTN and GPTQ), the saved checkpoint reloads to identical logits, and generate() runs. Plus every method on
one dense and one MoE model (QuantSim refuses fused experts by name), and multimodal Gemma3 (language model by default, the vision tower only when asked)."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import hf_vq
from hf_vq.nn.registry import LAYER_TYPES

from tests.arch_models import MOE, ROUTERS, configs, logits, multimodal_gemma3, save_tiny

ARCHS = configs()
CALIB = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))


def method_config(method: str, **kw):
    calib = dict(dataset=CALIB, num_samples=8, seq_len=32)
    if method == "rtn":
        return hf_vq.RTNConfig(group_size=32, **kw)
    if method == "gptq":
        return hf_vq.GPTQConfig(group_size=32, **calib, **kw)
    if method == "gptvq":
        return hf_vq.GPTVQConfig(vector_dim=2, index_bits=4, rows_per_block=16, cols_per_block=32,
                                 kmeans_iterations=5, **calib, **kw)
    if method == "adascale":
        return hf_vq.AdaScaleConfig(group_size=32, num_iterations=2, batch_size=4, **calib, **kw)
    return hf_vq.QuantSimConfig(weight_bits=4, block_size=32, **calib, **kw)


def float_weights_left(model, allowed_prefixes=()) -> list[str]:
    """Modules holding a >= 2-D parameter that are neither hf_vq quantized modules nor deliberately float:
    embeddings, the output head, routers/gates, and ``allowed_prefixes``."""
    left = []
    for name, mod in model.named_modules():
        if getattr(mod, "layer_type", None) in LAYER_TYPES or not any(p.dim() >= 2 for p in mod.parameters(False)):
            continue
        if isinstance(mod, nn.Embedding) or name == "lm_head" or name.endswith(ROUTERS):
            continue
        if name.startswith(tuple(allowed_prefixes)):
            continue
        left.append(name)
    return left


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            made[name] = tmp_path_factory.mktemp(name)
            cls, cfg = multimodal_gemma3() if name == "gemma3_mm" else ARCHS[name]
            save_tiny(name, cls, cfg, made[name])
        return made[name]
    return get


def _check_reload_and_generate(model, tmp_path):
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(again, IDS), logits(model, IDS))
    out = again.generate(IDS[:1, :4], max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)
    return again


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_every_weight_quantized_and_reload_exact(name, method, arch_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(arch_dir(name), quantization_config=method_config(method))
    assert float_weights_left(model) == []
    run = model.hf_quantizer.last_run
    assert run["warnings"] == []
    assert set(run["quantized"]) == set(model.config.quantization_config.layers)
    if name in MOE:
        assert any(v["type"] == "affine_experts" for v in run["quantized"].values())
    fp = AutoModelForCausalLM.from_pretrained(arch_dir(name))
    rel = (logits(model, IDS) - logits(fp, IDS)).norm() / logits(fp, IDS).norm()
    assert 0 < rel < 0.3
    _check_reload_and_generate(model, tmp_path)


@pytest.mark.parametrize("method", ["adascale", "gptvq", "quantsim"])
def test_other_methods_on_dense_and_moe(method, arch_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(arch_dir("llama"), quantization_config=method_config(method))
    assert float_weights_left(model) == []
    _check_reload_and_generate(model, tmp_path / "dense")
    # affine, VQ and QuantSim weight grids: the experts are quantized fused
    model = AutoModelForCausalLM.from_pretrained(arch_dir("qwen3_moe"), quantization_config=method_config(method))
    assert float_weights_left(model) == []
    assert model.hf_quantizer.last_run["warnings"] == []
    _check_reload_and_generate(model, tmp_path / "moe")


VISION = ("model.vision_tower", "model.multi_modal_projector")


@pytest.mark.parametrize("method", ["rtn", "gptq", "quantsim"])
def test_multimodal_quantizes_the_language_model_by_default(method, arch_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(arch_dir("gemma3_mm"), quantization_config=method_config(method))
    assert float_weights_left(model, VISION) == []
    run = model.hf_quantizer.last_run
    assert run["warnings"] == []
    vision = [n for n in run["float"] if n.startswith(VISION)]
    assert "model.vision_tower.encoder.layers.0.self_attn.q_proj" in vision
    assert all(run["float"][n].startswith("not the language model") for n in vision)
    _check_reload_and_generate(model, tmp_path)


def test_vision_tower_quantized_when_asked(arch_dir, tmp_path, caplog):
    asked = {"vision_tower": {"bits": 8}}
    model = AutoModelForCausalLM.from_pretrained(arch_dir("gemma3_mm"),
                                                 quantization_config=method_config("rtn", module_overrides=asked))
    q = model.model.vision_tower.encoder.layers[0].self_attn.q_proj
    assert isinstance(q, hf_vq.QuantLinear) and q.bits == 8
    run = model.hf_quantizer.last_run
    # the patch embedding (a Conv2d) has no quantized form: left float, and said loudly
    assert run["float"]["model.vision_tower.embeddings.patch_embedding"] == "unsupported (Conv2d)"
    assert any("patch_embedding" in w for w in run["warnings"])
    assert any("patch_embedding" in r.message for r in caplog.records if r.levelname == "WARNING")
    _check_reload_and_generate(model, tmp_path)
    # quantize_vision=True: every vision Linear is quantized, with the config's own grid
    model = AutoModelForCausalLM.from_pretrained(arch_dir("gemma3_mm"),
                                                 quantization_config=method_config("rtn", quantize_vision=True))
    assert isinstance(model.model.vision_tower.encoder.layers[0].mlp.fc1, hf_vq.QuantLinear)
    left = float_weights_left(model)
    assert "model.vision_tower.embeddings.patch_embedding" in left and "model.multi_modal_projector" in left
    # what is left has no quantized form (Conv2d, raw projection weights, MultiheadAttention), and the report says so
    assert {n: model.hf_quantizer.last_run["float"][n].split(" ")[0] for n in left} == dict.fromkeys(left, "unsupported")
    # text-only calibration never reaches the vision tower: GPTQ reports those layers instead of failing
    model = AutoModelForCausalLM.from_pretrained(arch_dir("gemma3_mm"),
                                                 quantization_config=method_config("gptq", module_overrides=asked))
    run = model.hf_quantizer.last_run
    assert run["float"]["model.vision_tower.encoder.layers.0.mlp.fc1"] == "not reached by calibration"
    assert isinstance(model.model.language_model.layers[0].mlp.down_proj, hf_vq.QuantLinear)
    # QuantSim: the vision tower's activation quantizers see no data; those layers are skipped, not a failure
    model = AutoModelForCausalLM.from_pretrained(arch_dir("gemma3_mm"),
                                                 quantization_config=method_config("quantsim", module_overrides={
                                                     "vision_tower": {"bits": 4}}))
    run = model.hf_quantizer.last_run
    assert run["float"]["model.vision_tower.encoder.layers.0.self_attn.q_proj"] == "not reached by calibration"
    assert isinstance(model.model.vision_tower.encoder.layers[0].self_attn.q_proj, nn.Linear)
    assert isinstance(model.model.language_model.layers[0].mlp.down_proj, hf_vq.nn.QATLinear)
