"""Sibling layers that read the same input (an attention's q/k/v projections, an MLP's gate and up projections)
computed by one kernel call on a decode row.

A decode token calls every quantized Linear once for a single row, so the fixed cost of a call (Python, the call
into C, quantizing the activations) is paid once per layer. A :class:`SharedInputGroup` joins the prepared states
of such siblings into one (``Kernel.fuse``: the siblings' own states become views into the joined one, so nothing
is stored twice). The first member called with a one-row input computes every member's output and keeps them; a
sibling called next with the very same tensor (same object, same version) takes its part. Anything else (more
rows, another input, a member whose tensors changed, a kernel no longer selected) runs each layer on its own; a
group whose members turn out not to share their input stops grouping.
"""

from __future__ import annotations

import torch

from hf_vq.nn import kernel_registry


_NOT_REFUSED = object()


class SharedInputGroup:
    """Layers of one parent that read the same input. Nothing is prepared until the first decode row: a model that
    is only saved or trained never builds a kernel state for it."""

    def __init__(self, modules: list):
        self.modules = modules
        self.kernel = self.fused = None
        self.starts: list[int] = []
        self.sources: list = []
        self.state_dicts: list = []
        self.bias = None
        self._bias_key = None
        self.pending: list | None = None   # [x, x._version, y, members not yet served]
        self.parts: list[tuple] = []
        self.has_bias = any(m.bias is not None for m in modules)
        self.refused_for = _NOT_REFUSED     # the HF_VQ_KERNELS selection under which joining failed
        for i, m in enumerate(modules):
            m._shared_input = (self, i)

    def release(self) -> None:
        """Let go of the joined state (a member's states were dropped: the next decode row joins again)."""
        self.kernel = self.fused = None
        self.pending = None

    def _join(self, device: str) -> bool:
        """Prepare the joined state when the kernel that serves each member a decode row is one for all and can
        fuse their states. A refusal holds until HF_VQ_KERNELS changes."""
        selection = kernel_registry.selection()
        if self.refused_for is selection:
            return False
        self.refused_for = selection
        kernels = [kernel_registry.candidates(m.storage, device, 1)[:1] for m in self.modules]
        if not kernels[0] or any(k != kernels[0] for k in kernels) or kernels[0][0].fuse is None:
            return False
        kernel = kernels[0][0]
        states = [m.kernel_state(kernel) for m in self.modules]
        joined = None if any(s is None for s in states) else kernel.fuse(states)
        if joined is None:
            return False
        self.fused, members, self.starts = joined
        for m, st in zip(self.modules, members):
            m._kernel_states.states[(kernel.name, None)] = (m.kernel_source(), st)
            if m._kernel_states.fixed is not None and m._kernel_states.fixed[0] is kernel:
                m._kernel_states.fixed = (kernel, st)
        self.kernel, self.refused_for = kernel, _NOT_REFUSED
        for m in self.modules:
            m._kernel_states.dependents[id(self)] = self.release
        kernel_registry.changed()
        self.parts = [(Ellipsis, slice(start, start + m.out_features)) for m, start in zip(self.modules, self.starts)]
        self.sources = [m.kernel_source() for m in self.modules]
        self.state_dicts = [m._kernel_states.states for m in self.modules]
        return True

    def disband(self) -> None:
        for m in self.modules:
            m.__dict__.pop("_shared_input", None)
            m._kernel_states.dependents.pop(id(self), None)
        self.pending = None

    def _valid(self) -> bool:
        return all(m._kernel_states.states is d and m.kernel_source() is s
                   for m, d, s in zip(self.modules, self.state_dicts, self.sources))

    def fused_bias(self) -> torch.Tensor | None:
        """The members' biases side by side (fp32), or None when none has one."""
        if not self.has_bias:
            return None
        biases = [m.bias for m in self.modules]
        key = tuple((id(b), b._version) if b is not None else None for b in biases)
        if key != self._bias_key:
            self._bias_key = key
            if all(b is None for b in biases):
                self.bias = None
            else:
                self.bias = torch.zeros(self.fused.n, dtype=torch.float32)
                for b, start in zip(biases, self.starts):
                    if b is not None:
                        self.bias[start:start + b.numel()] = b.detach().float()
        return self.bias

    def binding(self, device: str) -> tuple | None:
        """(kernel, joined state) that computes every member's output side by side (member i's at columns
        ``starts[i]`` on; the bias from :meth:`fused_bias`), or None when the group cannot serve a decode row now
        (not joinable, another kernel selected)."""
        if self.kernel is None or not self._valid():
            self.kernel = None
            if not self._join(device):   # also after a member's tensors changed: join again
                return None
        chosen = kernel_registry.candidates(self.kernel.storage, device, 1)
        if not chosen or chosen[0] is not self.kernel:
            return None
        return self.kernel, self.fused

    def run_joined(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every member's output for a one-row ``x`` side by side in one kernel call, or None (see :meth:`binding`)."""
        if self.binding(x.device.type) is None:
            return None
        return self.kernel.run(self.fused, x, self.fused_bias())

    def forward(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member ``index``'s output for ``x`` (a one-row input), or None when it must run on its own."""
        if x.is_inference():   # no version counter: a change in place between two siblings' calls would go unseen
            return None
        p = self.pending
        if p is not None:
            if p[0] is x and p[1] == x._version and index in p[3]:
                p[3].remove(index)
                if not p[3]:
                    self.pending = None
                return p[2][self.parts[index]]
            if p[3]:   # a sibling still waits for this input, yet another one came: these layers do not share it
                self.disband()
                return None
        y = self.run_joined(x)
        if y is None:
            self.pending = None
            return None
        rest = set(range(len(self.modules)))
        rest.remove(index)
        self.pending = [x, x._version, y, rest]
        return y[self.parts[index]]
