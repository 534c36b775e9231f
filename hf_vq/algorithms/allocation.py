"""Budgeted choice of one setting per unit (a layer or an expert set): a multiple-choice knapsack.

Each unit has, for each candidate setting, a cost (stored bits) and an estimated loss. ``choose`` minimises the summed
loss with the summed cost at most the budget: a Lagrangian sweep (each unit takes argmin loss + lam * cost; the
smallest lam whose choice fits) and then a greedy fill of what is left, upgrading the unit with the best loss saved per
extra bit while the exact total still fits. The budget is never exceeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class BudgetError(ValueError):
    """The budget is below the cheapest setting of every unit."""


@dataclass
class Choice:
    picks: list[int]  # candidate index per unit
    cost: float  # summed cost of the picks
    loss: float  # summed estimated loss of the picks


def _pick(costs, losses, lam: float) -> list[int]:
    # ties go to the cheaper candidate, then to the lower index
    return [min(range(len(c)), key=lambda j: (lo[j] + lam * c[j], c[j], j)) for c, lo in zip(costs, losses)]


def _total(values, picks) -> float:
    return math.fsum(v[j] for v, j in zip(values, picks))


def choose(costs: list[list[float]], losses: list[list[float]], budget: float, iterations: int = 64) -> Choice:
    """``costs[u][j]``, ``losses[u][j]``: candidate j of unit u. Returns the picks; raises BudgetError when even the
    cheapest candidate of every unit exceeds ``budget``."""
    if len(costs) != len(losses) or any(len(c) != len(lo) or not c for c, lo in zip(costs, losses)):
        raise ValueError("costs and losses must have one non-empty, equally long row per unit")
    for row in (*costs, *losses):
        if not all(math.isfinite(v) for v in row):
            raise ValueError("costs and losses must be finite")
    cheapest = [min(range(len(c)), key=lambda j: (c[j], losses[u][j])) for u, c in enumerate(costs)]
    floor = _total(costs, cheapest)
    if floor > budget:
        raise BudgetError(f"the cheapest candidates need {floor:.6g} and the budget is {budget:.6g}")
    picks = _pick(costs, losses, 0.0)
    if _total(costs, picks) > budget:
        # the cost of _pick falls as lam grows: bisect (in log space) for the smallest lam whose picks fit
        scale = max(max(abs(v) for v in row) for row in losses) / max(max(abs(v) for v in row) for row in costs)
        scale = scale or 1.0
        lo, hi = -80.0, 80.0
        if _total(costs, _pick(costs, losses, scale * math.exp(hi))) > budget:
            picks = cheapest
        else:
            for _ in range(iterations):
                mid = (lo + hi) / 2
                if _total(costs, _pick(costs, losses, scale * math.exp(mid))) <= budget:
                    hi = mid
                else:
                    lo = mid
            picks = _pick(costs, losses, scale * math.exp(hi))
    picks = _fill(costs, losses, list(picks), budget)
    return Choice(picks, _total(costs, picks), _total(losses, picks))


def _fill(costs, losses, picks: list[int], budget: float) -> list[int]:
    """Greedy: while some unit can move to a candidate that lowers its loss and the exact total still fits, make the
    move with the most loss saved per extra cost (moves that save loss at no extra cost first)."""
    banned: set[tuple[int, int]] = set()
    while True:
        spent = _total(costs, picks)
        best, best_rate = None, 0.0
        for u, (c, lo) in enumerate(zip(costs, losses)):
            now = picks[u]
            for j in range(len(c)):
                gain, extra = lo[now] - lo[j], c[j] - c[now]
                if gain <= 0 or spent + extra > budget or (u, j) in banned:
                    continue
                rate = math.inf if extra <= 0 else gain / extra
                if best is None or rate > best_rate:
                    best, best_rate = (u, j), rate
        if best is None:
            return picks
        u, j = best
        old, picks[u] = picks[u], j
        if _total(costs, picks) > budget:  # float rounding of spent + extra: the exact sum decides
            picks[u] = old
            banned.add((u, j))
