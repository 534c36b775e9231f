"""The compiled-kernel cache (hf_vq/utils/cbuild.py) with real files, a real compiler and real dlopen: it is private,
nothing planted in it runs, and every failure falls back to the torch path with one warning."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_vq
from hf_vq.algorithms import gptq
from hf_vq.algorithms.gptq import gptq_quantize
from hf_vq.utils import cbuild
from hf_vq.utils.cbuild import CLibrary

CC = shutil.which("cc") or shutil.which("gcc")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CC", raising=False)
    return tmp_path / "xdg" / "hf_vq" / "kernels"


def fresh_gptq_library(source=gptq.LIBRARY.source) -> CLibrary:
    return CLibrary(source, gptq._bind, "GPTQ block kernel (test)")


def foreign_library(tmp_path, marker) -> str:
    """A shared library that exports gptq_block (so binding it would succeed) and whose constructor writes
    ``marker``: if it is ever dlopen'ed, the marker exists."""
    src = tmp_path / "foreign.c"
    src.write_text('#include <stdio.h>\n'
                   '__attribute__((constructor)) static void planted(void) {\n'
                   f'  FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("ran", f); fclose(f); }}\n'
                   '}\n'
                   'void gptq_block(void) {}\n')
    out = tmp_path / "foreign.so"
    subprocess.run([CC, "-shared", "-fPIC", str(src), "-o", str(out)], check=True, capture_output=True)
    return str(out)


def quantize_both(lib):
    """GPTQ codes with ``lib`` as the kernel library and with the torch loop."""
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(48, 130, generator=g), torch.randn(256, 130, generator=g)
    h = x.T @ x / 256
    return gptq_quantize(w, h, 4, 32, use_kernel=True), gptq_quantize(w, h, 4, 32, use_kernel=False)


def test_cache_is_private_and_verified(cache):
    lib = fresh_gptq_library()
    assert lib.load() is not None
    for d in (cache, cache.parent):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    pointers = sorted(cache.glob("gptq_block_*.json"))
    libs = sorted(cache.glob("gptq_block_*.so"))
    assert len(pointers) == 1 and len(libs) == 1
    assert libs[0].name in pointers[0].read_text() and not list(cache.glob("*.tmp"))
    assert stat.S_IMODE(os.stat(libs[0]).st_mode) & 0o077 == 0


def test_planted_library_never_runs_and_the_kernel_still_works(cache, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    foreign = foreign_library(tmp_path, marker)
    # the probe can fail: loading the foreign library for real does write the marker
    import ctypes
    ctypes.CDLL(foreign)
    assert marker.exists()
    marker.unlink()

    # 1) planted before any build, under the name the old cache used and under every candidate name
    first = fresh_gptq_library()
    key = first._key(CC, cbuild.FLAG_SETS[0])
    cache.mkdir(parents=True, mode=0o700)
    os.chmod(cache.parent, 0o700)
    shutil.copy(foreign, cache / f"gptq_block_{key}.so")
    monkeypatch.setattr(gptq, "LIBRARY", first)
    a, b = quantize_both(first)
    assert first.load() is not None and not marker.exists()
    assert torch.equal(a.codes, b.codes)

    # 2) the verified library itself overwritten with the foreign bytes (same name, stale record): rebuilt
    (real,) = cache.glob(f"gptq_block_{key}_*.so")
    # swapped in as a new file: writing into the file `first` has mapped would corrupt the loaded code itself
    shutil.copy(foreign, real.with_suffix(".swap"))
    os.replace(real.with_suffix(".swap"), real)
    second = fresh_gptq_library()
    monkeypatch.setattr(gptq, "LIBRARY", second)
    a, b = quantize_both(second)
    assert second.load() is not None and not marker.exists()
    assert torch.equal(a.codes, b.codes)
    assert real.read_bytes() != open(foreign, "rb").read()  # the rebuild replaced it


def test_library_missing_a_symbol_falls_back_with_one_warning(cache, tmp_path, monkeypatch):
    src = tmp_path / "gptq_block.c"  # a stale/foreign build: no gptq_block symbol
    src.write_text("int something_else(void) { return 1; }\n")
    broken = fresh_gptq_library(src)
    monkeypatch.setattr(gptq, "LIBRARY", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a, b = quantize_both(broken)
        assert broken.load() is None
    ours = [w for w in caught if "falling back to torch" in str(w.message)]
    assert len(ours) == 1 and "gptq_block" in str(ours[0].message)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


def test_gptq_quantize_at_load_survives_a_broken_kernel(cache, tmp_path, monkeypatch, tiny_llama_dir, calib_ids):
    def run():
        cfg = hf_vq.GPTQConfig(dataset=calib_ids, num_samples=8, seq_len=32, group_size=32)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)
        with torch.no_grad():
            return model(input_ids=calib_ids[:2]).logits

    monkeypatch.setattr(gptq, "LIBRARY", fresh_gptq_library())
    with_kernel = run()
    src = tmp_path / "gptq_block.c"
    src.write_text("int something_else(void) { return 1; }\n")
    monkeypatch.setattr(gptq, "LIBRARY", fresh_gptq_library(src))
    with pytest.warns(RuntimeWarning, match="falling back to torch"):
        fallback = run()
    assert torch.equal(with_kernel, fallback)  # the C loop and the torch loop give identical codes


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722])
def test_cache_writable_by_others_is_refused(cache, mode):
    cache.mkdir(parents=True)
    os.chmod(cache.parent, 0o700)
    os.chmod(cache, mode)
    lib = fresh_gptq_library()
    with pytest.warns(RuntimeWarning, match="writable by group/others"):
        assert lib.load() is None
    assert not list(cache.iterdir())  # nothing was built into it, nothing loaded from it
    assert stat.S_IMODE(os.stat(cache).st_mode) == mode


def test_cache_owned_by_another_user_is_refused(cache, tmp_path):
    cache.parent.mkdir(parents=True, mode=0o700)
    if os.geteuid() == 0:
        cache.mkdir(mode=0o700)
        os.chown(cache, 65534, 65534)
    else:  # a directory this user does not own
        cache.symlink_to("/")
    lib = fresh_gptq_library()
    with pytest.warns(RuntimeWarning, match="not by this user"):
        assert lib.load() is None


def test_own_cache_with_0755_is_tightened_and_used(cache):
    cache.mkdir(parents=True, mode=0o755)
    os.chmod(cache, 0o755)
    os.chmod(cache.parent, 0o755)
    assert fresh_gptq_library().load() is not None
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(cache.parent).st_mode) == 0o700


def _value_library(src):
    import ctypes

    def bind(lib):
        lib.value.restype = ctypes.c_int
        return lib

    return CLibrary(src, bind, "header test")


@pytest.mark.parametrize("nested", [False, True])
def test_a_changed_local_header_rebuilds_the_library(cache, tmp_path, nested):
    # the .c file includes value.h, or includes part.c which includes value.h (as decode_layer.c includes
    # decode_attention.c, which includes bf16.h)
    (tmp_path / "value.h").write_text("#define VALUE 1\n")
    (tmp_path / "part.c").write_text('#include "value.h"\nstatic int part(void) { return VALUE; }\n')
    src = tmp_path / "reads_header.c"
    src.write_text('#include "part.c"\nint value(void) { return part(); }\n' if nested else
                   '#include "value.h"\nint value(void) { return VALUE; }\n')
    assert _value_library(src).load().value() == 1
    (tmp_path / "value.h").write_text("#define VALUE 2\n")   # same .c bytes: only the header changed
    assert _value_library(src).load().value() == 2
