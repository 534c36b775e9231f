"""Load-time cost of hf_vq's checkpoint checks on the real SmolLM2 (GPTQ 4-bit g128, 32 x 512 calibration).

Quantizes once, saves twice (plain and with checksums), then times ``from_pretrained`` of each save with the value
checks on and off, and each check on its own: the layer-record schema, the header check (names, shapes, dtypes,
transformers' key renaming), the value-range checks, the sha256 verification, and the sha256 computed at save.
Medians of ``--repeats`` runs (interleaved, so that load on a shared machine hits all variants alike).

    HF_VQ_CACHE=.cache/hf_vq OMP_NUM_THREADS=2 python benchmarks/load_checks.py [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_vq
from hf_vq import assets
from hf_vq.model import checkpoint


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / ".cache" / "load_checks"))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    out = Path(args.out)
    plain, summed = out / "plain", out / "checksums"
    if not (summed / "config.json").exists():
        src = assets.ensure_smollm2()
        tok = AutoTokenizer.from_pretrained(src)
        cfg = hf_vq.GPTQConfig(bits=4, group_size=128, dataset=[assets.austen_calibration_text()], tokenizer=tok,
                               num_samples=32, seq_len=512)
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
        model.save_pretrained(plain)
        model.hf_quantizer.save_checksums = True
        model.save_pretrained(summed)

    load = lambda d: AutoModelForCausalLM.from_pretrained(d)  # noqa: E731
    model = load(summed)
    layers = model.config.quantization_config.layers
    files = sorted(str(p) for p in summed.glob("*.safetensors"))
    sd = model.state_dict()
    keys = checkpoint.quantized_tensor_keys(layers, sd)
    nbytes = sum(sd[k].numel() * sd[k].element_size() for k in keys)
    print(f"{len(layers)} quantized layers, {len(keys)} quantized tensors, {nbytes / 2**20:.1f} MiB")

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    checkpoint.validate_layer_records(layers)
    from hf_vq.model.convert import build_skeleton
    build_skeleton(skeleton, layers, torch.float32)
    sums = checkpoint.check_checkpoint(skeleton, layers, files)
    parts = {
        "layer records (schema)": lambda: checkpoint.validate_layer_records(layers),
        "header check (names, shapes, dtypes, renaming)": lambda: checkpoint.check_checkpoint(skeleton, layers, files),
        "value-range checks": lambda: checkpoint.check_loaded(model, layers),
        "sha256 verification": lambda: checkpoint.check_loaded(model, {}, sums),
        "sha256 at save (checksum_metadata)": lambda: checkpoint.checksum_metadata(sd, layers),
    }
    for name, fn in parts.items():
        print(f"{name}: {1000 * median_time(fn, args.repeats):.1f} ms")

    original = checkpoint.check_loaded

    def without_value_checks():
        checkpoint.check_loaded = lambda *a, **k: None
        try:
            load(plain)
        finally:
            checkpoint.check_loaded = original

    variants = {"without value checks": without_value_checks, "with them": lambda: load(plain),
                "with them and checksums": lambda: load(summed)}
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    print("from_pretrained: " + ", ".join(f"{statistics.median(t):.3f} s {name}" for name, t in times.items()))


if __name__ == "__main__":
    main()
