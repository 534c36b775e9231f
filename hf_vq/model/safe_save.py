"""save_pretrained that can be killed at any instant without losing the earlier save.

transformers' ``save_pretrained`` writes into the target folder in place: config.json first (not atomically), then the
weight shards, then it deletes stale shards. A process killed in between leaves a folder whose config and weights
disagree, or a truncated config.json, and the earlier good save is gone. Here the new save is written into a fresh
sibling folder, flushed to disk, and swapped in with one atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``), so
``out_dir`` is always either the old complete save or the new one. Where the exchange is not supported (another OS or
file system) two renames are used: a kill between them leaves the complete old save under a hidden sibling name,
which the next call puts back.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from hf_vq.utils.io import exchange_paths, fsync_tree, owned_tempdir, remove_stale_tempdirs

logger = logging.getLogger(__name__)

# Files the new save owns: the old folder's copies are never carried over (a smaller save writes fewer shards).
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".gguf")
_SAVE_OWNED = ("config.json", "generation_config.json")


def _prefix(out: Path) -> str:
    return f".{out.name}.hf_vq-save"


def _restore_interrupted(out: Path) -> None:
    """A kill between the two fallback renames: out is missing, the old save sits in a '-old' holder."""
    if out.exists():
        return
    held = [p / "save" for p in out.parent.glob(f"{_prefix(out)}-old.*") if (p / "save").is_dir()]
    if held:
        os.rename(max(held, key=lambda p: p.stat().st_mtime), out)
        logger.warning("hf_vq: restored %s from an interrupted save", out)


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) the old folder's other files (tokenizer, README, encodings, ...) into the new save."""
    for entry in old.iterdir():
        if (new / entry.name).exists() or entry.name.endswith(_WEIGHT_SUFFIXES) or entry.name in _SAVE_OWNED:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def save_pretrained_safely(model, out_dir: str | os.PathLike, *, keep_other_files: bool = True,
                           checksums: bool | None = None, **kwargs) -> Path:
    """``model.save_pretrained(out_dir, **kwargs)``, crash-safe: write a new sibling folder, then swap it in.

    ``keep_other_files`` carries the old folder's files that the save does not write (tokenizer, model card,
    encodings; never old weight files) into the new one. ``checksums=True`` records the sha256 of every quantized
    tensor in the safetensors header (verified at load, see hf_vq.model.checkpoint). Temp folders of an earlier
    killed call are removed. Returns ``out_dir``.
    """
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    prefix = _prefix(out)
    for stale in remove_stale_tempdirs(out.parent, f"{prefix}-new"):
        logger.info("hf_vq: removed %s, left by an interrupted save", stale)
    _restore_interrupted(out)
    remove_stale_tempdirs(out.parent, f"{prefix}-old")
    quantizer = getattr(model, "hf_quantizer", None)
    previous = getattr(quantizer, "save_checksums", None)
    new = owned_tempdir(out.parent, f"{prefix}-new", mode=0o777)  # a normal folder once swapped in (umask applies)
    try:
        if checksums is not None and quantizer is not None:
            quantizer.save_checksums = checksums
        model.save_pretrained(new, **kwargs)
        if keep_other_files and out.is_dir():
            _carry_over(out, new)
        fsync_tree(new)
        if not out.exists():
            os.rename(new, out)
        elif exchange_paths(new, out):  # `new` now holds the old save
            shutil.rmtree(new, ignore_errors=True)
        else:  # out is missing between these renames; _restore_interrupted recovers a kill there
            holder = owned_tempdir(out.parent, f"{prefix}-old")
            os.rename(out, holder / "save")
            os.rename(new, out)
            shutil.rmtree(holder, ignore_errors=True)
        _fsync_dir(out.parent)
    finally:
        if quantizer is not None and checksums is not None:
            quantizer.save_checksums = previous
        if new.exists() and new != out:
            shutil.rmtree(new, ignore_errors=True)
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
