"""Every example script runs end to end on a tiny random Llama with a real tokenizer and text files."""

import json

import pytest

from examples import export_encodings, lora_finetune, qat_trainer, quantize_at_load
from tests.conftest import random_text


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_llama_dir, tiny_tokenizer):
    import shutil

    d = tmp_path_factory.mktemp("examples")
    model = d / "model"
    shutil.copytree(tiny_llama_dir, model)
    tiny_tokenizer.save_pretrained(model)
    (d / "calib.txt").write_text(random_text(3000, seed=5))
    (d / "test.txt").write_text(random_text(1000, seed=6))
    return d


@pytest.mark.parametrize("method", ["rtn", "gptq", "gptvq", "adascale", "quantsim"])
def test_quantize_at_load_example(workspace, method):
    out = workspace / f"q-{method}"
    r = quantize_at_load.main(["--model", str(workspace / "model"), "--method", method,
                               "--dataset", str(workspace / "calib.txt"), "--eval", str(workspace / "test.txt"),
                               "--out", str(out)])
    assert r["ppl"] == pytest.approx(r["reload_ppl"], rel=1e-6)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["method"] == method


def test_export_encodings_example(workspace):
    q = workspace / "q-enc"
    quantize_at_load.main(["--model", str(workspace / "model"), "--method", "gptq", "--dataset",
                           str(workspace / "calib.txt"), "--eval", str(workspace / "test.txt"), "--out", str(q)])
    r = export_encodings.main(["--model", str(q), "--out", str(workspace / "enc"), "--onnx"])
    doc = json.loads(open(r["encodings"]).read())
    assert doc["version"] == "1.0.0" and len(doc["param_encodings"]) == 14
    assert r["onnx"].endswith(".onnx")


def test_qat_trainer_example(workspace):
    r = qat_trainer.main(["--model", str(workspace / "model"), "--data", str(workspace / "calib.txt"),
                          "--out", str(workspace / "qat"), "--steps", "10"])
    assert r["ppl_after"] < r["ppl_before"]  # training on the same text lowers its perplexity
    assert r["reload_ppl"] == pytest.approx(r["ppl_after"], rel=1e-5)


def test_lora_finetune_example(workspace):
    r = lora_finetune.main(["--model", str(workspace / "model"), "--data", str(workspace / "calib.txt"),
                            "--out", str(workspace / "lora"), "--steps", "10", "--lr", "1e-2"])
    assert r["ppl_after"] < r["ppl_before"]  # training on the same text lowers its perplexity
    assert r["reload_ppl"] == pytest.approx(r["ppl_after"], rel=1e-6)
    assert r["merged_ppl"] == pytest.approx(r["ppl_after"], rel=1e-4)
