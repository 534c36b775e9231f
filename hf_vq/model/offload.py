"""A quantized checkpoint loaded with a ``device_map`` that puts blocks on disk: its quantized modules go to disk too
(hf_vq.pipeline.placement.offload_to_disk, as after quantize-at-load), so host memory holds one module's tensors at a
time, not the whole quantized model."""

from __future__ import annotations

from torch import nn

from hf_vq.pipeline.placement import disk_offload_folder, execution_device, offload_to_disk


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
