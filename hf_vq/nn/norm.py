"""RMSNorm modules of the model, left in float, with their inference forward through the kernel registry (storage
"rms_norm").

transformers has one RMSNorm class per architecture. Rather than trust names, :func:`adopt_rms_norm` runs a module's
own forward and the kernel on the same input and adopts the module only when they agree (Gemma's ``1 + weight``
variant, a norm without a weight or any other formula is left alone)."""

from __future__ import annotations

import torch
from torch import nn

from hf_vq.nn import kernel_registry
from hf_vq.nn.base import tracing, with_mixin

STORAGE = "rms_norm"


class KernelRMSNorm:
    """Mixed in front of a transformers RMSNorm class: without gradients, a one-row CPU input of the weight's dtype
    goes through the registry's RMSNorm kernels; anything else through the class's own forward. Parameters, state dict
    and hooks are the module's own."""

    hf_vq_eps: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        # one row (a decode step): more rows keep the module's own forward, so a prefill or a calibration pass
        # gives transformers' numbers bit for bit (the kernel's fp32 sum runs in another order)
        if (x.numel() == w.shape[0] and x.dtype is w.dtype and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
                and not torch.is_autocast_enabled("cpu") and not tracing()):
            for kernel in kernel_registry.candidates(STORAGE, "cpu", 1):
                if kernel.prepare(w) is not None:
                    return kernel.run(w, x, self.hf_vq_eps)
        return super().forward(x)


def _eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(module, name, None)
        if isinstance(v, float):
            return v
    return None


def _agrees(module: nn.Module, kernel_cls: type) -> bool:
    """The module's own forward and the kernel give the same output (up to the fp32 summation order) on random
    one-row inputs of its dtype."""
    w = module.weight
    gen = torch.Generator().manual_seed(0)
    ulp = 2.0 ** -7 if w.dtype is torch.bfloat16 else 2.0 ** -20
    for _ in range(3):
        x = (torch.randn(1, w.shape[0], generator=gen) * 3).to(w.dtype)
        with torch.no_grad():
            ref = type(module).forward(module, x)
            if ref.dtype is not w.dtype or ref.shape != x.shape:
                return False
            module.__class__, original = kernel_cls, type(module)
            try:
                got = kernel_cls.forward(module, x)
            finally:
                module.__class__ = original
        if not bool(((got.float() - ref.float()).abs() <= ulp * ref.float().abs() + 1e-30).all()):
            return False
    return True


def adopt_rms_norm(module: nn.Module) -> bool:
    """Give ``module`` (a float RMSNorm of a transformers model) the kernel forward, in place, when its own forward
    computes ``weight * (x / sqrt(mean(x^2) + eps))`` as the kernel does; returns whether it did."""
    cls = type(module)
    if isinstance(module, KernelRMSNorm):
        return True
    w = getattr(module, "weight", None)
    eps = _eps(module)
    if (not cls.__name__.endswith("RMSNorm") or not isinstance(w, nn.Parameter) or w.dim() != 1 or eps is None
            or hasattr(module, "_hf_hook") or w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16)
            or not any(k.prepare(w) is not None for k in kernel_registry.kernels_for(STORAGE))):
        return False
    kernel_cls = with_mixin(KernelRMSNorm, cls)
    module.hf_vq_eps = eps
    if not _agrees(module, kernel_cls):
        del module.hf_vq_eps
        return False
    module.__class__ = kernel_cls
    return True
