"""Config options without other real-model coverage, on SmolLM2-135M-Instruct with Austen text (issue 15): each run
is small (GPTQ 8 x 256 calibration tokens, QuantSim 4 x 128) and checked for sane quality against the default GPTQ run
or the float model. With 4 x 128 tokens GPTQ's perplexity moved by ~4% with the thread count alone (23.48 vs 22.59),
too noisy to compare options; 8 x 256 is stable enough (fp32 22.19 vs bf16 22.27 calibration)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_vq
from hf_vq.nn.qat import QATLinear

EVAL = dict(seq_len=512, max_tokens=65536, max_windows=3)  # 3 x 512 tokens of Pride and Prejudice


def quantize(real, cls, **kw):
    model_dir, tok, calib, _ = real
    if cls is not hf_vq.RTNConfig:
        size = dict(num_samples=8, seq_len=256) if cls is hf_vq.GPTQConfig else dict(num_samples=4, seq_len=128)
        kw = dict(dataset=[calib], tokenizer=tok, **size, **kw)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cls(**kw), dtype=torch.float32)


def ppl(real, model) -> float:
    _, tok, _, test = real
    return hf_vq.evaluate_perplexity(model, tok, test, **EVAL)


@pytest.fixture(scope="module")
def fp_ppl(real):
    return ppl(real, AutoModelForCausalLM.from_pretrained(real[0], dtype=torch.float32))


@pytest.fixture(scope="module")
def gptq_fp32_ppl(real):
    return ppl(real, quantize(real, hf_vq.GPTQConfig))


def test_bf16_calibration_matches_fp32_calibration(real, gptq_fp32_ppl):
    """calibration_dtype="bfloat16" crashed on the real model (m1/m2 dtype mismatch); now it runs, and its GPTQ
    perplexity is within 3% of the fp32-calibrated run's (measured 22.27 vs 22.19)."""
    model = quantize(real, hf_vq.GPTQConfig, calibration_dtype="bfloat16")
    assert model.config.quantization_config.calibration_dtype == "bfloat16"
    bf16 = ppl(real, model)
    print(f"ppl@512 x3: GPTQ4 fp32 calibration {gptq_fp32_ppl:.3f}, bf16 calibration {bf16:.3f}")
    assert abs(bf16 / gptq_fp32_ppl - 1) < 0.03


def test_gptq_ordering_overrides_and_exclusions(real, gptq_fp32_ppl, fp_ppl):
    """act_order / true_sequential off, reference first-token weight, small calibration batches, a seed, an explicit
    exclusion list and per-layer overrides (8-bit per-channel block 0; blocks 10-29 left in float, so the runner
    stops after block 9)."""
    model = quantize(real, hf_vq.GPTQConfig, act_order=False, true_sequential=False, first_token_weight=1,
                     calibration_batch_size=2, seed=3, modules_to_not_convert=["down_proj"],
                     module_overrides={r"layers\.0\.": {"bits": 8, "group_size": -1},
                                       r"layers\.[1-9][0-9]\.": {"skip": True}})
    layers = model.model.layers
    assert all(type(b.mlp.down_proj) is torch.nn.Linear for b in layers)
    assert all(type(m) is torch.nn.Linear for b in layers[10:] for m in b.modules() if isinstance(m, torch.nn.Linear))
    q0 = layers[0].self_attn.q_proj
    assert isinstance(q0, hf_vq.QuantLinear) and q0.bits == 8 and q0.scales.shape == (576, 1)
    q5 = layers[5].mlp.gate_proj
    assert isinstance(q5, hf_vq.QuantLinear) and q5.bits == 4 and q5.scales.shape == (1536, 5)
    assert sum(isinstance(m, hf_vq.QuantLinear) for m in model.modules()) == 10 * 6
    mixed = ppl(real, model)
    print(f"ppl@512 x3: FP {fp_ppl:.3f}, GPTQ4 default {gptq_fp32_ppl:.3f}, options mix (blocks 0-9) {mixed:.3f}")
    assert fp_ppl < mixed < gptq_fp32_ppl  # a third of the model quantized: between float and the full default run


def test_rtn_8bit_symmetric_per_channel_is_near_lossless(real, fp_ppl):
    sym8 = ppl(real, quantize(real, hf_vq.RTNConfig, bits=8, group_size=-1, sym=True))
    print(f"ppl@512 x3: FP {fp_ppl:.3f}, RTN8 sym per-channel {sym8:.3f}")  # measured 19.889, 19.953
    assert abs(sym8 / fp_ppl - 1) < 0.01


def test_quantsim_int8_input_activations_tf_enhanced_beats_min_max(real, fp_ppl):
    """W8A8 with input quantizers only (quantize_outputs=False): the SQNR range search (tf_enhanced) recovers part of
    what per-tensor int8 min-max ranges lose on SmolLM2's outlier activations (measured 28.44 vs 31.45, FP 19.89)."""
    def w8a8(scheme):
        model = quantize(real, hf_vq.QuantSimConfig, weight_bits=8, activation_bits=8, quant_scheme=scheme,
                         quantize_outputs=False)
        layers = [m for m in model.modules() if isinstance(m, QATLinear)]
        assert len(layers) == 210 and all(m.output_quantizer is None and m.input_quantizer is not None
                                           for m in layers)
        return ppl(real, model)

    tf, mm = w8a8("tf_enhanced"), w8a8("min_max")
    print(f"ppl@512 x3: FP {fp_ppl:.3f}, W8A8 inputs tf_enhanced {tf:.3f}, min_max {mm:.3f}")
    assert tf < 0.97 * mm
    assert tf < 1.6 * fp_ppl


FIRST_TWO_BLOCKS = {r"layers\.([2-9]|[1-2][0-9])\.": {"skip": True}}  # blocks 0-1 only: options, not quality


def _reload_exact(real, model, tmp_path):
    _, tok, _, test = real
    ids = tok(test[:4000], return_tensors="pt")["input_ids"][:, :128]
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    runtime = ("dataset", "tokenizer", "calibration")  # in-memory calibration data is not saved
    saved, orig = (({k: v for k, v in m.config.quantization_config.to_dict().items() if k not in runtime})
                   for m in (again, model))
    assert saved == orig


def test_gptvq_options(real, fp_ppl, tmp_path):
    """1-D vectors with k-means++ init, int4 codebooks with one scale per codebook, data normalization, plain
    (unweighted) lookup, no codebook update, and two steps of codebook fine-tuning."""
    model = quantize(real, hf_vq.GPTVQConfig, vector_dim=1, index_bits=3, codebook_bits=4, init="kpp",
                     codebook_scale="codebook", data_normalization=True, hessian_weighted_lookup=False,
                     codebook_update=False, kmeans_iterations=5, rows_per_block=64, cols_per_block=128,
                     finetune_iterations=2, finetune_lr=1e-4, module_overrides=FIRST_TWO_BLOCKS)
    vq = [m for m in model.modules() if isinstance(m, hf_vq.VQLinear)]
    assert len(vq) == 14 and all(m.layout.vector_dim == 1 and m.layout.index_bits == 3 for m in vq)
    q = ppl(real, model)
    print(f"ppl@512 x3: FP {fp_ppl:.3f}, GPTVQ 1-D 3-bit options (blocks 0-1) {q:.3f}")
    assert fp_ppl < q < 1.15 * fp_ppl
    _reload_exact(real, model, tmp_path)


@pytest.mark.parametrize("granularity,init", [("lpbq", "rtn"), ("lpbq", "gptq"), ("blockwise", "gptq")])
def test_adascale_options(real, fp_ppl, tmp_path, granularity, init):
    """AIMET grids (LPBQ from RTN or from GPTQ on the LPBQ grid, blockwise from GPTQ), FP-only block inputs, two
    sequences per step, custom learning rates and the on-disk activation cache (removed afterwards)."""
    cache = tmp_path / "acts"
    model = quantize(real, hf_vq.AdaScaleConfig, bits=4, group_size=64, sym=True, weight_granularity=granularity,
                     decompressed_bw=8, init=init, fp_input_prob=1.0, batch_size=2, num_iterations=3,
                     lr_scales=1e-3, lr_clip=2e-3, activation_cache_dir=str(cache), module_overrides=FIRST_TWO_BLOCKS)
    q = [m for m in model.modules() if isinstance(m, hf_vq.QuantLinear)]
    assert len(q) == 14 and all(m.bits == 4 and m.sym for m in q)
    assert cache.is_dir() and list(cache.iterdir()) == []
    got = ppl(real, model)
    print(f"ppl@512 x3: FP {fp_ppl:.3f}, AdaScale {granularity} ({init} start) 4-bit b64 (blocks 0-1) {got:.3f}")
    assert fp_ppl < got < 1.1 * fp_ppl
    _reload_exact(real, model, tmp_path / "saved")
