"""QAT: straight-through gradients, folding, Trainer full fine-tuning without PEFT, checkpoints, resume."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hf_vq
from hf_vq.nn.qat import ActQuantizer, QATLinear, QuantSimLinear, folded_state_dict


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def qsim(tiny_llama_dir, calib_ids, **kw):
    cfg = hf_vq.QuantSimConfig(weight_bits=4, weight_granularity="blockwise", block_size=64, activation_bits=16,
                               dataset=calib_ids, num_samples=16, seq_len=64, **kw)
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)


@pytest.mark.parametrize("gran", ["per_channel", "blockwise", "lpbq"])
def test_ste_gradients_and_exact_fold(gran):
    torch.manual_seed(0)
    w = torch.randn(32, 96) * 0.05
    mod = QATLinear(w, torch.randn(32) * 0.1, 4, gran, 32 if gran == "lpbq" else 64, 8, ActQuantizer(8),
                    ActQuantizer(16))
    x = torch.randn(4, 96)
    mod.input_quantizer.set_range(-3, 3)
    mod.output_quantizer.set_range(-2, 2.5)
    mod(x).pow(2).sum().backward()
    for p in (mod.latent, mod.log_scale, mod.input_quantizer.min, mod.input_quantizer.max, mod.output_quantizer.max):
        assert p.grad is not None and p.grad.abs().sum() > 0
    with torch.no_grad():
        mod.latent.add_(torch.randn_like(w) * 0.01)
        mod.log_scale.add_(0.013)  # a learned scale that is not fp16-exact
    folded = mod.fold()
    assert isinstance(folded, QuantSimLinear)
    assert torch.equal(folded.dequantize_weight(), mod.weight_qdq().detach())
    assert torch.equal(folded(x), mod(x).detach())
    # the folded tensors load back into a QAT module (Trainer resume) and give the same forward
    fresh = QATLinear(torch.zeros(32, 96), torch.zeros(32), 4, gran, 32 if gran == "lpbq" else 64, 8,
                      ActQuantizer(8), ActQuantizer(16))
    result = fresh.load_state_dict(folded.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert torch.equal(fresh(x).detach(), mod(x).detach())


def test_blockwise_shorter_last_block():
    w = torch.randn(16, 96)
    mod = QATLinear(w, None, 4, "blockwise", 64)  # 96 = 64 + 32
    assert mod.scale.shape == (16, 2)
    assert torch.equal(mod.fold().dequantize_weight(), mod.weight_qdq().detach())


def test_trainer_full_finetune_checkpoint_and_reload(tiny_llama_dir, calib_ids, tmp_path):
    model = qsim(tiny_llama_dir, calib_ids)
    assert model.hf_quantizer.is_qat_trainable is True and model.hf_quantizer.is_trainable is True
    q = model.model.layers[0].mlp.down_proj
    latent0, scale0, amax0 = q.latent.detach().clone(), q.log_scale.detach().clone(), float(q.output_quantizer.max)
    train = [{"input_ids": r, "labels": r} for r in calib_ids]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=1e-3, save_strategy="steps", save_steps=2, report_to=[], use_cpu=True,
                             logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=train)  # no PEFT
    trainer.train()
    assert not torch.equal(q.latent.detach(), latent0) and not torch.equal(q.log_scale.detach(), scale0)
    assert float(q.output_quantizer.max) != amax0
    ckpt = tmp_path / "run" / "checkpoint-4"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any(k.endswith((".latent", ".log_scale")) for k in keys) and "model.layers.0.mlp.down_proj.qweight" in keys
    again = AutoModelForCausalLM.from_pretrained(ckpt)
    assert isinstance(again.model.layers[0].mlp.down_proj, QuantSimLinear)
    assert torch.equal(logits(again, calib_ids[:2]), logits(model, calib_ids[:2]))
    model.save_pretrained(tmp_path / "final")
    cfg = json.loads((tmp_path / "final" / "config.json").read_text())["quantization_config"]
    assert cfg["method"] == "quantsim" and cfg["layers"]["model.layers.0.mlp.down_proj"]["type"] == "quantsim"


def test_resume_from_checkpoint_rebuilds_latents(tiny_llama_dir, calib_ids, tmp_path):
    train = [{"input_ids": r, "labels": r} for r in calib_ids]

    def args(steps):
        return TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=steps,
                                 learning_rate=1e-3, save_strategy="steps", save_steps=2, report_to=[], use_cpu=True,
                                 seed=0, data_seed=0, lr_scheduler_type="constant")

    full = qsim(tiny_llama_dir, calib_ids)
    Trainer(model=full, args=args(2), train_dataset=train).train()
    ckpt = tmp_path / "run" / "checkpoint-2"
    # a fresh QAT model (latents from the FP weights) resumes from the folded checkpoint
    resumed = qsim(tiny_llama_dir, calib_ids)
    before = resumed.model.layers[1].mlp.up_proj.latent.detach().clone()
    trainer = Trainer(model=resumed, args=args(2), train_dataset=train)
    trainer._load_from_checkpoint(str(ckpt))
    up = resumed.model.layers[1].mlp.up_proj
    assert not torch.equal(up.latent.detach(), before)
    assert torch.equal(logits(resumed, calib_ids[:2]), logits(full, calib_ids[:2]))
    # and the Trainer API: resume, then two more steps
    trainer = Trainer(model=resumed, args=args(4), train_dataset=train)
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.state.global_step == 4
    assert (tmp_path / "run" / "checkpoint-4" / "model.safetensors").exists()


def test_folded_state_dict_and_prepare_qat(tiny_llama_dir, calib_ids, tmp_path):
    model = qsim(tiny_llama_dir, calib_ids)
    sd = folded_state_dict(model)
    assert not any(k.endswith(".latent") for k in sd) and "model.layers.1.self_attn.o_proj.scales" in sd
    model.save_pretrained(tmp_path)
    again = hf_vq.prepare_qat(AutoModelForCausalLM.from_pretrained(tmp_path))
    assert isinstance(again.model.layers[0].self_attn.q_proj, QATLinear)
    assert torch.equal(logits(again, calib_ids[:2]), logits(model, calib_ids[:2]))
