"""GPTVQ unit tests: weighted EM, assignment, the layer algorithm, VQLinear storage, and from_pretrained round trips
on a tiny random Llama."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

import hf_vq
from hf_vq.algorithms.gptvq import (gptvq_quantize, weighted_argmin, weighted_error,
                                    weighted_kmeans)
from hf_vq.algorithms.hessian import output_error
from hf_vq.nn.vqlinear import VQLinear
from hf_vq.nn.registry import module_from_format


def _problem(n=64, k=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g))
    h = 2 * x.T @ x / x.shape[0]
    return torch.randn(n, k, generator=g) * 0.05, h


# ------------------------------------------------------------------------------------------ EM and assignment
def _brute_force_distances(x, c, w):
    return ((x[:, :, None] - c[:, None]) ** 2 * w[:, :, None]).sum(-1)      # [B, m, k]


@pytest.mark.parametrize("use_kernel", [True, False])
def test_weighted_argmin_matches_brute_force(use_kernel):
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(3, 200, 2, generator=g), torch.randn(3, 16, 2, generator=g)
    w = torch.rand(3, 200, 2, generator=g) + 0.05
    idx = weighted_argmin(x, c, w, use_kernel=use_kernel)
    dist = _brute_force_distances(x, c, w)
    chosen = dist.gather(2, idx[..., None])[..., 0]
    assert torch.allclose(chosen, dist.min(-1).values, rtol=1e-5, atol=1e-6)
    assert (idx == dist.argmin(-1)).float().mean() > 0.99


@pytest.mark.parametrize("d,k", [(1, 7), (2, 64), (4, 256), (3, 300), (8, 600)])
def test_assignment_kernel_is_nearest_and_first_on_ties(d, k):
    """The C kernel (centroids in tiles of 256): every vector gets a nearest centroid, the first of equal ones;
    zero-weight vectors (padding) get centroid 0."""
    from hf_vq.algorithms.gptvq import LIBRARY

    assert LIBRARY.load() is not None  # built with the machine's C compiler, as the GPTQ kernel is
    g = torch.Generator().manual_seed(d * 1000 + k)
    x, c = torch.randn(2, 500, d, generator=g), torch.randn(2, k, d, generator=g)
    c[:, k - 1] = c[:, k // 2]  # a duplicate centroid, later in the list (a later tile when k > 256)
    x[:, :10] = c[:, k // 2, None]  # vectors exactly on it: distance 0 to both
    w = torch.rand(2, 500, d, generator=g) + 0.05
    w[:, -5:] = 0.0
    idx = weighted_argmin(x, c, w)
    dist = _brute_force_distances(x, c, w)
    chosen = dist.gather(2, idx[..., None])[..., 0]
    assert torch.allclose(chosen, dist.min(-1).values, rtol=1e-5, atol=1e-6)
    assert (idx[:, :10] == k // 2).all()
    assert (idx[:, -5:] == 0).all()
    assert (idx == weighted_argmin(x, c, w, use_kernel=False)).float().mean() > 0.99


def test_negative_weights_take_the_torch_path():
    """The kernel's integer minimum holds for distances >= 0 only: weights with a negative entry still give the
    weighted argmin."""
    g = torch.Generator().manual_seed(5)
    x, c = torch.randn(2, 50, 2, generator=g), torch.randn(2, 9, 2, generator=g)
    w = torch.rand(2, 50, 2, generator=g)
    w[0, 3, 1] = -2.0
    dist = _brute_force_distances(x, c, w)
    chosen = weighted_argmin(x, c, w)
    assert torch.allclose(dist.gather(2, chosen[..., None])[..., 0], dist.min(-1).values, rtol=1e-5, atol=1e-6)


def test_weights_change_assignment():
    # (0.9, 0.4) is nearer (1, 1) under plain L2, nearer (0, 0) when dim 1 weighs 100x
    x, c = torch.tensor([[[0.9, 0.4]]]), torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    assert weighted_argmin(x, c, None).item() == 1
    assert weighted_argmin(x, c, torch.tensor([[[1.0, 100.0]]])).item() == 0


@pytest.mark.parametrize("init", ["mahalanobis", "kpp"])
def test_em_reduces_weighted_error(init):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 300, 2, generator=g) * torch.tensor([1.0, 3.0])
    w = torch.rand(4, 300, 2, generator=g) + 0.1
    errs = []
    for iters in (0, 1, 2, 5, 50):
        c1, i1 = weighted_kmeans(x, w, 8, iterations=iters, init=init, generator=torch.Generator().manual_seed(0))
        errs.append(weighted_error(x, c1, i1, w))
    for a, b in zip(errs, errs[1:]):
        assert (b <= a * (1 + 1e-5)).all()  # EM never increases the weighted error
    assert errs[-1].sum() < 0.9 * errs[0].sum()
    # a fixed point: assignments are nearest centroids and centroids are weighted means
    assert torch.equal(i1, weighted_argmin(x, c1, w))


def test_em_ignores_zero_weight_padding():
    x = torch.randn(1, 100, 2)
    w = torch.ones(1, 100, 2)
    xp = torch.cat((x, torch.full((1, 50, 2), 100.0)), 1)
    wp = torch.cat((w, torch.zeros(1, 50, 2)), 1)
    c, _ = weighted_kmeans(xp, wp, 4, iterations=20)
    assert c.abs().max() < 10  # no centroid pulled to the padding


# ------------------------------------------------------------------------------------------ layer algorithm
def test_gptvq_beats_rtn_vq_and_error_feedback_helps():
    w, h = _problem()
    kw = dict(vector_dim=2, index_bits=4, rows_per_block=16, cols_per_block=32, kmeans_iterations=30)
    vq = gptvq_quantize(w, h, **kw)
    err = output_error(w, vq.dequantize(), h)
    # plain (unweighted, no feedback) VQ of the same layout: EM on raw weights, nearest centroid
    x = w.reshape(4, 16, 3, 16, 2).permute(0, 2, 1, 3, 4).reshape(12, 256, 2)
    c, i = weighted_kmeans(x, torch.ones_like(x), 16, 30)
    plain = c.gather(1, i[..., None].expand_as(x)).reshape(4, 3, 16, 16, 2).permute(0, 2, 1, 3, 4).reshape(64, 96)
    assert err < 0.85 * output_error(w, plain, h)
    assert err < 0.2
    assert vq.info["loss_after_update"] <= vq.info["loss_before_update"] * 1.001


@pytest.mark.parametrize("kw", [
    dict(vector_dim=1, index_bits=3), dict(vector_dim=4, index_bits=8), dict(codebook_bits=16),
    dict(codebook_bits=4), dict(data_normalization=True), dict(init="kpp"), dict(hessian_weighted_lookup=False),
    dict(codebook_update=False)])
def test_options_run_and_decode(kw):
    w, h = _problem(48, 64)
    vq = gptvq_quantize(w, h, rows_per_block=16, cols_per_block=32, kmeans_iterations=5, **kw)
    wq = vq.dequantize()
    assert wq.shape == w.shape and torch.isfinite(wq).all()
    assert output_error(w, wq, h) < 0.5


@pytest.mark.parametrize("shape", [(50, 70), (192, 576), (7, 5), (33, 9)])
def test_odd_shapes(shape):
    n, k = shape
    w, h = _problem(n, k, seed=3)
    vq = gptvq_quantize(w, h, vector_dim=2, index_bits=3, rows_per_block=32, cols_per_block=256,
                        kmeans_iterations=5)
    assert vq.dequantize().shape == (n, k)
    mod = module_from_format(vq, None)
    assert torch.equal(mod.dequantize_weight(), vq.dequantize())
    # codebook count: ceil(rows / 32) x ceil(padded cols / 256)
    assert mod.vq_codebook.shape[0] == -(-n // 32) * -(-(-(-k // 2) * 2) // 256)


def test_vq_values_come_from_codebook():
    w, h = _problem(32, 64)
    vq = gptvq_quantize(w, h, vector_dim=2, index_bits=3, rows_per_block=32, cols_per_block=64, kmeans_iterations=5)
    pairs = vq.dequantize().reshape(-1, 2)
    assert torch.unique(pairs, dim=0).shape[0] <= 8


# ------------------------------------------------------------------------------------------ module / storage
@pytest.mark.usefixtures("exact_kernels")
def test_forward_exact_and_bits_honest(tmp_path):
    w, h = _problem(64, 96)
    vq = gptvq_quantize(w, h, rows_per_block=32, cols_per_block=64, kmeans_iterations=5)
    bias = torch.randn(64)
    mod = module_from_format(vq, bias)
    x = torch.randn(3, 5, 96)
    assert torch.equal(mod(x), torch.nn.functional.linear(x, vq.dequantize(), bias))
    VQLinear.cache_decoded = False
    try:
        assert torch.equal(mod(x), torch.nn.functional.linear(x, vq.dequantize(), bias))
    finally:
        VQLinear.cache_decoded = True
    cfg = hf_vq.GPTVQConfig(rows_per_block=32, cols_per_block=64)
    assert mod.bits_per_value() == pytest.approx(cfg.bits_per_value(64, 96))
    from safetensors.torch import save_file

    path = tmp_path / "l.safetensors"
    save_file({k: v for k, v in mod.state_dict().items() if k != "bias"}, str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        nbytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert 8 * nbytes / (64 * 96) == pytest.approx(mod.bits_per_value())


def test_nominal_bits_per_value():
    # paper formula: log2(k)/d + k*d*b_c/l, plus one fp16 scale per codebook
    cfg = hf_vq.GPTVQConfig(vector_dim=2, index_bits=6, codebook_bits=8, rows_per_block=32, cols_per_block=256)
    assert cfg.bits_per_value() == pytest.approx(3 + 64 * 2 * 8 / 8192 + 16 / 8192)
    cfg = hf_vq.GPTVQConfig(vector_dim=4, index_bits=8, codebook_bits=8, rows_per_block=256, cols_per_block=256)
    assert cfg.bits_per_value() == pytest.approx(2 + 256 * 4 * 8 / 65536 + 16 / 65536)
    cfg16 = hf_vq.GPTVQConfig(codebook_bits=16)
    assert cfg16.bits_per_value() == pytest.approx(3 + 64 * 2 * 16 / 8192)


def test_dtype_cast_keeps_codebooks():
    w, h = _problem(32, 64)
    mod = module_from_format(gptvq_quantize(w, h, codebook_bits=16, rows_per_block=32, cols_per_block=64, kmeans_iterations=3), None)
    ref = mod.dequantize_weight()
    mod.to(torch.bfloat16)
    assert torch.equal(mod.dequantize_weight(), ref)
    assert mod(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("kw, msg", [
    (dict(vector_dim=3), "vector_dim"), (dict(index_bits=9), "index_bits"), (dict(index_bits=0), "index_bits"),
    (dict(codebook_bits=6), "codebook_bits"), (dict(rows_per_block=0), "rows_per_block"),
    (dict(cols_per_block=255, vector_dim=2), "multiple of vector_dim"), (dict(init="random"), "init"),
    (dict(percdamp=0), "percdamp"), (dict(kmeans_iterations=-1), "kmeans_iterations"),
    (dict(hessian_weighted_lookup="yes"), "hessian_weighted_lookup"), (dict(codebook_scale="row"), "codebook_scale"),
    (dict(finetune_iterations=-1), "finetune_iterations"), (dict(finetune_lr=0), "finetune_lr")])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        hf_vq.GPTVQConfig(**kw)


def test_config_roundtrip():
    cfg = hf_vq.GPTVQConfig(vector_dim=4, index_bits=8, data_normalization=True, init="kpp")
    d = cfg.to_dict()
    json.dumps(d)
    again = hf_vq.HfVQConfig.from_dict(d)
    assert type(again) is hf_vq.GPTVQConfig and again == cfg


# ------------------------------------------------------------------------------------------ from_pretrained
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _calib():
    return torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kw", [dict(), dict(vector_dim=1, index_bits=2, codebook_bits=4, data_normalization=True),
                                dict(vector_dim=4, finetune_iterations=10)])
def test_from_pretrained_save_reload_exact(tiny_llama, tmp_path, kw):
    from transformers import AutoModelForCausalLM

    cfg = hf_vq.GPTVQConfig(**{"index_bits": 4, "rows_per_block": 32, "cols_per_block": 32, "kmeans_iterations": 5,
                               "dataset": _calib(), **kw})
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=cfg, dtype=torch.float32)
    qs = [m for m in model.modules() if isinstance(m, VQLinear)]
    assert len(qs) == 14  # 7 linears x 2 blocks; lm_head stays float
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["method"] == "gptvq" and saved["layers"]["model.layers.0.mlp.down_proj"]["type"] == "vq"
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    assert isinstance(again.model.layers[1].mlp.up_proj, VQLinear)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref)
    # saved bytes of the quantized tensors match bits_per_value
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as f:
        for name, layer in saved["layers"].items():
            nbytes = sum(f.get_tensor(key).numel() * f.get_tensor(key).element_size()
                         for key in f.keys() if key.startswith(name + ".vq_"))
            mod = again.get_submodule(name)
            assert 8 * nbytes / (mod.in_features * mod.out_features) == pytest.approx(mod.bits_per_value())
            assert mod.bits_per_value() == pytest.approx(cfg.bits_per_value(mod.out_features, mod.in_features))


def test_modules_to_not_convert(tiny_llama):
    from transformers import AutoModelForCausalLM

    cfg = hf_vq.GPTVQConfig(index_bits=3, rows_per_block=32, cols_per_block=32, kmeans_iterations=2,
                            dataset=_calib(), modules_to_not_convert=["lm_head", "down_proj"])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=cfg, dtype=torch.float32)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, VQLinear)


@pytest.mark.parametrize("version", ["1.0.0", "0.6.1"])
def test_vector_encodings_export_and_load(tiny_llama, tmp_path, version):
    """A GPTVQ model exports AIMET VECTOR entries (the schema of AIMET's own GPTVQ file) whose per-row grid holds
    every centroid exactly, and the file loads back; a mismatching file is refused."""
    from transformers import AutoModelForCausalLM

    from hf_vq.formats.vq import decode_codebooks
    from tests.test_aimet_encodings import REF, _schema

    cfg = hf_vq.GPTVQConfig(index_bits=4, rows_per_block=32, cols_per_block=32, kmeans_iterations=3, dataset=_calib())
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=cfg, dtype=torch.float32)
    path = hf_vq.export_encodings(model, tmp_path, version=version)
    doc = json.loads(path.read_text())
    name = "model.layers.0.mlp.down_proj.weight"
    mod = model.get_submodule("model.layers.0.mlp.down_proj")
    if version == "1.0.0":
        entry = next(e for e in doc["param_encodings"] if e["name"] == name)
        ref = json.loads((REF / "tiny-llama_gptvq-vector-2d-idx6-cb8_a8_v1.0.0_legacy-export.encodings").read_text())
        ref_entry = next(e for e in ref["param_encodings"] if e["enc_type"] == "VECTOR")
        assert _schema({k: entry[k] for k in sorted(entry)}) == _schema({k: ref_entry[k] for k in sorted(ref_entry)})
        scale, fields = entry["scale"], entry
    else:
        rows = doc["param_encodings"][name]
        scale, fields = [r["scale"] for r in rows], rows[0]
        assert all(r["offset"] == -128 and r["bitwidth"] == 8 for r in rows)
    assert (fields["rows_per_block"], fields["cols_per_block"], fields["vector_dim"], fields["index_bw"]) == (32, 32, 2, 4)
    assert len(scale) == mod.out_features
    # every centroid of a row block is an integer multiple of that row block's exported scale, within int8
    lay = mod.layout
    cb = decode_codebooks(lay, mod.vq_codebook, mod.vq_codebook_scales).reshape(lay.row_blocks, -1)
    row_scale = torch.tensor(scale).reshape(lay.row_blocks, -1)[:, :1]
    ints = cb / row_scale
    assert torch.allclose(ints, ints.round(), atol=1e-3) and ints.abs().max() <= 127

    enc = hf_vq.load_encodings(model, path)
    assert name in enc.applied
    wrong = json.loads(path.read_text())
    if version == "1.0.0":
        next(e for e in wrong["param_encodings"] if e["name"] == name)["index_bw"] = 6
    else:
        for r in wrong["param_encodings"][name]:
            r["index_bw"] = 6
    bad = tmp_path / "bad.encodings"
    bad.write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match="does not match this VQLinear"):
        hf_vq.load_encodings(model, bad)


def test_per_codebook_scales_refuse_vector_export(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = hf_vq.GPTVQConfig(index_bits=4, rows_per_block=32, cols_per_block=32, kmeans_iterations=3,
                            dataset=_calib(), codebook_scale="codebook")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=cfg, dtype=torch.float32)
    with pytest.raises(ValueError, match="codebook_scale='row_block'"):
        hf_vq.export_encodings(model, tmp_path)


# ------------------------------------------------------------------------------------------ codebook fine-tuning
@pytest.mark.parametrize("kw", [dict(), dict(data_normalization=True, codebook_bits=16)])
def test_codebook_finetune_lowers_block_error(tiny_llama, kw):
    from transformers import AutoModelForCausalLM

    from hf_vq.algorithms.gptvq import gptvq_quantize
    from hf_vq.pipeline.vq_finetune import VQCodebookLinear, finetune_vq_block
    from hf_vq.pipeline.blocks import _run_block, capture_block_inputs

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    block = model.model.layers[0]
    cache = capture_block_inputs(model, block, _calib(), 4, contextlib.nullcontext)
    with torch.no_grad():
        targets = [_run_block(block, h, kw_) for h, kw_ in cache]
    local = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    results = {}
    for n, lin in local.items():
        h = torch.eye(lin.in_features) + 0.1
        results[n] = gptvq_quantize(lin.weight.data, h, vector_dim=2, index_bits=3, rows_per_block=32,
                                    cols_per_block=32, kmeans_iterations=5, **kw)
        assert torch.equal(VQCodebookLinear(lin, results[n]).weight().detach(), results[n].dequantize())

    def block_mse(res):
        saved = {n: local[n].weight.data.clone() for n in res}
        for n, vq in res.items():
            local[n].weight.data.copy_(vq.dequantize())
        with torch.no_grad():
            err = sum(float(torch.nn.functional.mse_loss(_run_block(block, h, kw_), t))
                      for (h, kw_), t in zip(cache, targets))
        for n, w in saved.items():
            local[n].weight.data.copy_(w)
        return err

    new, first, last = finetune_vq_block(block, local, results, [h for h, _ in cache], [k for _, k in cache], targets,
                                         iterations=100, lr=1e-2, codebook_scale="row_block",
                                         generator=torch.Generator().manual_seed(0), progress=False)
    assert all(isinstance(block.get_submodule(n), torch.nn.Linear) for n in local)  # originals back in place
    assert last < first
    assert block_mse(new) < 0.95 * block_mse(results)  # measured 0.83 / 0.88
    for n in local:  # indices untouched, only codebooks moved; storage size unchanged
        assert torch.equal(new[n].tensors["vq_indices"], results[n].tensors["vq_indices"])
        assert new[n].layout == results[n].layout
        assert {k: v.shape for k, v in new[n].tensors.items()} == {k: v.shape for k, v in results[n].tensors.items()}
