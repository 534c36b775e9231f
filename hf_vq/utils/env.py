"""``os.environ.get`` for the variables the kernels read on every call (``HF_VQ_KERNELS``, ``HF_VQ_NATIVE_ISA``).

``os.environ.get`` goes through the Mapping machinery and encodes the key each time (about a microsecond); a decode
token reads these variables hundreds of times. On POSIX, ``os.environ`` keeps its values in a dict of encoded bytes
that every write (``os.environ[k] = v``, ``monkeypatch.setenv``, ``del``) updates: reading that dict gives the same
answer for a fraction of the cost. Elsewhere this is plain ``os.environ.get``.
"""

from __future__ import annotations

import os

_DATA = getattr(os.environ, "_data", None)
_POSIX = os.name == "posix" and isinstance(_DATA, dict)
_KEYS: dict[str, bytes] = {}


def getenv(name: str, default: str) -> str:
    if not _POSIX:
        return os.environ.get(name, default)
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = os.fsencode(name)
    raw = _DATA.get(key)
    return default if raw is None else os.fsdecode(raw)
