"""Tiny random models of many transformers architectures (hidden 64, 2 layers, vocab 128; MoE: 4 experts, top-2)."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 128
ATTN = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
# deliberate float weights per architecture (besides embeddings and the output head): routers and gates
ROUTERS = ("mlp.gate", "mlp.router", "mlp.shared_expert_gate")


def _llama_like(cfg_cls, **extra):
    return cfg_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, **ATTN, **extra)


def _moe(cfg_cls, **extra):
    return cfg_cls(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, **ATTN, **extra)


def configs() -> dict[str, tuple[type, object]]:
    """name -> (model class, config)."""
    out = {
        "llama": (tf.LlamaForCausalLM, _llama_like(tf.LlamaConfig)),
        "mistral": (tf.MistralForCausalLM, _llama_like(tf.MistralConfig)),
        "qwen2": (tf.Qwen2ForCausalLM, _llama_like(tf.Qwen2Config)),
        "qwen3": (tf.Qwen3ForCausalLM, _llama_like(tf.Qwen3Config, head_dim=16)),
        "gemma2": (tf.Gemma2ForCausalLM, _llama_like(tf.Gemma2Config, head_dim=16)),
        "gemma3": (tf.Gemma3ForCausalLM, _llama_like(tf.Gemma3TextConfig, head_dim=16)),
        "phi3": (tf.Phi3ForCausalLM, _llama_like(tf.Phi3Config, pad_token_id=0)),
        "opt": (tf.OPTForCausalLM, tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                                num_attention_heads=4, word_embed_proj_dim=64,
                                                max_position_embeddings=256, pad_token_id=1)),
        "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256)),
        "gptj": (tf.GPTJForCausalLM, tf.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                                   n_positions=256)),
        "falcon": (tf.FalconForCausalLM, tf.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                         num_attention_heads=4)),
        "gpt_neox": (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                                             num_hidden_layers=2, num_attention_heads=4,
                                                             max_position_embeddings=256)),
        "mixtral": (tf.MixtralForCausalLM, _moe(tf.MixtralConfig, intermediate_size=96, num_local_experts=4,
                                               num_experts_per_tok=2)),
        "qwen2_moe": (tf.Qwen2MoeForCausalLM, _moe(tf.Qwen2MoeConfig, intermediate_size=96, moe_intermediate_size=32,
                                                   shared_expert_intermediate_size=64, num_experts=4,
                                                   num_experts_per_tok=2)),
        "qwen3_moe": (tf.Qwen3MoeForCausalLM, _moe(tf.Qwen3MoeConfig, intermediate_size=96, moe_intermediate_size=32,
                                                   num_experts=4, num_experts_per_tok=2, head_dim=16,
                                                   norm_topk_prob=True)),
        "deepseek_v3": (tf.DeepseekV3ForCausalLM, _moe(
            tf.DeepseekV3Config, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=4,
            num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, n_shared_experts=1,
            kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)),
    }
    if hasattr(tf, "GptOssForCausalLM"):
        out["gpt_oss"] = (tf.GptOssForCausalLM, _moe(tf.GptOssConfig, intermediate_size=32, num_local_experts=4,
                                                     num_experts_per_tok=2, head_dim=16))
    return out


MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss")


def multimodal_gemma3():
    text = dict(vocab_size=VOCAB + 8, hidden_size=64, intermediate_size=96, num_hidden_layers=2, head_dim=16, **ATTN)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=VOCAB + 1,
                          boi_token_index=VOCAB + 2, eoi_token_index=VOCAB + 3)
    return tf.Gemma3ForConditionalGeneration, cfg


def save_tiny(name: str, cls, cfg, path) -> None:
    torch.manual_seed(0)
    model = cls(cfg)
    model.save_pretrained(path)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits
