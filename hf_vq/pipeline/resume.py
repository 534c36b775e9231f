"""Resumable block-by-block runs (``resume_dir``).

After each finished block the runner stores that block's quantized layers (``block-00007.safetensors``, header in the
safetensors metadata) and the block's outputs on this rank's calibration windows (``acts-rank0.safetensors``, the next
block's inputs), then ``progress.json`` naming the last finished block. Every file is written to a temporary name and
renamed, so a run killed at any point leaves either the previous or the new state. A rerun with the same config,
model, calibration windows and process count reads ``progress.json`` and starts after that block; anything else
raises. The folder is removed when the run completes; temporary files left by a killed run are removed at start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_vq.formats.state import from_state, to_state
from hf_vq.utils.io import atomic_output, atomic_write_text, read_json

PROGRESS = "progress.json"
TMP = ".tmp"  # the suffix of atomic_output's temporary files: left by a killed run


class ResumeError(ValueError):
    pass


def save_results(path: Path, results: dict[str, object]) -> None:
    """Quantized results (name -> AffineWeight/VQWeight) in one safetensors file, written atomically."""
    tensors, headers = {}, {}
    for name, result in results.items():
        header, ts = to_state(result)
        headers[name] = header
        tensors.update({f"{name}::{k}": v.detach().cpu().contiguous().clone() for k, v in ts.items()})
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata={"headers": json.dumps(headers)})


def load_results(path: Path, names: list[str] | None = None) -> dict[str, object]:
    """The results stored by save_results (only ``names`` when given)."""
    out = {}
    with safe_open(str(path), "pt") as f:
        headers = json.loads(f.metadata()["headers"])
        for name, header in headers.items():
            if names is not None and name not in names:
                continue
            prefix = f"{name}::"
            out[name] = from_state(header, {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
    return out


class SpilledResult:
    """A finished layer's result kept on disk instead of in RAM (blocks offloaded to disk): ``load()`` reads it."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name

    def load(self):
        return load_results(self.path, [self.name])[self.name]


def fingerprint(config_dict: dict, model_config: dict, targets: dict, samples: torch.Tensor, world: int) -> str:
    """What must match for a rerun to continue a stored run."""
    h = hashlib.sha256()
    h.update(json.dumps({"config": config_dict, "model": model_config, "world": world,
                         "targets": {n: list(getattr(m, "weight").shape) for n, m in targets.items()}},
                        sort_keys=True, default=str).encode())
    h.update(samples.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class ResumeStore:
    def __init__(self, directory: str | os.PathLike, key: str, rank: int = 0):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key, self.rank = key, rank
        for stale in self.dir.glob(f"*{TMP}"):
            stale.unlink(missing_ok=True)

    def last_finished(self) -> int:
        """Index of the last stored block, -1 for a fresh run; raises if the folder holds another run."""
        path = self.dir / PROGRESS
        if not path.exists():
            return -1
        doc = read_json(path, what="resume progress file", error=ResumeError)
        if not isinstance(doc, dict) or not isinstance(doc.get("finished"), int):
            raise ResumeError(f"{path} is not an hf_vq resume progress file")
        if doc.get("key") != self.key:
            raise ResumeError(f"{self.dir} holds a run with another config, model, calibration data or process "
                              "count; use another resume_dir or delete this one")
        return doc["finished"]

    def _save(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        with atomic_output(self.dir / name) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))

    def save_block(self, index: int, results: dict[str, object], hidden: list[torch.Tensor]) -> None:
        """Block ``index``'s results (rank 0 writes them) and this rank's activations, then the progress marker.
        Every rank calls this, in step: the marker is written after all ranks stored their activations."""
        if self.rank == 0:
            save_results(self.dir / f"block-{index:05d}.safetensors", results)
        self._save(f"acts-rank{self.rank}.safetensors", {str(j): h for j, h in enumerate(hidden)})
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if self.rank == 0:
            atomic_write_text(self.dir / PROGRESS, json.dumps({"key": self.key, "finished": index}))

    def load(self, last: int) -> tuple[dict[str, object], list[torch.Tensor]]:
        """Results of blocks 0..last and this rank's activations after block ``last``."""
        results = {}
        for i in range(last + 1):
            path = self.dir / f"block-{i:05d}.safetensors"
            if path.exists():  # a block with no layer to quantize stores nothing
                results.update(load_results(path))
        with safe_open(str(self.dir / f"acts-rank{self.rank}.safetensors"), "pt") as f:
            hidden = [f.get_tensor(str(j)) for j in range(len(f.keys()))]
        return results, hidden

    def finish(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if self.rank == 0:
            shutil.rmtree(self.dir, ignore_errors=True)
