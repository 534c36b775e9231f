"""``optimum-cli hf-vq``: registration through optimum's namespace package, same arguments as ``hf-vq``, packaging."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_vq
from hf_vq import cli
from tests.conftest import random_text

ROOT = Path(__file__).resolve().parent.parent
OPTIMUM_CLI = [sys.executable, "-c", "import sys; from optimum.commands.optimum_cli import main; "
               "sys.argv[0] = 'optimum-cli'; main()"]  # what the optimum-cli script runs, with this interpreter


def _run(args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_listed_without_importing_torch():
    # optimum-cli imports every registration module on each start: hf_vq's must not pull in torch for other commands
    script = ("import sys; from optimum.commands.optimum_cli import main; sys.argv = ['optimum-cli', '--help']\n"
              "try:\n    main()\nexcept SystemExit:\n    pass\nprint('TORCH', 'torch' in sys.modules)")
    out = _run([sys.executable, "-c", script])
    assert "hf-vq" in out and "export" in out and "env" in out  # optimum's own commands are still there
    assert "TORCH False" in out


def test_hf_vq_help():
    out = _run(OPTIMUM_CLI + ["hf-vq", "--help"])
    assert "usage: optimum-cli hf-vq" in out and "--verbose" in out
    for command in ("quantize", "eval", "export", "info"):
        assert command in out


@pytest.mark.parametrize("command", ["quantize", "eval", "export", "info"])
def test_subcommand_help_is_the_hf_vq_help(command, capsys):
    """Same options, help lines and defaults as ``hf-vq COMMAND --help`` (only the program name differs)."""
    helps = []
    for parse in (lambda: _optimum_parser().parse_args(["hf-vq", command, "--help"]),
                  lambda: cli.build_parser().parse_args([command, "--help"])):
        with pytest.raises(SystemExit):
            parse()
        text = capsys.readouterr().out
        helps.append(text[text.index("\n\n"):])  # past the usage lines, which name the program
    assert "(default: " in helps[0] and helps[0] == helps[1]


def _optimum_parser():
    from optimum.commands.base import RootOptimumCLICommand
    from optimum.commands.optimum_cli import register_optimum_cli_subcommand

    from hf_vq.optimum_cli import HfVQCommand

    root = RootOptimumCLICommand("Optimum CLI tool", usage="optimum-cli")
    register_optimum_cli_subcommand(HfVQCommand, parent_command=root)
    return root.parser


@pytest.mark.parametrize("argv", [
    ["quantize", "m", "--out", "o", "--method", "gptvq", "--skip", "lm_head", "--skip", "q_proj", "--vector-dim", "4",
     "--dataset", "wikitext", "--num-samples", "3", "--no-act-order", "--init", "gptq"],
    ["-v", "quantize", "m", "--out", "o"],
    ["eval", "m", "--data", "t.txt", "--max-windows", "2", "--dtype", "bfloat16"],
    ["eval", "m", "--tasks", "arc_easy,hellaswag", "--limit", "10", "--num-fewshot", "0", "--output", "r.json"],
    ["quantize", "m", "--out", "o", "--method", "quantsim", "--activation-bits", "none", "--override", "mlp:skip=true",
     "--device-map", "auto", "--max-memory", "0=20GiB,cpu=60GiB", "--config", "c.yaml"],
    ["export", "m", "--format", "gguf", "--out", "o", "--requantize"],
    ["info", "m", "--json"],
])
def test_same_arguments_as_hf_vq_cli(argv):
    ours = vars(cli.build_parser().parse_args(argv))
    theirs = vars(_optimum_parser().parse_args(["hf-vq", *argv]))
    for ns in (ours, theirs):
        ns.pop("func"), ns.pop("command", None)
    assert ours == theirs


def test_quantize(tiny_llama_dir, tiny_tokenizer, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    tiny_tokenizer.save_pretrained(base)
    out = tmp_path / "q"
    _run(OPTIMUM_CLI + ["hf-vq", "quantize", str(base), "--method", "rtn", "--bits", "4", "--group-size", "32",
                        "--out", str(out)])
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "hf_vq"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded.model.layers[0].mlp.up_proj, hf_vq.QuantLinear)
    ref = AutoModelForCausalLM.from_pretrained(base, quantization_config=hf_vq.RTNConfig(bits=4, group_size=32),
                                               dtype=torch.float32)
    ids = torch.arange(2, 40)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref(ids).logits)


def test_user_error_is_one_line(tmp_path):
    """A missing model folder: one line naming it and exit code 2, not a traceback (the traceback only with -v)."""
    argv = OPTIMUM_CLI + ["hf-vq", "eval", str(tmp_path / "missing"), "--data", "austen"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("hf-vq: error:") and "missing" in lines[-1] and "(-v for details)" in lines[-1]
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(OPTIMUM_CLI + ["hf-vq", "-v", "eval", str(tmp_path / "missing"), "--data", "austen"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_eval_command_runs(tiny_llama_dir, tiny_tokenizer, tmp_path, capsys):
    # in-process (the subprocess path is covered above): parse, then what optimum's main does: args.func(args).run()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=hf_vq.RTNConfig(group_size=32))
    model.save_pretrained(tmp_path / "q")
    tiny_tokenizer.save_pretrained(tmp_path / "q")
    text = tmp_path / "test.txt"
    text.write_text(random_text(600, seed=3))
    args = _optimum_parser().parse_args(["hf-vq", "eval", str(tmp_path / "q"), "--data", str(text), "--seq-len", "64",
                                         "--max-windows", "4"])
    args.func(args).run()
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expect = hf_vq.evaluate_perplexity(model, tiny_tokenizer, text.read_text(), seq_len=64, max_windows=4)
    assert res["ppl"] == pytest.approx(expect, rel=1e-4)


def test_info_and_export_run(tiny_llama_dir, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=hf_vq.RTNConfig(group_size=32,
                                                                                                   sym=True))
    model.save_pretrained(tmp_path / "q")
    args = _optimum_parser().parse_args(["hf-vq", "info", str(tmp_path / "q"), "--json"])
    args.func(args).run()
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "rtn" and info["quantized_layers"] == 2 * 7  # 2 blocks of 7 Linears
    args = _optimum_parser().parse_args(["hf-vq", "export", str(tmp_path / "q"), "--format", "compressed-tensors",
                                         "--out", str(tmp_path / "ct")])
    args.func(args).run()
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["layers"] == 14
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["format"]


def test_pyproject_lists_every_package():
    # packages are listed by hand (two live outside hf_vq/): a new hf_vq subpackage must be added there
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(d.relative_to(ROOT).parts) for d in [ROOT / "hf_vq", *(ROOT / "hf_vq").rglob("*")]
               if d.is_dir() and any(d.glob("*.py"))}
    assert on_disk <= listed, on_disk - listed
    assert not list((ROOT / "optimum").rglob("__init__.py"))  # optimum.* are namespace packages shared with optimum


def test_wheel_contents(tmp_path):
    src = tmp_path / "src"  # a copy: building in the work tree would write build/ under a shared checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("hf_vq", "model_cards", "optimum"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
          "-w", str(tmp_path / "whl")])
    (wheel,) = (tmp_path / "whl").glob("hf_vq-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        template = z.read("hf_vq/model_cards/hf_vq_model_card.md")
    assert template == (ROOT / "model_cards" / "hf_vq_model_card.md").read_bytes()
    assert "optimum/commands/register/register_hf_vq.py" in names and "hf_vq/optimum_cli.py" in names
    # only the registration file goes into optimum/: no __init__.py that would shadow optimum's own namespace
    assert {n for n in names if n.startswith("optimum/")} == {"optimum/commands/register/register_hf_vq.py"}
    assert {"hf_vq/cli/__init__.py", "hf_vq/cli/info.py", "hf_vq/hub.py", "hf_vq/config/base.py"} <= names
