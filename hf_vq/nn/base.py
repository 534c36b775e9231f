"""What every stored quantized Linear shares: back to nn.Linear, and its honest storage cost."""

from __future__ import annotations

import torch
from torch import nn

from hf_vq.nn import kernel_registry


class KernelDispatch:
    """Forward through the kernel registry, for modules with ``in_features``, ``bias`` and a ``_kernel_states``
    (:class:`kernel_registry.KernelStates`)."""

    # set by each module: the registry's storage format, the buffer whose replacement drops prepared kernels, and
    # format_weight() -> the hf_vq.formats object kernels prepare from
    storage: str = ""
    source_buffer: str = ""
    # (SharedInputGroup, index) when siblings reading the same input share one kernel call (nn/shared_input.py)
    _shared_input = None

    def kernel_source(self) -> torch.Tensor:
        return self._buffers[self.source_buffer]

    def kernel_state(self, kernel: kernel_registry.Kernel):
        """The kernel's prepared form of this layer (built on first use), or None when it cannot serve it."""
        return self._kernel_states.get(kernel, None, self.kernel_source(), lambda: kernel.prepare(self.format_weight()))

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """y through the kernel pinned by ``fix_kernel`` or the registry's first that serves this call; None when
        none does (the module then runs its exact path). Kernels have no backward: an input that needs a gradient
        gets None; a trainable bias is added after the kernel."""
        if torch.is_grad_enabled():
            if x.requires_grad:
                return None
        elif (self._shared_input is not None and x.numel() == self.in_features
              and not torch.compiler.is_compiling()):   # a compiled graph holds each layer's own kernel op
            y = self._shared_input[0].forward(self._shared_input[1], x)
            if y is not None:
                return y
        binding = self.kernel_binding(x.numel() // self.in_features if self.in_features else 0, x.device.type)
        return None if binding is None else with_bias(binding[0], binding[1], x, self.bias)

    def kernel_binding(self, rows: int = 1, device: str | None = None) -> tuple | None:
        """(kernel, prepared state) of the kernel that serves ``rows`` rows on ``device`` (default: this module's)
        now, the pinned one first; None when none does or the module keeps its exact path (``exact_decode``)."""
        fixed = self._kernel_states.fixed
        if fixed is not None and (fixed[0].max_rows is None or rows <= fixed[0].max_rows):
            return fixed
        if getattr(self, "exact_decode", False):
            return None
        for kernel in kernel_registry.candidates(self.storage, device or self.kernel_source().device.type, rows):
            state = self.kernel_state(kernel)
            if state is not None:
                return kernel, state
        return None

    def fix_kernel(self, rows: int = 1):
        """Choose, once, the kernel that serves ``rows`` rows on this module's device and prepare it; the forward
        then goes straight to it (``hf_vq.optimize``). Returns the kernel, or None when none serves this module."""
        self._kernel_states.fixed = None
        binding = self.kernel_binding(rows)
        if binding is None:
            return None
        self._kernel_states.fixed = binding
        return binding[0]


class QuantizedLinearMixin(KernelDispatch):
    """For modules with ``in_features``, ``out_features``, ``bias``, ``dequantize_weight(dtype)`` and a
    ``tensor_names`` tuple naming their stored quantized buffers."""

    tensor_names: tuple[str, ...] = ()

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {n: self._buffers[n] for n in self.tensor_names if self._buffers.get(n) is not None}

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        device = next(iter(self.stored_tensors().values())).device
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=device, dtype=dtype)
        lin.weight.data.copy_(self.dequantize_weight(dtype))
        if self.bias is not None:
            lin.bias.data.copy_(self.bias.detach())
        return lin

    def bits_per_value(self) -> float:
        """Stored bits per weight: the bytes of the saved quantized tensors (bias excluded)."""
        nbytes = sum(b.numel() * b.element_size() for b in self.stored_tensors().values())
        return 8.0 * nbytes / (self.in_features * self.out_features)


def with_bias(kernel, state, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A registry kernel's output plus ``bias``; a bias that needs a gradient is added by autograd, outside the
    kernel."""
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        y = kernel.run(state, x, None)
        return y + bias.to(y.dtype)
    return kernel.run(state, x, bias)


def tracing() -> bool:
    """Under torch.compile / torch.export, TorchScript tracing or ONNX export: the kernels' eager paths step aside."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


_WITH_MIXIN: dict[tuple[type, type], type] = {}


def with_mixin(mixin: type, cls: type) -> type:
    """``cls`` with ``mixin``'s methods in front, for a module adopted in place (``module.__class__ = ...``); the
    same name and module as ``cls``, so the model prints as before. One class per pair."""
    made = _WITH_MIXIN.get((mixin, cls))
    if made is None:
        made = _WITH_MIXIN[(mixin, cls)] = type(cls.__name__, (mixin, cls), {"__module__": cls.__module__})
    return made
