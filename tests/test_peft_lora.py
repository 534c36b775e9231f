"""PEFT LoRA on hf_vq-quantized models: frozen integer weights, trainable adapters, exact save/reload, merging."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hf_vq
from hf_vq.nn.qat import QATLinear, QuantSimLinear
from hf_vq.nn.qlinear import QuantLinear
from hf_vq.nn.vqlinear import VQLinear
from hf_vq.integrations.peft import QuantLoraLinear, _FrozenLinearFn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config(**kw):
    return LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": TARGETS, "lora_dropout": 0.0, **kw})


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def frozen_state(model):
    """Every non-LoRA tensor (quantized buffers, norms, embeddings), cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


def train_steps(model, ids, steps, lr=1e-2):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory, tiny_llama_dir, calib_ids):
    cfg = hf_vq.GPTQConfig(bits=4, group_size=32, dataset=calib_ids, num_samples=16, seq_len=64)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)
    d = tmp_path_factory.mktemp("gptq")
    model.save_pretrained(d)
    return d


def test_lora_trains_only_adapters_and_reloads_exactly(gptq_dir, calib_ids, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(gptq_dir)
    ref = logits(model, calib_ids[:2])
    before = frozen_state(model)
    peft_model = hf_vq.prepare_lora(model, lora_config())

    wrapped = [m for m in peft_model.modules() if isinstance(m, QuantLoraLinear)]
    assert len(wrapped) == 2 * len(TARGETS) and all(type(m.base_layer) is QuantLinear for m in wrapped)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(wrapped)
    assert torch.equal(logits(peft_model, calib_ids[:2]), ref)  # lora_B = 0 at init

    losses = train_steps(peft_model, calib_ids[:8], steps=8)
    assert losses[-1] < losses[0] - 0.2, losses  # 4.90 -> 4.46 when written
    after = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
             for k, v in frozen_state(peft_model).items()}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # quantized buffers bit-for-bit unchanged
    tuned = logits(peft_model, calib_ids[:2])
    assert not torch.allclose(tuned, ref)

    peft_model.save_pretrained(tmp_path / "adapter")
    fresh = hf_vq.load_lora(AutoModelForCausalLM.from_pretrained(gptq_dir), tmp_path / "adapter")
    assert torch.equal(logits(fresh, calib_ids[:2]), tuned)
    with fresh.disable_adapter():
        assert torch.equal(logits(fresh, calib_ids[:2]), ref)


def test_all_linear_expands_to_quantized_layers_bf16(gptq_dir, calib_ids):
    model = AutoModelForCausalLM.from_pretrained(gptq_dir, dtype=torch.bfloat16)
    ref = logits(model, calib_ids[:2])
    peft_model = hf_vq.prepare_lora(model, lora_config(target_modules="all-linear"))
    assert set(peft_model.peft_config["default"].target_modules) == set(TARGETS)  # lm_head (tied) excluded
    wrapped = [m for m in peft_model.modules() if isinstance(m, QuantLoraLinear)]
    assert len(wrapped) == 2 * len(TARGETS)
    assert all(m.lora_A["default"].weight.dtype == torch.float32 for m in wrapped)  # adapters train in fp32
    out = logits(peft_model, calib_ids[:2])
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)


@pytest.mark.parametrize("rows", [2, 12])  # 2 rows: the bf16 int4 decode kernel, which has no autograd formula
def test_frozen_backward_matches_dequantized_autograd(gptq_dir, rows):
    model = AutoModelForCausalLM.from_pretrained(gptq_dir, dtype=torch.bfloat16)
    base = model.model.layers[0].mlp.down_proj
    assert isinstance(base, QuantLinear)
    torch.manual_seed(0)
    x = torch.randn(rows, base.in_features, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(rows, base.out_features, dtype=torch.bfloat16)
    (_FrozenLinearFn.apply(x, base) * r).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (F.linear(x2, base.dequantize_weight(torch.bfloat16)) * r).sum().backward()
    assert torch.equal(x.grad, x2.grad)


@pytest.mark.usefixtures("exact_kernels")
def test_merge_refused_and_merge_and_dequantize(gptq_dir, calib_ids):
    peft_model = hf_vq.prepare_lora(AutoModelForCausalLM.from_pretrained(gptq_dir), lora_config())
    train_steps(peft_model, calib_ids[:4], steps=3)
    tuned = logits(peft_model, calib_ids[:2])
    with pytest.raises(ValueError, match="cannot merge a LoRA adapter into an integer-quantized"):
        peft_model.merge_adapter()
    with pytest.raises(ValueError, match="merge_and_dequantize"):
        peft_model.merge_and_unload()
    merged = hf_vq.merge_and_dequantize(peft_model)
    assert getattr(merged.config, "quantization_config", None) is None
    assert type(merged.model.layers[1].self_attn.q_proj) is torch.nn.Linear
    assert not any(isinstance(m, (QuantLinear, QuantLoraLinear)) for m in merged.modules())
    torch.testing.assert_close(logits(merged, calib_ids[:2]), tuned, atol=2e-5, rtol=0)


def test_vq_quantsim_and_qat_layers_forward_backward(tiny_llama_dir, calib_ids, tmp_path):
    vq = hf_vq.GPTVQConfig(rows_per_block=32, cols_per_block=32, kmeans_iterations=5, dataset=calib_ids,
                           num_samples=8, seq_len=64)
    qsim = hf_vq.QuantSimConfig(weight_bits=4, weight_granularity="blockwise", block_size=32, activation_bits=16,
                                dataset=calib_ids, num_samples=8, seq_len=64)
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=qsim).save_pretrained(tmp_path / "qs")
    cases = [(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=vq), VQLinear),
             (AutoModelForCausalLM.from_pretrained(tmp_path / "qs"), QuantSimLinear),
             (hf_vq.prepare_qat(AutoModelForCausalLM.from_pretrained(tmp_path / "qs")), QATLinear)]
    for model, kind in cases:
        ref = logits(model, calib_ids[:2])
        peft_model = hf_vq.prepare_lora(model, lora_config(lora_dropout=0.1))
        wrapped = [m for m in peft_model.modules() if isinstance(m, QuantLoraLinear)]
        assert len(wrapped) == 2 * len(TARGETS) and all(type(m.base_layer) is kind for m in wrapped), kind
        assert not any("qweight" in m.base_layer.__dict__ for m in wrapped)  # the placement alias is gone
        assert torch.equal(logits(peft_model, calib_ids[:2]), ref), kind
        peft_model.train()
        peft_model(input_ids=calib_ids[:2], labels=calib_ids[:2]).loss.backward()
        grads = [p.grad for n, p in peft_model.named_parameters() if ".lora_B." in n]
        assert len(grads) == len(wrapped) and all(g is not None and g.abs().sum() > 0 for g in grads), kind
        assert all(not p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)


def test_kbit_preparation_and_trainer(gptq_dir, calib_ids, tmp_path):
    model = prepare_model_for_kbit_training(AutoModelForCausalLM.from_pretrained(gptq_dir),
                                            use_gradient_checkpointing=False)
    before = frozen_state(model)
    assert model.model.layers[0].self_attn.q_proj.scales.dtype == torch.float16  # buffers untouched
    peft_model = hf_vq.prepare_lora(model, lora_config())
    data = [{"input_ids": r, "labels": r} for r in calib_ids]
    loss0 = peft_model(input_ids=calib_ids, labels=calib_ids).loss.item()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=5, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             activation_checkpointing=True)
    Trainer(model=peft_model, args=args, train_dataset=data).train()
    peft_model.eval()
    with torch.no_grad():
        assert peft_model(input_ids=calib_ids, labels=calib_ids).loss.item() < loss0
    after = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
             for k, v in frozen_state(peft_model).items()}
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("kw, match", [({"use_dora": True}, "use_dora"),
                                       ({"init_lora_weights": "olora"}, "init_lora_weights")])
def test_unsupported_lora_variants_raise(gptq_dir, kw, match):
    with pytest.raises(ValueError, match=match):
        hf_vq.prepare_lora(AutoModelForCausalLM.from_pretrained(gptq_dir), lora_config(**kw))


def test_plain_get_peft_model_without_registration_is_refused(gptq_dir):
    from peft import get_peft_model

    with pytest.raises(ValueError, match="is not supported"):
        get_peft_model(AutoModelForCausalLM.from_pretrained(gptq_dir), lora_config())


def test_second_adapter_and_mixed_batch(gptq_dir, calib_ids):
    peft_model = hf_vq.prepare_lora(AutoModelForCausalLM.from_pretrained(gptq_dir), lora_config())
    peft_model.add_adapter("other", hf_vq.integrations.peft.register_lora_modules(lora_config(target_modules=["q_proj"])))
    for n, p in peft_model.named_parameters():
        if ".lora_B.default." in n:
            torch.nn.init.normal_(p, std=0.1)
    ids = calib_ids[:2, :16]
    tuned = logits(peft_model, ids)
    with peft_model.disable_adapter():
        base = logits(peft_model, ids)
    assert not torch.allclose(tuned, base)
    with torch.no_grad():
        mixed = peft_model(input_ids=ids, adapter_names=["default", "__base__"]).logits
    assert torch.equal(mixed[0], tuned[0]) and torch.equal(mixed[1], base[1])
