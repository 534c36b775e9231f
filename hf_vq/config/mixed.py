"""Mixed precision to a bit budget: the ``average_bits`` / ``candidates`` / ``allocation`` fields.

With ``average_bits`` set, a run first measures how much each candidate setting of each layer would cost in estimated
loss, then picks one setting per layer (one per fused experts module) so that the stored bits of all quantized layers,
scales, zero-points and codebooks included, are at most ``average_bits`` x their weights, and quantizes with those
settings. The choice is written to ``allocation`` ({layer: setting}), which ``spec_for`` reads.
"""

from __future__ import annotations

from typing import Any, Mapping

from hf_vq.config.base import VALID_BITS, HfVQConfig, LayerSpec
from hf_vq.config.schema import Check, ConfigError, Field, Float, GroupSize, Int, Optional, show

VQ_VECTOR_DIMS = (1, 2, 4)

# No 8-bit by default: on SmolLM2 / Austen (benchmarks/mixed_table.md) the Fisher estimate bought 8-bit for a few
# small layers with budget taken from 3-bit ones, and ppl came out worse than without 8-bit at 3.25 and 4.25 bits.
AFFINE_CANDIDATES = ({"bits": 2, "group_size": 64}, {"bits": 2, "group_size": 128}, {"bits": 3, "group_size": 128},
                     {"bits": 4, "group_size": 128})


class Candidates(Check):
    """A non-empty list of distinct settings, each a dict with exactly ``keys`` (each checked by its Check)."""

    def __init__(self, keys: Mapping[str, Check]):
        self.keys = dict(keys)
        self.what = "a non-empty list of dicts {" + ", ".join(self.keys) + "}"

    def __call__(self, name, value, where=""):
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{name} must be {self.what}{where}, got {show(value)}", field=name)
        out = []
        for i, item in enumerate(value):
            at = f"{name}[{i}]"
            if not isinstance(item, Mapping):
                raise ConfigError(f"{at} must be a dict {{{', '.join(self.keys)}}}, got {show(item)}", field=name)
            if set(item) != set(self.keys):
                raise ConfigError(f"{at} must have exactly the keys {', '.join(self.keys)} (this method's settings), "
                                  f"got {sorted(map(str, item))}", field=name)
            try:
                setting = {k: self.keys[k](k, item[k], f" in {at}") for k in self.keys}
            except ConfigError as e:   # the field is the list, not the setting's key
                raise ConfigError(str(e), field=name) from None
            if setting in out:
                raise ConfigError(f"{at} repeats {setting}", field=name)
            out.append(setting)
        return out


class Allocation(Check):
    """``{layer or fused experts module: setting}`` where each setting holds some of ``keys`` (each checked by its
    Check); what an average_bits run writes and a reload reads."""

    def __init__(self, keys: Mapping[str, Check]):
        self.keys = dict(keys)
        self.what = "a dict of {module name: {" + ", ".join(self.keys) + "}}"

    def __call__(self, name, value, where=""):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be {self.what}{where}, got {show(value)}", field=name)
        out = {}
        for key, setting in value.items():
            at = f"{name}[{show(key)}]"
            if not isinstance(key, str) or not isinstance(setting, Mapping):
                raise ConfigError(f"{at} must map a module name to a dict {{{', '.join(self.keys)}}}, got "
                                  f"{show(setting)}", field=name)
            unknown = sorted(map(str, set(setting) - set(self.keys)))
            if unknown:
                raise ConfigError(f"{at} has unknown keys {unknown}; allowed: {', '.join(self.keys)}", field=name)
            try:
                out[key] = {k: self.keys[k](k, v, f" in {at}") for k, v in setting.items()}
            except ConfigError as e:
                raise ConfigError(str(e), field=name) from None
        return out


AVERAGE_BITS = Field(Optional(Float(lo=0.0, lo_open=True), what="None or a number of bits > 0"), None,
                     doc="mean stored bits per quantized weight (scales, zero-points and codebooks included): each "
                         "layer gets the candidate setting that minimises the estimated loss within this budget; "
                         "None: every layer gets the config's own setting")
ALLOCATION_KEYS = {"bits": Int(choices=VALID_BITS), "group_size": GroupSize()}
ALLOCATION = Field(Optional(Allocation(ALLOCATION_KEYS)), None,
                   doc="filled by an average_bits run: the setting chosen for each layer or fused experts module")


def affine_fields() -> dict[str, Field]:
    keys = {"bits": Int(choices=VALID_BITS), "group_size": GroupSize()}
    return dict(average_bits=AVERAGE_BITS, allocation=ALLOCATION,
                candidates=Field(Optional(Candidates(keys)), None,
                                 doc="settings average_bits chooses from, [{bits, group_size}, ...]; None: "
                                     "2-bit g64, and 2/3/4-bit g128"))


# GPTVQ: a setting is a vector size, an index width and the rows sharing one codebook (the codebook's share of the
# stored bits); each index width gets the rows that keep its codebooks near 1/8 bit per weight at 256 columns.
VQ_KEYS = {"vector_dim": Int(choices=VQ_VECTOR_DIMS), "index_bits": Int(1, hi=8, what="an integer in 1..8"),
           "rows_per_block": Int(1)}
VQ_CANDIDATES = ({"vector_dim": 4, "index_bits": 8, "rows_per_block": 256},
                 {"vector_dim": 2, "index_bits": 5, "rows_per_block": 16},
                 {"vector_dim": 2, "index_bits": 6, "rows_per_block": 32},
                 {"vector_dim": 2, "index_bits": 7, "rows_per_block": 64},
                 {"vector_dim": 2, "index_bits": 8, "rows_per_block": 128})


def vq_fields() -> dict[str, Field]:
    return dict(average_bits=AVERAGE_BITS,
                allocation=Field(Optional(Allocation(VQ_KEYS)), None,
                                 doc="filled by an average_bits run: the setting chosen for each layer or fused "
                                     "experts module"),
                candidates=Field(Optional(Candidates(VQ_KEYS)), None,
                                 doc="settings average_bits chooses from, [{vector_dim, index_bits, rows_per_block}, "
                                     "...]; None: 4D 8-bit index (256 rows per codebook), and 2D with 5/6/7/8-bit "
                                     "indices (16/32/64/128 rows)"))


MIXED_INERT = (("candidates", "average_bits is None (no per-layer choice)", lambda c: c.average_bits is None),)


def allocated(allocation: dict | None, name: str) -> dict | None:
    """The allocation entry of layer ``name``: its own, or that of the fused experts module holding it."""
    if not allocation:
        return None
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        entry = allocation.get(".".join(parts[:end]))
        if entry is not None:
            return entry
    return None


class MixedPrecision:
    """Mixed into the affine configs (GPTQConfig, AdaScaleConfig): ``average_bits`` over affine candidates."""

    inert = HfVQConfig.inert + MIXED_INERT
    default_candidates = AFFINE_CANDIDATES

    def candidate_list(self) -> list[dict[str, Any]]:
        return [dict(c) for c in (self.candidates or self.default_candidates)]

    @staticmethod
    def nominal_bits(setting: Mapping[str, Any]) -> float:
        """Bits per weight of a setting before scales and codebooks: the floor of what it can store."""
        return setting["bits"]

    def spec_for(self, module_name: str) -> LayerSpec | None:
        spec = super().spec_for(module_name)
        entry = allocated(self.__dict__.get("allocation"), module_name)
        if spec is not None and entry is not None:
            spec.bits, spec.group_size = entry.get("bits", spec.bits), entry.get("group_size", spec.group_size)
        return spec

    def validate(self) -> None:
        super().validate()
        if self.__dict__.get("average_bits") is None:
            return
        cands = self.candidate_list()
        lowest = min(self.nominal_bits(c) for c in cands)
        if self.average_bits < lowest:
            raise ConfigError(f"average_bits={self.average_bits} is below the smallest candidate ({lowest:g} bits per "
                              "weight before scales and codebooks): no layer can be stored that small",
                              field="average_bits")
        chosen = [p for p, o in self.module_overrides.items() if "bits" in o or "group_size" in o]
        if chosen:
            raise ConfigError(f"module_overrides {show(chosen[0])} sets bits/group_size, which average_bits chooses "
                              "per layer: keep only skips in module_overrides, or drop average_bits",
                              field="module_overrides")
        if getattr(self, "weight_granularity", None) == "lpbq":
            bad = [c for c in cands if c["group_size"] == -1 or c["bits"] >= self.decompressed_bw]
            if bad:
                raise ConfigError(f"candidates: {bad[0]} cannot be an LPBQ grid (needs a group_size and bits < "
                                  f"decompressed_bw={self.decompressed_bw})", field="candidates")


class VQMixedPrecision(MixedPrecision):
    """Mixed into GPTVQConfig: ``average_bits`` over (vector_dim, index_bits, rows_per_block) candidates; the other
    layout fields (cols_per_block, codebook_bits, data_normalization) stay the config's for every layer."""

    default_candidates = VQ_CANDIDATES

    @staticmethod
    def nominal_bits(setting: Mapping[str, Any]) -> float:
        return setting["index_bits"] / setting["vector_dim"]

    def vq_setting(self, module_name: str) -> dict[str, int]:
        """{vector_dim, index_bits, rows_per_block} of one layer: its allocation entry's, else the config's."""
        own = {k: getattr(self, k) for k in VQ_KEYS}
        return {**own, **(allocated(self.__dict__.get("allocation"), module_name) or {})}

    def validate(self) -> None:
        super().validate()
        if self.__dict__.get("average_bits") is None:
            return
        for i, c in enumerate(self.candidate_list()):
            if self.cols_per_block % c["vector_dim"]:
                raise ConfigError(f"candidates[{i}] has vector_dim={c['vector_dim']}, which does not divide "
                                  f"cols_per_block={self.cols_per_block}: a vector may not straddle two codebooks",
                                  field="candidates")
