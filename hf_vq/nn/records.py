"""Checks on what a saved checkpoint hands a quantized module: its config.json layer record (one declarative schema
per layer type) and its stored tensors (dtype, shape, and cheap value-range checks).

Every failure raises :class:`CheckpointError` naming the layer and the field or tensor. What the range checks cannot
see: a flipped bit that leaves a value inside its valid range (a code 5 -> 4, a scale 0.0123 -> 0.0124) loads as a
different but well-formed model. Only a checksum detects that; see ``hf_vq.model.checkpoint`` (``checksums=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


class CheckpointError(ValueError):
    """A saved hf_vq checkpoint (a config.json layer record or a stored tensor) is malformed."""


@dataclass(frozen=True)
class Field:
    """One layer-record field: its JSON type, whether it must be present, and its allowed values."""

    kind: str                          # "int", "bool", "str", "quantizer"
    required: bool = True
    choices: tuple | None = None       # allowed values
    minimum: int | None = None         # ints: smallest allowed value
    maximum: int | None = None
    nullable: bool = False             # null allowed
    also: tuple = ()                   # ints: extra allowed values outside [minimum, maximum] (group_size -1)


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _check_quantizer_spec(v: Any, where: str) -> None:
    if not isinstance(v, dict):
        raise CheckpointError(f"{where}: expected null or an object, got {_type_name(v)}")
    kind = v.get("kind")
    if kind == "int":
        extra = set(v) - {"kind", "bits"}
        bits = v.get("bits")
        if type(bits) is not int or bits not in (4, 8, 16):
            raise CheckpointError(f"{where}.bits: expected 4, 8 or 16, got {bits!r}")
    elif kind == "float":
        extra = set(v) - {"kind", "dtype"}
        if v.get("dtype", "float16") not in ("float16", "bfloat16"):
            raise CheckpointError(f"{where}.dtype: expected 'float16' or 'bfloat16', got {v.get('dtype')!r}")
    else:
        raise CheckpointError(f"{where}.kind: expected 'int' or 'float', got {kind!r}")
    if extra:
        raise CheckpointError(f"{where}: unknown fields {sorted(extra)}")


def _check_field(f: Field, v: Any, where: str) -> None:
    if v is None:
        if f.nullable:
            return
        raise CheckpointError(f"{where}: expected {f.kind}, got null")
    if f.kind == "quantizer":
        _check_quantizer_spec(v, where)
        return
    expected = {"int": int, "bool": bool, "str": str}[f.kind]
    if type(v) is not expected:  # exact: True is not an int here, 4.0 and "4" are not ints
        raise CheckpointError(f"{where}: expected {_type_name(expected())}, got {_type_name(v)} {v!r}")
    if f.choices is not None and v not in f.choices:
        raise CheckpointError(f"{where}: expected one of {list(f.choices)}, got {v!r}")
    if f.kind == "int" and v not in f.also:
        lo = f"{f.minimum}" if f.minimum is not None else "-inf"
        hi = f"{f.maximum}" if f.maximum is not None else "inf"
        if (f.minimum is not None and v < f.minimum) or (f.maximum is not None and v > f.maximum):
            alts = f" (or {', '.join(map(str, f.also))})" if f.also else ""
            raise CheckpointError(f"{where}: expected an integer in [{lo}, {hi}]{alts}, got {v!r}")


def validate_record(record: Any, schema: dict[str, Field], where: str,
                    rules: Callable[[dict], str | None] | None = None) -> dict:
    """Check ``record`` against ``schema`` (every key known, every required key present, types and ranges) and the
    cross-field ``rules`` (a message or None); returns it unchanged."""
    if not isinstance(record, dict):
        raise CheckpointError(f"{where}: expected an object (a layer record), got {_type_name(record)}")
    unknown = sorted(set(record) - set(schema) - {"type"})
    if unknown:
        raise CheckpointError(f"{where}: unknown fields {unknown} (known: {sorted(schema)})")
    for name, f in schema.items():
        if name not in record:
            if f.required:
                raise CheckpointError(f"{where}.{name}: missing (required)")
            continue
        _check_field(f, record[name], f"{where}.{name}")
    problem = rules(record) if rules is not None else None
    if problem:
        raise CheckpointError(f"{where}: {problem}")
    return record


# ------------------------------------------------------------------------- the layer-record schema of each type
FEATURES = {"in_features": Field("int", minimum=1), "out_features": Field("int", minimum=1),
            "bias": Field("bool")}
# "affine" (QuantLinear): any packable bit width; group_size -1 = one group per row
AFFINE_SCHEMA = {**FEATURES, "bits": Field("int", minimum=2, maximum=8),
                 "group_size": Field("int", minimum=1, also=(-1,)), "sym": Field("bool")}
# "quantsim" (QuantSimLinear, QATLinear's saved form)
WEIGHT_GRANULARITIES = ("per_channel", "blockwise", "lpbq")
QUANTSIM_SCHEMA = {**AFFINE_SCHEMA, "granularity": Field("str", required=False, choices=WEIGHT_GRANULARITIES),
                   "decompressed_bits": Field("int", required=False, nullable=True, minimum=3, maximum=18),
                   "input_quantizer": Field("quantizer", required=False, nullable=True),
                   "output_quantizer": Field("quantizer", required=False, nullable=True)}
# "vq" (VQLinear): the GPTVQConfig ranges
VQ_SCHEMA = {**FEATURES, "vector_dim": Field("int", choices=(1, 2, 4)),
             "index_bits": Field("int", minimum=1, maximum=8), "codebook_bits": Field("int", choices=(4, 8, 16)), "rows_per_block": Field("int", minimum=1),
             "cols_per_block": Field("int", minimum=1), "normalize": Field("bool", required=False)}


def quantsim_rules(record: dict) -> str | None:
    if record.get("granularity") == "lpbq":
        d = record.get("decompressed_bits")
        if d is None or not record["bits"] < d <= record["bits"] + 10:
            return (f"decompressed_bits must be an integer in ({record['bits']}, {record['bits'] + 10}] for "
                    f"granularity 'lpbq', got {d!r}")
    return None


def vq_rules(record: dict) -> str | None:
    if record["cols_per_block"] % record["vector_dim"]:
        return f"cols_per_block ({record['cols_per_block']}) must be a multiple of vector_dim ({record['vector_dim']})"
    return None


# ----------------------------------------------------------------------------------------------- stored tensors
def check_tensor_layout(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
                        where: str) -> None:
    """Every expected tensor present with exactly its dtype and shape (a float32 ``qweight`` is refused, not cast)."""
    for name, (shape, dtype) in expected.items():
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(f"{where}.{name}: missing")
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{where}.{name}: expected a tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise CheckpointError(f"{where}.{name}: stored as {t.dtype}, expected {dtype} (not cast)")
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{where}.{name}: shape {list(t.shape)}, expected {list(shape)}")


def check_finite_positive(t: torch.Tensor, what: str, positive: bool = True) -> None:
    t = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    bad = ~torch.isfinite(t)
    if positive:
        bad |= t <= 0
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        kind = "finite and > 0" if positive else "finite"
        raise CheckpointError(f"{what}: must be {kind}; {int(bad.sum())} values are not "
                              f"(first at flat index {i}: {float(t.flatten()[i])!r})")


def check_int_range(t: torch.Tensor, lo: int, hi: int, what: str) -> None:
    """Every value of the integer tensor ``t`` in [lo, hi]."""
    if t.numel() == 0:
        return
    mn, mx = int(t.min()), int(t.max())
    if mn < lo or mx > hi:
        bad = (t < lo) | (t > hi)
        i = int(bad.flatten().nonzero()[0])
        raise CheckpointError(f"{what}: values must lie in [{lo}, {hi}]; {int(bad.sum())} do not "
                              f"(first at flat index {i}: {int(t.flatten()[i])})")


def check_fp16_bits(t: torch.Tensor, what: str, positive: bool) -> None:
    """An int16 tensor holding fp16 bit patterns: finite (and > 0)."""
    check_finite_positive(t.view(torch.float16), what, positive)
