"""export_checkpoint: compressed-tensors, GPTQ and GGUF folders, each read back by a reader that is not hf_vq
(transformers' compressed-tensors and GGUF loaders in a process that never imports hf_vq; compressed-tensors'
own unpacking for the GPTQ bit layout; gguf-py's reader for the GGUF block types)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import hf_vq
from hf_vq.export.checkpoint import ExportError
from tests.conftest import random_text

READER = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
kwargs = json.loads(sys.argv[3])
if kwargs.pop("ct_dequantize", False):
    from transformers import CompressedTensorsConfig
    kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], **kwargs)
assert not any(m.startswith("hf_vq") for m in sys.modules), "the reader must not import hf_vq"
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    print(json.dumps(model(ids).logits.float().tolist()))
"""


def read_logits(path, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Logits of the exported folder, computed by transformers in a fresh process without hf_vq."""
    proc = subprocess.run([sys.executable, "-c", READER, str(path), json.dumps(ids.tolist()), json.dumps(kwargs)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))


def quantize(path, config):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.usefixtures("exact_kernels")
@pytest.mark.parametrize("bits,group_size,sym", [(4, 64, True), (8, -1, True), (4, 32, False), (3, 64, False)])
def test_compressed_tensors_read_by_transformers(tiny_llama_dir, ids, tmp_path, bits, group_size, sym):
    model = quantize(tiny_llama_dir, hf_vq.RTNConfig(bits=bits, group_size=group_size, sym=sym))
    with torch.no_grad():
        expected = model(ids).logits
    report = hf_vq.export_checkpoint(model, tmp_path / "ct", "compressed-tensors")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    weights = [g["weights"] for g in qc["config_groups"].values()]
    assert {(w["num_bits"], w["symmetric"]) for w in weights} == {(bits, sym)}
    assert "lm_head" in qc["ignore"]
    if group_size == 64:   # 96 and 160 columns: the partial groups are written as group 32, scales repeated
        assert {w["group_size"] for w in weights} == {32}
        assert any("written as group 32" in n for n in report.notes)
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.0.mlp.down_proj.weight_packed").get_dtype() == "I32"
    assert ("model.layers.0.mlp.down_proj.weight_zero_point" in keys) == (not sym)
    # transformers 5.24 + compressed-tensors 0.20 size weight_zero_point unpacked on their default (compressed) path,
    # so asymmetric checkpoints (ours and llm-compressor's alike) load through the dequantize path
    got = read_logits(tmp_path / "ct", ids, **({} if sym else {"ct_dequantize": True}))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_gptq_layout_matches_compressed_tensors_packing(tiny_llama_dir, tmp_path):
    """GPTQ qweight is compressed-tensors' dense int32 stream transposed; qzeros hold zero - 1 (v1 convention)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    model = quantize(tiny_llama_dir, hf_vq.RTNConfig(bits=4, group_size=32, sym=False))
    hf_vq.export_checkpoint(model, tmp_path / "gptq", "gptq")
    qc = json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())
    assert qc == json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"]) == ("gptq", 4, 32)
    assert (qc["desc_act"], qc["sym"]) == (False, False)
    assert qc["checkpoint_format"] == "gptq"
    layer = model.model.layers[1].mlp.up_proj       # 96 -> 160
    with safe_open(str(tmp_path / "gptq" / "model.safetensors"), "pt") as f:
        qweight = f.get_tensor("model.layers.1.mlp.up_proj.qweight")
        qzeros = f.get_tensor("model.layers.1.mlp.up_proj.qzeros")
        scales = f.get_tensor("model.layers.1.mlp.up_proj.scales")
        g_idx = f.get_tensor("model.layers.1.mlp.up_proj.g_idx")
    assert (qweight.dtype, tuple(qweight.shape)) == (torch.int32, (96 * 4 // 32, 160))
    assert (qzeros.dtype, tuple(qzeros.shape)) == (torch.int32, (3, 160 * 4 // 32))
    assert (scales.dtype, tuple(scales.shape)) == (torch.float16, (3, 160))
    assert torch.equal(g_idx, torch.arange(96, dtype=torch.int32) // 32)
    # compressed-tensors unpacks signed values (stored code - 8)
    codes = unpack_from_int32(qweight.t().contiguous(), 4, torch.Size([160, 96])).to(torch.int16) + 8
    zeros = unpack_from_int32(qzeros, 4, torch.Size([3, 160])).to(torch.int16) + 8 + 1
    assert torch.equal(codes, layer.codes().to(torch.int16))
    assert torch.equal(zeros.t(), layer.qzeros.to(torch.int16))
    assert torch.equal(scales.t(), layer.scales)


def test_gptq_refuses_what_v1_cannot_hold(tiny_llama_dir, tmp_path):
    model = quantize(tiny_llama_dir, hf_vq.RTNConfig(bits=4, group_size=32, sym=False))
    layer = model.model.layers[0].self_attn.q_proj
    layer.qzeros[0, 0] = 0
    with pytest.raises(ExportError, match=r"model.layers.0.self_attn.q_proj: a zero point of 0"):
        hf_vq.export_checkpoint(model, tmp_path / "gptq", "gptq")
    assert not (tmp_path / "gptq").exists() and list(tmp_path.iterdir()) == []   # no folder, no temp left


def test_gptvq_model_refused_by_every_format(tiny_llama_dir, calib_ids, tmp_path):
    cfg = hf_vq.GPTVQConfig(vector_dim=2, index_bits=4, rows_per_block=16, cols_per_block=32, kmeans_iterations=3,
                            dataset=calib_ids, num_samples=4, seq_len=32)
    model = quantize(tiny_llama_dir, cfg)
    for fmt in ("compressed-tensors", "gptq", "gguf"):
        with pytest.raises(ExportError, match=r"model\.layers\.0\.self_attn\.q_proj: a vector-quantized \(GPTVQ\)"):
            hf_vq.export_checkpoint(model, tmp_path / fmt, fmt)


def test_existing_folder_kept_unless_overwrite(tiny_llama_dir, tmp_path):
    model = quantize(tiny_llama_dir, hf_vq.RTNConfig(bits=4, group_size=32, sym=True))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError):
        hf_vq.export_checkpoint(model, out, "compressed-tensors")
    assert (out / "keep.txt").read_text() == "old"
    hf_vq.export_checkpoint(model, out, "compressed-tensors", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------------------------------- GGUF
@pytest.fixture(scope="module")
def bpe_llama_dir(tmp_path_factory):
    """A tiny random Llama with a byte-level BPE tokenizer (what GGUF's gpt2 tokenizer model expects)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([random_text(2000, seed=s) for s in range(4)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
    d = tmp_path_factory.mktemp("bpe_llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    fast.save_pretrained(d)
    return d


@pytest.mark.usefixtures("exact_kernels")
@pytest.mark.parametrize("bits,group_size,sym,kind", [(4, 32, True, "Q4_0"), (4, 64, False, "Q4_1"),
                                                      (8, 32, True, "Q8_0")])
def test_gguf_read_by_gguf_py_and_transformers(bpe_llama_dir, tmp_path, bits, group_size, sym, kind):
    import gguf

    model = quantize(bpe_llama_dir, hf_vq.RTNConfig(bits=bits, group_size=group_size, sym=sym))
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    report = hf_vq.export_checkpoint(model, tmp_path / "g", "gguf", dtype="float32")
    reader = gguf.GGUFReader(str(tmp_path / "g" / "model.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == kind and types["blk.1.ffn_down.weight"] == kind
    assert types["token_embd.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types                        # tied: llama.cpp reuses token_embd
    if kind == "Q4_1":
        assert any("Q4_1 offsets rounded" in n for n in report.notes)
    # transformers' GGUF loader un-permutes q/k and dequantizes the blocks: same logits as the hf_vq model
    got = read_logits(tmp_path / "g", ids, gguf_file="model.gguf", dtype="float32")
    tol = 1e-4 if kind != "Q4_1" else 5e-3                      # Q4_1's m is fp16(-zero * scale)
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)


def test_gguf_requantize_only_when_asked(bpe_llama_dir, tmp_path):
    model = quantize(bpe_llama_dir, hf_vq.RTNConfig(bits=3, group_size=32, sym=True))
    with pytest.raises(ExportError, match=r"model\.layers\.0\.self_attn\.q_proj: 3-bit sym has no exact"):
        hf_vq.export_checkpoint(model, tmp_path / "g", "gguf")
    report = hf_vq.export_checkpoint(model, tmp_path / "g", "gguf", requantize=True)
    assert len(report.requantized) == 14
    assert all(0 < e < 0.2 for e in report.requantized.values())   # RTN Q4_0 of a 3-bit grid: a small change
    assert "Re-quantized layers" in (tmp_path / "g" / "README.md").read_text()


def test_cli_export(tiny_llama_dir, tmp_path):
    model = quantize(tiny_llama_dir, hf_vq.RTNConfig(bits=4, group_size=32, sym=True))
    model.save_pretrained(tmp_path / "q")
    proc = subprocess.run([sys.executable, "-m", "hf_vq.cli", "export", str(tmp_path / "q"), "--format",
                           "compressed-tensors", "--out", str(tmp_path / "ct")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["layers"] == 14 and "model.safetensors" in report["files"]
    assert Path(tmp_path / "ct" / "README.md").read_text().count("compressed-tensors") >= 1


def test_gptq_bytes_equal_a_gptqmodel_checkpoint(tmp_path):
    """Two layers of a checkpoint written by GPTQModel 7.6.0 (benchmarks/gptq_reader.py make-ref): their codes,
    decoded by compressed-tensors' unpacker, re-exported by hf_vq give byte-identical qweight/qzeros/scales/g_idx."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    from hf_vq.formats.affine import AffineWeight
    from hf_vq.nn.registry import module_from_format
    from hf_vq.utils.modules import set_module

    ref = load_file(str(Path(__file__).with_name("data") / "gptqmodel_4bit_g32_layers.safetensors"))
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, head_dim=32,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg)
    names = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")
    for name in names:
        qweight, qzeros = ref[f"{name}.qweight"], ref[f"{name}.qzeros"]
        out, k = qweight.shape[1], qweight.shape[0] * 8
        codes = unpack_from_int32(qweight.t().contiguous(), 4, torch.Size([out, k])).to(torch.int16) + 8
        zeros = unpack_from_int32(qzeros, 4, torch.Size([qzeros.shape[0], out])).to(torch.int16) + 8 + 1
        aw = AffineWeight(codes, ref[f"{name}.scales"].t(), zeros.t(), ref[f"{name}.g_idx"], 4, 32, True)
        set_module(model, name, module_from_format(aw, None))
    hf_vq.export_checkpoint(model, tmp_path / "gptq", "gptq")
    qc = json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (4, 32, True, False)
    with safe_open(str(tmp_path / "gptq" / "model.safetensors"), "pt") as f:
        for name in names:
            for key in ("qweight", "qzeros", "scales", "g_idx"):
                mine = f.get_tensor(f"{name}.{key}")
                assert mine.dtype == ref[f"{name}.{key}"].dtype
                assert torch.equal(mine, ref[f"{name}.{key}"]), f"{name}.{key}"
