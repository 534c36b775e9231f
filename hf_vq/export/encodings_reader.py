"""Typed parsing of AIMET encodings files (0.6.1, 1.0.0, 2.0.0; also the version-less GPTVQ file).

Every value is read through :class:`Node`, which knows its path in the document, so every error says where and what:
``param_encodings[3].scale[0]: expected a number, got a string '0.1'``. The whole file is strict JSON (hf_vq.utils.io:
UTF-8, no NaN/Infinity, no duplicate object keys, bounded size and nesting). Tensor names are unique. Numbers must be
usable as stored: scales finite and > 0 in float32 (what the reader keeps), offsets integers on the grid (a float
offset is an error, never truncated), int scales integers >= 1. Unknown fields are kept in ``ParamEncoding.extra``.
All failures raise :class:`EncodingsError` (a ValueError).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_vq.export.aimet_common import _ONNX_SUFFIX, ENC_TYPES, VERSIONS
from hf_vq.formats import blockwise
from hf_vq.utils.io import MAX_JSON_BYTES, read_json


class EncodingsError(ValueError):
    """An AIMET encodings document that cannot be read or applied as it is."""


_MISSING = object()


def _describe(v: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)
    text = repr(v)
    return kind if isinstance(v, (list, dict)) else f"{kind} {text if len(text) <= 40 else text[:37] + '...'}"


class Node:
    """A JSON value and its path; typed reads raise EncodingsError naming the path."""

    __slots__ = ("v", "path")

    def __init__(self, v: Any, path: str):
        self.v, self.path = v, path

    def fail(self, expected: str):
        raise EncodingsError(f"{self.path}: expected {expected}, got {_describe(self.v)}")

    def child(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    # containers
    def obj(self) -> dict:
        if not isinstance(self.v, dict):
            self.fail("an object")
        return self.v

    def items(self) -> list["Node"]:
        if not isinstance(self.v, list):
            self.fail("a list")
        return [Node(x, f"{self.path}[{i}]") for i, x in enumerate(self.v)]

    def get(self, key: str, default: Any = _MISSING) -> "Node":
        d = self.obj()
        if key not in d:
            if default is _MISSING:
                raise EncodingsError(f"{self.child(key)}: missing (required)")
            return Node(default, self.child(key))
        return Node(d[key], self.child(key))

    def has(self, key: str) -> bool:
        return isinstance(self.v, dict) and key in self.v

    # scalars
    def str(self, choices: tuple | None = None) -> str:
        if not isinstance(self.v, str) or (choices is not None and self.v not in choices):
            self.fail(f"one of {list(choices)}" if choices else "a string")
        return self.v

    def int(self, lo: int | None = None, hi: int | None = None) -> int:
        if type(self.v) is not int:
            self.fail("an integer")
        if (lo is not None and self.v < lo) or (hi is not None and self.v > hi):
            self.fail(f"an integer in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]")
        return self.v

    def bool(self, text_ok: bool = False) -> bool:
        if type(self.v) is bool:
            return self.v
        if text_ok and self.v in ("True", "False", "true", "false"):
            return self.v.lower() == "true"
        self.fail("a boolean" + (" or 'True'/'False'" if text_ok else ""))

    def number(self) -> float:
        if type(self.v) not in (int, float):
            self.fail("a number")
        try:
            return float(self.v)
        except OverflowError:
            self.fail("a number in the float64 range")

    def _raw(self, single_ok: bool) -> tuple[list, Any]:
        """(values, index -> path) of a list (or of one value with ``single_ok``)."""
        if single_ok and not isinstance(self.v, list):
            return [self.v], lambda i: self.path
        if not isinstance(self.v, list):
            self.fail("a list")
        return self.v, lambda i: f"{self.path}[{i}]"

    def scales(self, single_ok: bool = False) -> list[float]:
        """A non-empty list of numbers (or one number with ``single_ok``), each finite and > 0 in float32. Checked
        with C-level passes (files hold millions of scales); the slow per-element search runs only on an error."""
        raw, path = self._raw(single_ok)
        if not raw:
            self.fail("a non-empty list of scales")
        if not set(map(type, raw)) <= {int, float}:
            i = next(i for i, x in enumerate(raw) if type(x) not in (int, float))
            Node(raw[i], path(i)).fail("a number")
        try:
            t = torch.tensor(raw, dtype=torch.float64)
        except OverflowError:
            i = next(i for i, x in enumerate(raw) if type(x) is int and abs(x) > 2**1023)
            Node(raw[i], path(i)).fail("a number in the float64 range")
        t32 = t.float()
        bad = ~torch.isfinite(t32) | (t32 <= 0)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise EncodingsError(f"{path(i)}: scale {raw[i]!r} is {float(t32[i])!r} in float32; scales "
                                 "must be finite and > 0 as stored")
        return [float(x) for x in raw] if int in set(map(type, raw)) else list(raw)

    def ints(self, lo: int | None = None, hi: int | None = None, single_ok: bool = False) -> list[int]:
        raw, path = self._raw(single_ok)
        if raw and (set(map(type, raw)) != {int} or (lo is not None and min(raw) < lo)
                    or (hi is not None and max(raw) > hi)):
            for i, x in enumerate(raw):
                Node(x, path(i)).int(lo, hi)
        return list(raw)


def _offsets(node: Node, bw: int, n: int) -> list[int]:
    """AIMET's unsigned-grid offsets: integers in [-(2^bw - 1), 0], one per scale."""
    off = node.ints(-(2**bw - 1), 0)
    if len(off) != n:
        raise EncodingsError(f"{node.path}: {len(off)} offsets for {n} scales")
    return off


@dataclass
class ParamEncoding:
    """One parsed encoding. ``scale``/``offset`` are flat (channel-major, block-minor) effective values on the
    ``bitwidth``-bit unsigned grid (LPBQ: int * per-channel scale, at the compressed bitwidth; offset -2^(bw-1))."""

    name: str
    enc_type: str | None          # None for 0.6.1 multi-entry lists: channels vs blocks follow from the layer shape
    dtype: str                    # "INT" or "FLOAT"
    bitwidth: int | None
    is_sym: bool | None
    scale: list[float] = field(default_factory=list)
    offset: list[int] = field(default_factory=list)
    block_size: int | None = None
    channels: int | None = None   # known for PER_TENSOR / PER_CHANNEL / LPBQ / 2.0.0
    block_major: bool = False     # scale/offset flattened [n_blocks, C] (PER_BLOCK of a transposed ".weight_0")
    per_channel_scale: list[float] | None = None
    per_block_int_scale: list[int] | None = None
    decompressed_bw: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def resolve(self, out_features: int, in_features: int):
        """(scale [C, nb] fp32, offset [C, nb] int64, block_size) for a [out, in] weight; C is 1 (broadcast) or out."""
        if self.dtype != "INT" or not self.scale:
            raise EncodingsError(f"{self.name}: {self.dtype} encoding has no integer grid")
        n = len(self.scale)
        if self.channels is not None:
            c = self.channels
            if n % c:
                raise EncodingsError(f"{self.name}: {n} scales do not split into {c} channels")
            nb = n // c
        elif self.block_size is not None:
            if in_features % self.block_size:
                raise EncodingsError(f"{self.name}: block_size {self.block_size} does not divide the layer's "
                                     f"{in_features} input columns")
            nb = in_features // self.block_size
            if n % nb:
                raise EncodingsError(f"{self.name}: {n} scales are not a whole number of channels of {nb} blocks "
                                     f"(layer has {out_features} channels)")
            c = n // nb
        else:  # 0.6.1 list: one dict per channel or per block
            if n % out_features:
                raise EncodingsError(f"{self.name}: encoding has {n} entries, not a multiple of the layer's "
                                     f"{out_features} channels")
            c, nb = out_features, n // out_features
        if c not in (1, out_features):
            raise EncodingsError(f"{self.name}: encoding has {c} channels, layer has {out_features}")
        if in_features % nb:
            raise EncodingsError(f"{self.name}: encoding has {nb} blocks per channel, which do not divide the "
                                 f"layer's {in_features} input columns")
        if self.block_size is not None and self.block_size * nb != in_features:
            raise EncodingsError(f"{self.name}: encoding has {nb} blocks of {self.block_size} columns, layer has "
                                 f"{in_features} input columns")
        scale = torch.tensor(self.scale, dtype=torch.float32)
        offset = torch.tensor(self.offset, dtype=torch.int64)
        if self.block_major:
            scale, offset = scale.reshape(nb, c).T, offset.reshape(nb, c).T
        scale = scale.reshape(c, nb).expand(out_features, nb)
        offset = offset.reshape(c, nb).expand(out_features, nb)
        return scale, offset, in_features // nb

    def quantize_dequantize(self, weight: torch.Tensor) -> torch.Tensor:
        """QDQ of a [out, in] weight on this grid (what a runtime does with the exported float weight)."""
        scale, offset, b = self.resolve(*weight.shape)
        return blockwise.quantize_dequantize(weight, scale, offset, self.bitwidth, (1, b))


@dataclass
class Encodings:
    version: str
    params: dict[str, ParamEncoding]
    activations: dict[str, Any]
    producer: dict | None = None
    applied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


_VECTOR_KEYS = ("rows_per_block", "cols_per_block", "vector_dim", "vector_stride", "index_bw")
_KNOWN_1_0_0 = ("name", "dtype", "bw", "is_sym", "scale", "offset", "enc_type", "block_size", "compressed_bw",
                "per_block_int_scale")


def _dtype(node: Node) -> str:
    d = node.str(("INT", "FLOAT", "FP", "int", "float"))
    return "FLOAT" if d.upper() in ("FLOAT", "FP") else "INT"


def parse_1_0_0(e: Node) -> ParamEncoding:
    """One 1.0.0 entry (a param or an activation)."""
    name = e.get("name").str()
    dtype = _dtype(e.get("dtype", "INT"))
    enc_type = e.get("enc_type").str(ENC_TYPES) if e.has("enc_type") else None
    extra = {k: v for k, v in e.obj().items() if k not in _KNOWN_1_0_0}
    for k in _VECTOR_KEYS:
        if k in extra:
            e.get(k).int(1)
    if dtype == "FLOAT":
        bw = e.get("bw").int(1, 64) if e.has("bw") else None
        return ParamEncoding(name, enc_type, dtype, bw, None, extra=extra)
    bw = e.get("bw").int(1, 32)
    is_sym = e.get("is_sym").bool()
    if enc_type == "LPBQ":
        cbw = e.get("compressed_bw").int(1, bw - 1)
        pc = e.get("scale").scales()
        c = len(pc)
        ints_node = e.get("per_block_int_scale")
        ints = ints_node.ints(1, 2 ** (bw - cbw))
        if len(ints) % c:
            raise EncodingsError(f"{ints_node.path}: {len(ints)} values for {c} channels")
        if e.has("offset"):
            _offsets(e.get("offset"), bw, c)
        t = torch.tensor(ints, dtype=torch.int64)
        # stored channel-major whatever the file's layout
        t = t.reshape(-1, c).T if _ONNX_SUFFIX.match(name) else t.reshape(c, -1)
        scale = blockwise.lpbq_effective_scale(torch.tensor(pc, dtype=torch.float32), t).flatten().tolist()
        return ParamEncoding(name, enc_type, dtype, cbw, is_sym, scale, [-(2 ** (cbw - 1))] * len(ints),
                             e.get("block_size").int(1), channels=c, per_channel_scale=pc,
                             per_block_int_scale=t.flatten().tolist(), decompressed_bw=bw, extra=extra)
    scale = e.get("scale").scales()
    offset = _offsets(e.get("offset"), bw, len(scale))
    block = e.get("block_size").int(1) if enc_type == "PER_BLOCK" or e.has("block_size") else None
    enc = ParamEncoding(name, enc_type, dtype, bw, is_sym, scale, offset, block, extra=extra)
    if enc_type in ("PER_TENSOR", "PER_CHANNEL", "VECTOR"):
        enc.channels = len(scale)
    if enc_type == "PER_BLOCK":
        enc.block_major = bool(_ONNX_SUFFIX.match(name))
    return enc


def parse_0_6_1(name: str, node: Node) -> ParamEncoding:
    """One 0.6.1 value: a list of per-channel / per-block dicts sharing dtype, bitwidth and symmetry."""
    entries = node.items()
    if not entries:
        node.fail("a non-empty list of encodings")
    first = entries[0]
    dtype = _dtype(first.get("dtype", "int"))
    bw = first.get("bitwidth").int(1, 64 if dtype == "FLOAT" else 32)
    sym = first.get("is_symmetric", "False").bool(text_ok=True) if dtype == "INT" else None
    for e in entries[1:]:
        if _dtype(e.get("dtype", "int")) != dtype or e.get("bitwidth").int() != bw:
            raise EncodingsError(f"{e.path}: dtype/bitwidth differ from {first.path}")
    if dtype == "FLOAT":
        return ParamEncoding(name, "PER_TENSOR", dtype, bw, None, channels=1)
    scale, offset = [], []
    for e in entries:
        s, o = e.get("scale"), e.get("offset")
        if isinstance(s.v, list):
            s.fail("a number")
        scale += s.scales(single_ok=True)
        offset.append(o.int(-(2**bw - 1), 0))
        for k in ("min", "max"):
            if e.has(k):
                e.get(k).number()
    enc = ParamEncoding(name, "PER_TENSOR" if len(entries) == 1 else None, dtype, bw, sym, scale, offset)
    first_keys = first.obj()
    if any(k in first_keys for k in _VECTOR_KEYS):
        enc.enc_type, enc.channels = "VECTOR", len(entries)
        enc.extra = {k: first.get(k).int(1) for k in _VECTOR_KEYS if k in first_keys}
    if enc.enc_type == "PER_TENSOR":
        enc.channels = 1
    return enc


def parse_2_0_0(e: Node) -> ParamEncoding:
    name = e.get("name").str()
    dt = e.get("output_dtype", "").str()
    m = re.fullmatch(r"(u?)int(\d+)", dt)
    if not m:
        return ParamEncoding(name, "PER_TENSOR", "FLOAT", None, None, extra=dict(e.obj()))
    signed, bits = not m.group(1), int(m.group(2))
    if not 1 <= bits <= 32:
        e.get("output_dtype").fail("an integer dtype of 1 to 32 bits")
    axis = e.get("axis").int() if e.has("axis") else None
    if e.has("per_block_int_scale"):
        rows = e.get("per_block_int_scale").items()
        ints = [i for row in rows for i in row.ints(1, 2**16)]
        pcs = e.get("per_channel_float_scale").items()
        pc = [s for row in pcs for s in row.scales(single_ok=True)]
        c = len(rows)
        if not c or len(ints) % c or len(pc) != c:
            raise EncodingsError(f"{e.path}: per_block_int_scale ({len(ints)} values in {c} rows) and "
                                 f"per_channel_float_scale ({len(pc)}) do not match")
        scale = blockwise.lpbq_effective_scale(torch.tensor(pc), torch.tensor(ints).reshape(c, -1)).flatten()
        return ParamEncoding(name, "LPBQ", "INT", bits, True, scale.tolist(), [-(2 ** (bits - 1))] * len(ints),
                             e.get("block_size").int(1) if e.has("block_size") else None, channels=c,
                             per_channel_scale=pc, per_block_int_scale=ints, extra={"axis": axis})
    scales_node = e.get("y_scale")
    rows = _rows(scales_node)  # [C] or [C, blocks] (one row per output channel)
    ys = [s for r in rows for s in r.scales(single_ok=True)]
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    zp_node = e.get("y_zero_point", 0)
    zp = [z for r in _rows(zp_node) for z in r.ints(lo, hi, single_ok=True)]
    if len(zp) == 1:
        zp = zp * len(ys)
    elif len(zp) != len(ys):
        raise EncodingsError(f"{zp_node.path}: {len(zp)} zero points for {len(ys)} scales")
    offset = [(-(2 ** (bits - 1)) - z) if signed else -z for z in zp]
    per_axis = isinstance(scales_node.v, list)
    enc_type = "PER_BLOCK" if e.has("block_size") else ("PER_CHANNEL" if per_axis else "PER_TENSOR")
    return ParamEncoding(name, enc_type, "INT", bits, bool(signed and not any(zp)), ys, offset,
                         e.get("block_size").int(1) if e.has("block_size") else None,
                         len(scales_node.v) if per_axis else 1,
                         extra={"axis": axis})


def _rows(node: Node) -> list[Node]:
    """A 2.0.0 tensor value: a number, a list of numbers, or a list of rows (lists of numbers)."""
    if isinstance(node.v, list) and node.v and isinstance(node.v[0], list):
        return node.items()
    return [node]


def _unique(entries: list[Node]) -> dict[str, Node]:
    out: dict[str, Node] = {}
    for e in entries:
        name = e.get("name").str()
        if name in out:
            raise EncodingsError(f"{e.path}.name: duplicate tensor name {name!r} (also {out[name].path})")
        out[name] = e
    return out


def parse_document(doc: Any) -> Encodings:
    """Typed parse of a loaded encodings document (see the module docstring)."""
    root = Node(doc, "")
    root.obj()
    producer = root.get("producer").obj() if root.has("producer") else None
    for n in root.get("excluded_layers", []).items():
        n.str()
    if root.has("quantizer_args"):
        root.get("quantizer_args").obj()
    if root.has("version"):
        version = root.get("version").str()
    else:
        version = "2.0.0" if root.has("encodings") else ("0.6.1" if isinstance(doc.get("param_encodings"), dict)
                                                        else "1.0.0")
    if version.startswith("2."):
        entries = _unique(root.get("encodings", []).items())
        return Encodings(version, {n: parse_2_0_0(e) for n, e in entries.items()}, {}, producer)
    if version not in VERSIONS:
        root.get("version").fail(f"a supported encodings version ({', '.join(VERSIONS)}, 2.x)")
    pe, ae = root.get("param_encodings", {} if version == "0.6.1" else []), root.get(
        "activation_encodings", {} if version == "0.6.1" else [])
    if version == "0.6.1":
        params = {n: parse_0_6_1(n, Node(v, f"param_encodings[{n!r}]")) for n, v in pe.obj().items()}
        for n, v in ae.obj().items():
            parse_0_6_1(n, Node(v, f"activation_encodings[{n!r}]"))
        return Encodings(version, params, dict(ae.v), producer)
    params = {n: parse_1_0_0(e) for n, e in _unique(pe.items()).items()}
    acts = _unique(ae.items())
    for e in acts.values():
        parse_1_0_0(e)
    return Encodings(version, params, {n: e.v for n, e in acts.items()}, producer)


def read_encodings(path: str | os.PathLike, *, max_bytes: int = MAX_JSON_BYTES) -> Encodings:
    """Parse an AIMET encodings JSON file (0.6.1, 1.0.0 or 2.0.0; also the version-less GPTVQ file)."""
    doc = read_json(path, what="JSON encodings file", max_bytes=max_bytes, error=EncodingsError)
    try:
        return parse_document(doc)
    except EncodingsError as e:
        raise EncodingsError(f"{path}: {e}") from None
