"""Calibration data: turn what the user gave (datasets name, local file or folder, list of strings, token tensors,
DataLoader) into ``num_samples`` token windows of ``seq_len`` tokens, drawn at seeded random positions."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch

logger = logging.getLogger(__name__)
TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")


class CalibrationError(ValueError):
    pass


def load_tokenizer(tokenizer: Any, fallback: str | None):
    """A tokenizer object from an object, a path/name, or the model's own path."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    source = tokenizer or fallback
    if not source:
        raise CalibrationError("calibration needs a tokenizer: pass tokenizer=<tokenizer or path> in the config")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise CalibrationError(f"could not load a tokenizer from {str(source)!r}: {e}; pass tokenizer=... explicitly") from e


def read_texts(path: str | os.PathLike) -> list[str]:
    """Text of a file, or of every text file (sorted) under a folder."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise CalibrationError(f"folder {str(p)!r} holds no text files ({', '.join(TEXT_SUFFIXES)})")
    elif p.is_file():
        files = [p]
    else:
        raise CalibrationError(f"calibration path {str(p)!r} does not exist")
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError) as e:
            raise CalibrationError(f"cannot read calibration text {str(f)!r}: {e}") from e
    return texts


def load_dataset_texts(name: str, config: str | None, split: str, text_column: str, **load_kwargs) -> list[str]:
    """Texts of a `datasets` dataset (a Hub name, or a builder like "text" with data files)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, **load_kwargs)
    except Exception as e:  # noqa: BLE001
        raise CalibrationError(f"could not load dataset {name!r} (config={config!r}, split={split!r}): {e}") from e
    if text_column not in ds.column_names:
        raise CalibrationError(f"dataset {name!r} has no column {text_column!r}; columns: {ds.column_names}")
    return [t for t in ds[text_column] if t]


def _token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    joined = "\n\n".join(t for t in texts if t)
    if not joined.strip():
        raise CalibrationError("calibration text is empty")
    ids = tokenizer(joined, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return ids


def sample_windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``num_samples`` windows of ``seq_len`` tokens at random starts (torch.Generator seeded)."""
    total = ids.numel()
    if total < seq_len:
        raise CalibrationError(f"calibration data too small: {total} tokens, need at least seq_len={seq_len}")
    if total < num_samples * seq_len:
        warnings.warn(f"calibration data has {total} tokens, fewer than num_samples*seq_len={num_samples * seq_len}: "
                      "windows will overlap", stacklevel=3)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seq_len + 1, (num_samples,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def _as_ids(item: Any, where: str) -> torch.Tensor:
    if isinstance(item, dict):
        if "input_ids" not in item:
            raise CalibrationError(f"{where}: a dict sample needs an 'input_ids' entry, got keys "
                                   f"{sorted(map(str, item))}")
        item = item["input_ids"]
    try:
        t = torch.as_tensor(item)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CalibrationError(f"{where}: not token ids ({type(item).__name__}): {e}") from None
    if t.dim() not in (1, 2):
        raise CalibrationError(f"{where}: token ids must be a 1-D sample or a 2-D [samples, tokens] batch, got a "
                               f"{t.dim()}-D tensor of shape {list(t.shape)}")
    return t


def _from_tensors(items: Iterable[Any]) -> torch.Tensor:
    rows = []
    for i, item in enumerate(items):
        t = _as_ids(item, f"calibration item {i}")
        rows.extend(t if t.dim() == 2 else [t])
    if not rows:
        raise CalibrationError("pre-tokenized calibration data holds no samples")
    lengths = {r.numel() for r in rows}
    if len(lengths) != 1:
        raise CalibrationError(f"pre-tokenized calibration samples must share one length, got lengths {sorted(lengths)}")
    if 0 in lengths:
        raise CalibrationError("pre-tokenized calibration samples are empty (0 tokens)")
    out = torch.stack(rows)
    if out.is_floating_point() or out.is_complex() or out.dtype == torch.bool:
        raise CalibrationError(f"token ids must be integers, got dtype {out.dtype}")
    return out.long()


def check_token_ids(samples: torch.Tensor, vocab_size: int | None, max_positions: int | None) -> torch.Tensor:
    """Token windows [n, L] the model can run: ids inside its vocabulary, L within its positions."""
    if max_positions is not None and samples.shape[1] > max_positions:
        raise CalibrationError(f"calibration samples have {samples.shape[1]} tokens, more than the model's "
                               f"max_position_embeddings ({max_positions})")
    if vocab_size is not None:
        bad = (samples < 0) | (samples >= vocab_size)
        if bool(bad.any()):
            i, j = (int(v) for v in bad.nonzero()[0])
            raise CalibrationError(f"calibration token id {int(samples[i, j])} (sample {i}, position {j}) is outside "
                                   f"the model's vocabulary [0, {vocab_size}); {int(bad.sum())} ids are out of range "
                                   "(a tokenizer of another model?)")
    return samples


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", ".", "~")) or s.lower().endswith(TEXT_SUFFIXES) or s.count("/") > 1


def build_calibration(dataset: Any, tokenizer: Any = None, num_samples: int = 128, seq_len: int = 2048, seed: int = 0,
                      dataset_config: str | None = None, dataset_split: str = "train", text_column: str = "text",
                      model_path: str | None = None, vocab_size: int | None = None,
                      max_positions: int | None = None) -> torch.Tensor:
    """Calibration token windows [num_samples, seq_len] (int64) from any supported source.

    Sources: a `datasets` name (``dataset_config``/``dataset_split``/``text_column``), a local text file or folder,
    a list of strings, a LongTensor [n, L] or a list of token tensors/dicts, or a DataLoader yielding those.
    Pre-tokenized data is used as given (no resampling). With ``vocab_size`` / ``max_positions`` (the model's), ids
    outside the vocabulary and windows longer than the model's positions raise CalibrationError.
    """
    if dataset is None:
        raise CalibrationError("this method needs calibration data: pass dataset=<list of strings | path | datasets name>")
    if isinstance(dataset, torch.Tensor):
        return check_token_ids(_from_tensors([dataset]), vocab_size, max_positions)
    if isinstance(dataset, torch.utils.data.DataLoader):
        return check_token_ids(_from_tensors(list(dataset)), vocab_size, max_positions)
    if max_positions is not None and seq_len > max_positions and (
            isinstance(dataset, (str, os.PathLike)) or (isinstance(dataset, (list, tuple)) and dataset
                                                        and all(isinstance(t, str) for t in dataset))):
        raise CalibrationError(f"seq_len={seq_len} is longer than the model's max_position_embeddings "
                               f"({max_positions})")
    if isinstance(dataset, (list, tuple)):
        if not dataset:
            raise CalibrationError("calibration dataset is an empty list")
        if all(isinstance(t, str) for t in dataset):
            texts = list(dataset)
        else:
            return check_token_ids(_from_tensors(dataset), vocab_size, max_positions)
    elif isinstance(dataset, (str, os.PathLike)):
        if Path(dataset).exists():
            texts = read_texts(dataset)
        elif _looks_like_path(str(dataset)):
            raise CalibrationError(f"calibration path {dataset!r} does not exist")
        else:
            texts = load_dataset_texts(str(dataset), dataset_config, dataset_split, text_column)
    else:
        raise CalibrationError(f"unsupported calibration dataset type {type(dataset).__name__}")
    tok = load_tokenizer(tokenizer, model_path)
    ids = _token_stream(texts, tok)
    logger.info("calibration: %d tokens from %d texts -> %d x %d windows", ids.numel(), len(texts), num_samples, seq_len)
    return check_token_ids(sample_windows(ids, num_samples, seq_len, seed), vocab_size, max_positions)
