"""The package's one-way layers (README "Architecture"): import-linter's contracts hold, a back-import breaks them,
and no two modules import each other, directly or through others (imports inside functions included)."""

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_contracts_hold():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_back_import_breaks_the_layers(tmp_path):
    shutil.copytree(ROOT / "hf_vq", tmp_path / "hf_vq", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    affine = tmp_path / "hf_vq" / "formats" / "affine.py"
    # a lazy import counts as much as a module-level one
    affine.write_text(affine.read_text() + "\n\ndef _up():\n    from hf_vq.nn.qlinear import QuantLinear  # noqa\n")
    proc = _lint(tmp_path)
    assert proc.returncode != 0
    assert "hf_vq.formats.affine -> hf_vq.nn.qlinear" in proc.stdout, proc.stdout


def _strongly_connected(graph: grimp.ImportGraph) -> list[set[str]]:
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            out.append(comp)

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return out


def test_no_import_cycles():
    graph = grimp.build_graph("hf_vq", cache_dir=None)
    assert len(graph.modules) > 40
    cycles = [c for c in _strongly_connected(graph) if len(c) > 1]
    assert not cycles, cycles
