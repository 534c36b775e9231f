"""hf_vq.evaluate: real lm-evaluation-harness on a tiny hf_vq-quantized model, with a local multiple-choice task
(tests/data/lm_eval: a task YAML over JSON lines, so no Hub)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_vq

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "lm_eval"
TASK = "hf_vq_tiny_choice"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # the task YAML names its data relative to the repository root
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def quantized(tiny_llama_dir, calib_ids):
    cfg = hf_vq.GPTQConfig(dataset=calib_ids, num_samples=16, seq_len=64, group_size=32)
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)


@pytest.fixture(scope="module")
def result(quantized, tiny_tokenizer):
    return hf_vq.evaluate(quantized, [TASK], tokenizer=tiny_tokenizer, include_path=TASKS)


@pytest.fixture(scope="module")
def saved(quantized, tiny_tokenizer, tmp_path_factory):
    """The quantized model saved with its tokenizer (evaluate's default tokenizer: the one beside the model)."""
    d = tmp_path_factory.mktemp("lm_eval_ckpt")
    quantized.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def docs():
    return [json.loads(line) for line in (TASKS / "tiny_choice.jsonl").read_text().splitlines()]


def test_equals_lm_eval_own_run_on_the_model_object(quantized, tiny_tokenizer, result):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    assert isinstance(quantized.model.layers[0].mlp.down_proj, hf_vq.QuantLinear)
    own = simple_evaluate(HFLM(pretrained=quantized, tokenizer=tiny_tokenizer, batch_size=1), tasks=[TASK],
                          task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))
    assert result["results"] == own["results"]
    assert result["n-samples"] == own["n-samples"] == {TASK: {"original": 5, "effective": 5}}
    assert json.loads(json.dumps(result)) == result  # ready for json.dump as is


@torch.no_grad()
def test_metrics_match_log_likelihoods_computed_by_hand(quantized, tiny_tokenizer, result):
    """acc: the choice with the highest summed log-probability given the question; acc_norm: divided by the choice's
    length in characters. Log-probabilities from plain forward passes of the same model."""
    hits, hits_norm = [], []
    for doc in docs():
        ctx = tiny_tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
        lls = []
        for choice in doc["choices"]:
            cont = tiny_tokenizer(choice, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(quantized(torch.tensor([ctx + cont])).logits[0].double(), -1)
            lls.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        lls = torch.tensor(lls)
        hits.append(int(lls.argmax()) == doc["label"])
        hits_norm.append(int((lls / torch.tensor([float(len(c)) for c in doc["choices"]])).argmax()) == doc["label"])
    acc, acc_norm = sum(hits) / len(hits), sum(hits_norm) / len(hits_norm)
    # a data set that the scores separate: neither metric is all-or-nothing, and they disagree
    assert 0 < acc < 1 and 0 < acc_norm < 1 and acc != acc_norm
    got = result["results"][TASK]
    assert got["acc,none"] == pytest.approx(acc, abs=1e-12)
    assert got["acc_norm,none"] == pytest.approx(acc_norm, abs=1e-12)


def test_disk_offloaded_checkpoint_gives_the_same_metrics(saved, result, tmp_path):
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  "model.layers.0": "cpu", "model.layers.1": "disk"}
    model = AutoModelForCausalLM.from_pretrained(saved, device_map=device_map,
                                                 offload_folder=tmp_path / "offload")
    assert model.model.layers[1].mlp.down_proj.qweight.is_meta
    got = hf_vq.evaluate(model, TASK, include_path=TASKS, device="cpu")
    assert got["results"] == result["results"]
    with pytest.raises(ValueError, match="dispatched with a device_map"):
        hf_vq.evaluate(model, TASK, include_path=TASKS, device="cuda:0")


def test_lm_eval_loads_the_checkpoint_by_path(saved, result):
    """lm_eval's own loader (HFLM(pretrained=DIR)) hands the checkpoint's quantization config back to from_pretrained;
    hf_vq loads it as the checkpoint it is (a different config would be refused as a re-quantization)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(saved), device="cpu", batch_size=1)
    assert isinstance(lm.model.model.layers[0].mlp.down_proj, hf_vq.QuantLinear)
    got = simple_evaluate(lm, tasks=[TASK], task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))
    assert got["results"] == result["results"]
    with pytest.raises(ValueError, match="already quantized by hf_vq"):
        AutoModelForCausalLM.from_pretrained(saved, quantization_config=hf_vq.RTNConfig(bits=8))


def test_cli_eval_writes_what_evaluate_returns(saved, result, tmp_path, capsys):
    from hf_vq.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", str(saved), "--tasks", TASK, "--include-path", str(TASKS), "--output", str(out)]) == 0
    written = json.loads(out.read_text())          # --output: lm_eval's whole result
    summary = json.loads(capsys.readouterr().out)   # stdout: one line with the metrics
    assert summary == {"model": str(saved), "tasks": [TASK], "results": written["results"]}
    direct = hf_vq.evaluate(AutoModelForCausalLM.from_pretrained(saved), [TASK], include_path=TASKS)
    # all but the clock: when each run started and ended
    clock = {"date", "start_time", "end_time", "total_evaluation_time_seconds"}
    assert set(written) == set(direct)
    assert {k: v for k, v in written.items() if k not in clock} == {k: v for k, v in direct.items() if k not in clock}
    assert direct["results"] == result["results"]  # the saved checkpoint scores as the model in memory did


def test_limit_scores_fewer_documents(quantized, tiny_tokenizer):
    got = hf_vq.evaluate(quantized, f"{TASK},", tokenizer=tiny_tokenizer, include_path=[TASKS], limit=2)
    assert got["n-samples"][TASK]["effective"] == 2


def test_unknown_task_names_the_task_and_where_tasks_are_looked_up(quantized, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"'hf_vq_tiny_choise'.*built-in tasks.*include_path.*close names: "
                                         r"hf_vq_tiny_choice"):
        hf_vq.evaluate(quantized, ["hf_vq_tiny_choise"], tokenizer=tiny_tokenizer, include_path=TASKS)
    with pytest.raises(ValueError, match=r"(?s)no tokenizer could be loaded.*pass tokenizer="):
        hf_vq.evaluate(quantized, [TASK], include_path=TASKS)  # its float model's folder holds no tokenizer
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        hf_vq.evaluate(quantized, [TASK], tokenizer=tiny_tokenizer, include_path=TASKS / "no_such_folder")


def test_missing_lm_eval_says_what_to_install(quantized, tiny_tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what Python does for a package that is not installed
    with pytest.raises(ImportError, match=r"pip install 'hf_vq\[eval\]'"):
        hf_vq.evaluate(quantized, [TASK], tokenizer=tiny_tokenizer, include_path=TASKS)
