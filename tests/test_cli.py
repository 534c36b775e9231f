"""hf-vq's arguments: every option has help with its default, every quantize flag reaches its config field, --config
files (JSON, YAML) with command-line flags over them, and clear errors for bad values. The runs that quantize,
evaluate, export and inspect a model are in tests/test_cli_runs.py."""

from __future__ import annotations

import json
import re

import pytest

import hf_vq
from hf_vq import cli

# flags that tests/test_cli_runs.py drives end to end (they need a model run to mean anything)
RUN_FLAGS = {"--device-map", "--max-memory", "--offload-folder", "--max-shard-size"}


def _parse(*extra):
    return cli.build_parser().parse_args(["quantize", "model", "--out", "out", *map(str, extra)])


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def _option_entries(text: str) -> dict[str, str]:
    """{option line: its help text} parsed from argparse --help output."""
    entries, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (-[^ ].*?)(?:\s{2,}(.*))?$", line)
        if m:
            current = m.group(1)
            entries[current] = m.group(2) or ""
        elif current is not None and re.match(r"^ {6,}\S", line):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("command", ["quantize", "eval", "export", "info"])
def test_every_option_has_a_help_line_with_its_default(command, capsys):
    text = _help([command], capsys)
    entries = _option_entries(text)
    parser = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices.items() if a[0] == command)[1]
    options = {a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"}
    shown = {entry.split(",")[0].split()[0] for entry in entries}
    assert options <= shown, options - shown  # every option is listed in --help
    for entry, help_text in entries.items():
        if entry.startswith("-h"):
            continue
        assert len(help_text) > 15, f"{command} {entry}: no help"
        assert "default" in help_text or "(required)" in help_text, f"{command} {entry}: no default in {help_text!r}"


def test_quantize_help_shows_the_schema_defaults(capsys):
    entries = _option_entries(_help(["quantize"], capsys))
    by_flag = {e.split(",")[0].split()[0]: h for e, h in entries.items()}
    assert "(default: 128)" in by_flag["--group-size"]
    assert "(default: 128 (gptq, gptvq); 64 (quantsim))" in by_flag["--block-size"]
    assert "(default: routed)" in by_flag["--expert-calibration"]
    assert "quantsim" in next(e for e in entries if e.startswith("--method"))


def test_top_level_help_lists_every_command(capsys):
    text = _help([], capsys)
    for command in ("quantize", "eval", "export", "info", "--verbose"):
        assert command in text


# (argv, method, {field: value}): between them every quantize config flag; the values are not the defaults
FLAG_CASES = [
    (["--method", "rtn", "--bits", "3", "--group-size", "64", "--sym", "--clip-search", "--lm-head-bits", "8",
      "--lm-head-group-size", "32", "--quantize-vision", "--skip", "model.layers.0.mlp.up_proj", "--skip", "k_proj",
      "--override", "down_proj:bits=8,group_size=-1,sym=false", "--override", r"layers\.1\.:skip=true"],
     "rtn", dict(bits=3, group_size=64, sym=True, clip_search=True, lm_head_bits=8, lm_head_group_size=32,
                 quantize_vision=True, modules_to_not_convert=["model.layers.0.mlp.up_proj", "k_proj"],
                 module_overrides={"down_proj": {"bits": 8, "group_size": -1, "sym": False},
                                   r"layers\.1\.": {"skip": True}})),
    (["--dataset", "{text}", "--dataset-config", "wiki", "--dataset-split", "validation", "--text-column", "body",
      "--num-samples", "5", "--seq-len", "33", "--seed", "7", "--batch-size", "3", "--calibration-dtype",
      "bfloat16", "--first-token-weight", "2.5", "--min-expert-tokens", "4", "--quantization-device", "cpu",
      "--resume-dir", "{tmp}/resume", "--percdamp", "0.05", "--no-act-order", "--no-true-sequential",
      "--block-size", "64", "--tokenizer", "{tmp}/tok"],
     "gptq", dict(dataset="{text}", dataset_config="wiki", dataset_split="validation", text_column="body",
                  num_samples=5, seq_len=33, seed=7, calibration_batch_size=3, calibration_dtype="bfloat16",
                  first_token_weight=2.5, min_expert_tokens=4.0, quantization_device="cpu",
                  resume_dir="{tmp}/resume", percdamp=0.05, act_order=False, true_sequential=False, block_size=64,
                  tokenizer="{tmp}/tok")),
    (["--method", "gptvq", "--dataset", "{text}", "--vector-dim", "4", "--index-bits", "5", "--codebook-bits", "16",
      "--rows-per-block", "16", "--cols-per-block", "64", "--kmeans-iterations", "3", "--no-hessian-weighted-lookup",
      "--codebook-update-steps", "2", "--data-normalization", "--codebook-scale", "codebook",
      "--finetune-iterations", "2", "--finetune-lr", "0.001", "--init", "kpp", "--expert-calibration", "all"],
     "gptvq", dict(vector_dim=4, index_bits=5, codebook_bits=16, rows_per_block=16, cols_per_block=64,
                   kmeans_iterations=3, hessian_weighted_lookup=False, codebook_update_steps=2,
                   data_normalization=True, codebook_scale="codebook", finetune_iterations=2, finetune_lr=0.001,
                   init="kpp", expert_calibration="all")),
    (["--dataset", "{text}", "--average-bits", "3.5", "--candidates", "4:128,3:64,2:32"],
     "gptq", dict(average_bits=3.5, candidates=[{"bits": 4, "group_size": 128}, {"bits": 3, "group_size": 64},
                                                 {"bits": 2, "group_size": 32}])),
    (["--method", "gptvq", "--dataset", "{text}", "--no-codebook-update", "--first-token-weight", "none"],
     "gptvq", dict(codebook_update=False, first_token_weight=None)),
    (["--method", "adascale", "--dataset", "{text}", "--sym", "--group-size", "32", "--init", "rtn",
      "--num-iterations", "5", "--train-batch-size", "2", "--lr-scales", "0.001", "--lr-clip", "0.002",
      "--early-stop-margin", "0.1", "--train-dtype", "float32", "--no-compile", "--fp-input-prob", "0.25",
      "--weight-granularity", "lpbq", "--decompressed-bw", "10", "--activation-cache-dir", "{tmp}/acts"],
     "adascale", dict(sym=True, group_size=32, init="rtn", num_iterations=5, batch_size=2, lr_scales=0.001,
                      lr_clip=0.002, early_stop_margin=0.1, train_dtype="float32", compile=False, fp_input_prob=0.25,
                      weight_granularity="lpbq", decompressed_bw=10, activation_cache_dir="{tmp}/acts")),
    (["--method", "quantsim", "--dataset", "{text}", "--weight-bits", "4", "--weight-granularity", "lpbq",
      "--block-size", "32", "--decompressed-bits", "12", "--activation-bits", "8", "--quant-scheme", "percentile",
      "--percentile", "99.5", "--no-quantize-inputs", "--no-quantize-outputs"],
     "quantsim", dict(weight_bits=4, weight_granularity="lpbq", block_size=32, decompressed_bits=12,
                      activation_bits=8, quant_scheme="percentile", percentile=99.5, quantize_inputs=False,
                      quantize_outputs=False)),
    (["--method", "quantsim", "--activation-dtype", "float16", "--activation-bits", "none"],
     "quantsim", dict(activation_dtype="float16", activation_bits=None)),
]


def _fill(value, tmp_path, text):
    if isinstance(value, str):
        return value.format(tmp=tmp_path, text=text)
    if isinstance(value, list):
        return [_fill(v, tmp_path, text) for v in value]
    return value


@pytest.fixture
def calib_text(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("the a of and to in is was " * 50)
    return str(text)


@pytest.mark.parametrize("argv, method, fields", FLAG_CASES, ids=[f"{c[1]}{i}" for i, c in enumerate(FLAG_CASES)])
def test_each_flag_sets_its_config_field(argv, method, fields, tmp_path, calib_text):
    cfg = cli.build_config(_parse(*_fill(argv, tmp_path, calib_text)))
    assert cfg.method == method
    for field, value in fields.items():
        assert getattr(cfg, field) == _fill(value, tmp_path, calib_text), field


def test_every_quantize_flag_is_tested():
    tested = {a for argv, _, _ in FLAG_CASES for a in argv if a.startswith("--")} | RUN_FLAGS
    tested |= {"--out", "--method", "--config", "--push-to-hub"}  # test_non_config_flags, the --config tests
    parser = cli.build_parser()._subparsers._group_actions[0].choices["quantize"]
    missing = [a.option_strings for a in parser._actions
               if a.option_strings and a.dest not in ("help",) and not set(a.option_strings) & tested]
    assert not missing


def test_non_config_flags():
    args = _parse("--push-to-hub", "me/tiny-gptq", "--max-memory", "0=20GiB,cpu=60.5GB", "--device-map", "auto",
                  "--offload-folder", "off", "--max-shard-size", "100KB")
    assert args.push_to_hub == "me/tiny-gptq" and args.device_map == "auto" and args.offload_folder == "off"
    assert args.max_memory == {0: "20GiB", "cpu": "60.5GB"} and args.max_shard_size == "100KB"
    assert _parse("--device-map", '{"model": "cpu", "lm_head": 0}').device_map == {"model": "cpu", "lm_head": 0}
    assert _parse("--device-map", "cuda:1").device_map == "cuda:1"


def test_device_map_from_a_json_file(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"model.layers.0": "disk", "": "cpu"}))
    assert _parse("--device-map", path).device_map == {"model.layers.0": "disk", "": "cpu"}


def test_calibrating_methods_default_to_the_bundled_text(tmp_path):
    from hf_vq import assets

    cfg = cli.build_config(_parse("--method", "gptq"))
    assert cfg.dataset == [assets.austen_calibration_text()]
    assert not hasattr(cli.build_config(_parse("--method", "rtn")), "dataset")


@pytest.mark.parametrize("argv, match", [
    (["--override", "down_proj"], "argument --override: expected REGEX:key=value"),
    (["--override", "down_proj:bits"], "argument --override: 'down_proj:bits': expected key=value"),
    (["--override", "down_proj:bits=eight"], "is neither an integer nor true/false"),
    (["--override", "(down:bits=8"], "is not a valid regex"),
    (["--max-memory", "cpu:60GB"], "argument --max-memory: expected DEVICE=SIZE"),
    (["--max-memory", "cpu=lots"], "argument --max-memory: expected DEVICE=SIZE"),
    (["--device-map", "{not json"], "argument --device-map: '{not json' is not valid JSON"),
    (["--device-map", "/no/such/map.json"], "argument --device-map: expected one of auto"),
    (["--activation-bits", "eight"], "argument --activation-bits: expected an integer or 'none', got 'eight'"),
])
def test_bad_flag_syntax_is_a_usage_error_naming_the_flag(argv, match, capsys):
    with pytest.raises(SystemExit) as info:
        _parse(*argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and match in err and "Traceback" not in err, err


def _one_line_error(rc, err, match):
    lines = [line for line in err.splitlines() if line.startswith("hf-vq: error:")]
    assert rc == 2 and len(lines) == 1 and match in lines[0] and "Traceback" not in err, err


@pytest.mark.parametrize("argv, match", [
    (["--method", "gptvq", "--bits", "3"], "--bits does not apply to --method gptvq: GPTVQ has no affine grid"),
    (["--method", "rtn", "--dataset", "x.txt"], "--dataset does not apply to --method rtn: round-to-nearest uses"),
    (["--method", "adascale", "--batch-size", "2"], "--batch-size does not apply to --method adascale"),
    (["--method", "quantsim", "--lm-head-bits", "8"], "--lm-head-bits does not apply to --method quantsim"),
    (["--method", "rtn", "--override", "down_proj:bitz=8"], "module_overrides['down_proj'] has unknown keys ['bitz']"),
    (["--method", "rtn", "--max-memory", "cpu=1GB"], "--max-memory needs --device-map"),
    (["--method", "rtn", "--offload-folder", "off"], "--offload-folder needs --device-map"),
])
def test_inapplicable_flags_are_one_line_errors(argv, match, tmp_path, capsys):
    rc = cli.main(["quantize", str(tmp_path / "no_model"), "--out", str(tmp_path / "o"), *argv])
    _one_line_error(rc, capsys.readouterr().err, match)


def test_yaml_config_with_flags_over_it(tmp_path, calib_text):
    path = tmp_path / "gptq.yaml"
    path.write_text(f"method: gptq\nbits: 3\ngroup_size: 32\nsym: true\nnum_samples: 4\nseq_len: 32\n"
                    f"dataset: {calib_text}\nmodule_overrides:\n  down_proj: {{bits: 8}}\n")
    cfg = cli.build_config(_parse("--config", path, "--bits", "2", "--override", "up_proj:bits=4"))
    assert isinstance(cfg, hf_vq.GPTQConfig)
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.num_samples, cfg.seq_len) == (2, 32, True, 4, 32)
    assert cfg.dataset == calib_text
    assert cfg.module_overrides == {"down_proj": {"bits": 8}, "up_proj": {"bits": 4}}
    # --method over the file's method
    assert isinstance(cli.build_config(_parse("--config", path, "--method", "adascale")), hf_vq.AdaScaleConfig)


def test_json_config_is_what_to_dict_writes(tmp_path, calib_text):
    want = hf_vq.QuantSimConfig(weight_bits=4, weight_granularity="blockwise", block_size=32, activation_bits=8,
                                dataset=calib_text, num_samples=4, seq_len=32, seed=3)
    path = tmp_path / "qs.json"
    path.write_text(json.dumps(want.to_dict()))  # with its derived bits/group_size/sym and notes
    got = cli.build_config(_parse("--config", path))
    assert got == want and got.to_dict()["group_size"] == 32


@pytest.mark.parametrize("body, suffix, match", [
    ('{"method": "gptq", "bitz": 4}', ".json", "GPTQConfig got unknown arguments: ['bitz']"),
    ('{"method": "gptvq", "group_size": 4}', ".json", "GPTVQConfig does not take 'group_size': GPTVQ groups are"),
    ('{"method": "nope"}', ".json", "unknown method 'nope'"),
    ("method: gptq\nbits: [4\n", ".yaml", "not valid YAML"),
    ('{"method": "gptq",}', ".json", "not valid JSON"),
    ("[1, 2]", ".json", "expected an object of config fields, got list"),
    ('{"method": "rtn", "layers": {"a": {}}}', ".json", "'layers' is written by a finished quantization"),
    ("bits = 4", ".toml", "expected a .json, .yaml or .yml file"),
])
def test_bad_config_files_are_one_line_errors(body, suffix, match, tmp_path, capsys):
    path = tmp_path / f"cfg{suffix}"
    path.write_text(body)
    rc = cli.main(["quantize", str(tmp_path / "no_model"), "--out", str(tmp_path / "o"), "--config", str(path)])
    _one_line_error(rc, capsys.readouterr().err, match)


def test_missing_config_file(tmp_path, capsys):
    rc = cli.main(["quantize", "m", "--out", str(tmp_path / "o"), "--config", str(tmp_path / "none.yaml")])
    _one_line_error(rc, capsys.readouterr().err, "none.yaml does not exist")


def test_eval_task_flags(capsys):
    args = cli.build_parser().parse_args(["eval", "m", "--tasks", "arc_easy,hellaswag", "--limit", "0.5",
                                          "--num-fewshot", "3", "--include-path", "tasks", "--batch-size", "auto",
                                          "--output", "r.json"])
    assert args.tasks == ["arc_easy", "hellaswag"] and args.limit == 0.5 and args.num_fewshot == 3
    assert args.include_path == "tasks" and args.batch_size == "auto" and args.output == "r.json"
    assert cli.build_parser().parse_args(["eval", "m", "--limit", "20", "--batch-size", "4"]).limit == 20
    rc = cli.main(["eval", "m", "--limit", "20", "--num-fewshot", "1"])
    _one_line_error(rc, capsys.readouterr().err, "--limit, --num-fewshot apply to --tasks runs only")
