"""Faults: a save killed with SIGKILL at any instant never loses the earlier save (save_pretrained_safely); AdaScale's
on-disk activation folders are removed on success, on error, and (at the next run) after a SIGKILL; hf_vq's own
writes go through a temp file and a rename. Real subprocesses, real signals."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_vq
from hf_vq.pipeline import adascale
from hf_vq.pipeline.activation_store import PREFIX, ActivationStore
from hf_vq.utils.io import atomic_output, exchange_paths, owned_tempdir, remove_stale_tempdirs

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def spawn(tmp_path, name, code, *args) -> subprocess.Popen:
    script = tmp_path / f"{name}.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)


def wait_for(proc, word, timeout=300.0) -> list[str]:
    """Lines of ``proc``'s output up to the first one starting with ``word``."""
    lines, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith(word):
                return lines
    proc.kill()
    raise AssertionError(f"child never printed {word!r}: {''.join(lines)[-2000:]}")


SAVER = """
    import os, signal, sys
    import hf_vq
    from transformers import AutoModelForCausalLM
    src4, src8, out, kill_at = sys.argv[1:5]
    new = AutoModelForCausalLM.from_pretrained(src8)
    made = []  # the save's temp folder

    def kill_inside_the_save(event, args):  # a real SIGKILL when the save reaches step `kill_at`
        if event == "os.mkdir" and ".hf_vq-save-new." in os.fsdecode(args[0]):
            made.append(os.fsdecode(args[0]))
        elif made and event == "open" and isinstance(args[0], (str, bytes)):
            path, mode = os.fsdecode(args[0]), args[1]
            if (kill_at == "config written" and path.endswith("generation_config.json")  # config.json is complete
                    or kill_at == "shards written" and path.endswith(".index.json") and "w" in (mode or "")
                    or kill_at == "files flushed" and mode is None and path.startswith(made[0])):  # fsync pass
                os.kill(os.getpid(), signal.SIGKILL)
        elif made and event == "shutil.rmtree" and os.fsdecode(args[0]) == made[0] and kill_at == "swapped":
            os.kill(os.getpid(), signal.SIGKILL)  # the new save swapped in, the old one about to be removed

    sys.addaudithook(kill_inside_the_save)
    hf_vq.save_pretrained_safely(new, out, max_shard_size="20KB")
    print("saved", flush=True)
"""


def save_temps(out: Path) -> list[Path]:
    """The temp folders save_pretrained_safely(..., out) holds while it runs."""
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.hf_vq-save-")]


def test_save_pretrained_safely_killed_inside_a_save(tiny_llama_dir, calib_ids, tmp_path):
    """A save of the 8-bit model over an earlier 4-bit save, SIGKILLed at each step of it: after config.json,
    after the weight shards, while flushing, and after the swap. The save's temp folder is still there after the
    kill (the kill landed inside the save); the target is the earlier save, complete, until the swap and the new
    one after it; with no earlier save, a kill before the swap leaves no target at all. The next save removes what
    the killed one left."""
    models = {bits: AutoModelForCausalLM.from_pretrained(tiny_llama_dir,
                                                         quantization_config=hf_vq.RTNConfig(bits=bits, group_size=32))
              for bits in (4, 8)}
    for bits, m in models.items():
        m.save_pretrained(tmp_path / f"src{bits}")
    expected = {bits: logits(m, calib_ids[:2]) for bits, m in models.items()}
    # target -> (the step the kill lands at, what the target must hold afterwards)
    cases = {"out0": ("config written", "4-bit"), "out1": ("shards written", "4-bit"),
             "out2": ("files flushed", "4-bit"), "out3": ("swapped", "8-bit"), "first": ("shards written", "absent")}
    for name, (_, want) in cases.items():
        if want != "absent":  # an earlier complete save, plus a file the save does not write (it must survive)
            hf_vq.save_pretrained_safely(models[4], tmp_path / name)
            (tmp_path / name / "notes.txt").write_text("keep me")
    procs = {name: spawn(tmp_path, f"saver_{name}", SAVER, tmp_path / "src4", tmp_path / "src8", tmp_path / name,
                         step) for name, (step, _) in cases.items()}  # all at once: the import dominates
    for name, proc in procs.items():
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == -signal.SIGKILL, (name, output[-2000:])
    for name, (step, want) in cases.items():
        out = tmp_path / name
        left = save_temps(out)
        assert len(left) == 1, (name, step, left)  # the interrupted save's folder
        if want == "absent":
            assert not out.exists(), step
        else:
            got = logits(AutoModelForCausalLM.from_pretrained(out), calib_ids[:2])
            assert torch.equal(got, expected[int(want[0])]), (name, step)
            assert (out / "notes.txt").read_text() == "keep me"
        assert any(left[0].iterdir()), (name, step)  # with what the save had written (or, swapped, the old save)
    # the next save removes the temp folder the killed save left behind
    for name, (_, want) in cases.items():
        out = tmp_path / name
        hf_vq.save_pretrained_safely(models[8], out)
        assert not save_temps(out), name
        assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), calib_ids[:2]), expected[8])
        assert (out / "notes.txt").exists() == (want != "absent")


def test_save_pretrained_safely_replaces_weights_and_keeps_other_files(tiny_llama_dir, calib_ids, tmp_path):
    small = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=hf_vq.RTNConfig(bits=4,
                                                                                                   group_size=32))
    out = tmp_path / "out"
    small.save_pretrained(out, max_shard_size="20KB")  # an old sharded save
    (out / "tokenizer.json").write_text("{}")
    assert len(list(out.glob("*.safetensors"))) > 1
    hf_vq.save_pretrained_safely(small, out, checksums=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json"]  # old shards and index gone, tokenizer kept
    assert small.hf_quantizer.save_checksums is False  # the option applied to this save only
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), calib_ids[:2]), logits(small, calib_ids[:2]))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_fallback_without_exchange_and_recovery_of_a_kill_between_renames(tiny_llama_dir, calib_ids, tmp_path,
                                                                          monkeypatch):
    from hf_vq.model import safe_save

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=hf_vq.RTNConfig(bits=4,
                                                                                                   group_size=32))
    out = tmp_path / "out"
    monkeypatch.setattr(safe_save, "exchange_paths", lambda a, b: False)  # e.g. a file system without it
    hf_vq.save_pretrained_safely(model, out)
    hf_vq.save_pretrained_safely(model, out)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), calib_ids[:1]), logits(model, calib_ids[:1]))
    # the state a kill between the two renames leaves: out missing, the old save in a dead process's holder
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = owned_tempdir(tmp_path, "probe").name.split(".")[1]
    holder = tmp_path / f".out.hf_vq-save-old.{host}.{int(dead.stdout)}.1.dead"
    holder.mkdir()
    os.rename(out, holder / "save")
    hf_vq.save_pretrained_safely(model, out, max_shard_size="20KB")
    assert len(list(out.glob("*.safetensors"))) > 1 and not holder.exists()
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), calib_ids[:1]), logits(model, calib_ids[:1]))


def test_folder_exchange_is_atomic_and_both_complete(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("A")
    (b / "x").write_text("B")
    if exchange_paths(a, b):  # Linux with a file system that supports RENAME_EXCHANGE (ext4, xfs, tmpfs, btrfs)
        assert (a / "x").read_text() == "B" and (b / "x").read_text() == "A"
    with pytest.raises(OSError):
        exchange_paths(a, tmp_path / "missing")


# ----------------------------------------------------------------------------------- AdaScale activation folders
def _acts(cache: Path) -> list[Path]:
    return sorted(cache.iterdir()) if cache.exists() else []


def _adascale_cfg(cache, iterations=2):
    return hf_vq.AdaScaleConfig(bits=4, group_size=32, num_iterations=iterations, batch_size=2,
                                dataset=torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1)),
                                num_samples=4, seq_len=32, activation_cache_dir=str(cache))


def test_adascale_cache_removed_on_success_and_on_error(tiny_llama_dir, tmp_path, monkeypatch):
    cache = tmp_path / "acts"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=_adascale_cfg(cache))
    assert cache.is_dir() and _acts(cache) == []

    def boom(*args, **kwargs):
        assert len(_acts(cache)) == 3  # fp_in, fp_out, q_in exist while training
        raise RuntimeError("interrupted")

    monkeypatch.setattr(adascale, "train_block", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=_adascale_cfg(cache))
    assert _acts(cache) == []


ADASCALE = """
    import sys, torch
    import hf_vq
    from transformers import AutoModelForCausalLM
    cfg = hf_vq.AdaScaleConfig(bits=4, group_size=32, num_iterations=10**6, batch_size=2,
                               dataset=torch.randint(0, 128, (4, 32)), num_samples=4, seq_len=32,
                               activation_cache_dir=sys.argv[2], early_stop_margin=None, compile=False)
    print("start", flush=True)
    AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=cfg)
"""


def test_adascale_cache_left_by_a_killed_run_is_removed_by_the_next(tiny_llama_dir, tmp_path):
    cache = tmp_path / "acts"
    proc = spawn(tmp_path, "adascale", ADASCALE, tiny_llama_dir, cache)
    wait_for(proc, "start")
    end = time.monotonic() + 300
    while len(_acts(cache)) < 3 and time.monotonic() < end and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)  # inside the (endless) distillation of block 0, activation batches on disk
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = _acts(cache)
    assert len(left) == 3 and all(p.name.startswith(PREFIX) and any(p.iterdir()) for p in left)

    live = owned_tempdir(cache, PREFIX, suffix=".other")  # a live run's folder (this process) is not touched
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=_adascale_cfg(cache))
    assert _acts(cache) == [live]


def test_stale_folder_detection_uses_pid_and_start_time(tmp_path):
    mine = owned_tempdir(tmp_path, "hf_vq_x")
    assert remove_stale_tempdirs(tmp_path, "hf_vq_x") == [] and mine.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    host = mine.name.split(".")[1]
    gone = tmp_path / f"hf_vq_x.{host}.{pid}.123.abcd"        # that process has exited
    reused = tmp_path / f"hf_vq_x.{host}.{os.getpid()}.1.abcd"  # our pid, but another start time: a reused pid
    other_host = tmp_path / f"hf_vq_x.00000000.{pid}.123.abcd"
    for p in (gone, reused, other_host):
        p.mkdir()
    removed = remove_stale_tempdirs(tmp_path, "hf_vq_x")
    assert sorted(removed) == sorted([gone, reused]) and mine.exists() and other_host.exists()
    with ActivationStore(2, tmp_path) as store:
        store[0] = torch.ones(2)
        assert store._dir.parent == tmp_path and store._dir.name.startswith(f"{PREFIX}.{host}.{os.getpid()}.")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(PREFIX)]


# ----------------------------------------------------------------------------------------------- atomic writes
def test_atomic_output_leaves_the_old_file_on_failure(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    with atomic_output(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
