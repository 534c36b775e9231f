"""Safe file system use: atomic file writes (a temp file in the same folder, then os.replace, so readers never see half
a file), bounded strict JSON reads, temp folders named after their owning process (a killed run's leftovers are
recognised and removed), and atomic folder swaps."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` (``\\n`` line ends) to ``path`` atomically (see atomic_write_bytes)."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """For writers that only take a file name (``onnx.save``, ``torch.onnx.export``): yields a temp path in the
    same folder; on success it replaces ``path``, on any failure it is removed and ``path`` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- bounded JSON reads
MAX_JSON_DEPTH = 32
MAX_JSON_BYTES = 1 << 30


class _DuplicateKey(Exception):
    pass


def _object(pairs):
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(dup)
    return out


def _constant(name):
    raise ValueError(f"{name} is not a JSON number")


_SCALARS = {int, float, str, bool, type(None)}


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion; a list of scalars costs one C-level pass."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        elif not isinstance(v, list):
            continue
        deepest = max(deepest, d)
        if not set(map(type, v)) <= _SCALARS:
            stack.extend((x, d + 1) for x in v if isinstance(x, (dict, list)))
    return deepest


def loads_json(data: str | bytes, where: str, *, what: str = "JSON document", max_depth: int = MAX_JSON_DEPTH,
               error: type[Exception] = ValueError) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys in an object, at most ``max_depth`` levels of
    nesting. Every failure raises ``error("<where>: not a <what>: <detail>")``."""
    def fail(detail: str):
        return error(f"{where}: not a {what}: {detail}")

    if isinstance(data, (bytes, bytearray)):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise fail(f"not UTF-8 text (invalid byte 0x{data[e.start]:02x} at offset {e.start})") from None
    try:
        doc = json.loads(data, object_pairs_hook=_object, parse_constant=_constant)
    except _DuplicateKey as e:
        raise fail(f"duplicate key {e.args[0]!r} in one JSON object") from None
    except RecursionError:
        raise fail(f"nested deeper than {max_depth} levels") from None
    except ValueError as e:  # JSONDecodeError, and NaN/Infinity from _constant
        raise fail(str(e)) from None
    if _depth(doc) > max_depth:
        raise fail(f"nested deeper than {max_depth} levels")
    return doc


def read_json(path: str | os.PathLike, *, what: str = "JSON document", max_bytes: int = MAX_JSON_BYTES,
              max_depth: int = MAX_JSON_DEPTH, error: type[Exception] = ValueError) -> Any:
    """``loads_json`` of a file of at most ``max_bytes`` bytes (checked before reading it)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise error(f"{path}: {size} bytes, more than the {max_bytes} allowed (pass max_bytes= to raise it)")
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise error(f"{path}: more than the {max_bytes} bytes allowed (pass max_bytes= to raise it)")
    return loads_json(data, str(path), what=what, max_depth=max_depth, error=error)


# --------------------------------------------------------------------------------------- temp folders, swapping
def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (Linux), 0 where unknown: tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _process_alive(pid: int, start: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    now = _start_time(pid)
    return not (start and now and now != start)


def owned_tempdir(parent: str | os.PathLike, prefix: str, suffix: str = "", mode: int = 0o700) -> Path:
    """A new folder ``<prefix>.<host>.<pid>.<start>.<random><suffix>`` in ``parent`` (``mode`` less the umask;
    private by default): the name records its owner, so :func:`remove_stale_tempdirs` can tell a killed run's
    leftovers from a live run's folder."""
    me = os.getpid()
    head = f"{prefix}.{_host_tag()}.{me}.{_start_time(me)}."
    for _ in range(100):
        path = Path(parent) / f"{head}{secrets.token_hex(4)}{suffix}"
        try:
            os.mkdir(path, mode)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp folder name {head}* in {parent}")


def remove_stale_tempdirs(parent: str | os.PathLike, prefix: str) -> list[Path]:
    """Remove this user's ``owned_tempdir(parent, prefix)`` folders whose process (on this host) is gone; returns
    them. Folders of live processes, other hosts and other users are left alone."""
    pattern = re.compile(re.escape(prefix) + r"\.([0-9a-f]{8})\.(\d+)\.(\d+)\.[^/]+")
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    host = _host_tag()
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if not m or m.group(1) != host:
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.geteuid():
                continue
        except OSError:
            continue
        pid, start = int(m.group(2)), int(m.group(3))
        if pid == os.getpid() and start == _start_time(pid):
            continue
        if not _process_alive(pid, start):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


_RENAME_EXCHANGE = 2


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE): at every instant each name points to
    one complete folder. False where the kernel, libc or filesystem cannot (the caller then renames twice)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file and folder under ``path`` (so a swap after it never exposes unwritten data)."""
    for root, dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
