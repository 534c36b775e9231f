"""One registry of the fast forward paths of quantized modules, keyed by storage format, device and kernel family.

A kernel is one file that calls :func:`register` at import; the modules ask :func:`candidates` which kernels may
serve a call and never name one. ``HF_VQ_KERNELS`` chooses among them:

- ``auto`` (default): every family the device supports, in priority order;
- ``exact``: none, so every module runs its dequantized reference forward;
- a family name (``native``, ``torch``, ...), or several separated by commas: only those, in that order.

A kernel that cannot serve a layer (shape, bit width, missing compiler) says so once, at prepare time, by returning
None: the module then tries the next candidate and, last, the exact path. Prepared states are per module and are
rebuilt only when the module's tensors change (see :class:`KernelStates`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from hf_vq.utils.env import getenv

ENV = "HF_VQ_KERNELS"


@dataclass(frozen=True)
class Kernel:
    name: str                     # unique, e.g. "native-affine"
    family: str                   # what HF_VQ_KERNELS names: "native", "torch", "triton", ...
    storage: str                  # the layer's storage format: "affine", "vq"
    devices: tuple[str, ...]      # torch device types it runs on
    priority: int                 # higher first under "auto"
    max_rows: int | None          # rows of input it serves at most (None: any)
    prepare: Callable[..., Any]   # (format object, **layer facts) -> state, or None when it cannot serve the layer
    run: Callable[..., torch.Tensor]   # (state, x, bias) -> y
    min_rows: int = 1
    # device types it runs on only when HF_VQ_KERNELS names its family (e.g. Triton's CPU interpreter, for tests)
    forced_devices: tuple[str, ...] = ()
    # (states of layers that read the same input) -> (one state giving all their outputs side by side, each
    # layer's state as a view into it, each layer's first output column), or None; see nn/shared_input.py
    fuse: Callable[..., Any] | None = None
    # (state) -> (C function address, context address, object keeping the context alive, instruction set) for the
    # one-row projection ABI of csrc/decode_layer.c, or None; lets a native decoder-layer step call this layer
    projection: Callable[..., Any] | None = None


_KERNELS: dict[str, list[Kernel]] = {}
_selection: tuple[str, tuple[str, ...] | None] = ("", None)
_memo: dict[tuple, list[Kernel]] = {}   # candidates() per (storage, device, rows), for the current selection
_epoch = 0   # bumped whenever a choice of kernel or a prepared state may have changed anywhere (see epoch())


def epoch() -> int:
    """A counter that changes whenever what some module's kernel call would use may have changed: a kernel
    registered, another HF_VQ_KERNELS selection, prepared states dropped or pinned. Plans that looked kernels up
    once (hf_vq.model.decode_layer) stay valid while it holds still (and their modules keep their tensors)."""
    return _epoch


def changed() -> None:
    global _epoch
    _epoch += 1


def register(kernel: Kernel) -> Kernel:
    kernels = [k for k in _KERNELS.get(kernel.storage, []) if k.name != kernel.name] + [kernel]
    _KERNELS[kernel.storage] = sorted(kernels, key=lambda k: -k.priority)
    _memo.clear()
    changed()
    return kernel


def families() -> list[str]:
    return sorted({k.family for ks in _KERNELS.values() for k in ks})


def _parse(value: str) -> tuple[str, ...] | None:
    """None for auto; () for exact; else the families named, in order."""
    names = [v.strip() for v in value.split(",") if v.strip()] or ["auto"]
    if names == ["auto"]:
        return None
    if names == ["exact"]:
        return ()
    unknown = [n for n in names if n not in families()]
    if unknown or "auto" in names or "exact" in names:
        raise ValueError(f"{ENV}={value!r}: expected 'auto', 'exact' or kernel families from {families()} "
                         f"(comma-separated), got {unknown or names}")
    return tuple(names)


def selection() -> tuple[str, ...] | None:
    """The families HF_VQ_KERNELS allows (None: all, by priority), read again whenever the variable changes."""
    global _selection
    value = getenv(ENV, "auto")
    if value != _selection[0]:
        _selection = (value, _parse(value))
        _memo.clear()
        changed()
    return _selection[1]


def candidates(storage: str, device_type: str, rows: int) -> list[Kernel]:
    """The kernels that may serve ``rows`` rows of input on ``device_type``, best first."""
    chosen = selection()
    key = (storage, device_type, rows)
    hit = _memo.get(key)
    if hit is not None:
        return hit
    ks = [k for k in _KERNELS.get(storage, ()) if k.min_rows <= rows and (k.max_rows is None or rows <= k.max_rows)
          and (device_type in k.devices or (chosen and k.family in chosen and device_type in k.forced_devices))]
    if chosen is not None:
        ks = sorted((k for k in ks if k.family in chosen), key=lambda k: chosen.index(k.family))
    if len(_memo) > 4096:
        _memo.clear()
    _memo[key] = ks
    return ks


def kernels_for(storage: str) -> list[Kernel]:
    return list(_KERNELS.get(storage, ()))


class KernelStates:
    """A module's prepared kernel states, one per (kernel, slot). Prepared on first use and kept until
    :meth:`clear` (called when the module's tensors change: ``.to()``, ``load_state_dict``) or until the stored
    tensor ``source()`` returns is another object (accelerate's offload hooks and device placement swap buffers).
    No per-call hashing of pointers or versions."""

    __slots__ = ("states", "_fixed", "dependents")

    def __init__(self):
        self.states: dict = {}
        self._fixed: tuple | None = None
        # key -> callable: whatever holds these states beyond the module (a joined group of siblings, a layer's
        # decode plan) lets go of them when they are dropped, so their memory goes with them; called once
        self.dependents: dict = {}
        changed()

    def _release(self) -> None:
        dependents, self.dependents = self.dependents, {}   # each registers again when it prepares again
        for release in dependents.values():
            release()

    @property
    def fixed(self) -> tuple | None:
        """(kernel, state) chosen once by hf_vq.optimize: the forward then skips the lookup (fewer guards under
        torch.compile); dropped with the states."""
        return self._fixed

    @fixed.setter
    def fixed(self, value: tuple | None) -> None:
        self._fixed = value
        changed()

    def clear(self) -> None:
        self.states = {}
        self._fixed = None
        changed()
        self._release()

    def get(self, kernel: Kernel, slot, source: torch.Tensor, build: Callable[[], Any]):
        key = (kernel.name, slot)
        hit = self.states.get(key)
        if hit is not None and hit[0] is source:
            return hit[1]
        state = build()
        self.states[key] = (source, state)
        changed()
        if hit is not None:   # a stale state replaced
            self._release()
        return state
