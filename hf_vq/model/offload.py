"""Quantized modules of disk-offloaded blocks go back to disk.

When accelerate offloads a block to disk (``device_map`` with ``"disk"``), its float weights live in the offload
folder and are loaded for each forward. After quantization the block's quantized modules are written next to them
(one safetensors file per module, in ``hf_vq_quantized/``) and get the same kind of accelerate hook: their tensors sit
on the meta device and are read for each forward, so host memory holds one module's tensors at a time, not the
whole quantized model. The decoded-weight and kernel caches of such a module are dropped after each forward.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from hf_vq.pipeline.placement import SPILL_DIR, disk_offload_folder, execution_device
from hf_vq.utils.io import atomic_output

_CACHES = ("_kernel_cache", "_cache", "_kcache")


def _forget_caches(module: nn.Module, _args, _output) -> None:
    for attr in _CACHES:
        value = module.__dict__.get(attr)
        if value is not None:
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


def _placement(device_map: dict, name: str):
    keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    return device_map[max(keys, key=len)] if keys else None


def offload_loaded(model: nn.Module, names) -> list[str]:
    """After a quantized checkpoint was loaded with a ``device_map`` that puts blocks on disk: the quantized tensors
    are buffers, which accelerate keeps in memory unless ``offload_buffers=True``; move those of the disk-placed
    modules to disk too. Returns the names moved."""
    device_map = getattr(model, "hf_device_map", None) or {}
    on_disk = [n for n in names if _placement(device_map, n) == "disk"]
    folder = disk_offload_folder(model) if on_disk else None
    moved = []
    for name in on_disk:
        module = model.get_submodule(name)
        if folder is not None and any(t.device.type != "meta" for t in module.buffers(recurse=False)):
            offload_to_disk(module, name, folder, execution_device(module))
            moved.append(name)
    return moved
