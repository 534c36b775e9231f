"""Encodings files (and every JSON hf_vq reads) are parsed with a schema: malformed input gives EncodingsError with
the path of the bad value; duplicates, float offsets and values that do not survive the stored dtype are refused;
size and nesting are bounded; a refused file never changes the model. Property-based tests mutate real documents."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hf_vq
from hf_vq.export.aimet import read_encodings
from hf_vq.export.encodings_reader import EncodingsError, parse_document
from hf_vq.algorithms.rtn import rtn_weight
from hf_vq.hub import _read_encodings
from hf_vq.nn.qlinear import QuantLinear

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "aimet-encodings"
REF_FILES = sorted(p.name for p in REF.glob("*.encodings"))
V100 = json.loads((REF / "mlp_w8a8_per-channel_v1.0.0.encodings").read_text())
V061 = json.loads((REF / "mlp_w8a8_per-channel_v0.6.1.encodings").read_text())
V200 = json.loads((REF / "mlp_w8a8_per-channel_v2.0.0.encodings").read_text())
LPBQ = json.loads((REF / "mlp_w4a8_lpbq-bs16-dbw8_v1.0.0.encodings").read_text())


def write(tmp_path, doc, name="x.encodings") -> Path:
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return p


def edited(doc, edit):
    d = copy.deepcopy(doc)
    edit(d)
    return d


def _set(path, value):
    def edit(d):
        *head, last = path
        for k in head:
            d = d[k]
        d[last] = value
    return edit


def _delete(path):
    def edit(d):
        *head, last = path
        for k in head:
            d = d[k]
        del d[last]
    return edit


def test_every_reference_file_still_parses():
    assert len(REF_FILES) == 8
    for f in REF_FILES:
        enc = read_encodings(REF / f)
        assert enc.params and all(p.dtype in ("INT", "FLOAT") for p in enc.params.values())
        assert _read_encodings(REF / f) == json.loads((REF / f).read_text())


# (document, edit, message regex): the examples of the issue, each now a path-qualified EncodingsError
CASES = {
    "entry without a name (was KeyError 'name')": (V100, _delete(["param_encodings", 1, "name"]),
                                                  r"param_encodings\[1\]\.name: missing \(required\)"),
    "string scale": (V100, _set(["param_encodings", 2, "scale", 0], "0.1"),
                     r"param_encodings\[2\]\.scale\[0\]: expected a number, got a string '0\.1'"),
    "bool bitwidth": (V100, _set(["param_encodings", 0, "bw"], True), r"param_encodings\[0\]\.bw: expected an integer"),
    "float offset (was truncated)": (V100, _set(["param_encodings", 0, "offset", 3], -127.6),
                                     r"param_encodings\[0\]\.offset\[3\]: expected an integer, got a number -127\.6"),
    "integral float offset": (V100, _set(["param_encodings", 0, "offset", 0], -128.0),
                              r"param_encodings\[0\]\.offset\[0\]: expected an integer"),
    "offset off the grid": (V100, _set(["param_encodings", 0, "offset", 0], 3),
                            r"param_encodings\[0\]\.offset\[0\]: expected an integer in \[-255, 0\]"),
    "fewer offsets than scales": (V100, _set(["param_encodings", 0, "offset"], [-128]),
                                  r"param_encodings\[0\]\.offset: 1 offsets for 128 scales"),
    "empty scale list (was ZeroDivisionError)": (LPBQ, _set(["param_encodings", 0, "scale"], []),
                                                 r"param_encodings\[0\]\.scale: expected a non-empty list"),
    "zero scale": (V100, _set(["param_encodings", 1, "scale", 5], 0.0),
                   r"param_encodings\[1\]\.scale\[5\]: scale 0\.0"),
    "scale beyond float32": (V100, _set(["param_encodings", 1, "scale", 0], 1e39),
                             r"param_encodings\[1\]\.scale\[0\]: scale 1e\+39 is inf in float32"),
    "scale below float32": (V100, _set(["param_encodings", 1, "scale", 0], 1e-46),
                            r"param_encodings\[1\]\.scale\[0\]: scale 1e-46 is 0\.0 in float32"),
    "huge integer scale": (V100, _set(["param_encodings", 1, "scale", 0], 10**400),
                           r"param_encodings\[1\]\.scale\[0\]: expected a number in the float64 range"),
    "unknown enc_type": (V100, _set(["param_encodings", 0, "enc_type"], "PER_ROW"),
                         r"param_encodings\[0\]\.enc_type: expected one of \['PER_TENSOR'"),
    "entry is a list": (V100, _set(["param_encodings", 0], [1, 2]), r"param_encodings\[0\]: expected an object"),
    "param_encodings is a string": (V100, _set(["param_encodings"], "fc1"), r"param_encodings: expected a list"),
    "duplicate tensor name (last won)": (V100, _set(["param_encodings", 2, "name"], "fc1.weight"),
                                         r"param_encodings\[2\]\.name: duplicate tensor name 'fc1\.weight' "
                                         r"\(also param_encodings\[0\]\)"),
    "duplicate activation name": (V100, _set(["activation_encodings", 1, "name"], "input"),
                                  r"activation_encodings\[1\]\.name: duplicate tensor name 'input'"),
    "LPBQ int scale out of range": (LPBQ, _set(["param_encodings", 0, "per_block_int_scale", 7], 17),
                                    r"param_encodings\[0\]\.per_block_int_scale\[7\]: "
                                    r"expected an integer in \[1, 16\]"),
    "LPBQ int scales not per channel": (LPBQ, _set(["param_encodings", 0, "per_block_int_scale"], [1, 2, 3]),
                                        r"per_block_int_scale: 3 values for 128 channels"),
    "0.6.1 list scale": (V061, _set(["param_encodings", "fc1.weight", 0, "scale"], [0.1]),
                         r"param_encodings\['fc1\.weight'\]\[0\]\.scale: expected a number"),
    "0.6.1 bad is_symmetric": (V061, _set(["param_encodings", "fc1.weight", 0, "is_symmetric"], "yes"),
                               r"is_symmetric: expected a boolean or 'True'/'False'"),
    "0.6.1 mixed bitwidths": (V061, _set(["param_encodings", "fc1.weight", 5, "bitwidth"], 4),
                              r"param_encodings\['fc1\.weight'\]\[5\]: dtype/bitwidth differ"),
    "0.6.1 empty list": (V061, _set(["param_encodings", "fc2.weight"], []),
                         r"param_encodings\['fc2\.weight'\]: expected a non-empty list"),
    "2.0.0 zero point off the uint8 grid": (V200, _set(["encodings", 2, "y_zero_point"], 300),
                                            r"encodings\[2\]\.y_zero_point: expected an integer in \[0, 255\]"),
    "2.0.0 duplicate name": (V200, _set(["encodings", 3, "name"], "fc1.weight"),
                             r"encodings\[3\]\.name: duplicate tensor name 'fc1\.weight'"),
    "unsupported version": (V100, _set(["version"], "3.1"), r"version: expected a supported encodings version"),
    "numeric version": (V100, _set(["version"], 1.0), r"version: expected a string"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_documents_give_path_qualified_errors(tmp_path, case):
    doc, edit, pattern = CASES[case]
    with pytest.raises(EncodingsError, match=pattern):
        read_encodings(write(tmp_path, edited(doc, edit)))
    with pytest.raises(EncodingsError, match=pattern):  # the Hub reader applies the same schema
        _read_encodings(write(tmp_path, edited(doc, edit), "hub.encodings"))


@pytest.mark.parametrize("text,pattern", [
    ("[" * 100_000 + "]" * 100_000, "nested deeper than 32 levels"),          # was RecursionError
    ('{"version": "1.0.0", "x": ' + "[" * 40 + "]" * 40 + "}", "nested deeper than 32 levels"),
    ('{"version": "1.0.0", "param_encodings": [], "version": "0.6.1"}', "duplicate key 'version'"),
    ('{"version": "0.6.1", "param_encodings": {"a": [{"scale": NaN}]}}', "NaN is not a JSON number"),
    ("{nope", "not a JSON encodings file"),
])
def test_json_level_problems(tmp_path, text, pattern):
    with pytest.raises(EncodingsError, match=pattern):
        read_encodings(write(tmp_path, text))


def test_duplicate_names_in_a_0_6_1_object_are_an_error(tmp_path):
    text = (REF / "mlp_w8a8_per-channel_v0.6.1.encodings").read_text()
    fc2 = text.index('"fc2.weight"')
    dup = text[:fc2] + '"fc1.weight"' + text[fc2 + len('"fc2.weight"'):]
    with pytest.raises(EncodingsError, match="duplicate key 'fc1.weight'"):
        read_encodings(write(tmp_path, dup))


def test_non_utf8_and_size_bound(tmp_path):
    p = tmp_path / "latin1.encodings"
    p.write_bytes('{"version": "1.0.0", "producer": {"package": "caf\xe9"}}'.encode("latin-1"))
    with pytest.raises(EncodingsError, match=r"not UTF-8 text \(invalid byte 0xe9"):  # was UnicodeDecodeError
        read_encodings(p)
    big = REF / "mlp_w8a8_per-channel_v1.0.0.encodings"
    with pytest.raises(EncodingsError, match=r"bytes, more than the 1000 allowed \(pass max_bytes= to raise it\)"):
        read_encodings(big, max_bytes=1000)
    with pytest.raises(EncodingsError, match="more than the 1000 allowed"):
        hf_vq.load_encodings(None, big, max_bytes=1000)
    assert read_encodings(big, max_bytes=big.stat().st_size).params  # exactly at the bound


# ------------------------------------------------------------------------------------- applying to a model
def small_model() -> nn.Module:
    """Two QuantLinear layers: 4-bit asymmetric groups of 16, and 8-bit symmetric per channel."""
    g = torch.Generator().manual_seed(0)
    m = nn.Module()
    m.a = QuantLinear.from_affine(rtn_weight(torch.randn(8, 32, generator=g), 4, 16, False), None)
    m.b = QuantLinear.from_affine(rtn_weight(torch.randn(6, 16, generator=g), 8, -1, True), None)
    return m


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("value,shown,becomes", [(1e10, r"1e\+10", "inf"), (1e-30, "1e-30", "0.0")])
def test_scale_that_does_not_survive_fp16_is_refused_and_model_unchanged(tmp_path, value, shown, becomes):
    model = small_model()
    doc = json.loads(hf_vq.export_encodings(model, tmp_path).read_text())
    doc["param_encodings"][1]["scale"][2] = value  # b.weight, channel 2
    before = state(model)
    with pytest.raises(EncodingsError, match=rf"b\.weight: scale {shown} \(row 2, group 0\) becomes {becomes} "
                                             r"in torch\.float16"):
        hf_vq.load_encodings(model, write(tmp_path, doc))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_layer_mismatch_from_a_layer_hook_is_an_encodings_error(tmp_path):
    model = small_model()
    doc = json.loads(hf_vq.export_encodings(model, tmp_path).read_text())
    doc["param_encodings"][0]["bw"] = 8
    with pytest.raises(EncodingsError, match="encoding has 8-bit codes, layer has 4 bits"):
        hf_vq.load_encodings(model, write(tmp_path, doc))


# ------------------------------------------------------------------------------------- property-based tests
JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-300, 300), st.integers(), st.floats(allow_nan=False),
                        st.floats(min_value=1e-8, max_value=1.0), st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                               st.dictionaries(st.text(max_size=6), kids, max_size=3)),
                           max_leaves=8)


def _paths(v, prefix=()):
    yield prefix
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _paths(x, prefix + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v[:6]):  # long scale lists: the first few stand for the rest
            yield from _paths(x, prefix + (i,))


@st.composite
def mutated(draw, docs):
    doc = copy.deepcopy(draw(st.sampled_from(docs)))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        path = draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        how = draw(st.sampled_from(["replace", "delete", "duplicate"]))
        if how == "delete":
            del parent[path[-1]]
        elif how == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[path[-1]]))
        else:
            parent[path[-1]] = draw(JSON_VALUES)
    return doc


SMALL_V100 = edited(V100, lambda d: [e.update(scale=e["scale"][:4], offset=e["offset"][:4])
                                     for e in d["param_encodings"]])
SMALL_V061 = edited(V061, lambda d: d["param_encodings"].update({k: v[:4] for k, v in d["param_encodings"].items()}))


@given(mutated([SMALL_V100, SMALL_V061, V200]))
def test_mutated_documents_parse_or_raise_our_error(doc):
    try:
        enc = parse_document(doc)
    except EncodingsError:
        return
    for p in enc.params.values():  # what parses is usable as stored
        if p.dtype == "INT" and p.scale:
            s = torch.tensor(p.scale, dtype=torch.float32)
            assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
            assert all(type(o) is int for o in p.offset)


VALID_SCALES = st.floats(min_value=1e-30, max_value=1e30)  # finite and > 0 in float32


@st.composite
def valid_documents(draw):
    """A 1.0.0 or 0.6.1 document with every INT entry given new valid values and a new unique name: scales
    finite and > 0 in float32, offsets in [-(2^bw - 1), 0], either symmetry. Returns (document, {name: values})."""
    version = draw(st.sampled_from(["1.0.0", "0.6.1"]))
    doc = copy.deepcopy(SMALL_V100 if version == "1.0.0" else SMALL_V061)
    want = {}
    names = iter(draw(st.lists(st.text(min_size=1, max_size=8), min_size=16, max_size=16, unique=True)))
    if version == "1.0.0":
        for section in ("param_encodings", "activation_encodings"):
            for e in doc[section]:
                e["name"] = next(names)
                if e.get("dtype", "INT") != "INT" or e.get("enc_type") == "LPBQ":
                    continue
                n = len(e["scale"])
                e["scale"] = draw(st.lists(VALID_SCALES, min_size=n, max_size=n))
                e["offset"] = draw(st.lists(st.integers(-(2 ** e["bw"] - 1), 0), min_size=n, max_size=n))
                e["is_sym"] = draw(st.booleans())
                want[(section, e["name"])] = (e["scale"], e["offset"], e["is_sym"])
        return doc, want
    for section in ("param_encodings", "activation_encodings"):
        doc[section] = {next(names): entries for entries in doc[section].values()}
        for name, entries in doc[section].items():
            sym = draw(st.booleans())
            for e in entries:
                e["scale"] = draw(VALID_SCALES)
                e["offset"] = draw(st.integers(-(2 ** e["bitwidth"] - 1), 0))
                e["is_symmetric"] = str(sym)
            want[(section, name)] = ([e["scale"] for e in entries], [e["offset"] for e in entries], sym)
    return doc, want


@given(valid_documents())
def test_valid_documents_parse_to_exactly_their_values(case):
    doc, want = case
    enc = parse_document(json.loads(json.dumps(doc)))  # as read from a file
    assert want and any(section == "param_encodings" for section, _ in want)
    for (section, name), (scale, offset, sym) in want.items():
        if section == "param_encodings":
            p = enc.params[name]
            assert (p.scale, p.offset, p.is_sym) == (scale, offset, sym)
        else:
            assert name in enc.activations


@settings(max_examples=30)  # each example exports and re-applies to a model
@given(st.integers(0, 2**32 - 1), st.sampled_from([(4, 16, False), (8, -1, True), (2, 8, False), (8, 32, True)]))
def test_exported_encodings_of_any_model_load_back_unchanged(tmp_path_factory, seed, grid):
    """export_encodings then load_encodings on the same model: accepted, and every stored tensor unchanged."""
    bits, group, sym = grid
    g = torch.Generator().manual_seed(seed)
    model = nn.Module()
    model.a = QuantLinear.from_affine(rtn_weight(torch.randn(8, 32, generator=g) * 10 ** (seed % 5 - 2), bits, group,
                                                 sym), None)
    d = tmp_path_factory.getbasetemp()
    path = hf_vq.export_encodings(model, d, filename_prefix=f"valid{seed}")
    before = state(model)
    hf_vq.load_encodings(model, path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_arbitrary_bytes_parse_or_raise_our_error(tmp_path_factory, data):
    p = tmp_path_factory.getbasetemp() / "fuzz.encodings"
    p.write_bytes(data)
    try:
        read_encodings(p)
    except EncodingsError:
        pass


@settings(max_examples=60)  # each example exports and re-applies to a model: fewer, to stay within a few seconds
@given(st.data())
def test_mutated_encodings_never_silently_change_a_model(tmp_path_factory, data):
    model = small_model()
    d = tmp_path_factory.getbasetemp()
    doc = json.loads(hf_vq.export_encodings(model, d, filename_prefix="base").read_text())
    doc = data.draw(mutated([doc]))
    before = state(model)
    p = d / "mutated.encodings"
    p.write_text(json.dumps(doc))
    try:
        hf_vq.load_encodings(model, p)
    except EncodingsError:
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # refused: untouched
        return
    for name in ("a", "b"):  # accepted: the layers hold a grid they can run
        getattr(model, name).check_stored(name)
