"""The hf-vq command line reports user mistakes in one line and exits 2; a traceback only with -v (issue 15).

The installed entry point (.venv/bin/hf-vq, else ``python -m hf_vq.cli``) runs in a subprocess for the exit status
and stderr as a user sees them; the other cases call ``hf_vq.cli.main`` in-process (each subprocess imports torch)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_vq import cli


def _entry_point() -> list[str]:
    exe = Path(sys.executable).with_name("hf-vq")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("hf-vq")
    return [found] if found else [sys.executable, "-m", "hf_vq.cli"]


def hf_vq_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
    return subprocess.run([*_entry_point(), *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


def _one_line_error(rc: int, stderr: str, match: str) -> None:
    assert rc == 2, (rc, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("hf-vq: error:")]
    assert len(errors) == 1, stderr[-2000:]
    assert match in errors[0], errors[0]


def test_entry_point_prints_one_line_and_exits_2(tiny_llama_dir, tmp_path):
    proc = hf_vq_cli("quantize", tiny_llama_dir, "--out", tmp_path / "o", "--method", "rtn", "--bits", "5")
    _one_line_error(proc.returncode, proc.stderr, "hf-vq: error: RTNConfig: bits must be one of (2, 3, 4, 8), got 5")


def test_entry_point_verbose_shows_the_traceback(tiny_llama_dir, tmp_path):
    proc = hf_vq_cli("quantize", tiny_llama_dir, "--out", tmp_path / "o", "--method", "rtn", "--bits", "5", "-v")
    assert proc.returncode == 2 and "Traceback (most recent call last)" in proc.stderr
    assert "hf_vq.config.schema.ConfigError: RTNConfig: bits must be one of" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("hf-vq: error: RTNConfig: bits must be one of")


@pytest.mark.parametrize("extra, match", [
    (["--method", "gptq", "--percdamp", "2"], "GPTQConfig: percdamp must be in (0, 1), got 2.0"),
    (["--method", "adascale", "--num-iterations", "-1"], "AdaScaleConfig: num_iterations must be a non-negative"),
    (["--method", "gptvq", "--vector-dim", "3"], "GPTVQConfig: vector_dim must be one of (1, 2, 4), got 3"),
    (["--method", "gptq", "--seq-len", "64", "--dataset", "/no/such/calib.txt"],
     "calibration path '/no/such/calib.txt' does not exist"),
    (["--method", "gptq", "--seq-len", "4096", "--dataset", "{text}"],
     "seq_len=4096 is longer than the model's max_position_embeddings (256)"),
])
def test_quantize_user_errors_print_one_line(tiny_llama_dir, tmp_path, capsys, extra, match):
    text = tmp_path / "calib.txt"
    text.write_text("the a of and to in is was " * 50)
    out = tmp_path / "out"
    rc = cli.main(["quantize", str(tiny_llama_dir), "--out", str(out), *[e.format(text=text) for e in extra]])
    _one_line_error(rc, capsys.readouterr().err, match)
    assert not out.exists()  # nothing saved


def test_missing_model_folder_prints_one_line(tmp_path, capsys):
    rc = cli.main(["eval", str(tmp_path / "missing_model")])
    _one_line_error(rc, capsys.readouterr().err, "missing_model")


def test_missing_eval_text_prints_one_line(tiny_llama_dir, tiny_tokenizer, tmp_path, capsys):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    rc = cli.main(["eval", str(tiny_llama_dir), "--tokenizer", str(tmp_path / "tok"),
                   "--data", str(tmp_path / "nope.txt")])
    _one_line_error(rc, capsys.readouterr().err, "nope.txt")


def test_unknown_option_is_a_usage_error(tiny_llama_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["quantize", str(tiny_llama_dir), "--out", str(tmp_path / "o"), "--bitz", "4"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "unrecognized arguments: --bitz 4" in err and "Traceback" not in err


def test_quantize_with_a_quantized_head(tiny_llama_dir, tiny_tokenizer, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "o"
    rc = cli.main(["quantize", str(model_dir), "--out", str(out), "--method", "rtn", "--bits", "4",
                   "--group-size", "32", "--lm-head-bits", "8"])
    assert rc == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["lm_head_bits"] == 8 and qc["lm_head_group_size"] == -1
    assert qc["layers"]["lm_head"]["bits"] == 8
