"""Mixed precision to a bit budget (GPTQConfig(average_bits=...)) against uniform GPTQ on the real model.

SmolLM2-135M-Instruct, Austen: 32 x 512 calibration windows of Emma, perplexity over the first 32 windows of 2048
tokens of Pride and Prejudice + Persuasion (benchmarks/quality.py's protocol, fp32 evaluation).

    python benchmarks/mixed.py --rows fp,gptq3,mixed3.25,mixed3.25-hessian
    python benchmarks/mixed.py --rows fp,vq2d6,vqmixed3.25 --vq-iterations 25
(rows: fp, gptq2/3/4 (uniform w2/w3/w4 g128) and mixed<bits>[-<estimator>][-<candidate set>], estimator one of
fisher, tokenfisher, hessian, relative, candidate set one of CANDIDATE_SETS; without them, the library's defaults.
GPTVQ: vq2d5/vq2d6/vq2d7/vq2d8/vq4d8 (uniform, rows per codebook as in the default candidates) and
vqmixed<bits>[-<estimator>], all with ``--vq-iterations`` k-means iterations)
prints one table row per run: bits per weight of the quantized layers (as stored), their size and the saved
checkpoint's size in MB, ppl, ppl/FP, quantize time (allocation / GPTQ). ``--json FILE`` appends each row as one
JSON line as soon as it is done; rows already in that file are printed again instead of being rerun.
``--no-eval`` quantizes only (sizes and times, no perplexity).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_vq
from hf_vq import assets
from hf_vq.pipeline import mixed

CALIBRATION = (32, 512)
ROWS = {
    "fp": None,
    "gptq2": dict(bits=2, group_size=128),
    "gptq3": dict(bits=3, group_size=128),
    "gptq4": dict(bits=4, group_size=128),
}


# named candidate lists for mixed rows (a -<name> suffix); without one, the library's default candidates
CANDIDATE_SETS = {
    "min3": [{"bits": 3, "group_size": 128}, {"bits": 4, "group_size": 128}, {"bits": 8, "group_size": 128}],
    "3pc": [{"bits": 3, "group_size": -1}, {"bits": 3, "group_size": 128}, {"bits": 4, "group_size": 128}],
    "no8": [{"bits": 2, "group_size": 64}, {"bits": 2, "group_size": 128}, {"bits": 3, "group_size": 128},
            {"bits": 4, "group_size": 128}],
    "with8": [{"bits": 2, "group_size": 64}, {"bits": 2, "group_size": 128}, {"bits": 3, "group_size": 128},
              {"bits": 4, "group_size": 128}, {"bits": 8, "group_size": 128}],
}


VQ_ROWS = {f"vq{c['vector_dim']}d{c['index_bits']}": dict(c) for c in hf_vq.GPTVQConfig.default_candidates}


def row_params(name: str) -> dict | None:
    """A ROWS entry, or ``mixed<bits>[-<estimator>][-<candidate set>]`` (e.g. mixed3.25, mixed2.5-fisher,
    mixed3.25-fisher-3pc): average_bits=<bits> over the CANDIDATE_SETS entry (default: the library's candidates)."""
    if name in ROWS:
        return ROWS[name]
    if name in VQ_ROWS:
        return dict(VQ_ROWS[name], method="gptvq")
    if name.startswith("vqmixed"):
        return dict(row_params(name[2:]), method="gptvq")
    if not name.startswith("mixed"):
        raise SystemExit(f"unknown row {name!r}: one of {', '.join(ROWS)} or mixed<bits>[-<estimator>]")
    bits, *rest = name[len("mixed"):].split("-")
    params = dict(average_bits=float(bits))
    if rest and rest[-1] in CANDIDATE_SETS:
        params["candidates"] = CANDIDATE_SETS[rest.pop()]
    estimator = rest[0] if rest else ""
    if estimator and estimator not in mixed.ESTIMATORS:
        raise SystemExit(f"unknown estimator {estimator!r} in row {name!r}: one of {', '.join(mixed.ESTIMATORS)}")
    return dict(params, estimator=estimator or mixed.DEFAULT_ESTIMATOR)


def quantized_bits(model) -> tuple[float, int]:
    """(stored bits, weights) of the quantized Linear layers."""
    bits = weights = 0
    for mod in model.modules():
        if hasattr(mod, "bits_per_value") and hasattr(mod, "in_features"):
            n = mod.in_features * mod.out_features
            bits += mod.bits_per_value() * n
            weights += n
    return bits, weights


def checkpoint_mb(model) -> float:
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return sum(p.stat().st_size for p in Path(d).glob("*.safetensors")) / 1e6


def run_row(name, model_dir, tok, calib_text, test_text, seq_len, max_windows, evaluate=True, vq_iterations=100):
    params = row_params(name)
    t0 = time.perf_counter()
    report = {}
    if params is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:
        kw = dict(params)
        default, mixed.DEFAULT_ESTIMATOR = mixed.DEFAULT_ESTIMATOR, kw.pop("estimator", mixed.DEFAULT_ESTIMATOR)
        cls = hf_vq.GPTVQConfig if kw.pop("method", "gptq") == "gptvq" else hf_vq.GPTQConfig
        if cls is hf_vq.GPTVQConfig:
            kw["kmeans_iterations"] = vq_iterations
        cfg = cls(dataset=[calib_text], tokenizer=tok, num_samples=CALIBRATION[0], seq_len=CALIBRATION[1], **kw)
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg, dtype=torch.float32)
        finally:
            mixed.DEFAULT_ESTIMATOR = default
        report = model.hf_quantizer.last_run
    qtime = time.perf_counter() - t0
    bits, weights = quantized_bits(model)
    size = checkpoint_mb(model)
    ppl = None
    if evaluate:
        ppl = hf_vq.evaluate_perplexity(model, tok, test_text, seq_len=seq_len, max_tokens=65536,
                                        max_windows=max_windows)
    alloc = report.get("allocation") or {}
    row = {"row": name, "target_bits": (params or {}).get("average_bits"),
           "estimator": alloc.get("estimator", "-"), "bits_per_weight": bits / weights if weights else 32.0,
           "layers_mb": bits / 8e6, "checkpoint_mb": size, "ppl": ppl, "quantize_s": qtime if params else 0.0,
           "allocation_s": alloc.get("sensitivity_s", 0.0) + alloc.get("fisher_s", 0.0),
           "settings": _settings(alloc), "candidates": alloc.get("candidates"),
           "units": {u: {**{k: e[k] for k in SETTING_KEYS if k in e}, "losses": e.get("candidate_losses")}
                     for u, e in (alloc.get("units") or {}).items()}}
    del model
    gc.collect()
    return row


SETTING_KEYS = ("bits", "group_size", "vector_dim", "index_bits", "rows_per_block")


def _settings(alloc: dict) -> str:
    """How many layers got each setting, e.g. '3b g128: 120, 4b g128: 90' or '2D 6b r32: 150, ...'."""
    counts: dict[str, int] = {}
    for u in (alloc.get("units") or {}).values():
        key = (f"{u['bits']}b g{u['group_size']}" if "bits" in u else
               f"{u['vector_dim']}D {u['index_bits']}b r{u['rows_per_block']}")
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "-"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="fp,gptq3,mixed3.25")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=32)
    ap.add_argument("--json", help="append each row here as a JSON line; rows already there are not rerun")
    ap.add_argument("--no-eval", action="store_true", help="quantize and measure sizes and times only (no ppl)")
    ap.add_argument("--vq-iterations", type=int, default=100, help="GPTVQ rows: k-means iterations per codebook")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    done = {}
    if args.json and os.path.exists(args.json):
        for line in Path(args.json).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if r["ppl"] is not None or args.no_eval:
                    done[r["row"]] = r
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = assets.ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib_text, test_text = assets.austen_calibration_text(), assets.austen_test_text()
    fp = done.get("fp", {}).get("ppl")
    print(f"| row | target bits | estimator | bits/weight | layers MB | checkpoint MB | ppl@{args.seq_len} | ppl/FP | "
          "quantize s | of which choosing s | settings (layers) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.rows.split(","):
        r = done.get(name)
        if r is None:
            r = run_row(name, model_dir, tok, calib_text, test_text, args.seq_len, args.max_windows,
                        not args.no_eval, args.vq_iterations)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
        fp = r["ppl"] if name == "fp" else fp
        ratio = f"{r['ppl'] / fp:.4f}" if fp and r["ppl"] is not None else "-"
        ppl = f"{r['ppl']:.3f}" if r["ppl"] is not None else "-"
        print(f"| {name} | {r['target_bits'] or '-'} | {r['estimator']} | {r['bits_per_weight']:.4f} | "
              f"{r['layers_mb']:.2f} | {r['checkpoint_mb']:.1f} | {ppl} | {ratio} | {r['quantize_s']:.1f} | "
              f"{r['allocation_s']:.1f} | {r['settings']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
