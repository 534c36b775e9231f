"""Fused mixture-of-experts: the calibration stand-in, QuantExperts, routed / all-token Hessians, the few-token
fallback, the run report, and the product paths on an MoE model (tiny random models, 4 experts, top-2)."""

import copy
import json

import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM

import hf_vq
from hf_vq.algorithms.rtn import rtn_weight
from hf_vq.model.experts import experts_layout, unfuse
from hf_vq.nn.experts import QuantExperts, VQExperts

from tests.arch_models import MOE, configs, logits, save_tiny

ARCHS = configs()


def _ids(n=8, length=32, seed=1):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def gptq(**kw):
    return hf_vq.GPTQConfig(dataset=_ids(), num_samples=8, seq_len=32, group_size=32, **kw)


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    out = {}
    for name in ("mixtral", "qwen2_moe", "gpt_oss"):
        d = tmp_path_factory.mktemp(name)
        save_tiny(name, *ARCHS[name], d)
        out[name] = d
    return out


@pytest.fixture(scope="module")
def rare_dir(tmp_path_factory):
    """gpt-oss whose router bias keeps expert 3 from ever being chosen (the router's bias is a real parameter)."""
    torch.manual_seed(0)
    cls, cfg = ARCHS["gpt_oss"]
    model = cls(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.bias[3] = -1e4
    d = tmp_path_factory.mktemp("gpt_oss_rare")
    model.save_pretrained(d)
    return d


def _experts(name):
    torch.manual_seed(0)
    cls, cfg = ARCHS[name]
    model = cls(cfg)
    mod = next(m for m in model.modules() if type(m).__name__.endswith("Experts"))
    return mod


def _routing(t, n_experts, k=2, seed=0, allowed=None):
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(allowed if allowed is not None else range(n_experts))
    idx = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(t)])
    w = torch.softmax(torch.randn(t, k, generator=g), -1)
    return idx, w


@pytest.mark.parametrize("name", [n for n in MOE if n in ARCHS])
def test_calibration_stand_in_computes_the_fused_forward(name):
    mod = _experts(name)
    layout = experts_layout(mod)
    h = torch.randn(24, layout.hidden_size, generator=torch.Generator().manual_seed(2))
    idx, w = _routing(24, layout.num_experts)
    with torch.no_grad():
        want = mod(h, idx, w)
        cal = unfuse(copy.deepcopy(mod), layout, "routed", 0.01)
        got = cal(h, idx, w)
        cal_all = unfuse(copy.deepcopy(mod), layout, "all", 0.01)
        cal_all.start_statistics(set(), 1.0)  # statistics mode: every token through every expert
        got_all = cal_all(h, idx, w)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert torch.allclose(got_all, want, atol=1e-5, rtol=1e-4)


def _quant_experts(name, bits=4, group=32):
    mod = _experts(name)
    layout = experts_layout(mod)
    cal = unfuse(copy.deepcopy(mod), layout, "routed", 0.01)
    firsts = [rtn_weight(cal.expert(e)._modules[layout.first].weight.data, bits, group, False)
              for e in range(layout.num_experts)]
    downs = [rtn_weight(cal.expert(e).down_proj.weight.data, bits, group, False) for e in range(layout.num_experts)]
    biases = None
    if layout.bias:
        biases = (torch.stack([cal.expert(e)._modules[layout.first].bias.data for e in range(layout.num_experts)]),
                  torch.stack([cal.expert(e).down_proj.bias.data for e in range(layout.num_experts)]))
    q = QuantExperts.from_affine(firsts, downs, layout.gated, layout.transposed, biases)
    q.attach_float_module(mod)
    return q, layout


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_quant_experts_equals_its_dequantized_fused_module(name, monkeypatch):
    monkeypatch.setenv("HF_VQ_KERNELS", "exact")  # the kernels' own error is bounded in tests/test_cpu_kernels.py
    q, layout = _quant_experts(name)
    h = torch.randn(16, layout.hidden_size, generator=torch.Generator().manual_seed(3))
    idx, w = _routing(16, layout.num_experts)
    fused = q.dequantize()
    assert type(fused).__name__ == layout.cls and fused.gate_up_proj.device.type == "cpu"
    assert fused.down_proj.shape == _experts(name).down_proj.shape  # transposed layouts come back transposed
    with torch.no_grad():
        assert torch.allclose(q(h, idx, w), fused(h, idx, w), atol=1e-5, rtol=1e-4)


def test_quant_experts_reads_only_the_routed_experts():
    q, layout = _quant_experts("mixtral")
    h = torch.randn(12, layout.hidden_size, generator=torch.Generator().manual_seed(4))
    idx, w = _routing(12, layout.num_experts, allowed=[0, 1])
    with torch.no_grad():
        before = q(h, idx, w)
        for p in ("gate_up", "down"):  # wreck the experts no token was routed to
            getattr(q, f"{p}_scales")[2:] = 1e3
            getattr(q, f"{p}_qweight")[2:] = 255
        after = q(h, idx, w)
    assert torch.equal(before, after)


def test_quant_experts_decode_kernel_matches_exact_path():
    q, layout = _quant_experts("mixtral")
    h = torch.randn(1, layout.hidden_size, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    idx, w = _routing(1, layout.num_experts)
    with torch.no_grad():
        fast = q(h, idx, w.to(torch.bfloat16)).float()
        q.exact_decode = True
        exact = q(h.float(), idx, w).float()
    assert (fast - exact).norm() / exact.norm() < 2e-2


def test_routed_hessians_use_the_routed_tokens_with_first_token_weight():
    mod = _experts("mixtral")
    layout = experts_layout(mod)
    cal = unfuse(copy.deepcopy(mod), layout, "routed", 0)
    window, t = 8, 32
    h = torch.randn(t, layout.hidden_size, generator=torch.Generator().manual_seed(6))
    idx, w = _routing(t, layout.num_experts)
    firsts, downs = cal.member_names()
    cal.start_statistics(set(firsts), first_token_weight=4.0)
    cal.set_window(window)
    with torch.no_grad():
        cal(h, idx, w)
    hs = cal.finish_statistics()
    for e in range(layout.num_experts):
        tok = torch.where(idx == e)[0]
        x = h[tok]
        weight = torch.where(tok % window == 0, 4.0, 1.0)
        want = 2.0 / len(tok) * (x.T * weight) @ x
        assert torch.allclose(hs[firsts[e]], want, atol=1e-5, rtol=1e-4)
    assert cal.report["routed_tokens"] == [int((idx == e).sum()) for e in range(layout.num_experts)]


def test_all_token_mode_gives_every_expert_every_token():
    mod = _experts("qwen2_moe")
    layout = experts_layout(mod)
    cal = unfuse(copy.deepcopy(mod), layout, "all", 0.01)
    h = torch.randn(20, layout.hidden_size, generator=torch.Generator().manual_seed(7))
    idx, w = _routing(20, layout.num_experts, allowed=[0, 1])  # experts 2 and 3 get no token
    firsts, downs = cal.member_names()
    cal.start_statistics(set(firsts) | set(downs), 1.0)
    with torch.no_grad():
        cal(h, idx, w)
        hs = cal.finish_statistics()
        want_in = 2.0 / 20 * h.T @ h
        e = 3
        inner = cal._activation(cal.expert(e).gate_up_proj(h))
    assert all(torch.allclose(hs[n], want_in, atol=1e-5) for n in firsts)
    assert hs[firsts[0]] is hs[firsts[3]]  # one shared Hessian: GPTQ solves the experts as one stacked problem
    assert torch.allclose(hs[downs[e]], 2.0 / 20 * inner.T @ inner, atol=1e-5, rtol=1e-4)
    assert "fallback" not in cal.report


def test_rare_expert_falls_back_and_is_reported(rare_dir):
    model = AutoModelForCausalLM.from_pretrained(rare_dir, quantization_config=gptq())
    run = model.hf_quantizer.last_run
    for name, rep in run["experts"].items():
        assert rep["routed_tokens"][3] == 0 and rep["tokens"] == 8 * 32
        assert rep["routed_tokens"][0] + rep["routed_tokens"][1] + rep["routed_tokens"][2] == 2 * 8 * 32
        assert rep["fallback"] == {"3": "all-token Hessian"}
    assert any("experts [3]" in w and "all-token Hessian" in w for w in run["warnings"])
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, QuantExperts)
    # expert 3 was still quantized from a real (all-token) Hessian: its weights are close to the float ones
    fp = AutoModelForCausalLM.from_pretrained(rare_dir).model.layers[0].mlp.experts
    w3 = experts.dequantize_expert("gate_up", 3)
    ref = fp.gate_up_proj.data[3].T
    assert 0 < (w3 - ref).norm() / ref.norm() < 0.2


def test_threshold_as_a_count_and_the_all_mode(rare_dir):
    model = AutoModelForCausalLM.from_pretrained(  # every expert is "rare"
        rare_dir, quantization_config=gptq(expert_calibration="routed", min_expert_tokens=10**6))
    rep = next(iter(model.hf_quantizer.last_run["experts"].values()))
    assert rep["threshold"] == 10**6 and set(rep["fallback"]) == {"0", "1", "2", "3"}
    model = AutoModelForCausalLM.from_pretrained(rare_dir, quantization_config=gptq(expert_calibration="all"))
    rep = next(iter(model.hf_quantizer.last_run["experts"].values()))
    assert rep["mode"] == "all" and "fallback" not in rep
    with pytest.raises(hf_vq.ConfigError, match="expert_calibration"):
        gptq(expert_calibration="sometimes")
    with pytest.raises(hf_vq.ConfigError, match="min_expert_tokens"):
        gptq(min_expert_tokens=-1)
    with pytest.raises(hf_vq.ConfigError, match="RTNConfig does not take 'expert_calibration'"):
        hf_vq.RTNConfig(expert_calibration="all")


@pytest.mark.usefixtures("exact_kernels")
def test_report_and_reload_of_a_gptq_moe(moe_dirs, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(moe_dirs["qwen2_moe"], quantization_config=gptq())
    run = model.hf_quantizer.last_run
    experts = [n for n, v in run["quantized"].items() if v["type"] == "affine_experts"]
    assert experts == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all(0 < run["quantized"][n]["error"] < 0.2 for n in experts)
    assert run["float"]["model.layers.0.mlp.gate"] == "router"
    assert run["float"]["model.layers.0.mlp.shared_expert_gate"] == "router"
    assert run["warnings"] == []
    cfg_layers = model.config.quantization_config.layers
    assert cfg_layers["model.layers.0.mlp.experts"]["gate_up"] == {"bits": 4, "group_size": 32, "sym": False}
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = _ids(2, 16, seed=9)
    assert torch.equal(logits(again, ids), logits(model, ids))
    fp = AutoModelForCausalLM.from_pretrained(moe_dirs["qwen2_moe"])
    rel = (logits(model, ids) - logits(fp, ids)).norm() / logits(fp, ids).norm()
    assert 0 < rel < 0.15
    deq = again.dequantize()
    assert type(deq.model.layers[0].mlp.experts).__name__ == "Qwen2MoeExperts"
    assert torch.allclose(logits(deq, ids), logits(model, ids), atol=1e-4, rtol=1e-4)


def test_unsupported_experts_are_refused_by_class_name(tmp_path):
    cfg = tf.Llama4TextConfig(vocab_size=128, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              num_local_experts=4, num_experts_per_tok=1, max_position_embeddings=256)
    torch.manual_seed(0)
    tf.Llama4ForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Llama4TextExperts.*experts interface"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=hf_vq.RTNConfig(group_size=32))
    skip = ["lm_head", r"model\.layers\.\d+\.feed_forward\.experts"]
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=hf_vq.RTNConfig(group_size=32, modules_to_not_convert=skip))
    run = model.hf_quantizer.last_run
    assert run["float"]["model.layers.0.feed_forward.experts"] == "excluded (modules_to_not_convert)"
    assert run["float"]["model.layers.0.feed_forward.router"] == "router"
    assert run["warnings"] == []


@pytest.mark.parametrize("granularity", ["blockwise", "lpbq"])
def test_quantsim_stores_fused_experts_on_its_weight_grid(moe_dirs, tmp_path, granularity):
    """QuantSim on MoE: the experts get QuantSim's symmetric block grid (stored as QuantExperts, no activation
    quantizers inside them); the other layers are QATLinears with their activation quantizers."""
    cfg = hf_vq.QuantSimConfig(dataset=_ids(), num_samples=8, seq_len=32, weight_bits=4, block_size=32,
                               weight_granularity=granularity)
    model = AutoModelForCausalLM.from_pretrained(moe_dirs["mixtral"], quantization_config=cfg)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, QuantExperts)
    assert experts.specs["down"] == {"bits": 4, "group_size": 32, "sym": True}
    assert isinstance(model.model.layers[0].self_attn.q_proj, hf_vq.nn.QATLinear)
    fp = AutoModelForCausalLM.from_pretrained(moe_dirs["mixtral"]).model.layers[0].mlp.experts
    w = experts.dequantize_expert("down", 1)
    ref = fp.down_proj.data[1]
    assert 0 < (w - ref).norm() / ref.norm() < 0.2
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = _ids(2, 16, seed=4)
    assert torch.equal(logits(again, ids), logits(model, ids))


@pytest.mark.usefixtures("exact_kernels")
@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_gptvq_experts_reload_exactly_and_dequantize(name, moe_dirs, tmp_path):
    cfg = hf_vq.GPTVQConfig(vector_dim=2, index_bits=6, rows_per_block=32, cols_per_block=32, kmeans_iterations=5,
                            dataset=_ids(), num_samples=8, seq_len=32)
    model = AutoModelForCausalLM.from_pretrained(moe_dirs[name], quantization_config=cfg)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, VQExperts)
    assert model.config.quantization_config.layers["model.layers.0.mlp.experts"]["down"]["index_bits"] == 6
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = _ids(2, 16, seed=5)
    assert torch.equal(logits(again, ids), logits(model, ids))
    fp = AutoModelForCausalLM.from_pretrained(moe_dirs[name])
    rel = (logits(model, ids) - logits(fp, ids)).norm() / logits(fp, ids).norm()
    assert 0 < rel < 0.3
    deq = again.dequantize()
    assert torch.allclose(logits(deq, ids), logits(model, ids), atol=1e-4, rtol=1e-4)


def test_quantsim_with_experts_kept_float(moe_dirs):
    cfg = hf_vq.QuantSimConfig(dataset=_ids(), num_samples=8, seq_len=32, weight_bits=4, block_size=32,
                               modules_to_not_convert=["lm_head", "experts"])
    model = AutoModelForCausalLM.from_pretrained(moe_dirs["mixtral"], quantization_config=cfg)
    run = model.hf_quantizer.last_run
    assert run["float"]["model.layers.1.mlp.experts"] == "excluded (modules_to_not_convert)"
    assert isinstance(model.model.layers[1].self_attn.o_proj, hf_vq.nn.QATLinear)


def test_adascale_on_moe_reloads_exactly(moe_dirs, tmp_path):
    cfg = hf_vq.AdaScaleConfig(bits=4, group_size=32, num_iterations=3, batch_size=4, dataset=_ids(), num_samples=8,
                               seq_len=32, init="gptq")
    model = AutoModelForCausalLM.from_pretrained(moe_dirs["mixtral"], quantization_config=cfg)
    assert isinstance(model.model.layers[0].mlp.experts, QuantExperts)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = _ids(2, 16, seed=3)
    assert torch.equal(logits(again, ids), logits(model, ids))


def test_quantization_config_for_a_quantized_checkpoint_is_refused(moe_dirs, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(moe_dirs["mixtral"], quantization_config=hf_vq.RTNConfig(group_size=32))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="already quantized by hf_vq"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=hf_vq.RTNConfig(bits=8))


def test_product_paths_on_moe(moe_dirs, tmp_path, tiny_tokenizer):
    import peft

    model = AutoModelForCausalLM.from_pretrained(moe_dirs["mixtral"], quantization_config=hf_vq.RTNConfig(group_size=32))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts is a fused mixture-of-experts"):
        hf_vq.export_encodings(model, tmp_path / "enc")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts is a fused mixture-of-experts"):
        hf_vq.export_onnx(model, tmp_path / "onnx")
    summary = hf_vq.hub.quantization_summary(model)
    assert summary["bits"] == [4] and "affine_experts" in summary["layer_types"]
    assert "4-bit" in str(hf_vq.render_model_card(model, None))
    lora = hf_vq.prepare_lora(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules="all-linear",
                                                                    task_type="CAUSAL_LM"))
    ids = _ids(2, 16, seed=4)
    out = lora(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    fp = hf_vq.merge_and_dequantize(lora)
    assert type(fp.model.layers[0].mlp.experts).__name__ == "MixtralExperts"


def test_cli_quantizes_a_moe_model(moe_dirs, tmp_path, tiny_tokenizer, capsys):
    from hf_vq import cli

    tiny_tokenizer.save_pretrained(moe_dirs["qwen2_moe"])
    (tmp_path / "calib.txt").write_text(" ".join(["the a of and to in is was"] * 200))
    rc = cli.main(["quantize", str(moe_dirs["qwen2_moe"]), "--method", "gptq", "--group-size", "32",
                   "--dataset", str(tmp_path / "calib.txt"), "--num-samples", "4", "--seq-len", "32",
                   "--out", str(tmp_path / "out")])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["layers"] == 16
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert isinstance(again.model.layers[1].mlp.experts, QuantExperts)


def test_malformed_experts_record_and_values_are_refused(moe_dirs, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(moe_dirs["mixtral"], quantization_config=hf_vq.RTNConfig(group_size=32))
    model.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    good = json.loads(cfg_path.read_text())
    name = "model.layers.0.mlp.experts"
    for edit, match in ((lambda r: r["down"].__setitem__("bits", "4"), r"experts'\]\.down\.bits"),
                        (lambda r: r.__setitem__("num_experts", 5), "config.json records"),
                        (lambda r: r.pop("gate_up"), r"gate_up: missing")):
        cfg = copy.deepcopy(good)
        edit(cfg["quantization_config"]["layers"][name])
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=match):
            AutoModelForCausalLM.from_pretrained(tmp_path)
    cfg_path.write_text(json.dumps(good))
    q = AutoModelForCausalLM.from_pretrained(tmp_path).model.layers[0].mlp.experts
    q.check_stored(name)
    q.down_qzeros[1, 0, 0] = 200  # outside a 4-bit grid
    with pytest.raises(ValueError, match=r"experts\.down_qzeros: values must lie in \[0, 15\]"):
        q.check_stored(name)
