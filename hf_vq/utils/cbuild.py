"""Build-on-first-use C helpers: compile a C source with the system compiler, cache the shared library, load it with
ctypes. Anything that goes wrong (no safe cache, build, verification, load, or a missing symbol at bind time) leaves
the library unavailable with one warning, and callers keep their torch path.

The cache (``$XDG_CACHE_HOME/hf_vq/kernels``, default ``~/.cache/hf_vq/kernels``) is private: created 0700, and
refused when another user owns it or others can write to it (anyone who can write there could run code in this
process). Each build is stored content-addressed, ``<stem>_<key>_<sha256[:16]>.so``, where ``key`` hashes the source,
compiler, flags and CPU; a pointer ``<stem>_<key>.json`` written atomically after the library records its full
sha256. Before ``dlopen`` the library is opened once, its bytes are hashed from that descriptor and compared with
the pointer, and that same descriptor is what gets loaded (``/proc/self/fd/N``), so a file swapped after the check
is not what runs. A library with no pointer, or bytes that do not match it (planted, stale, truncated), is never
loaded: it is rebuilt.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Callable

from hf_vq.utils.io import atomic_write_text

log = logging.getLogger(__name__)

BASE_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c11"]
# tried in order: the fastest build first, then ones that need less of the compiler
FLAG_SETS = (["-march=native", "-fopenmp"], ["-march=native"], [])
_OPEN_LIBRARIES: list[int] = []  # descriptors of the loaded libraries (see _dlopen_fd)


class KernelCacheError(OSError):
    """The kernel cache cannot be trusted (owner, permissions) or a cached library does not verify."""


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "hf_vq" / "kernels"


def _check_private(path: Path) -> None:
    """``path`` must be a directory owned by this user that no one else can write to; tighten it to 0700."""
    st = os.stat(path)  # follows a symlink: what matters is the directory the files land in
    if not stat.S_ISDIR(st.st_mode):
        raise KernelCacheError(f"kernel cache {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise KernelCacheError(f"kernel cache {path} is owned by uid {st.st_uid}, not by this user "
                               f"({os.geteuid()}): refusing to load libraries from it")
    if st.st_mode & 0o022:
        raise KernelCacheError(f"kernel cache {path} is writable by group/others (mode {stat.S_IMODE(st.st_mode):o}): "
                               "refusing to load libraries from it; chmod 700 it or remove it")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


def private_cache_dir() -> Path:
    """The kernel cache, created 0700 where missing; raises KernelCacheError when it is not private."""
    path = cache_dir()
    for d in (path.parent, path):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        except FileNotFoundError:
            os.makedirs(d.parent, exist_ok=True)  # ~/.cache itself: ordinary permissions
            os.mkdir(d, 0o700)
        _check_private(d)
    return path


def _cpu_tag() -> str:
    # -march=native binds the binary to this CPU: a shared home on another machine must not reuse it
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "".join(lines)


def _read_verified(path: Path, sha256: str) -> int:
    """Open ``path`` (no symlink), check it is our regular file with exactly the bytes of ``sha256``; returns the
    open descriptor (the caller closes it)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise KernelCacheError(f"{path}: not a private regular file of this user")
        h = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
        if h.hexdigest() != sha256:
            raise KernelCacheError(f"{path}: content does not match its recorded sha256")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _dlopen_fd(fd: int, path: Path) -> ctypes.CDLL:
    """dlopen the verified descriptor (a file renamed over ``path`` after the hash check is not what runs). On
    success the descriptor stays open for the life of the process: glibc knows loaded objects by name, and a reused
    ``/proc/self/fd/N`` would return the earlier library."""
    proc_path = f"/proc/self/fd/{fd}"
    lib = ctypes.CDLL(proc_path if os.path.exists(proc_path) else str(path))
    _OPEN_LIBRARIES.append(fd)
    return lib


class CLibrary:
    """One C source file, built and loaded at most once per process."""

    def __init__(self, source: Path, bind: Callable[[ctypes.CDLL], ctypes.CDLL], what: str, libs=("-lm",)):
        self.source, self.bind, self.what, self.libs = Path(source), bind, what, list(libs)
        self._lib: ctypes.CDLL | None = None
        self._tried = False

    def _key(self, cc: str, flags: list[str]) -> str:
        # the local files it includes ("bf16.h"), and the ones those include, are part of what is built
        src, seen, todo = b"", set(), [self.source.name]
        while todo:
            name = todo.pop(0)
            if name in seen:
                continue
            seen.add(name)
            text = (self.source.parent / name).read_bytes()
            src += b"\0" + text
            todo += sorted(n.decode() for n in set(re.findall(rb'^\s*#\s*include\s+"([^"/]+)"', text, re.M)))
        return hashlib.sha256(src + "\0".join([cc, *flags, *self.libs, _cpu_tag()]).encode()).hexdigest()[:16]

    def _recorded(self, pointer: Path) -> tuple[Path, str] | None:
        """(library path, sha256) from a pointer file, or None when it is missing or malformed."""
        try:
            rec = json.loads(pointer.read_text(encoding="utf-8"))
            name, sha = rec["file"], rec["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if (not isinstance(name, str) or not isinstance(sha, str) or "/" in name or len(sha) != 64
                or not name.startswith(pointer.stem + "_")):
            return None
        return pointer.parent / name, sha

    def compile(self, cc: str, flags: list[str]) -> Path:
        """Build (or find verified in the cache) the shared library for these extra compiler flags; returns its
        path. The file's bytes matched its recorded sha256 when this returns."""
        out_dir = private_cache_dir()
        pointer = out_dir / f"{self.source.stem}_{self._key(cc, flags)}.json"
        rec = self._recorded(pointer)
        if rec is not None:
            try:
                os.close(_read_verified(*rec))
                return rec[0]
            except OSError as e:
                log.info("hf_vq: rebuilding the %s: %s", self.what, e)
        fd, tmp = tempfile.mkstemp(prefix=f".{pointer.stem}.", suffix=".so.tmp", dir=out_dir)
        os.close(fd)
        try:
            # absolute, so that compiler messages name the file wherever the build runs
            subprocess.run([cc, *BASE_FLAGS, *flags, str(self.source.resolve()), "-o", tmp, *self.libs], check=True,
                           capture_output=True, timeout=120)
            os.chmod(tmp, 0o700)
            sha = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
            lib_path = out_dir / f"{pointer.stem}_{sha[:16]}.so"
            os.replace(tmp, lib_path)  # content-addressed: a concurrent build of the same bytes writes the same file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        atomic_write_text(pointer, json.dumps({"file": lib_path.name, "sha256": sha}))
        return lib_path

    def _load_verified(self, cc: str, flags: list[str]) -> ctypes.CDLL:
        path = self.compile(cc, flags)
        rec = self._recorded(private_cache_dir() / f"{self.source.stem}_{self._key(cc, flags)}.json")
        if rec is None or rec[0] != path:
            raise KernelCacheError(f"{path}: its record changed while loading")
        fd = _read_verified(*rec)
        try:
            lib = _dlopen_fd(fd, path)
        except BaseException:
            os.close(fd)
            raise
        return self.bind(lib)

    def load(self) -> ctypes.CDLL | None:
        if self._tried:
            return self._lib
        self._tried = True
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            log.info("hf_vq: no C compiler found; the %s falls back to torch", self.what)
            return None
        errors = []
        for flags in FLAG_SETS:
            try:
                lib = self._load_verified(cc, flags)
            except KernelCacheError as e:  # the cache itself is unsafe: no other flags will help
                errors.append(str(e))
                break
            except (OSError, subprocess.SubprocessError, AttributeError, ValueError) as e:
                # AttributeError: a symbol the binding needs is missing from the library
                detail = getattr(e, "stderr", b"") or b""
                errors.append(f"{flags}: {type(e).__name__}: {e} {detail.decode(errors='replace')[-300:]}")
                continue
            log.debug("hf_vq: %s built with %s", self.what, flags)
            self._lib = lib
            return lib
        warnings.warn(f"hf_vq: the {self.what} is unavailable, falling back to torch: " + " | ".join(errors),
                      RuntimeWarning, stacklevel=2)
        return None
