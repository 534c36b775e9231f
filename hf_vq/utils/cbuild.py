"""Build-on-first-use C helpers: compile a C source with the system compiler, cache the shared library, load it with
ctypes. Anything that goes wrong leaves the library unavailable (logged once) and callers keep their torch path.

Libraries go to ``$XDG_CACHE_HOME/hf_vq/kernels`` (default ``~/.cache/hf_vq/kernels``) under a name keyed by a hash of
the source, the compiler, the flags and the CPU, written atomically so concurrent processes never load a partial file.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

BASE_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c11"]
# tried in order: the fastest build first, then ones that need less of the compiler
FLAG_SETS = (["-march=native", "-fopenmp"], ["-march=native"], [])


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "hf_vq" / "kernels"


def _cpu_tag() -> str:
    # -march=native binds the binary to this CPU: a shared home on another machine must not reuse it
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "".join(lines)


class CLibrary:
    """One C source file, built and loaded at most once per process."""

    def __init__(self, source: Path, bind: Callable[[ctypes.CDLL], ctypes.CDLL], what: str, libs=("-lm",)):
        self.source, self.bind, self.what, self.libs = Path(source), bind, what, list(libs)
        self._lib: ctypes.CDLL | None = None
        self._tried = False

    def compile(self, cc: str, flags: list[str]) -> Path:
        """Build (or find in the cache) the shared library for these extra compiler flags."""
        src = self.source.read_bytes()
        key = hashlib.sha256(src + "\0".join([cc, *flags, *self.libs, _cpu_tag()]).encode()).hexdigest()[:16]
        out = cache_dir() / f"{self.source.stem}_{key}.so"
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=out.stem, suffix=".so.tmp", dir=out.parent)
        os.close(fd)
        try:
            subprocess.run([cc, *BASE_FLAGS, *flags, str(self.source), "-o", tmp, *self.libs], check=True,
                           capture_output=True, timeout=120)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return out

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
                lib = self.bind(ctypes.CDLL(str(self.compile(cc, flags))))
            except (OSError, subprocess.SubprocessError) as e:
                detail = getattr(e, "stderr", b"") or b""
                errors.append(f"{flags}: {e} {detail.decode(errors='replace')[-300:]}")
                continue
            log.debug("hf_vq: %s built with %s", self.what, flags)
            self._lib = lib
            return lib
        log.info("hf_vq: building the %s failed; falling back to torch:\n%s", self.what, "\n".join(errors))
        return None
