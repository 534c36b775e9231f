"""Property-based tests of the config schemas: random and mutated keyword arguments for every config constructor and
for ``from_dict`` give a valid config (that keeps every value it was given) or a ConfigError naming the field, never
another exception. Example counts: the "ci" / "extended" hypothesis profiles in tests/conftest.py."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import hf_vq
from hf_vq.config import ConfigError, HfVQConfig
from hf_vq.config import schema as sc
from hf_vq.config.base import BASE_SCHEMA, FORMAT_VERSION, NOTES, Device, FormatVersion
from hf_vq.config.mixed import Allocation, Candidates

CLASSES = [hf_vq.RTNConfig, hf_vq.GPTQConfig, hf_vq.GPTVQConfig, hf_vq.AdaScaleConfig, hf_vq.QuantSimConfig]
ALL_FIELDS = sorted(set().union(*(c.schema.fields for c in CLASSES)))
LEGACY = set(BASE_SCHEMA.fields)


def _tokenizer(text, **kwargs):  # a callable stands in for a tokenizer object
    return {"input_ids": torch.zeros(1, 1, dtype=torch.long)}


class _NoEq:
    def __eq__(self, other):
        raise RuntimeError("no ==")

    __hash__ = object.__hash__


ODD = st.sampled_from([
    float("nan"), float("inf"), -float("inf"), 2**70, -(2**70), 10**400, -1, 0, 1, 2, 3, 4, 8, 16, 1.5, 4.0, 1e-300,
    "", "a", "4", "0.01", "no", "true", "lpbq", "float32", "bfloat16", "q_proj", "[", "(" * 300, b"x", True, False,
    None, (), [], {}, [1], ["q_proj"], ("q_proj",), {"q_proj": {"bits": 8}}, {"a": [1]}, {1: 2}, object(),
    _NoEq(), Path("p"), torch.zeros(2, dtype=torch.long), torch.tensor(4), _tokenizer, math.pi,
])
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | ODD,
    lambda inner: (st.lists(inner, max_size=3) | st.tuples(inner)
                   | st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)
KEYS = st.sampled_from(ALL_FIELDS + ["bits", "group_size", "sym", "method", "quant_method", "calibration", "loading",
                                     "nonsense", "Bits", "", "self", "cls", "args"]) | st.text(max_size=6)


def valid(check: sc.Check) -> st.SearchStrategy:
    """Values a check accepts (so that cross-field rules are reached, not only type errors)."""
    if isinstance(check, sc.Optional):
        return st.none() | valid(check.inner)
    if isinstance(check, sc.Bool):
        return st.booleans()
    if isinstance(check, FormatVersion):
        return st.integers(1, FORMAT_VERSION)
    if isinstance(check, Device):
        return st.sampled_from(["auto", "cpu", "cuda", "cuda:1"])
    if isinstance(check, sc.GroupSize):
        return st.sampled_from([-1, 2, 16, 32, 64, 128])
    if isinstance(check, sc.Int):
        if check.choices:
            return st.sampled_from(check.choices)
        lo = 0 if check.lo is None else check.lo
        return st.integers(lo, min(check.hi, lo + 40)) | st.just(check.hi)
    if isinstance(check, sc.Float):
        lo = -1e6 if check.lo is None else check.lo
        hi = 1e6 if check.hi is None else check.hi
        return st.floats(lo, hi, exclude_min=check.lo_open, exclude_max=check.hi_open)
    if isinstance(check, sc.Str):
        return st.sampled_from(check.choices) if check.choices else st.text(min_size=1, max_size=6)
    if isinstance(check, sc.StrList):
        return st.lists(st.text(min_size=1, max_size=6), max_size=3)
    if isinstance(check, sc.Overrides):
        override = st.fixed_dictionaries({}, optional={k: valid(c) for k, c in check.keys.items()})
        return st.dictionaries(st.sampled_from(["down_proj", r"layers\.0\.", "q_proj$"]), override, max_size=2)
    if isinstance(check, Candidates):
        setting = st.fixed_dictionaries({k: valid(c) for k, c in check.keys.items()})
        return st.lists(setting, min_size=1, max_size=3, unique_by=lambda d: tuple(sorted(d.items())))
    if isinstance(check, Allocation):
        setting = st.fixed_dictionaries({}, optional={k: valid(c) for k, c in check.keys.items()})
        return st.dictionaries(st.sampled_from(["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]),
                               setting, max_size=2)
    if isinstance(check, sc.Records):
        return st.dictionaries(st.text(min_size=1, max_size=6), st.dictionaries(st.text(max_size=4), st.integers(),
                                                                                max_size=2), max_size=2)
    if isinstance(check, sc.Instance):
        if check.callable_ok:
            return st.sampled_from(["some/tokenizer", _tokenizer])
        if list in check.types:
            return st.sampled_from(["calib.txt", ["one text", "two"], torch.zeros(2, 8, dtype=torch.long)])
        return st.sampled_from(["acts", Path("cache") / "acts"])  # paths are only recorded, never created
    raise AssertionError(f"no strategy for {type(check).__name__}: add one so the new check is fuzzed")


@st.composite
def valid_kwargs(draw, cls):
    names = draw(st.lists(st.sampled_from(sorted(cls.schema.fields)), unique=True, max_size=6))
    return {n: draw(valid(cls.schema.fields[n].check)) for n in names}


@st.composite
def mutated_kwargs(draw, cls):
    kwargs = draw(valid_kwargs(cls))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(kwargs)) if kwargs and draw(st.booleans()) else KEYS)
        kwargs[key] = draw(JUNK)
    return kwargs


def _kept(stored, given) -> bool:
    if stored is given:
        return True
    if isinstance(given, os.PathLike):
        return stored == str(given)
    if isinstance(given, (torch.Tensor,)) or callable(given):
        return stored is given
    if isinstance(given, tuple):
        return stored == list(given)
    return stored == given


def _check_error(e: ConfigError) -> None:
    assert type(e) is ConfigError and str(e)
    assert e.field is None or e.field in str(e) or sc.show(e.field)[1:-1] in str(e), (e.field, str(e))


def _check_accepted(cfg: HfVQConfig, given: dict) -> None:
    for key, value in given.items():
        if key in cfg.schema.fields:
            assert _kept(getattr(cfg, key), value), (key, value, getattr(cfg, key))
    d = cfg.to_dict()
    again = HfVQConfig.from_dict(json.loads(json.dumps(d)))  # JSON-clean, and reloads to the same saved fields
    assert type(again) is type(cfg)
    assert _saved(again.to_dict()) == _saved(d)


def _saved(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in NOTES}  # the notes describe runtime objects not saved


def _construct(cls, kwargs):
    try:
        cfg = cls(**kwargs)
    except ConfigError as e:
        _check_error(e)
        return None
    _check_accepted(cfg, {k: v for k, v in kwargs.items() if k not in ("method", "quant_method", *NOTES)})
    return cfg


def broken_rules(cls, kwargs) -> set[str]:
    """The fields of the cross-field rules (each config's documented constraints between fields) that ``kwargs``
    break, the other fields at their defaults; empty: the config must be accepted."""
    v = {n: f.default for n, f in cls.schema.fields.items()} | kwargs
    overrides = list((v.get("module_overrides") or {}).values())
    broken = set()
    if v.get("lm_head_bits") is not None and "lm_head" in (v.get("modules_to_not_convert") or []):
        broken.add("lm_head_bits")
    if cls is hf_vq.GPTVQConfig and v["cols_per_block"] % v["vector_dim"]:
        broken.add("cols_per_block")
    lpbq = v.get("weight_granularity") == "lpbq"
    if cls is hf_vq.AdaScaleConfig and lpbq:
        if not all([v["sym"]] + [o.get("sym", v["sym"]) for o in overrides]):
            broken.add("sym")
        bits = [v["bits"]] + [o.get("bits", v["bits"]) for o in overrides]
        if any(v["decompressed_bw"] <= b for b in bits) or v["decompressed_bw"] - min(bits) > 10:
            broken.add("decompressed_bw")
        if v["group_size"] == -1 or any(o.get("group_size") == -1 for o in overrides):
            broken.add("group_size")
    if cls is hf_vq.GPTVQConfig and v["average_bits"] is not None:
        candidates = v["candidates"] or cls.default_candidates
        if v["average_bits"] < min(c["index_bits"] / c["vector_dim"] for c in candidates):
            broken.add("average_bits")
        if any(v["cols_per_block"] % c["vector_dim"] for c in candidates):
            broken.add("candidates")
    if cls in (hf_vq.GPTQConfig, hf_vq.AdaScaleConfig) and v["average_bits"] is not None:
        candidates = v["candidates"] or cls.default_candidates
        if v["average_bits"] < min(c["bits"] for c in candidates):
            broken.add("average_bits")
        if any("bits" in o or "group_size" in o for o in overrides):
            broken.add("module_overrides")
        if lpbq and any(c["group_size"] == -1 or c["bits"] >= v["decompressed_bw"] for c in candidates):
            broken.add("candidates")
    if cls is hf_vq.QuantSimConfig:
        if lpbq and not (v["weight_bits"] < v["decompressed_bits"] <= min(16, v["weight_bits"] + 10)):
            broken.add("decompressed_bits")
        if v["activation_dtype"] != "int" and v["activation_bits"] not in (None, 16):
            broken.add("activation_bits")
        if any(o.get("sym", True) is not True for o in overrides):
            broken.add("module_overrides")
    return broken


@given(st.sampled_from(CLASSES).flatmap(lambda c: st.tuples(st.just(c), valid_kwargs(c))))
def test_valid_kwargs_build_unless_a_cross_field_rule_is_broken(case):
    """Values each field accepts: the config is built, keeps them and round-trips through JSON, unless they break a
    cross-field rule; then a ConfigError names one of the rule's fields."""
    cls, kwargs = case
    broken = broken_rules(cls, kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a value with no effect (inert) warns: still accepted
        try:
            cfg = cls(**kwargs)
        except ConfigError as e:
            _check_error(e)
            assert e.field in broken, (kwargs, str(e))
            return
    assert not broken, (broken, kwargs)
    _check_accepted(cfg, kwargs)


def representatives(check: sc.Check) -> list:
    """A few values ``check`` accepts, its bounds and every choice included (a deterministic table next to the
    random draws, so that no accepted value of any field is missed)."""
    if isinstance(check, sc.Optional):
        return [None] + representatives(check.inner)
    if isinstance(check, FormatVersion):
        return list(range(1, FORMAT_VERSION + 1))
    if isinstance(check, Device):
        return ["auto", "cpu", "cuda:1"]
    if isinstance(check, sc.Bool):
        return [False, True]
    if isinstance(check, sc.GroupSize):
        return [-1, 2, 32, 128]
    if isinstance(check, sc.Int):
        if check.choices:
            return list(check.choices)
        lo = 0 if check.lo is None else check.lo
        return sorted({lo, lo + 1, lo + 7, check.hi})
    if isinstance(check, sc.Float):
        lo = -1e6 if check.lo is None else check.lo
        hi = 1e6 if check.hi is None else check.hi
        ends = [v for v, is_open in ((lo, check.lo_open), (hi, check.hi_open)) if not is_open]
        return ends + [lo + (hi - lo) * t for t in (0.001, 0.5, 0.999)]
    if isinstance(check, sc.Str):
        return list(check.choices) if check.choices else ["x"]
    if isinstance(check, sc.StrList):
        return [[], ["q_proj", "layers.0"]]
    if isinstance(check, sc.Overrides):
        return [{}] + [{"q_proj$": {k: v}} for k, c in check.keys.items() for v in representatives(c)[:3]]
    if isinstance(check, Candidates):
        return [[{k: representatives(c)[-1] for k, c in check.keys.items()}]]
    if isinstance(check, Allocation):
        return [{}, {"model.layers.0.mlp.down_proj": {k: representatives(c)[-1] for k, c in check.keys.items()}}]
    if isinstance(check, sc.Records):
        return [{}, {"layer": {"bits": 4}}]
    if isinstance(check, sc.Instance):
        return ["some/tokenizer", _tokenizer] if check.callable_ok else ["acts", Path("cache") / "acts"]
    raise AssertionError(f"no representatives for {type(check).__name__}: add them so the new check is covered")


TABLE = [(cls, name, value) for cls in CLASSES for name, f in sorted(cls.schema.fields.items())
         for value in representatives(f.check)]


@pytest.mark.parametrize("cls,name,value", TABLE, ids=[f"{c.__name__}.{n}={v!r}"[:60] for c, n, v in TABLE])
def test_each_accepted_value_alone_builds_a_config(cls, name, value):
    """One field set to a value its check accepts, the others at their defaults: built, kept, JSON round trip;
    refused only by a cross-field rule with the defaults, naming one of its fields."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        broken = broken_rules(cls, {name: value})
        try:
            cfg = cls(**{name: value})
        except ConfigError as e:
            assert e.field in broken, str(e)
            return
    assert not broken, broken
    _check_accepted(cfg, {name: value})


@given(st.sampled_from(CLASSES).flatmap(lambda c: st.tuples(st.just(c), valid_kwargs(c))))
def test_valid_config_json_loads(case):
    """config.json of a valid config (as to_dict writes it, through JSON) loads back to the same fields."""
    cls, kwargs = case
    if broken_rules(cls, kwargs):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = json.loads(json.dumps(cls(**kwargs).to_dict()))
        again = HfVQConfig.from_dict(d)
    assert type(again) is cls and _saved(again.to_dict()) == _saved(d)


@given(st.sampled_from(CLASSES).flatmap(lambda c: st.tuples(st.just(c), mutated_kwargs(c))))
def test_mutated_kwargs_give_a_config_or_config_error(case):
    cls, kwargs = case
    _construct(cls, kwargs)


@given(st.sampled_from(CLASSES), st.dictionaries(KEYS, JUNK, max_size=5))
def test_random_kwargs_give_a_config_or_config_error(cls, kwargs):
    _construct(cls, kwargs)


def _from_dict(d):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cfg = HfVQConfig.from_dict(d)
        except ConfigError as e:
            _check_error(e)
            return None
    assert isinstance(cfg, HfVQConfig)
    text = " ".join(str(w.message) for w in caught)
    for key, value in d.items():
        if key in cfg.schema.fields:
            assert _kept(getattr(cfg, key), value), key
        elif key in LEGACY and key not in cfg.derived:
            # a field older versions wrote for every method: dropped, and loudly unless it held the default
            default = BASE_SCHEMA.fields[key].default
            assert (type(value) is type(default) and value == default) or f"field {key}=" in text, key
    _check_accepted(cfg, {})
    return cfg


@st.composite
def mutated_dicts(draw):
    cls = draw(st.sampled_from(CLASSES))
    try:
        d = cls(**draw(valid_kwargs(cls))).to_dict()
    except ConfigError:
        d = cls().to_dict()
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "set", "delete", "method"]))
        if op == "delete" and d:
            d.pop(draw(st.sampled_from(sorted(d))))
        elif op == "method":
            d["method"] = draw(st.sampled_from(["rtn", "gptq", "gptvq", "adascale", "quantsim", "", "GPTQ"]) | JUNK)
        else:
            d[draw(KEYS)] = draw(JUNK)
    return d


@given(mutated_dicts())
def test_mutated_config_json_gives_a_config_or_config_error(d):
    _from_dict(d)


LEGACY_FILE = Path(__file__).parent / "data" / "legacy_hf_vq_configs.json"
LEGACY_DICTS = list(json.loads(LEGACY_FILE.read_text()).values())


@given(st.sampled_from(LEGACY_DICTS), st.lists(st.tuples(KEYS, JUNK), min_size=1, max_size=3))
def test_mutated_legacy_config_json_gives_a_config_or_config_error(d, edits):
    d = dict(d)
    for key, value in edits:
        d[key] = value
    _from_dict(d)


@given(JUNK)
def test_from_dict_of_anything(value):
    _from_dict(value) if isinstance(value, dict) else _from_dict_not_a_dict(value)


def _from_dict_not_a_dict(value):
    try:
        HfVQConfig.from_dict(value)
    except ConfigError as e:
        _check_error(e)
    else:
        raise AssertionError(f"from_dict accepted {value!r}")


@given(st.sampled_from(CLASSES).flatmap(lambda c: st.tuples(st.just(c), st.sampled_from(sorted(c.schema.fields)))),
       JUNK | ODD)
def test_assignment_is_validated_and_atomic(case, value):
    cls, name = case
    cfg = cls()
    before = cfg.to_dict()
    try:
        setattr(cfg, name, value)
    except ConfigError as e:
        _check_error(e)
        assert cfg.to_dict() == before  # a refused assignment leaves the config unchanged
        return
    assert _kept(getattr(cfg, name), value)
    _check_accepted(cfg, {})
