"""Property-based tests of the checkpoint checks: random and mutated layer records and stored tensors give either a
module that holds exactly what was given, or CheckpointError; never another exception, never a silent change."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hf_vq.algorithms.rtn import rtn_weight
from hf_vq.formats.vq import VQLayout
from hf_vq.model.checkpoint import validate_layer_records
from hf_vq.nn.qat import QuantSimLinear
from hf_vq.nn.qlinear import QuantLinear
from hf_vq.nn.records import CheckpointError
from hf_vq.nn.registry import build_module, layer_record
from hf_vq.nn.vqlinear import VQLinear

BASE_RECORDS = [
    {"type": "affine", "in_features": 96, "out_features": 64, "bits": 4, "group_size": 32, "sym": False,
     "bias": False},
    {"type": "vq", "in_features": 96, "out_features": 64, "vector_dim": 2, "index_bits": 6, "codebook_bits": 8,
     "rows_per_block": 32, "cols_per_block": 64, "normalize": True, "bias": True},
    {"type": "quantsim", "in_features": 96, "out_features": 64, "bits": 4, "group_size": 16, "sym": True,
     "bias": True, "granularity": "lpbq", "decompressed_bits": 8, "input_quantizer": {"kind": "int", "bits": 8},
     "output_quantizer": None},
]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.integers(), st.floats(), st.text(max_size=6),
                   st.sampled_from(["affine", "vq", "quantsim", "lpbq", "blockwise", "float16", "4"]),
                   st.lists(st.integers(0, 9), max_size=3),
                   st.fixed_dictionaries({"kind": st.sampled_from(["int", "float", "x"]),
                                          "bits": st.sampled_from([4, 8, 16, 5, "8"])}))


@st.composite
def records(draw):
    rec = copy.deepcopy(draw(st.sampled_from(BASE_RECORDS)))
    keys = sorted(rec) + ["extra_field"]
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(keys))
        if draw(st.booleans()) and key in rec:
            del rec[key]
        else:
            rec[key] = draw(VALUES)
    return draw(st.one_of(st.just(rec), VALUES)) if draw(st.integers(0, 9)) == 0 else rec


@given(records())
def test_layer_records_build_exactly_or_raise_our_error(rec):
    try:
        validate_layer_records({"model.layers.0.mlp.up_proj": rec})
        with torch.device("meta"):  # what build_skeleton does: no memory for absurd shapes
            mod = build_module(rec, None)
    except CheckpointError as e:
        assert "model.layers.0.mlp.up_proj" in str(e)
        return
    # accepted: the module is exactly what the record says (optional fields at their defaults)
    rebuilt = layer_record(mod)
    assert {k: v for k, v in rebuilt.items() if k in rec} == rec
    assert set(rebuilt) >= set(rec)


@st.composite
def valid_records(draw):
    """Records the layer-record schema (hf_vq/nn/records.py) allows: every required field at an allowed value,
    optional fields present or not, cross-field rules kept."""
    kind = draw(st.sampled_from(["affine", "quantsim", "vq"]))
    n_in, n_out = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    rec = {"type": kind, "in_features": n_in, "out_features": n_out, "bias": draw(st.booleans())}
    if kind == "vq":
        vector_dim = draw(st.sampled_from([1, 2, 4]))
        rec.update(vector_dim=vector_dim, index_bits=draw(st.integers(1, 8)),
                   codebook_bits=draw(st.sampled_from([4, 8, 16])), rows_per_block=draw(st.integers(1, 400)),
                   cols_per_block=vector_dim * draw(st.integers(1, 100)))
        if draw(st.booleans()):
            rec["normalize"] = draw(st.booleans())
        return rec
    bits = draw(st.integers(2, 8))
    rec.update(bits=bits, group_size=draw(st.just(-1) | st.integers(1, 400)), sym=draw(st.booleans()))
    if kind == "quantsim":
        quantizer = st.none() | st.fixed_dictionaries({"kind": st.just("int"), "bits": st.sampled_from([4, 8, 16])}) \
            | st.fixed_dictionaries({"kind": st.just("float")},
                                    optional={"dtype": st.sampled_from(["float16", "bfloat16"])})
        granularity = draw(st.none() | st.sampled_from(["per_channel", "blockwise", "lpbq"]))
        if granularity is not None:
            rec["granularity"] = granularity
        if granularity == "lpbq":
            rec["decompressed_bits"] = draw(st.integers(bits + 1, min(bits + 10, 18)))
        elif draw(st.booleans()):
            rec["decompressed_bits"] = draw(st.none() | st.integers(3, 18))
        for q in ("input_quantizer", "output_quantizer"):
            if draw(st.booleans()):
                rec[q] = draw(quantizer)
    return rec


@given(valid_records())
def test_valid_layer_records_are_accepted_and_rebuilt_exactly(rec):
    validate_layer_records({"model.layers.0.mlp.up_proj": copy.deepcopy(rec)})
    with torch.device("meta"):
        mod = build_module(copy.deepcopy(rec), None)
    want = copy.deepcopy(rec)
    for q in ("input_quantizer", "output_quantizer"):
        if isinstance(want.get(q), dict) and want[q]["kind"] == "float":
            want[q].setdefault("dtype", "float16")  # the documented default
    rebuilt = layer_record(mod)
    assert {k: v for k, v in rebuilt.items() if k in want} == want and set(rebuilt) >= set(want)


def _affine_module() -> QuantLinear:
    g = torch.Generator().manual_seed(0)
    return QuantLinear.from_affine(rtn_weight(torch.randn(16, 40, generator=g), 4, 16, False), None)


DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
          torch.float32]
FLOATS = [0.0, 1.0, -1.0, 1e-8, 70000.0, -0.5, float("inf"), float("-inf"), float("nan")]
# small codes, grid edges, and float bit patterns (int16 0x7C00 = fp16 inf, int32 0x7F800000 = fp32 inf, -1 = NaN)
INTS = [0, 1, 2, 3, 15, 16, 127, 255, -1, -128, 0x7C00, 0x7F800000, 2**40]


@st.composite
def mutated_tensors(draw, good: dict[str, torch.Tensor]):
    tensors = {k: v.clone() for k, v in good.items()}
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(tensors)))
        t = tensors[key]
        how = draw(st.sampled_from(["value", "value", "dtype", "shape", "delete"]))
        if how == "delete":
            del tensors[key]
        elif how == "dtype":
            tensors[key] = t.to(draw(st.sampled_from(DTYPES)))
        elif how == "shape":
            tensors[key] = t.flatten()[: max(t.numel() - 1, 0)] if draw(st.booleans()) else t.unsqueeze(0)
        elif t.numel():
            if t.is_floating_point():
                v = draw(st.sampled_from(FLOATS))
            else:
                info = torch.iinfo(t.dtype)
                v = draw(st.sampled_from([x for x in INTS if info.min <= x <= info.max]))
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = v
    return tensors


GOOD_AFFINE = {k: v.clone() for k, v in _affine_module().state_dict().items()}


@given(mutated_tensors(GOOD_AFFINE))
def test_affine_tensors_load_exactly_or_raise_our_error(tensors):
    mod = _affine_module()
    try:
        mod.load_state_dict(tensors)
    except CheckpointError:
        assert all(torch.equal(v, mod.state_dict()[k]) for k, v in GOOD_AFFINE.items())  # untouched
        return
    except RuntimeError as e:  # torch's own strict-load report: only for missing keys, which it names
        assert "Missing key(s)" in str(e)
        return
    for k, v in tensors.items():  # loaded as given: same dtype, same values (no cast)
        assert mod.state_dict()[k].dtype == v.dtype and torch.equal(mod.state_dict()[k], v)
    y = mod(torch.randn(3, 40))
    assert bool(torch.isfinite(y).all())


def _vq_module() -> VQLinear:
    lay = VQLayout(16, 24, 2, 4, 8, 8, 16, normalize=True)
    mod = VQLinear(lay, bias=False)
    g = torch.Generator().manual_seed(0)
    mod.vq_indices.copy_(torch.randint(0, 256, mod.vq_indices.shape, generator=g, dtype=torch.uint8))
    mod.vq_codebook.copy_(torch.randint(0, 256, mod.vq_codebook.shape, generator=g, dtype=torch.uint8))
    mod.vq_codebook_scales.copy_(torch.full(mod.vq_codebook_scales.shape, 0.01).half().view(torch.int16))
    mod.vq_norm_codes.copy_(torch.randint(0, 256, mod.vq_norm_codes.shape, generator=g, dtype=torch.uint8))
    mod.vq_norm_base.copy_(torch.tensor([0.5]).view(torch.int32))
    return mod


GOOD_VQ = {k: v.clone() for k, v in _vq_module().state_dict().items()}


@given(mutated_tensors(GOOD_VQ))
def test_vq_tensors_load_exactly_or_raise_our_error(tensors):
    mod = _vq_module()
    mod.fast_decode = False
    try:
        mod.load_state_dict(tensors)
    except CheckpointError:
        assert all(torch.equal(v, mod.state_dict()[k]) for k, v in GOOD_VQ.items())
        return
    except RuntimeError as e:
        assert "Missing key(s)" in str(e)
        return
    for k, v in tensors.items():
        assert mod.state_dict()[k].dtype == v.dtype and torch.equal(mod.state_dict()[k], v)
    assert bool(torch.isfinite(mod(torch.randn(2, 24))).all())


@given(st.integers(0, 2**32 - 1), st.sampled_from([1e-3, 1.0, 300.0]), st.floats(0.0, 0.5), st.booleans())
def test_valid_affine_tensors_are_accepted_exactly(seed, magnitude, zero_fraction, positive):
    """The tensors of any 16x40 4-bit g16 weight RTN writes (tiny to large ranges, exact zeros, one-signed rows)
    load into the skeleton unchanged, and the module computes what the source module computes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 40, generator=g) * magnitude
    w = w.abs() if positive else w
    w[torch.rand(w.shape, generator=g) < zero_fraction] = 0.0
    source = QuantLinear.from_affine(rtn_weight(w, 4, 16, False), None)
    mod = _affine_module()
    mod.load_state_dict(source.state_dict())
    for k, v in source.state_dict().items():
        assert mod.state_dict()[k].dtype == v.dtype and torch.equal(mod.state_dict()[k], v)
    x = torch.randn(3, 40, generator=g)
    assert torch.equal(mod(x), source(x))


@given(st.integers(0, 2**32 - 1), st.sampled_from([1e-4, 0.01, 1.0, 100.0]), st.sampled_from([0.25, 1.0, 3.0]))
def test_valid_vq_tensors_are_accepted_exactly(seed, scale, norm_base):
    """Any indices, codebook entries and norm codes, with finite positive codebook scales and norm base, load
    unchanged, and the forward is finite."""
    g = torch.Generator().manual_seed(seed)
    tensors = {k: v.clone() for k, v in GOOD_VQ.items()}
    for k in ("vq_indices", "vq_codebook", "vq_norm_codes"):
        tensors[k] = torch.randint(0, 256, tensors[k].shape, generator=g, dtype=torch.uint8)
    scales = torch.rand(tensors["vq_codebook_scales"].shape, generator=g) * scale + scale / 2
    tensors["vq_codebook_scales"] = scales.half().view(torch.int16)
    tensors["vq_norm_base"] = torch.tensor([norm_base]).view(torch.int32)
    mod = _vq_module()
    mod.fast_decode = False
    mod.load_state_dict(tensors)
    for k, v in tensors.items():
        assert mod.state_dict()[k].dtype == v.dtype and torch.equal(mod.state_dict()[k], v)
    assert bool(torch.isfinite(mod(torch.randn(2, 24, generator=g))).all())


def test_quantsim_record_rules():
    rec = dict(BASE_RECORDS[2], decompressed_bits=4)  # lpbq needs decompressed_bits > bits
    with pytest.raises(CheckpointError, match=r"\['x'\]: decompressed_bits must be an integer in \(4, 14\]"):
        validate_layer_records({"x": rec})
    with torch.device("meta"):
        assert isinstance(build_module(BASE_RECORDS[2], None), QuantSimLinear)
