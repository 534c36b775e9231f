"""AdaScale: trainable quantizer math, folding, blockwise distillation on tiny random Llamas, config validation."""

import contextlib

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_vq
from hf_vq.algorithms.adascale import AdaScaleQuantizer, quantizer_from_affine, quantizer_from_rtn
from hf_vq.pipeline.adascale import adascale_model, folded_block_mse, train_block
from hf_vq.algorithms.gptq import gptq_quantize
from hf_vq.algorithms.rtn import rtn_weight
from hf_vq.model.convert import select_linears
from hf_vq.export.aimet import collect_param_encodings
from hf_vq.formats import blockwise
from hf_vq.formats.affine import AffineWeight
from hf_vq.pipeline.blocks import _run_block, capture_block_inputs
from hf_vq.nn.registry import module_from_format

GRIDS = [  # (granularity, sym, group/block size) on a 48 x 96 weight
    ("group", False, 64),  # 96 = 64 + a shorter last group of 32
    ("group", True, 32),
    ("group", False, -1),
    ("blockwise", True, 32),
    ("blockwise", False, 16),
    ("lpbq", True, 16),
]


def _weight(seed=0, shape=(48, 96)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.05


def _perturb(qz: AdaScaleQuantizer, seed=1, size=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in qz.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * size)


@pytest.mark.parametrize("gran,sym,gs", GRIDS)
def test_fold_is_exactly_the_trained_forward_weight(gran, sym, gs):
    qz = quantizer_from_rtn(_weight(), 3, gs, sym, gran)
    _perturb(qz)
    with torch.no_grad():
        w_fwd = qz()
    aw = qz.fold()
    assert isinstance(aw, AffineWeight)
    assert torch.equal(aw.dequantize(), w_fwd)
    assert int(aw.codes.max()) <= 7 and aw.zeros.dtype == torch.uint8
    assert torch.equal(aw.scales.float(), aw.scales.float().half().float())
    # the stored module reproduces it too
    lin = module_from_format(aw, None)
    assert torch.equal(lin.to_linear(torch.float32).weight.data, w_fwd)


def test_fold_of_lpbq_stays_lpbq_and_exports_as_lpbq():
    qz = quantizer_from_rtn(_weight(), 4, 16, True, "lpbq")
    _perturb(qz)
    aw = qz.fold()
    factored = blockwise.factor_lpbq(aw.scales.float(), 4, 8)
    assert factored is not None
    pc, ints = factored
    assert float(ints.min()) >= 1 and float(ints.max()) == 16


@pytest.mark.parametrize("sym", [False, True])
def test_zero_parameters_reproduce_rtn_exactly(sym):
    w = _weight()
    qz = quantizer_from_rtn(w, 4, 64, sym)
    with torch.no_grad():
        assert torch.equal(qz(), rtn_weight(w, 4, 64, sym).dequantize())
    lp = quantizer_from_rtn(w, 4, 32, True, "lpbq")
    with torch.no_grad():
        assert torch.equal(lp(), blockwise.lpbq_affine_weight(w, 4, 32).dequantize())


def test_gptq_start_reproduces_gptq_codes():
    w = _weight()
    x = torch.randn(256, 96, generator=torch.Generator().manual_seed(3))
    h = 2 * x.T @ x / 256
    start = gptq_quantize(w, h, 3, 32, False)
    qz = quantizer_from_affine(w, start)
    with torch.no_grad():
        assert torch.equal(qz(), start.dequantize())
    assert torch.equal(qz.fold().codes, start.codes)


@pytest.mark.parametrize("gran,sym,gs", GRIDS)
def test_straight_through_gradients_reach_all_parameters(gran, sym, gs):
    w = _weight()
    qz = quantizer_from_rtn(w, 3, gs, sym, gran)
    _perturb(qz, size=0.05)
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(2))
    loss = ((x @ qz().T - x @ w.T) ** 2).mean()
    loss.backward()
    for name in ("s2", "s3", "gamma", "beta"):
        grad = getattr(qz, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def _tiny(layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("gran,sym", [("group", False), ("lpbq", True)])
def test_distillation_lowers_block_loss(gran, sym):
    block, inputs, targets, linears = _one_block(batch=2)
    quantizers = {n: quantizer_from_rtn(m.weight.data, 2, 32, sym, gran) for n, m in linears.items()}
    before = folded_block_mse(block, linears, quantizers, inputs, targets)
    hidden, kws = [h for h, _ in inputs], [kw for _, kw in inputs]
    train_block(block, quantizers, hidden, hidden, kws, targets, num_iterations=40, lr_scales=5e-3, lr_clip=1e-2,
                fp_input_prob=1.0, generator=torch.Generator().manual_seed(0), progress=False)
    after = folded_block_mse(block, linears, quantizers, inputs, targets)
    assert all(type(block.get_submodule(n)) is nn.Linear for n in linears)  # stand-ins removed
    assert after < 0.8 * before, (before, after)


def _run(model, config, ids):
    return adascale_model(model, ids, select_linears(model, config, ["lm_head"]), config, progress=False)


def test_disk_activation_cache_gives_identical_result(tmp_path):
    """Block activations kept on disk (safetensors per batch) instead of in memory change nothing, and are removed."""
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    kw = dict(bits=3, group_size=32, num_iterations=4, batch_size=2, lr_scales=1e-2, lr_clip=1e-2, init="gptq")
    in_memory = _run(_tiny(), hf_vq.AdaScaleConfig(**kw), ids)[0]
    cfg = hf_vq.AdaScaleConfig(**kw, activation_cache_dir=str(tmp_path / "acts"))
    on_disk = _run(_tiny(), cfg, ids)[0]
    assert in_memory.keys() == on_disk.keys() and len(in_memory) == 14
    for name in in_memory:
        assert torch.equal(in_memory[name].codes, on_disk[name].codes), name
        assert torch.equal(in_memory[name].scales, on_disk[name].scales), name
    assert list((tmp_path / "acts").iterdir()) == []  # temporary batch files removed
    assert "activation_cache_dir" not in cfg.to_dict()  # a local path is not part of the saved model


def test_activation_store_roundtrip_and_errors(tmp_path):
    from hf_vq.pipeline.activation_store import ActivationStore

    for directory in (None, tmp_path):
        with ActivationStore(2, directory) as store:
            t = torch.randn(2, 3, 4)
            store[1] = t
            assert torch.equal(store[1], t)
            with pytest.raises(IndexError, match="batch 0 was never stored"):
                store[0]


def test_reproducible_with_seed():
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    kw = dict(bits=3, group_size=32, num_iterations=6, batch_size=1, lr_scales=1e-2, lr_clip=1e-2, init="rtn")
    runs = [_run(_tiny(), hf_vq.AdaScaleConfig(**kw), ids) for _ in range(2)]
    other, stats = _run(_tiny(), hf_vq.AdaScaleConfig(**kw, seed=5), ids)
    assert runs[0][0].keys() == runs[1][0].keys() and len(runs[0][0]) == 14
    for name in runs[0][0]:
        assert torch.equal(runs[0][0][name].codes, runs[1][0][name].codes)
        assert torch.equal(runs[0][0][name].scales, runs[1][0][name].scales)
    # another seed trains differently (from the RTN start, training lowers these blocks' output error: kept)
    assert all(t < s for s, t in runs[0][1].block_output_mse + stats.block_output_mse)
    assert any(not torch.equal(runs[0][0][n].dequantize(), other[n].dequantize()) for n in runs[0][0])


def test_start_kept_when_training_makes_the_block_worse():
    """A learning rate that wrecks the scales: each block falls back to its start (GPTQ's), so the result is the
    0-iteration one."""
    from hf_vq.pipeline.adascale import run_adascale

    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    kw = dict(bits=3, group_size=32, batch_size=2, dataset=ids, num_samples=4, seq_len=32, early_stop_margin=None)
    out = []
    for cfg in (hf_vq.AdaScaleConfig(num_iterations=0, **kw),
                hf_vq.AdaScaleConfig(num_iterations=5, lr_scales=1.0, lr_clip=1.0, **kw)):
        model = _tiny()
        out.append(run_adascale(model, cfg, select_linears(model, cfg, ["lm_head"]), progress=False))
    (start, _), (trained, stats) = out
    assert len(stats.block_output_mse) == 2 and all(t > s for s, t in stats.block_output_mse)
    for n in start:
        assert torch.equal(start[n].codes, trained[n].codes) and torch.equal(start[n].scales, trained[n].scales), n


@pytest.mark.parametrize("gran,sym,gs,init", [("lpbq", True, 32, "rtn"), ("lpbq", True, 32, "gptq"),
                                               ("blockwise", True, 32, "gptq"), ("group", False, 64, "gptq")])
def test_from_pretrained_save_reload(tmp_path, gran, sym, gs, init):
    _tiny().save_pretrained(tmp_path / "fp")
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    cfg = hf_vq.AdaScaleConfig(bits=4, group_size=gs, sym=sym, weight_granularity=gran, init=init,
                               num_iterations=3, dataset=ids, num_samples=4, seq_len=32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=cfg)
    assert isinstance(model.model.layers[1].mlp.down_proj, hf_vq.QuantLinear)
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert type(again.config.quantization_config) is hf_vq.AdaScaleConfig
    assert again.config.quantization_config.weight_granularity == gran
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    encs = collect_param_encodings(model, "1.0.0")
    kinds = {e["enc_type"] for e in encs.values()}
    assert kinds == ({"LPBQ"} if gran == "lpbq" else {"PER_BLOCK"})


def test_blockwise_block_must_divide_in_features(tmp_path):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    cfg = hf_vq.AdaScaleConfig(bits=4, group_size=64, sym=True, weight_granularity="blockwise", num_iterations=1)
    with pytest.raises(ValueError, match="does not divide in_features=96"):
        _run(_tiny(), cfg, ids)


def test_clear_error_without_decoder_blocks():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, input_ids=None, **kw):
            return self.fc(input_ids.float())

    model = Flat()
    cfg = hf_vq.AdaScaleConfig(num_iterations=1)
    with pytest.raises(ValueError, match="AdaScale .* none were found in Flat"):
        adascale_model(model, torch.zeros(1, 8, dtype=torch.long), {"fc": model.fc}, cfg, progress=False)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_iterations=-1), "num_iterations"),
    (dict(num_iterations=1.5), "num_iterations"),
    (dict(batch_size=0), "batch_size"),
    (dict(lr_scales=0), "lr_scales"),
    (dict(lr_clip=-1e-3), "lr_clip"),
    (dict(init="adaround"), "init"),
    (dict(fp_input_prob=1.5), "fp_input_prob"),
    (dict(weight_granularity="vector"), "weight_granularity"),
    (dict(weight_granularity="lpbq", sym=False), "sym=True"),
    (dict(weight_granularity="lpbq", sym=True, decompressed_bw=4), "decompressed_bw"),
    (dict(weight_granularity="lpbq", sym=True, group_size=-1), "block size"),
    (dict(bits=5), "bits"),
    (dict(early_stop_margin=1.0), "early_stop_margin"),
    (dict(early_stop_margin=-0.1), "early_stop_margin"),
    (dict(train_dtype="float16"), "train_dtype"),
    (dict(compile="yes"), "compile"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hf_vq.AdaScaleConfig(**kwargs)


def test_config_round_trip():
    cfg = hf_vq.AdaScaleConfig(bits=3, num_iterations=200, lr_scales=1e-4, init="gptq", fp_input_prob=0.25)
    d = cfg.to_dict()
    assert d["method"] == "adascale" and d["num_iterations"] == 200
    again = hf_vq.HfVQConfig.from_dict(d)
    assert again == cfg and type(again) is hf_vq.AdaScaleConfig
    default = hf_vq.AdaScaleConfig()
    assert default.num_iterations == 300 and default.early_stop_margin is None and default.fp_input_prob == 0.5


@pytest.mark.parametrize("gran,sym,gs", GRIDS)
def test_fused_ste_matches_autograd(gran, sym, gs):
    from hf_vq.algorithms.adascale import reference_forward

    w = _weight()
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(2))
    grads = []
    for fn in (lambda q: q(), reference_forward):
        qz = quantizer_from_rtn(w, 3, gs, sym, gran)
        _perturb(qz, size=0.2)
        out = fn(qz)
        ((x @ out.T - x @ w.T) ** 2).mean().backward()
        grads.append((out.detach(), [p.grad for p in qz.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)


# ----------------------------------------------------------------------------------------------- issue 16: speed
def test_compiled_kernels_match_eager_and_fold_exactly():
    from hf_vq.algorithms.adascale import compiled_kernels

    w = _weight()
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(2))
    runs = []
    for compiled in (False, True):
        qz = quantizer_from_rtn(w, 3, 64, False)
        if compiled:
            qz.kernels = compiled_kernels()
        _perturb(qz, size=0.2)
        out = qz()
        ((x @ out.T - x @ w.T) ** 2).mean().backward()
        assert torch.equal(qz.fold().dequantize(), out.detach())
        runs.append((out.detach(), [p.grad for p in qz.parameters()]))
    assert qz.kernels.compiled  # no fallback happened
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=1e-6)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_failing_compile_falls_back_to_eager():
    from hf_vq.algorithms.adascale import QuantKernels

    kernels = QuantKernels(compile=True)

    def broken(*args):
        raise RuntimeError("no compiler")

    kernels.forward = broken
    qz = quantizer_from_rtn(_weight(), 4, 32, True)
    expected = qz().detach()
    qz.kernels = kernels
    with pytest.warns(UserWarning, match="torch.compile failed .*no compiler"):
        got = qz()
    assert torch.equal(got.detach(), expected) and not kernels.compiled


def _one_block(seed=0, batch=1):
    model = _tiny(1, seed)
    model.requires_grad_(False)
    ids = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(1))
    block = model.model.layers[0]
    inputs = capture_block_inputs(model, block, ids, batch, contextlib.nullcontext)
    with torch.no_grad():
        targets = [_run_block(block, h, kw) for h, kw in inputs]
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    return block, inputs, targets, linears


def test_bf16_autocast_training_lowers_the_fp32_loss():
    block, inputs, targets, linears = _one_block()
    quantizers = {n: quantizer_from_rtn(m.weight.data, 2, 32, False) for n, m in linears.items()}
    before = folded_block_mse(block, linears, quantizers, inputs, targets)
    hidden, kws = [h for h, _ in inputs], [kw for _, kw in inputs]
    train_block(block, quantizers, hidden, hidden, kws, targets, num_iterations=40, lr_scales=5e-3, lr_clip=1e-2,
                fp_input_prob=1.0, generator=torch.Generator().manual_seed(0), progress=False,
                autocast_dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for q in quantizers.values() for p in q.parameters())
    assert folded_block_mse(block, linears, quantizers, inputs, targets) < 0.8 * before


# ---------------------------------------------------------------------------------------------- early stop
def test_early_stop_never_stops_a_loss_falling_by_more_than_the_margin():
    from hf_vq.pipeline.distill import EarlyStop

    margin, window = 0.01, 8
    stop = EarlyStop(window, margin)
    rng = torch.Generator().manual_seed(0)
    # each window's mean 1.5% below the last (slower than most real curves), with +-20% step-to-step spread that
    # averages out within a window (zero-mean within each window)
    for w in range(200):
        noise = torch.rand(window // 2, generator=rng) * 0.2
        spread = torch.cat([noise, -noise]).tolist()
        level = 0.985 ** w
        for e in spread:
            assert not stop.update(level * (1 + e)), f"stopped in window {w}"


def test_early_stop_stops_a_flat_loss_after_two_windows():
    from hf_vq.pipeline.distill import EarlyStop

    stop = EarlyStop(8, 0.01)
    steps = next(i for i in range(1, 100) if stop.update(1.0 - 0.005 * (i // 8) / 8))  # 0.06% per window: flat
    assert steps == 16


def test_early_stop_ends_distillation_of_a_flat_block():
    from hf_vq.pipeline.distill import EarlyStop

    block, inputs, targets, linears = _one_block()
    quantizers = {n: quantizer_from_rtn(m.weight.data, 4, 32, False) for n, m in linears.items()}
    hidden, kws = [h for h, _ in inputs], [kw for _, kw in inputs]
    history = []
    # learning rates too small to move anything: the loss only varies with the batch, window = one pass
    train_block(block, quantizers, hidden, hidden, kws, targets, num_iterations=1000, lr_scales=1e-12,
                lr_clip=1e-12, fp_input_prob=1.0, generator=torch.Generator().manual_seed(0), progress=False,
                early_stop=EarlyStop(len(targets), 0.01), history=history)
    assert len(history) == 2 * len(targets)
    assert all(type(block.get_submodule(n)) is nn.Linear for n in linears)


def test_adascale_model_reports_steps_per_block():
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    cfg = hf_vq.AdaScaleConfig(bits=3, group_size=32, num_iterations=200, batch_size=1, lr_scales=1e-12,
                               lr_clip=1e-12, fp_input_prob=1.0, early_stop_margin=0.01, compile=False)
    _, stats = _run(_tiny(), cfg, ids)
    assert stats.block_iterations == [32, 32]  # windows of 16 steps (4 passes over the 4 batches): stopped after 2
    cfg = hf_vq.AdaScaleConfig(bits=3, group_size=32, num_iterations=40, batch_size=1, early_stop_margin=None)
    assert _run(_tiny(), cfg, ids)[1].block_iterations == [40, 40]


# ---------------------------------------------------------------------------------------------- defaults
def test_default_init_is_gptq():
    assert hf_vq.AdaScaleConfig().init_method() == "gptq"
    assert hf_vq.AdaScaleConfig(weight_granularity="blockwise", sym=True).init_method() == "gptq"
    lpbq = hf_vq.AdaScaleConfig(weight_granularity="lpbq", sym=True)
    assert lpbq.init is None and lpbq.init_method() == "gptq" and lpbq.learning_rates() == (2e-3, 0.0)
    assert hf_vq.AdaScaleConfig(init="rtn").init_method() == "rtn"


def test_gptq_start_on_an_lpbq_grid_stays_lpbq_and_beats_rtn():
    """GPTQ rounds onto the RTN LPBQ grid: the scales are that grid's (int x per-channel, exports as LPBQ), the
    quantizer starts exactly there, and the Hessian-weighted output error is below RTN's on the same grid."""
    from hf_vq.algorithms.adascale import initial_grid
    from hf_vq.algorithms.hessian import output_error

    w = _weight()
    x = torch.randn(256, 96, generator=torch.Generator().manual_seed(3))
    x[:, :8] *= 6.0  # a few dominant input channels, where error feedback matters
    h = 2 * x.T @ x / 256
    grid = initial_grid(w, 4, 16, True, "lpbq", 8)
    start = gptq_quantize(w, h, 4, 16, True, grid=grid)
    rtn = blockwise.lpbq_affine_weight(w, 4, 16, 8)
    assert torch.equal(start.scales.float(), rtn.scales.float()) and torch.equal(start.zeros, rtn.zeros)
    assert blockwise.factor_lpbq(start.scales.float(), 4, 8) is not None
    assert not torch.equal(start.codes, rtn.codes)
    assert output_error(w, start.dequantize(), h) < 0.9 * output_error(w, rtn.dequantize(), h)
    qz = quantizer_from_affine(w, start, "lpbq")
    with torch.no_grad():
        assert torch.equal(qz(), start.dequantize())
    aw = qz.fold()
    assert torch.equal(aw.codes, start.codes) and torch.equal(aw.scales, start.scales.float())
    with pytest.raises(ValueError, match="grid shapes"):
        gptq_quantize(w, h, 4, 32, True, grid=grid)


@pytest.mark.parametrize("gran,sym", [("group", False), ("blockwise", True)])
def test_zero_iterations_with_default_init_are_gptq(gran, sym):
    """With 0 Adam steps the result is the GPTQ method's (true-sequential Hessians, same damping and act order),
    code for code, in every block."""
    from hf_vq.pipeline.adascale import run_adascale
    from hf_vq.pipeline.gptq import _run_gptq

    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    cfg = hf_vq.AdaScaleConfig(bits=3, group_size=32, sym=sym, weight_granularity=gran, num_iterations=0,
                               batch_size=2, dataset=ids, num_samples=4, seq_len=32)
    model = _tiny()
    got, _ = run_adascale(model, cfg, select_linears(model, cfg, ["lm_head"]), progress=False)
    ref = _tiny()
    gcfg = hf_vq.GPTQConfig(bits=3, group_size=32, sym=sym, dataset=ids, num_samples=4, seq_len=32,
                            calibration_batch_size=2)
    want, _ = _run_gptq(ref, gcfg, select_linears(ref, gcfg, ["lm_head"]), progress=False)
    assert got.keys() == want.keys() and len(got) == 14
    for n in got:
        assert torch.equal(got[n].codes, want[n].codes), n
        assert torch.equal(got[n].scales, want[n].scales) and torch.equal(got[n].zeros, want[n].zeros), n


def test_gptq_start_keeps_gptqs_grid_by_default():
    """Defaults from a GPTQ start: the clipping is not trained (lr_clip 0), so every layer keeps GPTQ's scales and
    zeros while the rounding moves; from RTN, AIMET's rates train the clipping too."""
    assert hf_vq.AdaScaleConfig().learning_rates() == (2e-3, 0.0)
    assert hf_vq.AdaScaleConfig(init="rtn").learning_rates() == (5e-4, 1e-3)
    assert hf_vq.AdaScaleConfig(lr_clip=0.0, init="rtn").learning_rates() == (5e-4, 0.0)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    kw = dict(bits=3, group_size=32, batch_size=1, early_stop_margin=None)
    start = _run(_tiny(), hf_vq.AdaScaleConfig(num_iterations=0, **kw), ids)[0]
    trained, stats = _run(_tiny(), hf_vq.AdaScaleConfig(num_iterations=20, **kw), ids)
    assert all(t < s for s, t in stats.block_output_mse)  # training helped (not the keep-start fallback)
    for name in start:
        assert torch.equal(start[name].scales, trained[name].scales) and torch.equal(start[name].zeros,
                                                                                        trained[name].zeros), name
    assert sum(int((start[n].codes != trained[n].codes).sum()) for n in start) > 0
