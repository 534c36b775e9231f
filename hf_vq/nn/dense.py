"""A float ``nn.Linear`` that hf_vq keeps in float (the output head) with its inference forward through the kernel
registry (storage "dense")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hf_vq.nn.base import KernelDispatch, tracing
from hf_vq.nn.kernel_registry import KernelStates


class FloatLinear(KernelDispatch, nn.Linear):
    """An nn.Linear in every way (same parameters, state dict and autograd); without gradients, a call whose input
    has the weight's dtype goes through the registry's "dense" kernels, else through ``F.linear``."""

    storage = "dense"

    @classmethod
    def adopt(cls, linear: nn.Linear) -> "FloatLinear":
        """Turn ``linear`` into a FloatLinear in place: its parameters stay the same objects, so weight tying, hooks
        registered on it and optimizer references are kept."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"FloatLinear.adopt takes a plain nn.Linear, got {type(linear).__name__}")
        linear.__class__ = cls
        linear._kernel_states = KernelStates()
        return linear

    def kernel_source(self) -> torch.Tensor:
        return self.weight

    def format_weight(self) -> torch.Tensor:
        # the parameter itself: kernels read its storage at each call, so in-place updates and ``.data`` swaps show
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not torch.is_grad_enabled() and x.dtype is self.weight.dtype
                and not torch.is_autocast_enabled(x.device.type) and not tracing()):
            y = self.kernel_forward(x)
            if y is not None:
                return y
        return F.linear(x, self.weight, self.bias)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._kernel_states.clear()
        return self
