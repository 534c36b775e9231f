"""A quantized output head (``lm_head_bits``): config checks, untying of tied embeddings, error bounds of the grid,
exact save/reload, and exports read back by readers that are not hf_vq (as in test_export_checkpoint)."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_vq
from hf_vq.config import ConfigError
from hf_vq.export.checkpoint import ExportError
from hf_vq.nn.qlinear import QuantLinear
from tests.test_export_checkpoint import bpe_llama_dir, read_logits  # noqa: F401  (fixture)

HIDDEN = 96  # tiny_llama_dir's hidden size: groups of 64 leave a partial last group of 32


@pytest.fixture(scope="module")
def untied_llama_dir(tmp_path_factory):
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      max_position_embeddings=256)
    d = tmp_path_factory.mktemp("untied_llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))


def load(path, config=None):
    kw = {} if config is None else {"quantization_config": config}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)


def head_input_and_logits(model, ids):
    """(input of the output head, logits) of one forward pass."""
    seen = []
    handle = model.lm_head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        handle.remove()
    return seen[0], logits


def rounding_bound(h: torch.Tensor, w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Largest |logit change| that rounding ``w`` [V, K] to a symmetric min-max grid can cause for inputs ``h``:
    each weight moves by at most half a step, step = 2*max|w_group| / (2^bits - 1) (stored as fp16, rounded up:
    at most 2^-10 relative), so |dlogit_v| <= sum_groups |h_g| . step_vg / 2."""
    k = w.shape[1]
    gs = k if group_size == -1 else group_size
    bound = torch.zeros(*h.shape[:-1], w.shape[0], dtype=torch.float64)
    for start in range(0, k, gs):
        step = 2 * w[:, start:start + gs].abs().amax(1).double() / (2**bits - 1) * (1 + 2**-10)
        bound += h[..., start:start + gs].abs().double().sum(-1, keepdim=True) * step / 2
    return bound


# ------------------------------------------------------------------------------------------------------- config
def test_config_fields_validated_by_name():
    assert hf_vq.GPTQConfig().lm_head_bits is None                        # default: the head stays float
    for cls in (hf_vq.RTNConfig, hf_vq.GPTQConfig, hf_vq.GPTVQConfig, hf_vq.AdaScaleConfig):
        cfg = cls(lm_head_bits=4, lm_head_group_size=64)
        assert (cfg.lm_head_bits, cfg.lm_head_group_size) == (4, 64)
        again = hf_vq.HfVQConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert type(again) is cls and (again.lm_head_bits, again.lm_head_group_size) == (4, 64)
    for bad in (2, 3, 16, 0, True, "8", 8.0):
        with pytest.raises(ConfigError, match=r"lm_head_bits must be None \(float\) or one of \(4, 8\)") as e:
            hf_vq.RTNConfig(lm_head_bits=bad)
        assert e.value.field == "lm_head_bits"
    for bad in (0, 1, -2, 1.5, None):
        with pytest.raises(ConfigError, match="lm_head_group_size must be") as e:
            hf_vq.GPTQConfig(lm_head_bits=8, lm_head_group_size=bad)
        assert e.value.field == "lm_head_group_size"
    with pytest.raises(ConfigError, match="lm_head_bits=8 quantizes lm_head, which modules_to_not_convert keeps"):
        hf_vq.GPTQConfig(lm_head_bits=8, modules_to_not_convert=["lm_head", "down_proj"])
    cfg = hf_vq.GPTQConfig(modules_to_not_convert=["lm_head"])
    with pytest.raises(ConfigError, match="lm_head_bits"):
        cfg.lm_head_bits = 8                                              # cross-field rule on assignment too
    assert cfg.lm_head_bits is None
    with pytest.raises(ConfigError, match="QuantSimConfig does not take 'lm_head_bits'"):
        hf_vq.QuantSimConfig(lm_head_bits=8)
    with pytest.warns(UserWarning, match="lm_head_group_size=64 has no effect: lm_head_bits is None"):
        hf_vq.RTNConfig(lm_head_group_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_vq.RTNConfig(lm_head_bits=4, lm_head_group_size=64)


# --------------------------------------------------------------------------------------------- tied / untied
@pytest.mark.parametrize("bits,group_size", [(8, -1), (4, 64)])
def test_tied_head_quantized_and_untied(tiny_llama_dir, ids, bits, group_size):
    ref = load(tiny_llama_dir, hf_vq.RTNConfig(bits=4, group_size=32, sym=True))      # same body, float head
    model = load(tiny_llama_dir, hf_vq.RTNConfig(bits=4, group_size=32, sym=True, lm_head_bits=bits,
                                                 lm_head_group_size=group_size))
    float_emb = load(tiny_llama_dir).model.embed_tokens.weight.detach()
    head = model.lm_head
    assert isinstance(head, QuantLinear) and (head.bits, head.group_size, head.sym) == (bits, group_size, True)
    emb = model.model.embed_tokens
    assert type(emb) is nn.Embedding and emb.weight.dtype == torch.float32
    assert torch.equal(emb.weight, float_emb)                             # the input embedding is untouched
    assert model.config.tie_word_embeddings is False and model.all_tied_weights_keys == {}
    assert all(t.untyped_storage().data_ptr() != emb.weight.untyped_storage().data_ptr()
               for t in head.state_dict().values())
    report = model.hf_quantizer.last_run
    assert report["quantized"]["lm_head"]["type"] == "affine" and "lm_head" not in report["float"]
    assert report["float"] == {"model.embed_tokens": "excluded (modules_to_not_convert)"}
    assert model.config.quantization_config.modules_to_not_convert == ["model.embed_tokens"]

    h, logits = head_input_and_logits(model, ids)
    h_ref, logits_ref = head_input_and_logits(ref, ids)
    assert torch.equal(h, h_ref)                                          # the body is the same: only the head moved
    diff = (logits - logits_ref).abs().double()
    bound = rounding_bound(h, float_emb, bits, group_size) + 1e-5
    assert bool((diff <= bound).all()), float((diff - bound).max())
    assert float(diff.max()) > 0                                          # the head really is on a grid


def test_untied_head_uses_its_own_weight(untied_llama_dir, ids):
    ref = load(untied_llama_dir, hf_vq.RTNConfig(bits=8, group_size=-1, sym=True))
    model = load(untied_llama_dir, hf_vq.RTNConfig(bits=8, group_size=-1, sym=True, lm_head_bits=4,
                                                   lm_head_group_size=64))
    floats = load(untied_llama_dir)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.bits == 4
    assert torch.equal(model.model.embed_tokens.weight, floats.model.embed_tokens.weight)
    assert model.config.tie_word_embeddings is False
    h, logits = head_input_and_logits(model, ids)
    _, logits_ref = head_input_and_logits(ref, ids)
    diff = (logits - logits_ref).abs().double()
    w = floats.lm_head.weight.detach()
    assert bool((diff <= rounding_bound(h, w, 4, 64) + 1e-5).all())
    # quantized from lm_head.weight (not the embedding): every weight within half a step of its group's grid
    wq = model.lm_head.dequantize_weight().double()
    for start in range(0, HIDDEN, 64):
        g = w[:, start:start + 64].double()
        step = 2 * g.abs().amax(1, keepdim=True) / 15 * (1 + 2**-10)
        assert bool(((wq[:, start:start + 64] - g).abs() <= step / 2 + 1e-12).all())


def test_untied_head_in_method_targets_is_unchanged_without_the_field(untied_llama_dir):
    """Without lm_head_bits an untied head in the method's targets is quantized by the method as before."""
    model = load(untied_llama_dir, hf_vq.RTNConfig(bits=4, group_size=32, sym=False, modules_to_not_convert=[]))
    assert isinstance(model.lm_head, QuantLinear) and (model.lm_head.bits, model.lm_head.sym) == (4, False)


def test_gptq_head_beats_rtn_on_its_hessian(tiny_llama_dir, calib_ids):
    """The calibrating methods run GPTQ on the head's input Hessian: on the calibration inputs its output error is
    below round-to-nearest's on the same grid."""
    kw = dict(bits=4, group_size=32, dataset=calib_ids, num_samples=8, seq_len=32, lm_head_bits=4,
              lm_head_group_size=32)
    model = load(tiny_llama_dir, hf_vq.GPTQConfig(**kw))
    floats = load(tiny_llama_dir)
    w = floats.lm_head.weight.detach().double()
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.bits == 4
    assert model.config.tie_word_embeddings is False
    err = model.hf_quantizer.last_run["quantized"]["lm_head"]["error"]
    assert err is not None and 0 < err < 0.1
    # the head's inputs on the calibration windows through the quantized body
    xs = []
    handle = model.lm_head.register_forward_pre_hook(lambda _m, args: xs.append(args[0].detach()))
    with torch.no_grad():
        model(calib_ids[:8, :32])
    handle.remove()
    x = torch.cat(xs).reshape(-1, w.shape[1]).double()
    rtn = load(tiny_llama_dir, hf_vq.RTNConfig(bits=4, group_size=32, sym=True, lm_head_bits=4,
                                               lm_head_group_size=32)).lm_head.dequantize_weight().double()
    gptq = model.lm_head.dequantize_weight().double()
    e_gptq = float((x @ (gptq - w).T).square().sum())
    e_rtn = float((x @ (rtn - w).T).square().sum())
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)


# ------------------------------------------------------------------------------------------------ save / reload
def test_save_reload_exact(tiny_llama_dir, ids, tmp_path):
    model = load(tiny_llama_dir, hf_vq.RTNConfig(bits=4, group_size=64, sym=True, lm_head_bits=8))
    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False
    qc = saved["quantization_config"]
    assert (qc["lm_head_bits"], qc["lm_head_group_size"]) == (8, -1) and "lm_head" in qc["layers"]
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(back.lm_head, QuantLinear) and back.config.tie_word_embeddings is False
    assert back.config.quantization_config.lm_head_bits == 8
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


# ----------------------------------------------------------------------------------------------------- exports
@pytest.mark.usefixtures("exact_kernels")
def test_compressed_tensors_export_with_quantized_head(tiny_llama_dir, ids, tmp_path):
    model = load(tiny_llama_dir, hf_vq.RTNConfig(bits=4, group_size=32, sym=True, lm_head_bits=8))
    with torch.no_grad():
        expected = model(ids).logits
    hf_vq.export_checkpoint(model, tmp_path / "ct", "compressed-tensors")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    qc = cfg["quantization_config"]
    head_group = [g for g in qc["config_groups"].values() if "lm_head" in g["targets"]]
    assert len(head_group) == 1 and head_group[0]["weights"]["num_bits"] == 8
    assert head_group[0]["weights"]["strategy"] == "channel" and "lm_head" not in qc["ignore"]
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"lm_head.weight_packed", "lm_head.weight_scale", "model.embed_tokens.weight"} <= keys
    got = read_logits(tmp_path / "ct", ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.usefixtures("exact_kernels")
def test_gguf_export_with_q8_0_head(bpe_llama_dir, tmp_path):  # noqa: F811
    import gguf

    model = load(bpe_llama_dir, hf_vq.RTNConfig(bits=4, group_size=32, sym=True, lm_head_bits=8))
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    hf_vq.export_checkpoint(model, tmp_path / "g", "gguf", dtype="float32")
    reader = gguf.GGUFReader(str(tmp_path / "g" / "model.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == "Q4_0"
    got = read_logits(tmp_path / "g", ids, gguf_file="model.gguf", dtype="float32")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_gptq_export_refuses_quantized_head_by_name(tiny_llama_dir, tmp_path):
    model = load(tiny_llama_dir, hf_vq.RTNConfig(bits=4, group_size=32, sym=True, lm_head_bits=4,
                                                 lm_head_group_size=32))
    with pytest.raises(ExportError, match=r"^lm_head: a quantized output head is not read by transformers' GPTQ"):
        hf_vq.export_checkpoint(model, tmp_path / "gptq", "gptq")
    assert not (tmp_path / "gptq").exists()


def test_aimet_encodings_include_the_head(tiny_llama_dir, tmp_path):
    model = load(tiny_llama_dir, hf_vq.RTNConfig(bits=4, group_size=32, sym=True, lm_head_bits=8))
    path = hf_vq.export_encodings(model, tmp_path / "enc")
    doc = json.loads(path.read_text())
    entries = {e["name"]: e for e in doc["param_encodings"]}
    head = entries["lm_head.weight"]
    assert head["enc_type"] == "PER_CHANNEL" and head["bw"] == 8 and len(head["scale"]) == 128
    scales = model.lm_head.scales.float().flatten()
    assert torch.equal(torch.tensor(head["scale"], dtype=torch.float32), scales)
    assert "lm_head" not in doc["excluded_layers"]


@pytest.mark.usefixtures("exact_kernels")
def test_onnx_export_with_quantized_head(tiny_llama_dir, ids, tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort

    model = load(tiny_llama_dir, hf_vq.RTNConfig(bits=4, group_size=32, sym=True, lm_head_bits=8))
    path = hf_vq.export_onnx(model, tmp_path / "onnx", seq_len=16)
    graph = onnx.load(str(path)).graph
    initializers = {i.name for i in graph.initializer}
    doc = json.loads(path.with_suffix(".encodings").read_text())
    head = [e for e in doc["param_encodings"] if e["name"].endswith("lm_head.weight")]
    assert len(head) == 1 and head[0]["name"] in initializers and head[0]["bw"] == 8
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": np.ones(ids.shape, dtype=np.int64)})[0]
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    assert np.abs(got - ref).max() < 1e-4          # fp32 graph of the same dequantized weights: op order only
