"""Routed (token, slot) pairs grouped by expert: what fused-expert forwards and the calibration stand-in iterate."""

from __future__ import annotations

import torch


class ExpertGroups:
    """The (token, slot) pairs of a routing ``top_k_index`` [T, k], sorted by expert (token order within one), and
    each expert's count: one host sync per call however many experts there are (a loop of ``top_k_index == e``
    syncs once per expert). Indices outside [0, num_experts) (expert-parallel sentinels) are left out."""

    def __init__(self, top_k_index: torch.Tensor, num_experts: int):
        with torch.no_grad():
            flat = top_k_index.reshape(-1)
            key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
            self.order = torch.argsort(key, stable=True)
            self.counts: list[int] = torch.bincount(key, minlength=num_experts + 1)[:num_experts].tolist()
        self.k = top_k_index.shape[-1]
        self._offsets = None
        self.starts = [0]
        for c in self.counts:
            self.starts.append(self.starts[-1] + c)

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(token, slot) of every routed pair, sorted by expert."""
        sel = self.order[:self.starts[-1]]
        return sel // self.k, sel % self.k

    def offsets(self, device) -> torch.Tensor:
        """int32 [E + 1]: expert e's rows of ``pairs()`` are offsets[e]..offsets[e + 1] (made once per device)."""
        if self._offsets is None or self._offsets.device != torch.device(device):
            self._offsets = torch.tensor(self.starts, dtype=torch.int32, device=device)
        return self._offsets

    def expert_of_rows(self, device) -> torch.Tensor:
        """The expert of every row of ``pairs()``."""
        counts = torch.tensor(self.counts, device=device)
        return torch.repeat_interleave(torch.arange(len(self.counts), device=device), counts)

    def tokens(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token, slot) of every pair routed to ``expert``, as ``torch.where(top_k_index == expert)`` gives them."""
        sel = self.order[self.starts[expert]:self.starts[expert + 1]]
        return sel // self.k, sel % self.k
