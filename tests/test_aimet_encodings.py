"""AIMET encodings export/import (hf_vq.export.aimet) on tiny random models and AIMET's own reference files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import hf_vq
from hf_vq import GPTQConfig, QuantLinear, RTNConfig, convert
from hf_vq.export import aimet
from hf_vq.formats import blockwise as bw
from hf_vq.nn.registry import module_from_format

# shared/ lies beside the repository checkout (also in CI)
REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "aimet-encodings"
REF_FILES = sorted(p.name for p in REF.glob("*.encodings"))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a fixed summation order for the exact round-trip checks
    yield
    torch.set_num_threads(threads)


def tiny_llama(hidden=64, intermediate=128, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def quantized(config, skip=("lm_head",), **kw):
    model = tiny_llama(**kw)
    convert.quantize_model(model, config, list(skip), progress=False)
    model.config.quantization_config = config       # what from_pretrained(quantization_config=...) leaves
    return model


def qlinears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def lpbq_model(bits=4, block=16, dbw=8):
    """Tiny Llama whose Linears are LPBQ-quantized (blockwise.lpbq_affine_weight) hf_vq QuantLinears."""
    model = tiny_llama()
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]:
        convert.set_module(model, name, module_from_format(bw.lpbq_affine_weight(lin.weight.data, bits, block, dbw), lin.bias))
    return model


def _schema(x):
    """Structure of a JSON value: field names in order and value types (lists reduced to their element types)."""
    if isinstance(x, dict):
        return {k: _schema(v) for k, v in x.items()}
    if isinstance(x, list):
        return ["list", sorted({json.dumps(_schema(v), sort_keys=True) for v in x})]
    return type(x).__name__


def _entry_schemas(doc, enc_type=None):
    pe = doc["param_encodings"]
    if isinstance(pe, dict):
        return {json.dumps(_schema(v)) for v in pe.values()}
    return {json.dumps(_schema(e)) for e in pe if enc_type is None or e["enc_type"] == enc_type}


# ------------------------------------------------------------------------------------------ reading AIMET's files
@pytest.mark.parametrize("fname", REF_FILES)
def test_reads_every_reference_file(fname):
    assert len(REF_FILES) == 8
    raw = json.loads((REF / fname).read_text())
    enc = hf_vq.load_encodings(None, REF / fname)
    assert enc.version == raw["version"] and enc.producer == {"package": "aimet-torch", "version": "2.42.0"}
    n_params = len(raw["param_encodings"]) if "param_encodings" in raw else len(raw["encodings"])
    assert len(enc.params) == n_params
    for p in enc.params.values():
        if p.dtype == "INT":
            assert len(p.scale) == len(p.offset) > 0 and all(s > 0 for s in p.scale)
            assert all(-(2**p.bitwidth) < o <= 0 for o in p.offset)


def test_reference_values_parse_consistently_across_versions():
    v061 = aimet.read_encodings(REF / "mlp_w8a8_per-channel_v0.6.1.encodings")
    v100 = aimet.read_encodings(REF / "mlp_w8a8_per-channel_v1.0.0.encodings")
    v200 = aimet.read_encodings(REF / "mlp_w8a8_per-channel_v2.0.0.encodings")
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        a, b, c = v061.params[name], v100.params[name], v200.params[name]
        assert a.scale == b.scale == c.scale and a.offset == b.offset == c.offset == [-128] * len(a.scale)
        assert a.is_sym is b.is_sym is c.is_sym is True and a.bitwidth == b.bitwidth == c.bitwidth == 8
        assert b.enc_type == c.enc_type == "PER_CHANNEL"
    assert v100.activations["input"]["offset"] == [-135]
    assert v200.params["input"].offset == [-135] and v200.params["fc1.bias"].bitwidth == 32
    lp1 = aimet.read_encodings(REF / "mlp_w4a8_lpbq-bs16-dbw8_v1.0.0.encodings").params["fc1.weight"]
    lp2 = aimet.read_encodings(REF / "mlp_w4a8_lpbq-bs16-dbw8_v2.0.0.encodings").params["fc1.weight"]
    assert lp1.per_block_int_scale == lp2.per_block_int_scale and lp1.scale == lp2.scale
    assert (lp1.bitwidth, lp1.decompressed_bw, lp1.block_size) == (4, 8, 16) and lp1.offset[0] == -8
    assert lp1.scale[0] == pytest.approx(13 * 0.0011095235822722316, rel=1e-7)    # README cross-check
    vec = aimet.read_encodings(REF / "tiny-llama_gptvq-vector-2d-idx6-cb8_a8_v1.0.0_legacy-export.encodings")
    q = vec.params["m.model.layers.0.self_attn.q_proj.weight"]
    assert q.enc_type == "VECTOR" and q.channels == 64
    assert q.extra == {"rows_per_block": 32, "cols_per_block": 256, "vector_dim": 2, "vector_stride": 1,
                       "index_bw": 6}


# ----------------------------------------------------------------------------------------------------- schema
@pytest.mark.parametrize("version,ref,enc_type,config", [
    ("0.6.1", "mlp_w8a8_per-channel_v0.6.1.encodings", None, dict(bits=8, group_size=-1, sym=True)),
    ("1.0.0", "mlp_w8a8_per-channel_v1.0.0.encodings", "PER_CHANNEL", dict(bits=8, group_size=-1, sym=True)),
    ("1.0.0", "mlp_w4a8_per-block-bs16_v1.0.0.encodings", "PER_BLOCK", dict(bits=4, group_size=16, sym=True)),
    ("1.0.0", "mlp_w4a8_lpbq-bs16-dbw8_v1.0.0.encodings", "LPBQ", None),
])
def test_export_matches_reference_schema(tmp_path, version, ref, enc_type, config):
    model = lpbq_model() if config is None else quantized(RTNConfig(**config))
    path = hf_vq.export_encodings(model, tmp_path, version=version, filename_prefix="tiny")
    assert path == tmp_path / "tiny.encodings"
    ours, theirs = json.loads(path.read_text()), json.loads((REF / ref).read_text())
    assert list(ours) == list(theirs)
    assert ours["version"] == theirs["version"] == version
    for key in ("producer", "quantizer_args"):
        assert _schema(ours[key]) == _schema(theirs[key])
    assert type(ours["activation_encodings"]) is type(theirs["activation_encodings"])
    assert type(ours["excluded_layers"]) is type(theirs["excluded_layers"]) is list
    assert ours["excluded_layers"] == ["lm_head"] and ours["activation_encodings"] in ({}, [])
    assert _entry_schemas(ours) == _entry_schemas(theirs, enc_type)     # same fields, order and types
    names = list(ours["param_encodings"]) if version == "0.6.1" else [e["name"] for e in ours["param_encodings"]]
    assert names == [f"{n}.weight" for n in qlinears(model)]
    assert "model.layers.0.self_attn.q_proj.weight" in names


# -------------------------------------------------------------------------------------------------- round trip
def _check_round_trip(model, path):
    enc = aimet.read_encodings(path)
    for name, mod in qlinears(model).items():
        p = enc.params[f"{name}.weight"]
        w = mod.dequantize_weight()
        # a runtime's QDQ of the module's float weight on the exported grid gives that weight back, bit for bit
        assert torch.equal(p.quantize_dequantize(w), w), name
        # and the module's own integer codes decode to it through the exported scales/offsets
        scale, offset, b = p.resolve(mod.out_features, mod.in_features)
        assert torch.equal(bw.dequantize(mod.codes().float(), scale, offset, (1, b)), w), name
    before = {n: (m.qweight.clone(), m.scales.clone(), m.qzeros.clone()) for n, m in qlinears(model).items()}
    res = hf_vq.load_encodings(model, path, require_exact=True)
    assert sorted(res.applied) == sorted(f"{n}.weight" for n in before) and not res.skipped
    for n, m in qlinears(model).items():
        for a, b in zip(before[n], (m.qweight, m.scales, m.qzeros)):
            assert torch.equal(a, b), n


@pytest.mark.parametrize("version", ["1.0.0", "0.6.1"])
@pytest.mark.parametrize("config", [dict(bits=4, group_size=-1, sym=False), dict(bits=4, group_size=16, sym=True),
                                    dict(bits=3, group_size=32, sym=False), dict(bits=8, group_size=64, sym=True)])
def test_round_trip_rtn(tmp_path, version, config):
    model = quantized(RTNConfig(**config))
    _check_round_trip(model, hf_vq.export_encodings(model, tmp_path, version=version))


def test_round_trip_gptq_uneven_groups(tmp_path):
    # hidden 96 with group 64: groups of 64 + 32 -> exported as exact blocks of gcd(64, 96) = 32
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = GPTQConfig(bits=4, group_size=64, sym=False, dataset=ids, num_samples=4, seq_len=16)
    model = quantized(cfg, hidden=96, intermediate=160)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.scales.shape == (96, 2)
    path = hf_vq.export_encodings(model, tmp_path)
    doc = json.loads(path.read_text())
    entry = doc["param_encodings"][0]
    assert entry["enc_type"] == "PER_BLOCK" and entry["block_size"] == 32 and len(entry["scale"]) == 96 * 3
    assert doc["quantizer_args"]["quant_scheme"] == "gptq"
    _check_round_trip(model, path)
    with pytest.raises(ValueError, match="group_size 64 does not tile its 96 input columns"):
        hf_vq.export_encodings(model, tmp_path, split_uneven_groups=False)


def test_round_trip_lpbq(tmp_path):
    model = lpbq_model()
    path = hf_vq.export_encodings(model, tmp_path)
    e = json.loads(path.read_text())["param_encodings"][0]
    assert (e["enc_type"], e["bw"], e["compressed_bw"], e["block_size"]) == ("LPBQ", 8, 4, 16)
    assert e["offset"] == [-128] * 64 and max(e["per_block_int_scale"]) == 16 and min(e["per_block_int_scale"]) >= 1
    _check_round_trip(model, path)
    pb = json.loads(hf_vq.export_encodings(model, tmp_path, lpbq=False).read_text())["param_encodings"][0]
    assert pb["enc_type"] == "PER_BLOCK"
    rtn = quantized(RTNConfig(bits=4, group_size=16, sym=True))
    first = json.loads(hf_vq.export_encodings(rtn, tmp_path).read_text())["param_encodings"][0]
    assert first["enc_type"] == "PER_BLOCK"
    with pytest.raises(ValueError, match="q_proj.weight: not an LPBQ grid"):
        hf_vq.export_encodings(rtn, tmp_path, lpbq=True)


def test_load_changes_grid_of_another_model(tmp_path):
    src = quantized(RTNConfig(bits=4, group_size=32, sym=False), seed=0)
    dst = quantized(RTNConfig(bits=4, group_size=32, sym=False, clip_search=True), seed=1)
    name = "model.layers.1.mlp.down_proj"
    w_before = dst.get_submodule(name).dequantize_weight()
    hf_vq.load_encodings(dst, hf_vq.export_encodings(src, tmp_path, version="0.6.1"))
    s, d = src.get_submodule(name), dst.get_submodule(name)
    assert torch.equal(s.scales, d.scales) and torch.equal(s.qzeros, d.qzeros)
    p = aimet.read_encodings(tmp_path / "model.encodings").params[f"{name}.weight"]
    assert torch.equal(d.dequantize_weight(), p.quantize_dequantize(w_before))


# ------------------------------------------------------------------------------------- AIMET's files on hf_vq
def test_load_aimet_lpbq_llama_file():
    """AIMET's tiny-Llama LPBQ file (same architecture) onto an hf_vq 4-bit g16 sym Llama, lm_head included."""
    model = quantized(RTNConfig(bits=4, group_size=16, sym=True), skip=())
    path = REF / "tiny-llama_w4a8_lpbq-bs16-dbw8_v1.0.0.encodings"
    with pytest.raises(ValueError, match=r"unknown parameter name 'm.model.embed_tokens.weight'.*strip_prefix='m.'"):
        hf_vq.load_encodings(model, path)                       # wrapper prefix "m." not stripped
    with pytest.raises(ValueError, match="embed_tokens.weight belongs to a Embedding, not an hf_vq quantized layer"):
        hf_vq.load_encodings(model, path, strip_prefix="m.")
    with pytest.raises(ValueError, match="not exact in torch.float16"):
        hf_vq.load_encodings(model, path, strip_prefix="m.", strict=False, require_exact=True)
    lm_w_before = model.lm_head.dequantize_weight()
    res = hf_vq.load_encodings(model, path, strip_prefix="m.", strict=False)
    assert len(res.applied) == 15 and sorted(res.skipped) == ["m.model.embed_tokens.weight",
                                                             "m.model.layers.0.input_layernorm.weight_dup_4"]
    p = res.params["m.lm_head.weight_0"]
    scale, _, _ = p.resolve(256, 64)
    assert torch.equal(model.lm_head.scales, scale.half())
    assert bool((model.lm_head.qzeros == 8).all())
    # block-major int scales read right: every row's largest block scale is 16 x its per-channel scale
    pc16 = (16 * torch.tensor(p.per_channel_scale)).half()
    assert torch.equal(model.lm_head.scales.amax(1), pc16)
    # weights re-rounded onto AIMET's grid (fp16 scales): QDQ of the previous weight
    assert torch.equal(model.lm_head.dequantize_weight(), bw.quantize_dequantize(
        lm_w_before, model.lm_head.scales.float(), -model.lm_head.qzeros.float(), 4, 16))


@pytest.mark.parametrize("fname,bits,group", [("mlp_w8a8_per-channel_v0.6.1.encodings", 8, -1),
                                              ("mlp_w8a8_per-channel_v1.0.0.encodings", 8, -1),
                                              ("mlp_w4a8_per-block-bs16_v1.0.0.encodings", 4, 16),
                                              ("mlp_w4a8_lpbq-bs16-dbw8_v1.0.0.encodings", 4, 16)])
def test_load_aimet_mlp_files(fname, bits, group):
    torch.manual_seed(0)
    mlp = nn.Sequential()
    mlp.add_module("fc1", nn.Linear(64, 128))
    mlp.add_module("fc2", nn.Linear(128, 64))
    mlp.add_module("fc3", nn.Linear(64, 32))
    convert.quantize_model(mlp, RTNConfig(bits=bits, group_size=group, sym=True), [], progress=False)
    res = hf_vq.load_encodings(mlp, REF / fname)
    assert res.applied == ["fc1.weight", "fc2.weight", "fc3.weight"]
    for name in ("fc1", "fc2", "fc3"):
        mod = mlp.get_submodule(name)
        scale, offset, _ = res.params[f"{name}.weight"].resolve(mod.out_features, mod.in_features)
        assert torch.equal(mod.scales, scale.half()) and torch.equal(mod.qzeros.long(), -offset)


# ---------------------------------------------------------------------------------------------------- errors
def test_load_errors(tmp_path):
    path = hf_vq.export_encodings(quantized(RTNConfig(bits=4, group_size=-1), intermediate=128), tmp_path)
    other = quantized(RTNConfig(bits=4, group_size=-1), intermediate=160)
    q_before = other.model.layers[0].self_attn.q_proj.scales.clone()
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight: encoding has 128 channels, "
                                         r"layer has 160"):
        hf_vq.load_encodings(other, path)
    assert torch.equal(other.model.layers[0].self_attn.q_proj.scales, q_before)   # nothing applied on error
    with pytest.raises(ValueError, match="encoding has 4-bit codes, layer has 8 bits"):
        hf_vq.load_encodings(quantized(RTNConfig(bits=8, group_size=-1)), path)
    with pytest.raises(ValueError, match="is_sym=False, layer sym=True"):
        hf_vq.load_encodings(quantized(RTNConfig(bits=4, group_size=-1, sym=True)), path)
    doc = json.loads(path.read_text())
    doc["param_encodings"][0]["name"] = "model.layers.0.self_attn.qq_proj.weight"
    (tmp_path / "bad.encodings").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="unknown parameter name 'model.layers.0.self_attn.qq_proj.weight'"):
        hf_vq.load_encodings(other, tmp_path / "bad.encodings")
    # blocks that split a layer group cannot be applied
    blk = hf_vq.export_encodings(quantized(RTNConfig(bits=4, group_size=16)), tmp_path, filename_prefix="g16")
    with pytest.raises(ValueError, match="blocks of 16 columns do not fit the layer's groups"):
        hf_vq.load_encodings(quantized(RTNConfig(bits=4, group_size=32)), blk)
    with pytest.raises(ValueError, match="can be read .* but not applied"):
        hf_vq.load_encodings(other, REF / "mlp_w8a8_per-channel_v2.0.0.encodings")
    (tmp_path / "junk.encodings").write_text("{nope")
    with pytest.raises(ValueError, match="not a JSON encodings file"):
        aimet.read_encodings(tmp_path / "junk.encodings")
    with pytest.raises(ValueError, match="version must be one of"):
        hf_vq.export_encodings(other, tmp_path, version="2.0.0")


# ------------------------------------------------------------------------------------- hook and atomic writes
class FakeVectorLinear(nn.Module):
    """Stands in for a colleague's vector-quantized layer: contributes its own entry through the hook."""

    layer_type = "vector"

    def __init__(self, out_features=64):
        super().__init__()
        self.out_features = out_features
        self.loaded = None

    def aimet_param_encodings(self, version):
        if version == "0.6.1":
            return {"weight": [{"min": -0.128, "max": 0.127, "scale": 0.001, "offset": -128, "bitwidth": 8,
                                "dtype": "int", "is_symmetric": "True", "rows_per_block": 32,
                                "cols_per_block": 256, "vector_dim": 2, "vector_stride": 1, "index_bw": 6}]
                    * self.out_features}
        return {"weight": {"dtype": "INT", "bw": 8, "is_sym": True, "scale": [0.001] * self.out_features,
                           "offset": [-128] * self.out_features, "enc_type": "VECTOR", "rows_per_block": 32,
                           "cols_per_block": 256, "vector_dim": 2, "vector_stride": 1, "index_bw": 6}}

    def load_aimet_param_encoding(self, local_name, encoding):
        self.loaded = (local_name, encoding)

    def forward(self, x):
        return x


@pytest.mark.parametrize("version", ["1.0.0", "0.6.1"])
def test_hook_for_other_layer_types(tmp_path, version, monkeypatch):
    model = quantized(RTNConfig(bits=4, group_size=32))
    fake = FakeVectorLinear()
    convert.set_module(model, "model.layers.0.self_attn.o_proj", fake)
    path = hf_vq.export_encodings(model, tmp_path, version=version)
    enc = aimet.read_encodings(path)
    p = enc.params["model.layers.0.self_attn.o_proj.weight"]
    assert p.enc_type == "VECTOR" and p.extra["index_bw"] == 6 and len(p.scale) == 64
    if version == "1.0.0":
        ref = json.loads((REF / "tiny-llama_gptvq-vector-2d-idx6-cb8_a8_v1.0.0_legacy-export.encodings").read_text())
        ours = json.loads(path.read_text())
        assert {k: _schema(v) for k, v in sorted(ours["param_encodings"][3].items())} == \
            {k: _schema(v) for k, v in sorted(ref["param_encodings"][1].items())}
    hf_vq.load_encodings(model, path)
    assert fake.loaded[0] == "weight" and fake.loaded[1].enc_type == "VECTOR"
    monkeypatch.setitem(convert.LAYER_TYPES, "mute", nn.Identity)
    mute = nn.Identity()
    mute.layer_type = "mute"
    convert.set_module(model, "model.layers.1.self_attn.o_proj", mute)
    with pytest.raises(TypeError, match="layer type 'mute' has no aimet_param_encodings"):
        hf_vq.export_encodings(model, tmp_path)


def test_atomic_write(tmp_path):
    model = quantized(RTNConfig(bits=4, group_size=32))
    path = hf_vq.export_encodings(model, tmp_path)
    good = path.read_text()
    fake = FakeVectorLinear()
    fake.aimet_param_encodings = lambda version: {"weight": {"scale": torch.ones(2)}}   # not JSON-serializable
    convert.set_module(model, "model.layers.0.self_attn.o_proj", fake)
    with pytest.raises(TypeError):
        hf_vq.export_encodings(model, tmp_path)
    assert path.read_text() == good and os.listdir(tmp_path) == ["model.encodings"]
