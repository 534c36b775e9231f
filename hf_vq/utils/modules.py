"""Module-tree helpers shared by every layer above."""

from __future__ import annotations

from torch import nn


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
