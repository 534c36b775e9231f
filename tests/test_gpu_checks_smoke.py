"""benchmarks/gpu_checks.py runs as-is on a CPU (``--device cpu --small``): every part finishes, and every decode /
prefill row of the per-layer table computes the right product (its own error column, against the fp32 product with
the dequantized weight, within fp16 rounding; the Triton rows run through Triton's interpreter)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_gpu_checks_runs_small_on_cpu():
    env = dict(os.environ, HF_VQ_KERNELS="auto")
    env.pop("TRITON_INTERPRET", None)   # the script sets it itself on CPU
    proc = subprocess.run([sys.executable, "benchmarks/gpu_checks.py", "--device", "cpu", "--small"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    layer = {k: v for k, v in rows.items() if k.startswith("512x256 ")}
    want = {"dense fp16", "affine 4-bit g128, triton", "affine 4-bit g128, dequantize per call",
            "affine 4-bit g128, torch int4 (hf_vq torch family)", "GPTVQ 2D, triton", "GPTVQ 2D, dequantize per call"}
    assert {k.removeprefix("512x256 ") for k in layer} == want
    for name, row in layer.items():
        for what in ("decode", "prefill 20"):
            assert row[f"{what} tok/s"] > 0
            # fp16 activations and outputs (bf16 inside the torch int4 kernel), K = 256
            limit = 2e-2 if "torch int4" in name else 3e-3
            assert float(row[f"{what} rel err"]) <= limit, (name, what, row)
    smol = {k for k in rows if k.startswith("smollm2 ") and "quantization_device" not in k}
    assert smol == {"smollm2 dense float32", "smollm2 RTN 4-bit g128, dequantize per call",
                    "smollm2 RTN 4-bit g128, torch int4 (hf_vq torch family)"}
    assert any(k.startswith("8B-shaped gptq") for k in rows) and any("quantization_device" in k for k in rows)
    assert all(rows[k]["decode tok/s"] > 0 for k in smol)
