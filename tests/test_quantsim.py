"""QuantSim on a tiny random Llama: config validation, weight grids, activation encodings, helpers, save/reload,
encodings export."""

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import hf_vq
from hf_vq.nn.qat import ActQuantizer, FloatQuantizer, QATLinear, QuantSimLinear
from hf_vq.formats import blockwise
from hf_vq.export.quantsim import activation_quantizers
from hf_vq.pipeline.act_ranges import percentile_range, sqnr_range


def cfg(calib_ids, **kw):
    kw.setdefault("weight_bits", 4)
    return hf_vq.QuantSimConfig(dataset=calib_ids, num_samples=16, seq_len=64, **kw)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def fp(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def lpbq_a8(tiny_llama_dir, calib_ids):
    return AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=cfg(calib_ids, weight_granularity="lpbq", block_size=32, activation_bits=8))


@pytest.mark.parametrize("kw, match", [
    (dict(weight_granularity="vector"), "weight_granularity"),
    (dict(weight_granularity="blockwise", block_size=1), "block_size"),
    (dict(weight_granularity="lpbq", decompressed_bits=4), "decompressed_bits"),
    (dict(activation_bits=12), "activation_bits"),
    (dict(activation_dtype="float16", activation_bits=8), "16-bit"),
    (dict(quant_scheme="mse"), "quant_scheme"),
    (dict(percentile=20), "percentile"),
    (dict(weight_bits=5), "bits"),
    (dict(module_overrides={"down_proj": {"sym": False}}), "symmetric"),
])
def test_config_rejects_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        hf_vq.QuantSimConfig(**kw)


def test_config_round_trips_through_dict():
    c = hf_vq.QuantSimConfig(weight_bits=4, weight_granularity="lpbq", block_size=32, activation_bits=8,
                             quant_scheme="percentile", percentile=99.9)
    again = hf_vq.HfVQConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert isinstance(again, hf_vq.QuantSimConfig) and again == c
    assert (again.bits, again.group_size, again.sym) == (4, 32, True)
    assert not hf_vq.QuantSimConfig(activation_bits=None).needs_calibration
    assert not hf_vq.QuantSimConfig(activation_dtype="float16").needs_calibration


def test_layers_get_lpbq_weights_and_activation_encodings(lpbq_a8, fp, calib_ids):
    q_proj = lpbq_a8.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QATLinear) and q_proj.granularity == "lpbq"
    # AIMET LPBQ: int block scales in [1, 16] (4 -> 8 bits) times one float scale per output channel
    assert q_proj.int_scale.shape == (96, 3) and 1 <= q_proj.int_scale.min() and q_proj.int_scale.max() == 16
    for _, _, q in activation_quantizers(lpbq_a8):
        assert isinstance(q, ActQuantizer) and q.bits == 8 and q.initialized and float(q.min) <= 0 <= float(q.max)
    assert len(activation_quantizers(lpbq_a8)) == 2 * 7 * 2
    rel = (logits(lpbq_a8, calib_ids[:2]) - logits(fp, calib_ids[:2])).norm() / logits(fp, calib_ids[:2]).norm()
    assert 0.01 < rel < 0.25


def test_weight_grid_matches_aimet_minmax(tiny_llama_dir):
    fp = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    w = fp.model.layers[0].mlp.up_proj.weight.data
    mod = QATLinear(w, None, 4, "blockwise", 32)
    raw, _ = blockwise.minmax_grid(w, 4, True, (1, 32))
    s = mod.block_scale().detach()
    assert torch.all(s >= raw) and torch.all(s <= raw * (1 + 2**-10))  # rounded up to fp16 only
    ref = blockwise.quantize_dequantize(w, s, torch.full_like(s, -8), 4, (1, 32))
    assert torch.equal(mod.weight_qdq().detach(), ref)


def test_min_max_ranges_equal_observed_extremes(tiny_llama_dir, calib_ids):
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg(calib_ids, activation_bits=16))
    seen = {}
    down = m.model.layers[1].mlp.down_proj

    def hook(_m, args):
        seen["x"] = args[0]
    down.input_quantizer.enabled = False
    h = down.register_forward_pre_hook(hook)
    xs = []
    for i in range(0, 16, 8):
        m(input_ids=calib_ids[i:i + 8])
        xs.append(seen["x"])
    h.remove()
    x = torch.cat([t.flatten() for t in xs])
    e = down.input_quantizer.encoding()
    scale = e["scale"]
    assert e["min"] <= float(x.min()) + scale and abs(e["min"] - float(x.min())) < scale
    assert abs(e["max"] - float(x.max())) < scale


def test_percentile_and_sqnr_ranges():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(100000), torch.tensor([40.0])])  # one outlier
    hist = torch.histc(x, 2048, float(x.min()), float(x.max())).double()
    lo, hi = percentile_range(hist, float(x.min()), float(x.max()), 99.9)
    assert -4.0 < lo < -2.5 and 2.5 < hi < 4.0
    lo8, hi8 = sqnr_range(hist, float(x.min()), float(x.max()), 8)
    assert hi8 < 40 and lo8 < -2  # 8 bits: clipping the outlier beats rounding noise
    lo16, hi16 = sqnr_range(hist, float(x.min()), float(x.max()), 16)
    assert hi16 > 39  # 16 bits: the grid is fine enough to keep the whole range


def test_schemes_all_run(tiny_llama_dir, calib_ids, fp):
    outs = {}
    for scheme in ("min_max", "tf_enhanced", "percentile"):
        m = AutoModelForCausalLM.from_pretrained(
            tiny_llama_dir, quantization_config=cfg(calib_ids, weight_bits=8, activation_bits=8, quant_scheme=scheme))
        outs[scheme] = logits(m, calib_ids[:2])
    ref = logits(fp, calib_ids[:2])
    for scheme, out in outs.items():
        assert (out - ref).norm() / ref.norm() < 0.1, scheme


def test_weight_only_and_float16_activations(tiny_llama_dir, calib_ids, fp):
    w = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=hf_vq.QuantSimConfig(
        weight_bits=8, activation_bits=None))
    assert not activation_quantizers(w)
    f16 = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=hf_vq.QuantSimConfig(
        weight_bits=8, activation_dtype="float16"))
    qs = activation_quantizers(f16)
    assert qs and all(isinstance(q, FloatQuantizer) for _, _, q in qs)
    ids = calib_ids[:2]
    assert (logits(f16, ids) - logits(w, ids)).abs().max() < 1e-2
    assert (logits(w, ids) - logits(fp, ids)).norm() / logits(fp, ids).norm() < 0.02


def test_aimet_style_helpers(tiny_llama_dir, calib_ids):
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg(
        calib_ids, weight_bits=8, activation_bits=16))
    down = [m.model.layers[i].mlp.down_proj for i in range(2)]
    done = hf_vq.set_blockwise_quantization_for_weights(m, down, 4, True, 32)
    assert done == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert down[0].granularity == "blockwise" and down[0].scale.shape == (96, 5) and down[0].bits == 4
    done = hf_vq.set_grouped_blockwise_quantization_for_weights(
        m, lambda mod: mod.out_features == 96 and mod.in_features == 96, 4, True, 8, 32)
    assert len(done) == 4 and m.model.layers[0].self_attn.q_proj.granularity == "lpbq"
    hf_vq.set_activation_quantizers_to_float(m, [nn.Linear], dtype=torch.float16)
    assert all(isinstance(q, FloatQuantizer) for _, _, q in activation_quantizers(m))
    with pytest.raises(ValueError, match="does not divide"):
        hf_vq.set_blockwise_quantization_for_weights(m, [nn.Linear], 4, True, 64)  # 96 % 64
    with pytest.raises(ValueError, match="symmetric"):
        hf_vq.set_blockwise_quantization_for_weights(m, [nn.Linear], 4, False, 32)
    with pytest.raises(ValueError, match="float16"):
        hf_vq.set_activation_quantizers_to_float(m, [nn.Linear], exponent_bits=4, mantissa_bits=3)
    # the new grids reach config.json and reload
    layers = m.config.quantization_config.layers
    assert layers["model.layers.0.mlp.down_proj"]["group_size"] == 32
    assert layers["model.layers.0.self_attn.q_proj"]["granularity"] == "lpbq"


def test_save_reload_exact_with_activation_encodings(lpbq_a8, calib_ids, tmp_path):
    lpbq_a8.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any(k.endswith((".latent", ".log_scale")) for k in keys)
    assert "model.layers.0.self_attn.q_proj.input_quantizer.min" in keys
    rec = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["layers"]
    assert rec["model.layers.0.self_attn.q_proj"]["type"] == "quantsim"
    assert rec["model.layers.0.self_attn.q_proj"]["input_quantizer"] == {"kind": "int", "bits": 8}
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    mod = again.model.layers[0].self_attn.q_proj
    assert isinstance(mod, QuantSimLinear)
    ref = lpbq_a8.model.layers[0].self_attn.q_proj
    assert torch.equal(mod.input_quantizer.min, ref.input_quantizer.min.detach())
    assert torch.equal(logits(again, calib_ids[:3]), logits(lpbq_a8, calib_ids[:3]))


def test_export_encodings_include_activations(lpbq_a8, tmp_path):
    for version in ("1.0.0", "0.6.1"):
        path = hf_vq.export_encodings(lpbq_a8, tmp_path / version, version=version)
        doc = json.loads(path.read_text())
        acts = doc["activation_encodings"]
        assert len(acts) == 28
        if version == "1.0.0":
            e = next(a for a in acts if a["name"] == "model.layers.0.mlp.down_proj.output")
            q = lpbq_a8.model.layers[0].mlp.down_proj.output_quantizer
            assert e["bw"] == 8 and e["enc_type"] == "PER_TENSOR" and e["is_sym"] is False
            assert e["scale"][0] == pytest.approx(float(q.encoding()["scale"])) and e["offset"][0] <= 0
            p = next(a for a in doc["param_encodings"] if a["name"] == "model.layers.0.mlp.down_proj.weight")
            assert p["enc_type"] == "LPBQ" and p["compressed_bw"] == 4 and p["bw"] == 8 and p["block_size"] == 32
        else:
            e = acts["model.layers.0.mlp.down_proj.input"][0]
            assert e["bitwidth"] == 8 and e["is_symmetric"] == "False"
            assert e["max"] - e["min"] == pytest.approx(255 * e["scale"], rel=1e-5)
        assert doc["quantizer_args"]["activation_bitwidth"] == 8 and doc["quantizer_args"]["param_bitwidth"] == 4
    # the param encodings load back onto a folded model unchanged
    folded = hf_vq.load_encodings(None, tmp_path / "1.0.0" / "model.encodings")
    assert len(folded.params) == 14 and len(folded.activations) == 28


def test_bfloat16_model_keeps_fp32_grids(lpbq_a8, calib_ids):
    import copy

    m = copy.deepcopy(lpbq_a8).to(torch.bfloat16)
    q = m.model.layers[0].self_attn.q_proj
    assert q.latent.dtype == q.scale.dtype == q.input_quantizer.min.dtype == torch.float32
    out = logits(m, calib_ids[:1])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
