"""Token-id files the reader scripts score (stdlib only: the readers run in their own venvs, without hf_vq)."""

from __future__ import annotations

import json


def load_ids(path: str) -> list[int]:
    """A JSON list of integer token ids, or an object with such a list under ``input_ids``."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict):
        if "input_ids" not in data:
            raise ValueError(f"{path}: JSON object has no 'input_ids' field")
        data = data["input_ids"]
    if not isinstance(data, list) or not all(isinstance(t, int) for t in data):
        raise ValueError(f"{path}: expected a JSON list of integer token ids")
    return data
