"""Every example script runs end to end on a tiny random Llama with a real tokenizer and text files.

push_and_reload.py needs a Hub: it runs against the local Hub server in integration_tests/test_hub.py
(test_push_and_reload_example). The defaults on the real SmolLM2 are checked in integration_tests/test_examples_real.py.
"""

import json

import pytest

from examples import demo, export_encodings, lora_finetune, qat_trainer, quantize_at_load
from tests.conftest import random_text

# The tiny model allows 256 positions: calibrate and evaluate on short windows.
SMALL = ["--num-samples", "8", "--seq-len", "64", "--eval-seq-len", "64", "--eval-windows", "4"]


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


def _files(workspace):
    return ["--model", str(workspace / "model"), "--dataset", str(workspace / "calib.txt"),
            "--eval", str(workspace / "test.txt")]


@pytest.mark.parametrize("method", ["rtn", "gptq", "gptvq", "adascale", "quantsim"])
def test_quantize_at_load_example(workspace, method):
    out = workspace / f"q-{method}"
    r = quantize_at_load.main([*_files(workspace), "--method", method, *SMALL, "--kmeans-iterations", "5",
                               "--adascale-iterations", "5", "--out", str(out)])
    assert r["reload_max_logit_diff"] <= 1e-5  # the saved checkpoint reloads to the same model
    assert r["eval_tokens"] == 4 * 64
    assert json.loads((out / "config.json").read_text())["quantization_config"]["method"] == method


def test_demo_example(workspace):
    r = demo.main([*_files(workspace), *SMALL, "--group-size", "32"])
    assert r["quantized_mb"] < 0.6 * r["fp_mb"]  # 4-bit codes + fp16 scales; the fp32 embedding stays
    # A random model predicts near-uniformly; 4-bit GPTQ moves its perplexity by a few percent at most.
    assert r["ppl"] == pytest.approx(r["fp_ppl"], rel=0.05)


def test_export_encodings_example(workspace):
    q = workspace / "q-enc"
    quantize_at_load.main([*_files(workspace), "--method", "gptq", *SMALL, "--out", str(q)])
    r = export_encodings.main(["--model", str(q), "--out", str(workspace / "enc"), "--onnx"])
    doc = json.loads(open(r["encodings"]).read())
    assert doc["version"] == "1.0.0" and len(doc["param_encodings"]) == 14
    assert r["onnx"].endswith(".onnx")


def test_qat_trainer_example(workspace):
    calib = str(workspace / "calib.txt")
    r = qat_trainer.main(["--model", str(workspace / "model"), "--data", calib, "--eval", calib,
                          "--out", str(workspace / "qat"), "--steps", "10", "--eval-seq-len", "64"])
    assert r["ppl_after"] < r["ppl_before"]  # training on the same text lowers its perplexity
    assert r["reload_max_logit_diff"] <= 1e-4  # latents folded into the saved integer grid


def test_lora_finetune_example(workspace):
    r = lora_finetune.main(["--model", str(workspace / "model"), "--data", str(workspace / "calib.txt"),
                            "--out", str(workspace / "lora"), "--steps", "10", "--lr", "1e-2"])
    assert r["ppl_after"] < r["ppl_before"]  # training on the same text lowers its perplexity
    assert r["reload_ppl"] == pytest.approx(r["ppl_after"], rel=1e-6)
    assert r["merged_ppl"] == pytest.approx(r["ppl_after"], rel=1e-4)
    assert (workspace / "lora" / "adapter" / "adapter_config.json").is_file()
