"""Saved checkpoints with wrong records, dtypes or values are refused at load with an error naming the layer and the
field; transformers' key renaming is applied when matching tensors; optional checksums catch in-range bit flips."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_vq
from hf_vq.model.checkpoint import CHECKSUM_KEY
from hf_vq.nn.qat import QATLinear, QuantSimLinear
from hf_vq.nn.records import CheckpointError
from hf_vq.nn.vqlinear import VQLinear
from hf_vq.formats.vq import VQLayout

LAYER = "model.layers.0.mlp.up_proj"


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def saved(tiny_llama_dir, tmp_path_factory):
    """A tiny Llama quantized with RTN 4-bit g32, saved with and without checksums."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=hf_vq.RTNConfig(bits=4,
                                                                                                   group_size=32))
    plain = tmp_path_factory.mktemp("rtn_plain")
    model.save_pretrained(plain)
    summed = tmp_path_factory.mktemp("rtn_checksums")
    model.hf_quantizer.save_checksums = True
    model.save_pretrained(summed)
    model.hf_quantizer.save_checksums = False
    return model, plain, summed


def copy_of(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def edit_record(d, edit):
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg))


def edit_tensors(d, edit):
    f = d / "model.safetensors"
    with safe_open(str(f), "pt") as sf:
        meta = sf.metadata()
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata=meta)


def _set(field, value):
    def edit(qc):
        qc["layers"][LAYER][field] = value
    return edit


def _delete(field):
    def edit(qc):
        del qc["layers"][LAYER][field]
    return edit


def _replace_record(value):
    def edit(qc):
        qc["layers"][LAYER] = value
    return edit


def _top(field, value):
    def edit(qc):
        qc[field] = value
    return edit


# (edit of quantization_config, regex the error must match): each names the layer (or the field) and what is wrong
RECORD_CASES = {
    "bits is a string": (_set("bits", "4"), rf"{LAYER}.*\.bits: expected an integer, got a string '4'"),
    "bits is a float": (_set("bits", 4.0), rf"{LAYER}.*\.bits: expected an integer, got a number 4\.0"),
    "bits is a bool": (_set("bits", True), rf"{LAYER}.*\.bits: expected an integer, got a boolean"),
    "bits out of range": (_set("bits", 9), rf"{LAYER}.*\.bits: expected an integer in \[2, 8\]"),
    "group_size 0": (_set("group_size", 0), rf"{LAYER}.*\.group_size: expected an integer in \[1, inf\] \(or -1\)"),
    "in_features 0": (_set("in_features", 0), rf"{LAYER}.*\.in_features: expected an integer in \[1, inf\]"),
    "sym is a string": (_set("sym", "no"), rf"{LAYER}.*\.sym: expected a boolean, got a string 'no'"),
    "missing field": (_delete("sym"), rf"{LAYER}.*\.sym: missing \(required\)"),
    "unknown field": (_set("scale_bits", 8), rf"{LAYER}.*unknown fields \['scale_bits'\]"),
    "unknown type": (_set("type", "sparse"), rf"{LAYER}.*\.type: unknown quantized layer type 'sparse'"),
    # the config schema (hf_vq.config) already refuses these two when the config is built
    "record is a list": (_replace_record([4, 32]), rf"layers\['{LAYER}'\].*(must be a dict|expected an object)"),
    "layers is a list": (_top("layers", [LAYER]), r"layers.*(must be a dict|expected an object)"),
    "format_version string": (_top("format_version", "2"), r"format_version"),
    "format_version newer": (_top("format_version", 2), r"format_version 2 is newer than this hf_vq supports"),
}


@pytest.mark.parametrize("case", list(RECORD_CASES))
def test_malformed_layer_record_gives_a_clear_error(saved, tmp_path, case):
    edit, pattern = RECORD_CASES[case]
    d = copy_of(saved[1], tmp_path)
    edit_record(d, edit)
    with pytest.raises(ValueError, match=pattern):
        AutoModelForCausalLM.from_pretrained(d)


def _cast(name, dtype):
    def edit(t):
        t[name] = t[name].to(dtype)
    return edit


def _fill(name, index, value):
    def edit(t):
        t[name] = t[name].clone()
        t[name].view(-1)[index] = value
    return edit


TENSOR_CASES = {
    "float32 qweight": (_cast(f"{LAYER}.qweight", torch.float32),
                        rf"{LAYER}\.qweight: stored as F32, expected U8 \(not cast\)"),
    "float32 scales": (_cast(f"{LAYER}.scales", torch.float32), rf"{LAYER}\.scales: stored as F32, expected F16"),
    "int64 g_idx": (_cast(f"{LAYER}.g_idx", torch.int64), rf"{LAYER}\.g_idx: stored as I64, expected I32"),
    "inf scale": (_fill(f"{LAYER}.scales", 3, float("inf")), rf"{LAYER}\.scales: must be finite and > 0"),
    "nan scale": (_fill(f"{LAYER}.scales", 0, float("nan")), rf"{LAYER}\.scales: must be finite and > 0"),
    "zero scale": (_fill(f"{LAYER}.scales", 5, 0.0), rf"{LAYER}\.scales: must be finite and > 0"),
    "negative scale": (_fill(f"{LAYER}.scales", 1, -0.01), rf"{LAYER}\.scales: must be finite and > 0"),
    "zero-point outside the 4-bit grid": (_fill(f"{LAYER}.qzeros", 2, 16),
                                          rf"{LAYER}\.qzeros: values must lie in \[0, 15\]"),
    "g_idx past the last group": (_fill(f"{LAYER}.g_idx", 7, 3), rf"{LAYER}\.g_idx: values must lie in \[0, 2\]"),
    "negative g_idx": (_fill(f"{LAYER}.g_idx", 0, -1), rf"{LAYER}\.g_idx: values must lie in \[0, 2\]"),
}


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_wrong_tensor_dtype_or_value_is_refused_at_load(saved, tmp_path, case):
    edit, pattern = TENSOR_CASES[case]
    d = copy_of(saved[1], tmp_path)
    edit_tensors(d, edit)
    with pytest.raises(ValueError, match=pattern):
        AutoModelForCausalLM.from_pretrained(d)


def test_in_range_bit_flip_loads_without_checksum_and_is_caught_with_one(saved, tmp_path, calib_ids):
    model, plain, summed = saved

    def flip(t):
        t[f"{LAYER}.qweight"] = t[f"{LAYER}.qweight"].clone()
        t[f"{LAYER}.qweight"][0, 0] ^= 1  # one code changes by 1: still a valid 4-bit code

    d = copy_of(plain, tmp_path / "plain")
    edit_tensors(d, flip)
    flipped = AutoModelForCausalLM.from_pretrained(d)  # undetectable without a checksum (documented)
    assert not torch.equal(logits(flipped, calib_ids[:1]), logits(model, calib_ids[:1]))

    d = copy_of(summed, tmp_path / "summed")
    edit_tensors(d, flip)
    with pytest.raises(ValueError, match=rf"checksum mismatch for 1 quantized tensors \(first: {LAYER}\.qweight\)"):
        AutoModelForCausalLM.from_pretrained(d)


def test_checksums_are_written_verified_and_kept(saved, tmp_path, calib_ids):
    model, plain, summed = saved
    with safe_open(str(summed / "model.safetensors"), "pt") as sf:
        sums = json.loads(sf.metadata()[CHECKSUM_KEY])
    assert len(sums) == 4 * len(model.config.quantization_config.layers)  # qweight, scales, qzeros, g_idx
    with safe_open(str(plain / "model.safetensors"), "pt") as sf:
        assert CHECKSUM_KEY not in (sf.metadata() or {})
    again = AutoModelForCausalLM.from_pretrained(summed)
    assert torch.equal(logits(again, calib_ids[:2]), logits(model, calib_ids[:2]))
    again.save_pretrained(tmp_path / "resaved")  # a verified checkpoint keeps its checksums
    with safe_open(str(tmp_path / "resaved" / "model.safetensors"), "pt") as sf:
        assert json.loads(sf.metadata()[CHECKSUM_KEY]) == sums


def test_malformed_checksum_metadata_is_an_error(saved, tmp_path):
    d = copy_of(saved[2], tmp_path)
    f = d / "model.safetensors"
    save_file(load_file(f), f, metadata={"format": "pt", CHECKSUM_KEY: json.dumps({f"{LAYER}.qweight": "zz"})})
    with pytest.raises(ValueError, match="must map tensor names to sha256 hex digests"):
        AutoModelForCausalLM.from_pretrained(d)


# ----------------------------------------------------------------------------- transformers' key renaming
def _tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=128)
    return MixtralForCausalLM(cfg), AutoModelForCausalLM, "block_sparse_moe"


def _tiny_gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    cfg = Gemma3Config(text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        max_position_embeddings=128, sliding_window=16),
                       vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=32, patch_size=8),
                       mm_tokens_per_image=4, image_token_index=127, boi_token_index=125, eoi_token_index=126)
    return Gemma3ForConditionalGeneration(cfg), Gemma3ForConditionalGeneration, "language_model.model."


@pytest.mark.parametrize("build", [_tiny_mixtral, _tiny_gemma3], ids=["mixtral", "gemma3"])
def test_checkpoint_keys_renamed_by_transformers_reload_exactly(build, tmp_path):
    torch.manual_seed(0)
    fp, auto, saved_marker = build()
    fp.save_pretrained(tmp_path / "fp")
    q = auto.from_pretrained(tmp_path / "fp", quantization_config=hf_vq.RTNConfig(bits=4, group_size=32))
    q.save_pretrained(tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as sf:
        keys = list(sf.keys())
    layers = q.config.quantization_config.layers
    renamed = [n for n in layers if f"{n}.qweight" not in keys and f"{n}.gate_up_qweight" not in keys]
    # the test exercises the renaming: some quantized tensors are saved under names that are not module names
    assert renamed and any(saved_marker in k and k.endswith("qweight") for k in keys)
    again = auto.from_pretrained(tmp_path / "q")
    ids = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(again, ids), logits(q, ids))

    # a wrong tensor under a renamed key is still refused, naming both the module key and the saved key
    target = next(k for k in keys if saved_marker in k and k.endswith("scales"))
    f = tmp_path / "q" / "model.safetensors"
    tensors = load_file(f)
    tensors[target] = tensors[target].float()
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"saved as {target}\): stored as F32, expected F16"):
        auto.from_pretrained(tmp_path / "q")


# ----------------------------------------------------------------------------- load_state_dict paths
def test_load_state_dict_refuses_cast_and_out_of_range(saved):
    model = saved[0]
    mod = model.get_submodule(LAYER)
    good = {k: v.clone() for k, v in mod.state_dict().items()}
    for key, value, pattern in [("qweight", good["qweight"].float(), "stored as torch.float32, expected torch.uint8"),
                                ("g_idx", torch.full_like(good["g_idx"], 3), r"g_idx: values must lie in \[0, 2\]"),
                                ("scales", torch.full_like(good["scales"], float("inf")), "scales: must be finite")]:
        with pytest.raises(CheckpointError, match=pattern):
            mod.load_state_dict({**good, key: value})
        assert all(torch.equal(mod.state_dict()[k], good[k]) for k in good)  # nothing was changed


def test_qat_resume_from_folded_tensors_refuses_bad_ones():
    torch.manual_seed(0)
    qat = QATLinear(torch.randn(16, 32), None, 4, "blockwise", 16)
    folded = qat.fold().state_dict()
    latent = qat.latent.detach().clone()
    bad = {**folded, "qzeros": folded["qzeros"].float()}
    with pytest.raises(CheckpointError, match="qzeros: stored as torch.float32"):
        qat.load_state_dict(bad, strict=False)
    assert torch.equal(qat.latent, latent)
    qat.load_state_dict(folded, strict=False)  # the good folded form still loads
    assert torch.equal(qat.fold().qweight, QuantSimLinear.from_affine(qat.affine_weight(), None).qweight)


def test_vq_tensors_checked():
    lay = VQLayout(8, 16, 2, 4, 8, 8, 16, normalize=True)
    mod = VQLinear(lay, bias=False)
    good = {k: v.clone() for k, v in mod.state_dict().items()}
    good["vq_codebook_scales"] = torch.tensor([0.01], dtype=torch.float16).view(torch.int16).expand(
        good["vq_codebook_scales"].shape).clone()
    good["vq_norm_base"] = torch.tensor([0.5]).view(torch.int32)
    mod.load_state_dict(good)
    for key, value, pattern in [
            ("vq_codebook_scales", torch.full_like(good["vq_codebook_scales"], 0x7C00),  # fp16 inf
             "vq_codebook_scales: must be finite"),
            ("vq_norm_base", torch.tensor([float("nan")]).view(torch.int32), "vq_norm_base: must be finite"),
            ("vq_indices", good["vq_indices"].to(torch.int32), "vq_indices: stored as torch.int32")]:
        with pytest.raises(CheckpointError, match=pattern):
            mod.load_state_dict({**good, key: value})
