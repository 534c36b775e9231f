"""Calibration of fused mixture-of-experts weights.

During a quantization run each fused experts module (transformers 5 ``*Experts``: ``gate_up_proj`` [E, 2I, H],
``down_proj`` [E, H, I]) is replaced by a :class:`CalibrationExperts`: the same forward contract and the same result,
but every expert projection is an ``nn.Linear`` named ``<experts>.<e>.gate_up_proj`` / ``<experts>.<e>.down_proj``, so
every driver (RTN, GPTQ, AdaScale) quantizes them like any other Linear. The runner calibrates all experts of one
module in two passes over the block: first every expert's ``gate_up_proj``, then every ``down_proj`` (the down
Hessians see the quantized gate_up outputs, as true-sequential GPTQ does for a dense MLP).

Hessians are collected by the module itself (not by per-Linear hooks), per expert:

- ``mode="routed"`` (default): each expert's Hessians come from the tokens the router sent to it, what it sees at
  inference.
- ``mode="all"``: every calibration token goes through every expert for the statistics (llm-compressor's
  ``moe_calibrate_all_experts``); the block output still uses only the routed tokens. All ``gate_up_proj`` then share
  one Hessian (the module's input), which GPTQ solves as one stacked problem.
- Few-token fallback (routed mode): an expert routed fewer than ``min_tokens`` tokens (a fraction of the calibration
  tokens if < 1, else a count; default 1%) gets all-token Hessians: ``gate_up_proj`` the Hessian of every token
  entering the experts module, ``down_proj`` the Hessian of its own intermediate activations over every token (in the
  down pass it runs on all tokens for the statistics, its output still follows the router). Only when gate_up and
  down are collected in one pass is a rare expert's down Hessian the identity (GPTQ then reduces to RTN on that
  weight). The run report lists the fallback experts with their token counts.

The first token of each calibration window gets the runner's ``first_token_weight`` in the expert Hessians too.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from hf_vq.algorithms.hessian import HessianAccumulator
from hf_vq.nn.expert_groups import ExpertGroups

MODES = ("routed", "all")


def check_options(mode: str, min_tokens: float) -> None:
    if mode not in MODES:
        raise ValueError(f"expert_calibration must be one of {MODES}, got {mode!r}")
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, (int, float)) or not 0 <= min_tokens < math.inf:
        raise ValueError(f"min_expert_tokens must be a finite number >= 0 (a fraction of the calibration tokens if "
                         f"< 1, else a token count), got {min_tokens!r}")


def resolve_options(config) -> tuple[str, float]:
    """(expert_calibration, min_expert_tokens) of a config; RTN (no calibration) has neither: the defaults."""
    mode = getattr(config, "expert_calibration", "routed")
    min_tokens = getattr(config, "min_expert_tokens", 0.01)
    check_options(mode, min_tokens)
    return mode, min_tokens


class ExpertMLP(nn.Module):
    """One expert as Linears: ``gate_up_proj`` (or ``up_proj`` for ungated experts) and ``down_proj``."""

    def __init__(self, first_name: str, first: nn.Linear, down: nn.Linear):
        super().__init__()
        self.add_module(first_name, first)
        self.down_proj = down


def _add(acc: HessianAccumulator, x: torch.Tensor, first_rows: torch.Tensor | None) -> None:
    acc.add(x)
    if first_rows is not None and acc.first_token_weight != 1.0:
        x0 = x[first_rows].to(torch.float32)
        if x0.shape[0]:
            acc.sum.addmm_(x0.T, x0, alpha=acc.first_token_weight - 1.0)


class _Stats:
    def __init__(self, first_experts: set[int], down_experts: set[int], weight: float):
        self.first_experts, self.down_experts, self.weight = first_experts, down_experts, weight
        self.first: dict[int, HessianAccumulator] = {}
        self.down: dict[int, HessianAccumulator] = {}
        self.ran_all: set[int] = set()
        self.inputs: HessianAccumulator | None = None
        self.counts: list[int] | None = None
        self.tokens = 0
        self.window: int | None = None


class CalibrationExperts(nn.Module):
    """Stand-in for a fused experts module while it is calibrated: same forward contract, one Linear per projection.

    ``activation``: the original module's gate (``_apply_gate(gate_up_out)``) or, for ungated experts, ``act_fn``.
    """

    def __init__(self, experts: list[ExpertMLP], first: str, activation: Callable, mode: str = "routed",
                 min_tokens: float = 0.01):
        super().__init__()
        check_options(mode, min_tokens)
        for e, m in enumerate(experts):
            self.add_module(str(e), m)
        self.num_experts, self.first = len(experts), first
        self.__dict__["_activation"] = activation
        self.mode, self.min_tokens = mode, min_tokens
        self.rare: set[int] = set()
        self.report: dict = {"mode": mode}
        self._stats: _Stats | None = None

    def expert(self, e: int) -> ExpertMLP:
        return self._modules[str(e)]

    def member_names(self) -> tuple[list[str], list[str]]:
        """Local names of the first projections and of the down projections, in expert order."""
        return ([f"{e}.{self.first}" for e in range(self.num_experts)],
                [f"{e}.down_proj" for e in range(self.num_experts)])

    # ------------------------------------------------------------------ statistics
    def start_statistics(self, members: set[str], first_token_weight: float) -> None:
        firsts, downs = self.member_names()
        self._stats = _Stats({e for e, n in enumerate(firsts) if n in members},
                             {e for e, n in enumerate(downs) if n in members}, first_token_weight)

    def set_window(self, window: int | None) -> None:
        if self._stats is not None:
            self._stats.window = window

    def stop_statistics(self) -> None:
        self._stats = None

    def threshold(self, tokens: int) -> int:
        return int(self.min_tokens) if self.min_tokens >= 1 else math.ceil(self.min_tokens * tokens)

    def _reduce(self, st: _Stats, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum every rank's statistics (torch.distributed): token counts, and each accumulator, created empty where
        this rank saw no token for it so that every rank reduces the same list."""
        counts = reduce(torch.tensor([st.tokens] + list(st.counts or [0] * self.num_experts), dtype=torch.float64))
        st.tokens, st.counts = int(counts[0]), [int(c) for c in counts[1:]]
        ran = reduce(torch.tensor([float(e in st.ran_all) for e in range(self.num_experts)]))
        st.ran_all = {e for e in range(self.num_experts) if ran[e] > 0}
        dev = self.expert(0).down_proj.weight.device
        accs = []
        if st.first_experts:
            if st.inputs is None:
                st.inputs = HessianAccumulator(self.expert(0).down_proj.out_features, dev, st.weight)
            accs.append(st.inputs)
        for table, members, width in ((st.first, st.first_experts, lambda e: self.expert(e).down_proj.out_features),
                                      (st.down, st.down_experts, lambda e: self.expert(e).down_proj.in_features)):
            for e in sorted(members):
                accs.append(table.get(e) or table.setdefault(e, HessianAccumulator(width(e), dev, st.weight)))
        for acc in accs:
            acc.sum = reduce(acc.sum)
            acc.count = int(reduce(torch.tensor([acc.count], dtype=torch.float64))[0])
        for table in (st.first, st.down):  # an expert no rank saw keeps "no statistics"
            for e in [e for e, acc in table.items() if acc.count == 0]:
                del table[e]

    def finish_statistics(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                          ) -> dict[str, torch.Tensor]:
        """Hessians of the members given to ``start_statistics`` (local names), with the fallbacks applied.
        ``reduce`` (sum over torch.distributed ranks) is applied to the statistics first."""
        st, self._stats = self._stats, None
        if st is None or (st.counts is None and reduce is None):
            raise RuntimeError("the experts module never ran during calibration")
        if reduce is not None:
            self._reduce(st, reduce)
        thr = self.threshold(st.tokens)
        rare = {e for e, c in enumerate(st.counts) if c < thr}
        out: dict[str, torch.Tensor] = {}
        fallback: dict[int, str] = {}
        if st.first_experts:
            self.rare = rare
            inputs = st.inputs.finalize()
            for e in sorted(st.first_experts):
                use_inputs = self.mode == "all" or e in rare or e not in st.first
                out[f"{e}.{self.first}"] = inputs if use_inputs else st.first[e].finalize()
                if self.mode == "routed" and use_inputs:
                    fallback[e] = "all-token Hessian"
            self.report.update({"tokens": st.tokens, "routed_tokens": list(st.counts), "threshold": thr})
        for e in sorted(st.down_experts):
            acc = st.down.get(e)
            if acc is not None and acc.count and (self.mode == "all" or e not in rare or e in st.ran_all):
                out[f"{e}.down_proj"] = acc.finalize()
            else:
                width = self.expert(e).down_proj.in_features
                out[f"{e}.down_proj"] = torch.eye(width, device=self.expert(e).down_proj.weight.device)
                fallback[e] = "identity Hessian (RTN)"
            if self.mode == "routed" and e in rare and e in st.ran_all:
                fallback.setdefault(e, "all-token Hessian")
        if fallback:
            merged = self.report.setdefault("fallback", {})
            for e, rule in fallback.items():
                if merged.get(str(e)) != "identity Hessian (RTN)":
                    merged[str(e)] = rule
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        st = self._stats
        out = torch.zeros_like(hidden_states)
        first_rows = None
        if st is not None:
            t = hidden_states.shape[0]
            if st.counts is None:
                st.counts = [0] * self.num_experts
            st.tokens += t
            if st.window and t % st.window == 0:
                first_rows = torch.arange(t, device=hidden_states.device) % st.window == 0
            if st.first_experts:
                if st.inputs is None:
                    st.inputs = HessianAccumulator(hidden_states.shape[-1], hidden_states.device, st.weight)
                _add(st.inputs, hidden_states, first_rows)
        groups = ExpertGroups(top_k_index, self.num_experts)
        for e in range(self.num_experts):
            token, slot = groups.tokens(e)
            run_all = st is not None and (self.mode == "all" or (e in self.rare and e in st.down_experts))
            if st is not None:
                st.counts[e] += token.numel()
            if not run_all and token.numel() == 0:
                continue
            x = hidden_states if run_all else hidden_states[token]
            rows = None if first_rows is None else (first_rows if run_all else first_rows[token])
            expert = self.expert(e)
            if st is not None and e in st.first_experts and not run_all:
                acc = st.first.get(e) or st.first.setdefault(e, HessianAccumulator(x.shape[-1], x.device, st.weight))
                _add(acc, x, rows)
            h = self._activation(getattr(expert, self.first)(x))
            if st is not None and e in st.down_experts:
                acc = st.down.get(e) or st.down.setdefault(e, HessianAccumulator(h.shape[-1], h.device, st.weight))
                _add(acc, h, rows)
                if run_all:
                    st.ran_all.add(e)
            y = expert.down_proj(h)
            if run_all:
                y = y[token]
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


class ExpertPass:
    """The calibration experts modules that one Hessian pass over a block collects statistics for."""

    def __init__(self, block: nn.Module, group: list[str], first_token_weight: float):
        self.modules: dict[str, CalibrationExperts] = {}
        self.members: set[str] = set()
        names = set(group)
        for cname, ce in block.named_modules():
            if not isinstance(ce, CalibrationExperts):
                continue
            mine = {n for n in names if n.startswith(cname + ".")}
            if mine:
                self.modules[cname] = ce
                self.members |= mine
                ce.start_statistics({n[len(cname) + 1:] for n in mine}, first_token_weight)

    def begin_batch(self, hidden: torch.Tensor) -> None:
        for ce in self.modules.values():
            ce.set_window(hidden.shape[1] if hidden.dim() == 3 else None)

    def hessians(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for cname, ce in self.modules.items():
            out.update({f"{cname}.{n}": h for n, h in ce.finish_statistics(reduce).items()})
        return out

    def close(self) -> None:
        for ce in self.modules.values():
            ce.stop_statistics()


def regroup(block: nn.Module, groups: list[list[str]], shared: list[bool]) -> tuple[list[list[str]], list[bool]]:
    """Calibrate each experts module's projections as two groups (all first projections, then all down projections),
    placed where the module first ran; the other groups keep their order."""
    member_of: dict[str, tuple[str, int]] = {}
    for cname, ce in block.named_modules():
        if isinstance(ce, CalibrationExperts):
            firsts, downs = ce.member_names()
            member_of.update({f"{cname}.{n}": (cname, 0) for n in firsts})
            member_of.update({f"{cname}.{n}": (cname, 1) for n in downs})
    if not member_of:
        return groups, shared
    present = {n for g in groups for n in g if n in member_of}
    new_groups, new_shared, placed = [], [], set()
    for g, s in zip(groups, shared):
        rest = [n for n in g if n not in member_of]
        if rest:
            new_groups.append(rest)
            new_shared.append(s)
        for n in g:
            cname = member_of.get(n, (None,))[0]
            if cname is None or cname in placed:
                continue
            placed.add(cname)
            for phase in (0, 1):
                part = [m for m, (c, p) in member_of.items() if c == cname and p == phase and m in present]
                if part:
                    new_groups.append(part)
                    new_shared.append(False)
    return new_groups, new_shared
