"""Config schemas (issue 15): every field typed and bounded at construction, fields a class does not take refused,
saved configs (also those older hf_vq versions wrote) still load, and a malformed config.json fails with ConfigError."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_vq
from hf_vq.config import ConfigError, HfVQConfig
from hf_vq.config.schema import Check

CLASSES = [hf_vq.RTNConfig, hf_vq.GPTQConfig, hf_vq.GPTVQConfig, hf_vq.AdaScaleConfig, hf_vq.QuantSimConfig]
INF, NAN = float("inf"), float("nan")


# ------------------------------------------------------------------------------- the issue's examples
@pytest.mark.parametrize("cls, kwargs, field, match", [
    (hf_vq.GPTQConfig, dict(sym="no"), "sym", "sym must be True or False, got 'no' \\(str\\)"),
    (hf_vq.GPTQConfig, dict(modules_to_not_convert="q_proj"), "modules_to_not_convert",
     r"must be a list of strings, got the string 'q_proj': write \['q_proj'\]"),
    (hf_vq.QuantSimConfig, dict(bits=4), "bits", "QuantSimConfig does not take 'bits'.*weight_bits"),
    (hf_vq.AdaScaleConfig, dict(lr_scales=INF), "lr_scales",
     "lr_scales must be a finite number in \\(0, 1\\], got inf"),
    (hf_vq.AdaScaleConfig, dict(lr_clip=NAN), "lr_clip", "finite number"),
    (hf_vq.AdaScaleConfig, dict(lr_scales=1e30), "lr_scales", "must be in \\(0, 1\\]"),
    (hf_vq.GPTQConfig, dict(bits=4.0), "bits", "bits must be one of \\(2, 3, 4, 8\\), got 4.0 \\(float\\)"),
    (hf_vq.GPTQConfig, dict(percdamp="0.01"), "percdamp", "percdamp must be a finite number in \\(0, 1\\), got '0.01'"),
    (hf_vq.GPTQConfig, dict(seed="a"), "seed", "seed must be an integer"),
    (hf_vq.GPTVQConfig, dict(vector_dim=2.0), "vector_dim", "vector_dim must be one of \\(1, 2, 4\\), got 2.0"),
])
def test_issue_examples_are_refused_at_construction(cls, kwargs, field, match):
    with pytest.raises(ConfigError, match=match) as info:
        cls(**kwargs)
    assert info.value.field == field and field in str(info.value)


@pytest.mark.parametrize("cls, kwargs, field", [
    (hf_vq.GPTQConfig, dict(bits=True), "bits"),                    # bool is not an int
    (hf_vq.GPTQConfig, dict(num_samples=True), "num_samples"),
    (hf_vq.GPTQConfig, dict(act_order=1), "act_order"),             # an int is not a bool
    (hf_vq.GPTQConfig, dict(group_size=64.0), "group_size"),
    (hf_vq.GPTQConfig, dict(seq_len="2048"), "seq_len"),
    (hf_vq.GPTQConfig, dict(seed=-1), "seed"),
    (hf_vq.GPTQConfig, dict(seed=2**64), "seed"),
    (hf_vq.GPTQConfig, dict(first_token_weight=INF), "first_token_weight"),
    (hf_vq.GPTQConfig, dict(percdamp=10**400), "percdamp"),          # too large for a float
    (hf_vq.GPTQConfig, dict(calibration_dtype="float16"), "calibration_dtype"),
    (hf_vq.GPTQConfig, dict(dataset_split=""), "dataset_split"),
    (hf_vq.GPTQConfig, dict(dataset=42), "dataset"),
    (hf_vq.GPTQConfig, dict(tokenizer=42), "tokenizer"),
    (hf_vq.GPTQConfig, dict(modules_to_not_convert=["q_proj", 3]), "modules_to_not_convert[1]"),
    (hf_vq.GPTQConfig, dict(module_overrides={"down": {"bits": "8"}}), "bits"),
    (hf_vq.GPTQConfig, dict(module_overrides={"down": {"skip": "yes"}}), "skip"),
    (hf_vq.GPTQConfig, dict(module_overrides={"down": 8}), "module_overrides['down']"),
    (hf_vq.GPTQConfig, dict(module_overrides=["down"]), "module_overrides"),
    (hf_vq.GPTQConfig, dict(format_version="2"), "format_version"),
    (hf_vq.GPTQConfig, dict(layers=[{"type": "affine"}]), "layers"),
    (hf_vq.GPTVQConfig, dict(index_bits=6.0), "index_bits"),
    (hf_vq.GPTVQConfig, dict(finetune_lr=INF), "finetune_lr"),
    (hf_vq.AdaScaleConfig, dict(fp_input_prob=NAN), "fp_input_prob"),
    (hf_vq.AdaScaleConfig, dict(num_iterations=10.0), "num_iterations"),
    (hf_vq.QuantSimConfig, dict(percentile=INF), "percentile"),
    (hf_vq.QuantSimConfig, dict(activation_bits=8.0), "activation_bits"),
    (hf_vq.QuantSimConfig, dict(quantize_inputs="false"), "quantize_inputs"),
])
def test_fields_are_type_checked(cls, kwargs, field):
    with pytest.raises(ConfigError) as info:
        cls(**kwargs)
    assert info.value.field == field and field in str(info.value)


@pytest.mark.parametrize("cls, kwargs, instead", [
    (hf_vq.QuantSimConfig, dict(group_size=32), "block_size"),
    (hf_vq.QuantSimConfig, dict(sym=False), "always symmetric"),
    (hf_vq.QuantSimConfig, dict(calibration_dtype="bfloat16"), "model's dtype"),
    (hf_vq.RTNConfig, dict(dataset=["text"]), "no calibration data"),
    (hf_vq.RTNConfig, dict(seq_len=512), "no calibration data"),
    (hf_vq.GPTVQConfig, dict(bits=3), "index_bits"),
    (hf_vq.GPTVQConfig, dict(group_size=64), "rows_per_block x cols_per_block"),
    (hf_vq.GPTVQConfig, dict(clip_search=True), "RTN/GPTQ"),
    (hf_vq.AdaScaleConfig, dict(calibration_batch_size=4), "batch_size"),
    (hf_vq.AdaScaleConfig, dict(calibration_dtype="bfloat16"), "model's dtype"),
    (hf_vq.RTNConfig, dict(percdamp=0.1), "a field of GPTQConfig"),
])
def test_fields_that_do_not_apply_are_refused_not_dropped(cls, kwargs, instead):
    (name,) = kwargs
    with pytest.raises(ConfigError, match=f"{cls.__name__} does not take '{name}'.*{instead}") as info:
        cls(**kwargs)
    assert info.value.field == name


def test_gptvq_overrides_can_only_skip():
    assert hf_vq.GPTVQConfig(module_overrides={"lm_head": {"skip": True}}).spec_for("lm_head") is None
    with pytest.raises(ConfigError, match=r"module_overrides\['down'\] has unknown keys \['bits'\]; allowed: skip"):
        hf_vq.GPTVQConfig(module_overrides={"down": {"bits": 8}})


def test_positional_arguments_are_refused():
    with pytest.raises(ConfigError, match="pass config fields by keyword"):
        hf_vq.GPTQConfig(4)


def test_our_error_type():
    assert issubclass(ConfigError, ValueError) and hf_vq.config.ConfigError is ConfigError
    try:
        hf_vq.GPTQConfig(bits=5)
    except ConfigError as e:
        assert e.field == "bits" and str(e).startswith("GPTQConfig: bits must be one of")


# ---------------------------------------------------------------------------- the schema guarantees
@pytest.mark.parametrize("cls", CLASSES)
def test_every_field_is_in_the_schema_with_a_check(cls):
    cfg = cls()
    assert all(isinstance(f.check, Check) for f in cls.schema.fields.values())
    public = {k for k in vars(cfg) if not k.startswith("_")}
    assert public == set(cls.schema.fields) | {"quant_method"}  # no attribute outside the schema
    with pytest.raises(ConfigError, match="unknown arguments: \\['new_field'\\]"):
        cfg.new_field = 1  # a field cannot be added without a schema entry (and so a check)
    assert list(__import__("inspect").signature(cls).parameters) == list(cls.schema.fields)


def test_assignment_is_validated_and_keeps_cross_field_rules():
    cfg = hf_vq.GPTQConfig()
    with pytest.raises(ConfigError, match="bits"):
        cfg.bits = 4.0
    assert cfg.bits == 4
    cfg.bits = 3
    assert cfg.bits == 3
    vq = hf_vq.GPTVQConfig(vector_dim=2, cols_per_block=6)
    with pytest.raises(ConfigError, match="multiple of vector_dim"):
        vq.vector_dim = 4
    assert vq.vector_dim == 2  # the refused assignment is undone
    qs = hf_vq.QuantSimConfig(weight_bits=4)
    with pytest.raises(ConfigError, match="does not take 'bits'"):
        qs.bits = 8  # derived: read-only
    assert qs.bits == 4


def test_quantsim_bits_come_from_weight_bits_on_the_model(tiny_llama_dir):
    """QuantSimConfig(bits=4) used to give 8-bit weights; weight_bits=4 gives 4-bit ones."""
    cfg = hf_vq.QuantSimConfig(weight_bits=4, weight_granularity="blockwise", block_size=32, activation_bits=None)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg, dtype=torch.float32)
    bits = {m.bits for m in model.modules() if hasattr(m, "bits") and hasattr(m, "in_features")}
    assert bits == {4}


def test_modules_to_not_convert_list_keeps_the_named_layers_in_float(tiny_llama_dir):
    cfg = hf_vq.RTNConfig(group_size=32, modules_to_not_convert=["q_proj"])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg, dtype=torch.float32)
    kinds = {n: type(m) for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj"))}
    assert len(kinds) == 4
    assert all(t is torch.nn.Linear for n, t in kinds.items() if n.endswith("q_proj"))
    assert all(t is hf_vq.QuantLinear for n, t in kinds.items() if n.endswith("k_proj"))


# ---------------------------------------------------------------------------------- reload and JSON
LEGACY = json.loads((Path(__file__).parent / "data" / "legacy_hf_vq_configs.json").read_text())
IGNORED = {"gptvq_ignored_bits": ["bits=3", "clip_search=True"],
           "rtn_ignored_calibration": ["dataset='calib.txt'", "seq_len=512"]}


@pytest.mark.parametrize("name", sorted(LEGACY))
def test_configs_saved_by_the_previous_version_load(name):
    """tests/data/legacy_hf_vq_configs.json: quantization_config dicts written by hf_vq before the schemas (models
    saved by save_pretrained, and to_dict of configs with many options)."""
    saved = LEGACY[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = HfVQConfig.from_dict(saved)
    assert cfg.method == saved["method"]
    for key, value in saved.items():
        if key in cfg.schema.fields or key in cfg.derived:
            assert getattr(cfg, key) == value, key
    notes = [str(w.message) for w in caught if "does not apply" in str(w.message)]
    assert len(notes) == len(IGNORED.get(name, [])) and all(any(i in n for n in notes) for i in IGNORED.get(name, []))
    again = HfVQConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_contradicting_derived_field_is_refused():
    d = hf_vq.QuantSimConfig(weight_bits=4).to_dict()
    with pytest.raises(ConfigError, match="bits=8 contradicts the fields it derives from"):
        HfVQConfig.from_dict({**d, "bits": 8})


@pytest.mark.parametrize("edit, field", [
    (dict(format_version="2"), "format_version"),
    (dict(format_version=2), "format_version"),
    (dict(layers=[{"type": "affine", "bits": 4}]), "layers"),
    (dict(layers={"model.layers.0.mlp.down_proj": [4, 128]}), "layers['model.layers.0.mlp.down_proj']"),
    (dict(bits="4"), "bits"),
    (dict(group_size=0), "group_size"),
    (dict(method=["gptq"]), "method"),
    (dict(quant_method="gptq"), "quant_method"),
    (dict(percdamp=0.1), "percdamp"),
])
def test_malformed_config_json_gives_config_error(edit, field):
    d = hf_vq.RTNConfig().to_dict()
    with pytest.raises(ConfigError) as info:
        HfVQConfig.from_dict({**d, **edit})
    assert info.value.field == field


def test_from_dict_of_a_non_dict():
    with pytest.raises(ConfigError, match="must be a dict, got list"):
        HfVQConfig.from_dict([("method", "rtn")])


def test_from_dict_kwargs_are_validated():
    d = hf_vq.GPTQConfig().to_dict()
    cfg, unused = HfVQConfig.from_dict(d, return_unused_kwargs=True, bits=3, other=1)
    assert cfg.bits == 3 and unused == {"other": 1}
    with pytest.raises(ConfigError, match="bits"):
        HfVQConfig.from_dict(d, bits="3")


def test_malformed_saved_config_fails_from_pretrained_with_config_error(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=hf_vq.RTNConfig(group_size=32))
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    good = json.loads(path.read_text())
    assert AutoModelForCausalLM.from_pretrained(tmp_path) is not None
    for edit, field in [(dict(format_version="2"), "format_version"), (dict(layers=list(good["quantization_config"]
                                                                                     ["layers"])), "layers")]:
        path.write_text(json.dumps({**good, "quantization_config": {**good["quantization_config"], **edit}}))
        with pytest.raises(ConfigError) as info:
            AutoModelForCausalLM.from_pretrained(tmp_path)
        assert info.value.field == field


def test_a_value_without_effect_warns():
    import warnings

    with pytest.warns(UserWarning, match="finetune_lr=0.001 has no effect"):
        hf_vq.GPTVQConfig(finetune_lr=1e-3)
    with pytest.warns(UserWarning, match="codebook_update_steps=4 has no effect"):
        hf_vq.GPTVQConfig(codebook_update=False, codebook_update_steps=4)
    with pytest.warns(UserWarning, match="min_expert_tokens"):
        hf_vq.GPTQConfig(expert_calibration="all", min_expert_tokens=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_vq.GPTVQConfig(finetune_iterations=5, finetune_lr=1e-3)  # used: no warning
        hf_vq.GPTQConfig(expert_calibration="all")  # the default threshold: nothing was asked
