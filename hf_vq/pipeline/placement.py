"""Where a block computes while it is calibrated, and sequential onloading.

The model's weights stay where transformers/accelerate put them (a device, CPU RAM, or offloaded to disk with
``offload_folder``: parameters on the meta device, values in an accelerate ``weights_map``). While the runner works
on a decoder block, :func:`onloaded` puts that block's weights on the quantization device, points accelerate's hooks
there and stops them from re-loading offloaded weights on every forward (the runner writes quantized weights into the
block and replays it); on exit every weight goes back to its home (offloaded ones back to meta: the float originals
stay in the offload folder, the quantized result is kept by the runner).

:func:`offload_to_disk` puts a quantized module of a disk-offloaded block back on disk: its tensors are written next
to accelerate's files (one safetensors file per module, in ``hf_vq_quantized/``) and an accelerate hook of the same
kind reads them for each forward; the module's decoded-weight and kernel caches are dropped after each forward.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from hf_vq.utils.io import atomic_output


SPILL_DIR = "hf_vq_quantized"  # inside accelerate's offload folder: results and modules of disk-offloaded blocks


def _align_hooks(module: nn.Module) -> list:
    """accelerate AlignDevicesHooks on ``module`` (a SequentialHook holds several)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = getattr(hook, "hooks", [hook])
    return [h for h in hooks if hasattr(h, "execution_device") and hasattr(h, "offload")]


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: accelerate's execution device where a hook says so, else its weights'."""
    for m in module.modules():
        for h in _align_hooks(m):
            if h.execution_device is not None:
                dev = h.execution_device
                return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    for t in module.parameters():
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def disk_offload_folder(module: nn.Module):
    """The accelerate offload folder that holds ``module``'s weights (disk offload), else None (in memory, or CPU
    offload: weights in RAM)."""
    for m in module.modules():
        for h in _align_hooks(m):
            wm = h.weights_map if h.offload else None
            loader = getattr(wm, "dataset", wm)
            folder = getattr(loader, "save_folder", None)
            if folder is not None:
                return folder
    return None


def resolve_device(spec: str | None, block: nn.Module) -> torch.device:
    """``None``: where the block computes today; ``"auto"``: this process's GPU (LOCAL_RANK) if there is one, else
    CPU; anything else is a torch device string."""
    if spec is None:
        return execution_device(block)
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"quantization_device={spec!r} but torch sees no CUDA device")
    return dev


def move(obj, device: torch.device):
    """Tensors inside (nested tuples/lists/dicts of) ``obj`` moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move(o, device) for o in obj)
    if isinstance(obj, list):
        return [move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def onloaded(block: nn.Module, device: torch.device):
    """``block``'s parameters and buffers on ``device`` inside the ``with``; restored afterwards."""
    from accelerate.utils import set_module_tensor_to_device

    restore = []  # (module, tensor name, home device | "meta", is_param)
    hooks = []  # (hook, execution_device, offload)
    try:
        for m in block.modules():
            offloaded = []
            for h in _align_hooks(m):
                hooks.append((h, h.execution_device, h.offload))
                if h.offload and h.weights_map is not None:
                    offloaded.append(h)
                h.execution_device, h.offload = device, False
            tensors = [(n, t, True) for n, t in m._parameters.items() if t is not None]
            tensors += [(n, t, False) for n, t in m._buffers.items() if t is not None]
            for name, t, is_param in tensors:
                if t.device.type == "meta":
                    src = next((h.weights_map for h in offloaded if name in h.weights_map), None)
                    if src is None:
                        raise RuntimeError(f"{type(m).__name__}.{name} is on the meta device and no accelerate "
                                           "offload map holds it: cannot load it for calibration")
                    set_module_tensor_to_device(m, name, device, value=src[name])
                    restore.append((m, name, "meta", is_param))
                elif t.device != device:
                    restore.append((m, name, t.device, is_param))
                    _set(m, name, t.data.to(device), is_param)
        yield device
    finally:
        for m, name, home, is_param in reversed(restore):
            if home == "meta":
                set_module_tensor_to_device(m, name, "meta")
            else:
                _set(m, name, getattr(m, name).data.to(home), is_param)
        for h, dev, offload in hooks:
            h.execution_device, h.offload = dev, offload


def _set(m: nn.Module, name: str, value: torch.Tensor, is_param: bool) -> None:
    if is_param:
        m._parameters[name].data = value
    else:
        m._buffers[name] = value


_CACHES = ("_kernel_states", "_cache")


def _forget_caches(module: nn.Module, _args, _output) -> None:
    for attr in _CACHES:
        value = module.__dict__.get(attr)
        if hasattr(value, "clear") and not isinstance(value, dict):
            value.clear()   # kernel_registry.KernelStates
        elif value is not None:
            module.__dict__[attr] = {} if isinstance(value, dict) else None


def offload_to_disk(module: nn.Module, name: str, folder: str | os.PathLike, execution_device) -> None:
    """Write ``module``'s own tensors to ``folder``/hf_vq_quantized/``name``.safetensors and attach an accelerate
    hook that loads them onto ``execution_device`` for each forward (child modules keep their tensors in memory)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils import OffloadedWeightsLoader
    from safetensors.torch import save_file

    tensors = {k: t for k, t in [*module._parameters.items(), *module._buffers.items()] if t is not None}
    if not tensors:
        return
    path = Path(folder) / SPILL_DIR / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        save_file({k: t.detach().cpu().contiguous().clone() for k, t in tensors.items()}, str(tmp))
    loader = OffloadedWeightsLoader(index={k: {"safetensors_file": str(path), "weight_name": k} for k in tensors})
    hook = AlignDevicesHook(execution_device=execution_device, offload=True, io_same_device=False,
                            weights_map=loader, offload_buffers=True, place_submodules=False)
    add_hook_to_module(module, hook)  # moves the module's tensors to meta
    module.register_forward_hook(_forget_caches)
