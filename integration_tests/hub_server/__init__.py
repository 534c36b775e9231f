"""A local Hub-compatible server for tests: olah 0.5.4 (read side, own virtualenv) behind a small write front.

Everything listens on 127.0.0.1 only; olah's upstream is a closed local port so nothing leaves the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
OLAH_VENV = REPO_ROOT / ".cache" / "olah-venv"
OLAH_VERSION = "0.5.4"
_MARKER = f".olah-{OLAH_VERSION}-ok"


def ensure_olah_venv(venv: Path = OLAH_VENV, timeout: float = 600) -> Path:
    """Create the olah virtualenv once (idempotent: a marker file is written only after a successful install)."""
    cli = venv / "bin" / "olah-cli"
    if (venv / _MARKER).exists() and cli.exists():
        return cli
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    # sys.executable is a python3 with venv support (the test environment's interpreter)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          f"olah=={OLAH_VERSION}"], capture_output=True, text=True, timeout=timeout)
    if pip.returncode != 0:
        raise RuntimeError(f"pip install olah=={OLAH_VERSION} failed:\n{pip.stdout[-3000:]}{pip.stderr[-3000:]}")
    if not cli.exists():
        raise RuntimeError(f"pip installed olah=={OLAH_VERSION} but {cli} is missing")
    (venv / _MARKER).write_text("ok\n")
    return cli


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _olah_toml(port: int, workdir: Path) -> str:
    netloc = f"127.0.0.1:{port}"
    return "\n".join([
        "[basic]",
        'host = "127.0.0.1"',
        f"port = {port}",
        'ssl-key = ""',
        'ssl-cert = ""',
        f'repos-path = "{workdir / "olah-repos"}"',
        'cache-size-limit = ""',
        'cache-clean-strategy = "LRU"',
        f'mirrors-path = ["{workdir / "mirrors"}"]',
        'hf-scheme = "http"',
        'hf-netloc = "127.0.0.1:9"',  # closed local port: no upstream traffic, ever
        'hf-lfs-netloc = "127.0.0.1:9"',
        'mirror-scheme = "http"',
        f'mirror-netloc = "{netloc}"',
        f'mirror-lfs-netloc = "{netloc}"',
        "",
        "[accessibility]",
        "offline = true",
        "",
    ])


@dataclass
class HubServer:
    workdir: Path
    front_port: int = 0
    olah_port: int = 0
    procs: list = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.front_port}"

    @property
    def mirrors(self) -> Path:
        return self.workdir / "mirrors"

    def start(self, ready_timeout: float = 60) -> "HubServer":
        cli = ensure_olah_venv()
        self.olah_port, self.front_port = free_port(), free_port()
        self.mirrors.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        cfg = self.workdir / "olah.toml"
        cfg.write_text(_olah_toml(self.olah_port, self.workdir))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        logs = self.workdir / "logs"
        try:
            self._spawn([str(cli), "-c", str(cfg), "--log-path", str(logs)], env, logs / "olah.out")
            front = Path(__file__).with_name("front.py")
            self._spawn([sys.executable, str(front), "--port", str(self.front_port), "--olah-port",
                         str(self.olah_port), "--mirrors", str(self.mirrors), "--blobs", str(self.workdir / "lfs")],
                        env, logs / "front.out")
            self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, cmd, env, log_path: Path):
        log = open(log_path, "wb")
        # own process group, so stop() can end olah's workers with it (and only them)
        self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True))
        log.close()

    def _wait_ready(self, timeout: float):
        url = f"{self.endpoint}/api/models/ready/probe/revision/main"
        deadline = time.monotonic() + timeout
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}; logs in {self.workdir / 'logs'}")
            try:
                opener.open(url, timeout=2)
                return
            except urllib.error.HTTPError as e:
                if e.code != 502:  # 502 = front is up but olah is not yet
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"hub server not ready after {timeout:.0f} s; logs in {self.workdir / 'logs'}")

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        self.procs.clear()

    def logs(self) -> str:
        return "\n".join(f"== {f.name}\n{f.read_text(errors='replace')[-4000:]}"
                         for f in sorted((self.workdir / "logs").glob("*")) if f.is_file())
