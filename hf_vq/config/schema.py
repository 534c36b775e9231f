"""Declarative config schemas: every config field is a :class:`Field` with a check that types and bounds its value.

A config class lists its fields in a :class:`Schema`. The constructor, ``from_dict`` and attribute assignment all go
through the schema, so a field cannot be added without a check, and a field that does not apply to a class is refused
(with a hint at the field that class uses instead). Checks return the normalized value (plain int/float/list/dict).
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

_INT_MAX = 2**31 - 1  # counts and sizes end up in int32/int64 tensors and shapes


class ConfigError(ValueError):
    """An invalid hf_vq config value. ``field`` names the offending field when there is one."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def show(value: Any) -> str:
    """A short repr for error messages (safe for huge ints and objects whose repr fails)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - any repr failure: fall back to the type
        return f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _fail(name: str, what: str, value: Any, where: str = "", with_type: bool = False) -> ConfigError:
    typ = f" ({type(value).__name__})" if with_type else ""
    return ConfigError(f"{name} must be {what}{where}, got {show(value)}{typ}", field=name)


class Check:
    """Validates one value; ``__call__`` returns it normalized or raises ConfigError naming the field."""

    what = "a value"

    def __call__(self, name: str, value: Any, where: str = "") -> Any:
        raise NotImplementedError


class Bool(Check):
    what = "True or False"

    def __call__(self, name, value, where=""):
        if not isinstance(value, bool):
            raise _fail(name, self.what, value, where, with_type=True)
        return value


class Int(Check):
    """An int (bool refused) from ``choices``, or in [lo, hi]."""

    def __init__(self, lo: int | None = None, hi: int = _INT_MAX, choices: tuple[int, ...] | None = None,
                 what: str | None = None):
        self.lo, self.hi, self.choices = lo, hi, choices
        if what is None:
            what = (f"one of {choices}" if choices else "a positive integer" if lo == 1 else
                    "a non-negative integer" if lo == 0 else f"an integer >= {lo}" if lo is not None else "an integer")
        self.what = what

    def __call__(self, name, value, where=""):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise _fail(name, self.what, value, where, with_type=True)
        value = int(value)
        if self.choices is not None:
            if value not in self.choices:
                raise _fail(name, self.what, value, where)
        elif self.lo is not None and value < self.lo:
            raise _fail(name, self.what, value, where)
        if value > self.hi:
            raise _fail(name, f"at most {self.hi}", value, where)
        return value


class GroupSize(Int):
    def __init__(self):
        super().__init__(what="-1 (per channel) or an integer >= 2")

    def __call__(self, name, value, where=""):
        value = super().__call__(name, value, where)
        if value != -1 and value < 2:
            raise _fail(name, self.what, value, where)
        return value


class Float(Check):
    """A finite real number (bool and strings refused; ints accepted) in an optionally open range."""

    def __init__(self, lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        if lo is not None and hi is not None:
            self.range = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            self.range = f"{'>' if lo_open else '>='} {lo:g}"
        elif hi is not None:
            self.range = f"{'<' if hi_open else '<='} {hi:g}"
        else:
            self.range = ""
        self.what = "a finite number" + (f" {self.range}" if self.range else "")

    def __call__(self, name, value, where=""):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _fail(name, self.what, value, where, with_type=True)
        try:
            value = float(value)
        except (OverflowError, ValueError, TypeError):
            raise _fail(name, self.what, value, where) from None
        if not math.isfinite(value):
            raise _fail(name, self.what, value, where)
        lo_bad = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        hi_bad = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if lo_bad or hi_bad:
            raise _fail(name, self.range, value, where)
        return value


class Str(Check):
    def __init__(self, choices: tuple[str, ...] | None = None):
        self.choices = choices
        self.what = f"one of {choices}" if choices else "a non-empty string"

    def __call__(self, name, value, where=""):
        if not isinstance(value, str):
            raise _fail(name, self.what, value, where, with_type=True)
        if (self.choices is not None and value not in self.choices) or not value:
            raise _fail(name, self.what, value, where)
        return value


class Optional(Check):
    """None, or a value ``inner`` accepts; ``what`` replaces the inner check's wording in errors."""

    def __init__(self, inner: Check, what: str | None = None):
        self.inner, self.custom = inner, what
        self.what = what or f"None or {inner.what}"

    def __call__(self, name, value, where=""):
        if value is None:
            return None
        try:
            return self.inner(name, value, where)
        except ConfigError:
            if self.custom is None:
                raise
            raise _fail(name, self.what, value, where) from None


class StrList(Check):
    """A list (or tuple) of strings, stored as a list. A bare string is refused: it is not split into characters."""

    what = "a list of strings"

    def __call__(self, name, value, where=""):
        if isinstance(value, str):
            raise ConfigError(f"{name} must be a list of strings{where}, got the string {show(value)}: "
                              f"write [{show(value)}]", field=name)
        if not isinstance(value, (list, tuple)):
            raise _fail(name, self.what, value, where, with_type=True)
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise _fail(f"{name}[{i}]", "a string", item, where, with_type=True)
        return list(value)


class Instance(Check):
    """A runtime object (kept by reference): an instance of ``types``, or anything callable when ``callable_ok``."""

    def __init__(self, types: tuple[type, ...], what: str, callable_ok: bool = False):
        self.types, self.what, self.callable_ok = types, what, callable_ok

    def __call__(self, name, value, where=""):
        if isinstance(value, str) and not value:
            raise _fail(name, self.what, value, where)
        if isinstance(value, self.types) or (self.callable_ok and callable(value)):
            return str(value) if isinstance(value, os.PathLike) else value
        raise _fail(name, self.what, value, where, with_type=True)


class Overrides(Check):
    """``{regex: {key: value}}``; each key is checked by ``keys[key]``."""

    def __init__(self, keys: Mapping[str, Check]):
        self.keys = dict(keys)
        self.what = "a dict {regex: {" + ", ".join(self.keys) + "}}"

    def __call__(self, name, value, where=""):
        if not isinstance(value, Mapping):
            raise _fail(name, self.what, value, where, with_type=True)
        out = {}
        for pattern, override in value.items():
            at = f"{name}[{show(pattern)}]"
            if not isinstance(pattern, str):
                raise _fail(f"{name} key", "a regex string", pattern, where, with_type=True)
            try:
                re.compile(pattern)
            except Exception as e:  # noqa: BLE001 - re.error, RecursionError, OverflowError on hostile patterns
                raise ConfigError(f"{name} pattern {show(pattern)} is not a valid regex: {e}", field=name) from None
            if not isinstance(override, Mapping):
                raise _fail(at, "a dict", override, where, with_type=True)
            unknown = [k for k in override if k not in self.keys]
            if unknown:
                raise ConfigError(f"{at} has unknown keys [{', '.join(sorted(map(show, unknown)))}]; allowed: "
                                  f"{', '.join(self.keys)}", field=name)
            out[pattern] = {k: self.keys[k](k, v, f" in {at}") for k, v in override.items()}
        return out


class Records(Check):
    """``{name: {...}}`` (a JSON object of JSON objects), deep-copied; the records' contents are checked at load."""

    what = "a dict of {name: dict}"

    def __call__(self, name, value, where=""):
        if not isinstance(value, Mapping):
            raise _fail(name, self.what, value, where, with_type=True)
        for key, record in value.items():
            if not isinstance(key, str):
                raise _fail(f"{name} key", "a string", key, where, with_type=True)
            if not isinstance(record, Mapping):
                raise _fail(f"{name}[{show(key)}]", "a dict", record, where, with_type=True)
        return {key: copy.deepcopy(dict(record)) for key, record in value.items()}


@dataclass(frozen=True)
class Field:
    """One config field. ``saved``: "always" (written to config.json), "never" (a runtime object such as a tokenizer)
    or "text" (written only when it is a string, e.g. a dataset name)."""

    check: Check
    default: Any
    saved: str = "always"
    doc: str = ""

    def validate(self, name: str, value: Any) -> Any:
        return self.check(name, value)


class Schema:
    """The fields of one config class, and hints for fields other classes take but this one refuses."""

    def __init__(self, fields: Mapping[str, Field], refused: Mapping[str, str] | None = None):
        self.fields: dict[str, Field] = dict(fields)
        self.refused: dict[str, str] = dict(refused or {})

    def extend(self, **fields: Field) -> "Schema":
        return Schema({**self.fields, **fields}, {k: v for k, v in self.refused.items() if k not in fields})

    def without(self, **hints: str) -> "Schema":
        """Drop fields that do not apply; each hint says what to use instead (shown when the field is passed)."""
        missing = [k for k in hints if k not in self.fields]
        if missing:
            raise KeyError(f"no such fields to drop: {missing}")
        return Schema({k: f for k, f in self.fields.items() if k not in hints}, {**self.refused, **hints})

    def check_defaults(self, owner: str) -> None:
        for name, f in self.fields.items():
            if f.saved not in ("always", "never", "text"):
                raise TypeError(f"{owner}.{name}: saved must be 'always', 'never' or 'text'")
            f.validate(name, copy.deepcopy(f.default))

