"""Per-batch calibration activations kept in memory or, with a directory, on disk (safetensors, one file per batch).

AdaScale holds three copies of a block's activations for the whole calibration set (FP inputs, quantized inputs, FP
targets); on disk, memory holds one batch at a time plus the model. Each store's folder is named after the process
that owns it (hf_vq.utils.io.owned_tempdir) and removed by ``close()`` (the runner closes on success and on error);
folders left by a killed run are removed when the next store opens in the same directory.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hf_vq.utils.io import owned_tempdir, remove_stale_tempdirs

logger = logging.getLogger(__name__)
PREFIX = "hf_vq_acts"


class ActivationStore:
    """A fixed-length list of tensors; ``directory=None`` keeps them in memory (CPU)."""

    def __init__(self, n: int, directory: str | os.PathLike | None = None, name: str = "acts"):
        self.n = n
        self._mem: list[torch.Tensor | None] | None = None if directory else [None] * n
        self._dir: Path | None = None
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
            for stale in remove_stale_tempdirs(directory, PREFIX):
                logger.warning("hf_vq: removed %s, left by a run that was killed", stale)
            self._dir = owned_tempdir(directory, PREFIX, suffix=f".{name}")

    def __len__(self) -> int:
        return self.n

    def __setitem__(self, j: int, t: torch.Tensor) -> None:
        t = t.detach().cpu().contiguous()
        if self._mem is not None:
            self._mem[j] = t
            return
        path = self._dir / f"{j:06d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({"t": t}, str(tmp))
        os.replace(tmp, path)

    def __getitem__(self, j: int) -> torch.Tensor:
        if self._mem is not None:
            t = self._mem[j]
        else:
            path = self._dir / f"{j:06d}.safetensors"
            t = load_file(str(path))["t"] if path.exists() else None
        if t is None:
            raise IndexError(f"activation batch {j} was never stored")
        return t

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._mem = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
