"""Disk offload at the model level.

- A quantized checkpoint loaded with a ``device_map`` that puts blocks on disk: its quantized modules go to disk too
  (hf_vq.pipeline.placement.offload_to_disk, as after quantize-at-load), so host memory holds one module's tensors at
  a time, not the whole quantized model.
- Fused MoE experts offloaded to disk: unfused one module at a time (loaded for the copy), each per-expert Linear
  written beside accelerate's files so the runner onloads it with its block; fused back the same way, and the fused
  quantized module goes to disk.
"""

from __future__ import annotations

from torch import nn

from hf_vq.model import experts as experts_mod
from hf_vq.pipeline.placement import disk_offload_folder, execution_device, offload_to_disk, onloaded
from hf_vq.pipeline.resume import SpilledResult


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


def unfuse_experts(module: nn.Module, layout, mode: str, min_tokens: float, name: str, folder=None):
    """experts.unfuse; for an experts module offloaded to disk (``folder``) its float weights are read for the copy
    and the per-expert Linears go to disk (host memory holds one experts module at a time)."""
    if folder is None:
        return experts_mod.unfuse(module, layout, mode, min_tokens)
    home = execution_device(module)
    with onloaded(module, home):
        cal = experts_mod.unfuse(module, layout, mode, min_tokens)
    for n, lin in cal.named_modules():
        if isinstance(lin, nn.Linear):
            offload_to_disk(lin, f"{name}.{n}", folder, home)
    return cal


def fuse_experts(cal, layout, results: dict, name: str, folder=None) -> nn.Module:
    """experts.fuse; with ``folder`` the per-expert Linears (and spilled results) are read from disk and the fused
    module goes to disk."""
    if folder is None:
        return experts_mod.fuse(cal, layout, results, name)
    home = execution_device(cal)
    mine = {k: r.load() if isinstance(r, SpilledResult) else r for k, r in results.items()
            if k.startswith(name + ".")}
    with onloaded(cal, home):  # biases are read from the per-expert Linears
        fused = experts_mod.fuse(cal, layout, mine, name)
    offload_to_disk(fused, name, folder, home)
    return fused


def refold_experts(cal, folder=None) -> nn.Module:
    """experts.refold; per-expert Linears on disk (``folder``) are read back for the copy."""
    if folder is None:
        return experts_mod.refold(cal)
    with onloaded(cal, execution_device(cal)):
        return experts_mod.refold(cal)
