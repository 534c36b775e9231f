"""hf-vq commands run end to end on the tiny random Llama of tests/conftest.py: quantize with every method, a disk
offload + resume run, ``info`` against what the architecture says, ``eval`` and ``export``."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_vq
from hf_vq import cli
from tests.conftest import random_text
from tests.test_export_checkpoint import bpe_llama_dir  # noqa: F401  (a tiny Llama with a tokenizer GGUF can write)

ROOT = Path(__file__).resolve().parents[1]
# (out_features, in_features) of each Linear of a block of the tiny Llama: hidden 96, 4 heads of 24, 2 KV heads,
# intermediate 160
SHAPES = {"self_attn.q_proj": (96, 96), "self_attn.k_proj": (48, 96), "self_attn.v_proj": (48, 96),
          "self_attn.o_proj": (96, 96), "mlp.gate_proj": (160, 96), "mlp.up_proj": (160, 96),
          "mlp.down_proj": (96, 160)}
BLOCKS = 2


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir, tiny_tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_model") / "tiny"
    shutil.copytree(tiny_llama_dir, d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_calib") / "calib.txt"
    path.write_text(random_text(3000, seed=5))
    return path


def run(capsys, *argv) -> dict:
    rc = cli.main([*map(str, argv)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    if argv[0] == "info":  # indented JSON
        return json.loads(captured.out)
    return json.loads(captured.out.strip().splitlines()[-1])


def stored(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved checkpoint, read with safetensors."""
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            tensors.update({k: sf.get_tensor(k) for k in sf.keys()})
    return tensors


def test_rtn_with_overrides_auto_offload_and_info(model_dir, tmp_path, capsys):
    out, offload = tmp_path / "rtn", tmp_path / "offload"
    printed = run(capsys, "quantize", model_dir, "--out", out, "--method", "rtn", "--bits", "4", "--group-size", "32",
                  "--sym", "--override", "down_proj:bits=8,group_size=-1", "--override", r"layers\.1\.self_attn\.q_proj:skip=true",
                  "--skip", "model.layers.0.self_attn.k_proj", "--skip", "lm_head", "--device-map", "auto",
                  "--max-memory", "cpu=300KB", "--offload-folder", offload, "--max-shard-size", "100KB")
    assert printed["layers"] == BLOCKS * len(SHAPES) - 2
    assert list((offload / "hf_vq_quantized").glob("*.safetensors"))  # the memory limit sent blocks to disk
    assert len(list(out.glob("*.safetensors"))) > 1  # sharded at 100KB

    info = run(capsys, "info", out, "--json")
    assert info["method"] == "rtn" and info["quantized_layers"] == BLOCKS * len(SHAPES) - 2
    assert info["quantized_by_type"] == {"affine": BLOCKS * len(SHAPES) - 2}
    reasons = info["float"]
    assert set(reasons) == {"lm_head", "model.embed_tokens", "model.layers.0.self_attn.k_proj",
                            "model.layers.1.self_attn.q_proj"}
    assert "output head" in reasons["lm_head"] and reasons["model.embed_tokens"] == "embedding"
    assert "modules_to_not_convert" in reasons["model.layers.0.self_attn.k_proj"]
    assert "module_overrides" in reasons["model.layers.1.self_attn.q_proj"]
    tensors = stored(out)
    total_bits = total_weights = 0
    for name, rec in info["layers"].items():
        rows, cols = SHAPES[name.split(".", 3)[3]]
        assert rec["weights"] == rows * cols
        nbytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(name + ".")
                     and not k.endswith(".bias"))
        assert rec["bits_per_weight"] == pytest.approx(8 * nbytes / (rows * cols), rel=1e-12)
        want = (8, -1) if name.endswith("down_proj") else (4, 32)
        assert (rec["bits"], rec["group_size"], rec["sym"]) == (*want, True)
        total_bits += 8 * nbytes
        total_weights += rows * cols
    assert info["bits_per_weight"] == pytest.approx(total_bits / total_weights, rel=1e-12)
    assert info["size_on_disk_bytes"] == sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert info["safetensors_bytes"] == sum(f.stat().st_size for f in out.glob("*.safetensors"))

    rc = cli.main(["info", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "method: rtn" in text and f"quantized layers: {BLOCKS * len(SHAPES) - 2}" in text
    assert f"bits per weight of the quantized layers: {info['bits_per_weight']:.3f}" in text
    assert "model.layers.0.self_attn.k_proj" in text and "embedding: model.embed_tokens" in text

    # the offloaded run gives the in-memory quantization of the same config
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=hf_vq.RTNConfig(
        bits=4, group_size=32, sym=True, modules_to_not_convert=["model.layers.0.self_attn.k_proj", "lm_head"],
        module_overrides={"down_proj": {"bits": 8, "group_size": -1}, r"layers\.1\.self_attn\.q_proj": {"skip": True}}))
    want = {k: v for k, v in ref.state_dict().items() if k.endswith(("qweight", "scales", "qzeros"))}
    assert want and all(torch.equal(tensors[k], v) for k, v in want.items())


def test_info_refuses_what_is_not_an_hf_vq_checkpoint(model_dir, tmp_path, capsys):
    for path, match in ((model_dir, "not an hf_vq checkpoint"), (tmp_path, "no config.json here")):
        rc = cli.main(["info", str(path)])
        err = capsys.readouterr().err
        assert rc == 2 and match in err and "Traceback" not in err


def test_offload_and_resume_give_the_in_memory_codes(model_dir, calib, tmp_path, capsys):
    """GPTQ with block 1 on disk and a resume folder: interrupted (Ctrl-C) once block 0 is stored, the same command
    resumes after it (block 0 is not run again) and saves the codes of an uninterrupted in-memory run configured by
    --config."""
    resume, offload = tmp_path / "resume", tmp_path / "offload"
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  "model.layers.0": "cpu", "model.layers.1": "disk"}
    fields = ["--group-size", "32", "--dataset", str(calib), "--num-samples", "4", "--seq-len", "32",
              "--batch-size", "2"]
    argv = ["quantize", str(model_dir), "--out", str(tmp_path / "resumed"), "--method", "gptq", *fields,
            "--device-map", json.dumps(device_map), "--offload-folder", str(offload), "--quantization-device", "cpu",
            "--resume-dir", str(resume)]

    def interrupt(module, args):  # when block 1 starts calibrating: block 0 is finished
        if type(module).__name__ == "LlamaDecoderLayer" and module.self_attn.layer_idx == 1:
            raise KeyboardInterrupt
    handle = register_module_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            cli.main(argv)
    finally:
        handle.remove()
    assert json.loads((resume / "progress.json").read_text())["finished"] == 0
    assert not (tmp_path / "resumed").exists()

    calls = [0] * BLOCKS
    def count(module, args, output):
        if type(module).__name__ == "LlamaDecoderLayer":
            calls[module.self_attn.layer_idx] += 1
    handle = register_module_forward_hook(count)
    try:
        printed = run(capsys, *argv)
    finally:
        handle.remove()
    assert calls[0] == 0 and calls[1] > 0  # block 0 came from the resume folder
    assert printed["resumed_blocks"] == 1 and not resume.exists()
    assert (offload / "hf_vq_quantized" / "model.layers.1.mlp.down_proj.safetensors").is_file()

    config = tmp_path / "gptq.json"
    config.write_text(json.dumps({"method": "gptq", "group_size": 32, "dataset": str(calib), "num_samples": 4,
                                  "seq_len": 32, "calibration_batch_size": 2}))
    run(capsys, "quantize", model_dir, "--out", tmp_path / "in_memory", "--config", config)
    got, want = stored(tmp_path / "resumed"), stored(tmp_path / "in_memory")
    codes = [k for k in want if k.endswith(("qweight", "scales", "qzeros", "g_idx"))]
    assert len(codes) == 4 * BLOCKS * len(SHAPES)
    assert all(torch.equal(got[k], want[k]) for k in codes)


@pytest.mark.parametrize("argv, check", [
    (["--method", "gptvq", "--vector-dim", "2", "--index-bits", "4", "--rows-per-block", "16", "--cols-per-block",
      "32", "--kmeans-iterations", "2", "--finetune-iterations", "1"],
     lambda qc: qc["index_bits"] == 4 and qc["finetune_iterations"] == 1 and
     qc["layers"]["model.layers.0.mlp.up_proj"]["type"] == "vq"),
    (["--method", "adascale", "--group-size", "32", "--init", "rtn", "--num-iterations", "2", "--train-batch-size",
      "2", "--train-dtype", "float32", "--no-compile"],
     lambda qc: qc["num_iterations"] == 2 and qc["init"] == "rtn" and qc["batch_size"] == 2),
    (["--method", "quantsim", "--weight-bits", "4", "--weight-granularity", "blockwise", "--block-size", "32",
      "--activation-bits", "8", "--quant-scheme", "percentile", "--percentile", "99.9", "--no-quantize-outputs",
      "--batch-size", "2"],
     lambda qc: qc["weight_bits"] == 4 and qc["activation_bits"] == 8 and qc["quantize_outputs"] is False and
     qc["layers"]["model.layers.0.mlp.up_proj"]["type"].startswith("quantsim")),
], ids=["gptvq", "adascale", "quantsim"])
def test_every_method_runs(argv, check, model_dir, calib, tmp_path, capsys):
    out = tmp_path / "q"
    printed = run(capsys, "quantize", model_dir, "--out", out, "--dataset", calib, "--num-samples", "4",
                  "--seq-len", "32", "--seed", "1", *argv)
    assert printed["layers"] == BLOCKS * len(SHAPES)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["method"] == argv[1] and check(qc), qc
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(2, 30)[None]).logits).all()
    info = run(capsys, "info", out, "--json")
    assert info["method"] == argv[1] and info["quantized_layers"] == BLOCKS * len(SHAPES)


def test_moe_expert_calibration_and_info(calib, tiny_tokenizer, tmp_path, capsys):
    """Qwen2-MoE (2 blocks: 4 attention Linears, a 3-Linear shared expert, one fused experts module, two routers)."""
    from tests.arch_models import configs, save_tiny

    src = tmp_path / "moe"
    save_tiny("qwen2_moe", *configs()["qwen2_moe"], src)
    tiny_tokenizer.save_pretrained(src)
    out = tmp_path / "q"
    run(capsys, "quantize", src, "--out", out, "--method", "gptq", "--group-size", "32", "--dataset", calib,
        "--num-samples", "4", "--seq-len", "32", "--expert-calibration", "all", "--calibration-dtype", "bfloat16",
        "--first-token-weight", "4")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["expert_calibration"], qc["calibration_dtype"], qc["first_token_weight"]) == ("all", "bfloat16", 4.0)
    info = run(capsys, "info", out, "--json")
    assert info["quantized_by_type"] == {"affine": 2 * 7, "affine_experts": 2}
    routers = {f"model.layers.{i}.mlp.{r}" for i in range(2) for r in ("gate", "shared_expert_gate")}
    assert {n for n, why in info["float"].items() if why == "router"} == routers


def test_multimodal_quantize_vision_and_info(tiny_tokenizer, tmp_path, capsys):
    """Gemma3: 2 language blocks of 7 Linears; a 1-layer SigLIP vision tower (q, k, v, out_proj, fc1, fc2) and its
    pooling head (attention out_proj, fc1, fc2)."""
    from tests.arch_models import multimodal_gemma3

    cls, cfg = multimodal_gemma3()
    torch.manual_seed(0)
    cls(cfg).save_pretrained(tmp_path / "mm")
    tiny_tokenizer.save_pretrained(tmp_path / "mm")
    for extra, count in (([], 2 * 7), (["--quantize-vision"], 2 * 7 + 6 + 3)):
        out = tmp_path / f"q{count}"
        assert run(capsys, "quantize", tmp_path / "mm", "--out", out, "--method", "rtn", "--group-size", "16",
                   *extra)["layers"] == count
        info = run(capsys, "info", out, "--json")
        assert info["quantized_layers"] == count
        vision_float = [n for n in info["float"] if n.startswith("model.vision_tower.encoder")]
        assert len(vision_float) == (0 if extra else 6)


def test_eval_perplexity_and_output_file(model_dir, tmp_path, capsys):
    q = tmp_path / "q"
    run(capsys, "quantize", model_dir, "--out", q, "--method", "rtn", "--group-size", "32")
    text = tmp_path / "test.txt"
    text.write_text(random_text(800, seed=9))
    result = run(capsys, "eval", q, "--data", text, "--tokenizer", model_dir, "--seq-len", "64", "--max-tokens",
                 "512", "--max-windows", "5", "--dtype", "bfloat16", "--output", tmp_path / "r" / "ppl.json")
    assert json.loads((tmp_path / "r" / "ppl.json").read_text()) == result
    model = AutoModelForCausalLM.from_pretrained(q).to(torch.bfloat16)
    want = hf_vq.evaluate_perplexity(model, AutoTokenizer.from_pretrained(model_dir), text.read_text(), seq_len=64, max_tokens=512, max_windows=5)
    assert result["ppl"] == pytest.approx(want, rel=1e-4) and result["seq_len"] == 64


def test_export_flags(bpe_llama_dir, tmp_path, capsys):  # noqa: F811
    q = tmp_path / "q"
    run(capsys, "quantize", bpe_llama_dir, "--out", q, "--method", "rtn", "--group-size", "32", "--sym", "--override",
        "down_proj:bits=3")  # GGUF has no 3-bit grid of hf_vq's kind: --requantize rounds those layers onto one
    (tmp_path / "gguf").mkdir()
    report = json.loads(_export(capsys, q, "--format", "gguf", "--out", tmp_path / "gguf", "--requantize", "--dtype",
                                "float32", "--overwrite", "--gguf-pre-tokenizer", "smollm"))
    assert sorted(report["requantized"]) == [f"model.layers.{i}.mlp.down_proj" for i in range(BLOCKS)]
    from gguf import GGUFReader

    (path,) = (tmp_path / "gguf").glob("*.gguf")
    reader = GGUFReader(str(path))
    field = reader.fields["tokenizer.ggml.pre"]
    assert bytes(field.parts[field.data[0]]).decode() == "smollm"
    # the float embedding matrix in float32, as --dtype asks (GGUF's default is F16 matrices)
    assert {t.tensor_type.name for t in reader.tensors if t.name == "token_embd.weight"} == {"F32"}


def _export(capsys, *argv) -> str:
    rc = cli.main(["export", *map(str, argv)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    return captured.out[captured.out.index("{"):]


def test_eval_tasks_flags(model_dir, tmp_path, capsys, monkeypatch):
    """--tasks with a local task (tests/data/lm_eval, data paths relative to the repository root)."""
    q = tmp_path / "q"
    run(capsys, "quantize", model_dir, "--out", q, "--method", "rtn", "--group-size", "32")
    monkeypatch.chdir(ROOT)
    out = tmp_path / "tasks.json"
    result = run(capsys, "eval", q, "--tasks", "hf_vq_tiny_choice", "--include-path", "tests/data/lm_eval",
                 "--limit", "3", "--num-fewshot", "1", "--batch-size", "2", "--output", out)
    metrics = result["results"]["hf_vq_tiny_choice"]
    assert metrics["sample_len"] == 3 and 0 <= metrics["acc,none"] <= 1
    full = json.loads(out.read_text())
    assert full["results"] == result["results"] and full["n-shot"]["hf_vq_tiny_choice"] == 1


def test_eval_tasks_without_lm_eval(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not importable, as when the package is not installed
    rc = cli.main(["eval", str(tmp_path), "--tasks", "arc_easy"])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'hf_vq[eval]'" in err and "Traceback" not in err
