"""AdaScale quality/speed benchmark on the real model (SmolLM2-135M-Instruct, Austen corpus).

Calibration: ``--num-samples`` x ``--calib-len`` tokens of Emma (default 32 x 512; same windows for GPTQ and
AdaScale). Eval: perplexity at ``--seq-len`` tokens (default 512) over the first ``--max-windows`` windows of Pride
and Prejudice + Persuasion, in fp32. Rows are ``fp``, ``rtn<b>``, ``gptq<b>``, ``ada<b>-<iters>`` (RTN start) and
``adag<b>-<iters>`` (GPTQ start), e.g.

    python benchmarks/adascale.py --rows fp,rtn4,gptq4,ada4-0,ada4-100 --max-windows 16

prints: row, bits, ppl, quantize wall and CPU time, AdaScale wall time per block and per iteration. ``--json``
also keeps each block's per-step losses and step count; ``--plot out.png`` draws ppl vs quantize CPU time from
such a file, and ``--early-stop-study 0,0.01`` replays its losses through the early stop, instead of running
anything.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_vq
from hf_vq import assets

from common import first_blocks_only


def make_config(row: str, tok, calib: str, num_samples: int, seq_len: int, group_size: int, blocks: int | None = None,
                **ada_kw):
    calib_kw = dict(dataset=[calib], tokenizer=tok, num_samples=num_samples, seq_len=seq_len)
    if blocks is not None:  # quantize only decoder blocks < blocks (iteration sweeps that fit a CPU session)
        calib_kw["module_overrides"] = first_blocks_only(blocks)
    if row.startswith("rtn"):
        return hf_vq.RTNConfig(bits=int(row[3:]), group_size=group_size), 0
    if row.startswith("gptq"):
        return hf_vq.GPTQConfig(bits=int(row[4:]), group_size=group_size, **calib_kw), 0
    head, iters = row.split("-")
    init = "gptq" if head.startswith("adag") else "rtn"
    bits = int(head[4:] if init == "gptq" else head[3:])
    return hf_vq.AdaScaleConfig(bits=bits, group_size=group_size, num_iterations=int(iters), init=init,
                                **calib_kw, **ada_kw), int(iters)


def record_histories(into: list):
    """Wrap the pipeline's train_block so each block's per-step losses land in ``into`` (offline early-stop
    studies)."""
    from hf_vq.pipeline import adascale

    inner = adascale.train_block

    def train_block(*args, history=None, **kw):
        history = [] if history is None else history
        out = inner(*args, history=history, **kw)
        into.append(list(history))
        return out

    adascale.train_block = train_block


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="fp,rtn4,gptq4,ada4-0,ada4-100")
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="append rows as JSON lines here")
    ap.add_argument("--blocks", type=int, default=None, help="quantize only the first N decoder blocks")
    ap.add_argument("--early-stop-margin", default="default", help="a number, 'none', or 'default' (the config's)")
    ap.add_argument("--train-dtype", choices=("float32", "bfloat16"), default=None, help="default: the config's")
    ap.add_argument("--lr-scales", type=float, default=None, help="default: the config's")
    ap.add_argument("--lr-clip", type=float, default=None, help="default: the config's")
    ap.add_argument("--granularity", choices=("group", "blockwise", "lpbq"), default=None,
                    help="AdaScale rows' weight_granularity (blockwise and lpbq: symmetric); default: the config's")
    ap.add_argument("--plot", help="only draw ppl vs quantize CPU time from the --json file into this PNG")
    ap.add_argument("--early-stop-study", metavar="MARGINS",
                    help="only replay the --json file's recorded block losses through EarlyStop at these margins "
                         "(comma-separated) and print where each would stop")
    args = ap.parse_args(argv)
    if args.plot:
        return plot(args.json, args.plot)
    if args.early_stop_study:
        return early_stop_study(args.json, [float(m) for m in args.early_stop_study.split(",")], args.num_samples)
    ada_kw = {}
    if args.early_stop_margin != "default":
        ada_kw["early_stop_margin"] = None if args.early_stop_margin == "none" else float(args.early_stop_margin)
    if args.train_dtype:
        ada_kw["train_dtype"] = args.train_dtype
    if args.granularity:
        ada_kw.update(weight_granularity=args.granularity, sym=args.granularity != "group")
    for lr in ("lr_scales", "lr_clip"):
        if getattr(args, lr) is not None:
            ada_kw[lr] = getattr(args, lr)
    histories: list[list[float]] = []
    record_histories(histories)
    torch.set_num_threads(args.threads)
    model_dir = assets.ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib, test = assets.austen_calibration_text(), assets.austen_test_text()
    rows = []
    print(f"{'row':<12} {'bits':>4} {'ppl':>8} {'quant_s':>8} {'cpu_s':>8} {'s/block':>8} {'ms/iter':>8}")
    for row in args.rows.split(","):
        t0, c0 = time.perf_counter(), time.process_time()
        if row == "fp":
            model, iters, bits = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), 0, 32
        else:
            cfg, iters = make_config(row, tok, calib, args.num_samples, args.calib_len, args.group_size, args.blocks,
                                     **(ada_kw if row.startswith("ada") else {}))
            histories.clear()
            model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg, dtype=torch.float32)
            bits = cfg.bits
        qs, qcpu = time.perf_counter() - t0, time.process_time() - c0  # CPU time: robust on a shared machine
        ppl = hf_vq.evaluate_perplexity(model, tok, test, seq_len=args.seq_len, max_tokens=None,
                                        max_windows=args.max_windows)
        run = getattr(getattr(model, "hf_quantizer", None), "last_run", None) or {}
        rec = {"row": row, "bits": bits, "ppl": ppl, "quantize_s": qs if row != "fp" else 0.0, "quantize_cpu_s": qcpu,
               "num_samples": args.num_samples, "threads": args.threads}
        if row.startswith("ada"):
            n_blocks = args.blocks or len(model.model.layers)
            per_block = run.get("quantize_s", 0.0) / n_blocks
            rec.update(s_per_block=per_block, iterations=iters, block_steps=[len(h) for h in histories],
                       histories=[[round(x, 7) for x in h] for h in histories],
                       early_stop_margin=cfg.early_stop_margin, train_dtype=cfg.train_dtype,
                       granularity=cfg.weight_granularity, sym=cfg.sym, group_size=cfg.group_size,
                       lr_scales=cfg.learning_rates()[0], lr_clip=cfg.learning_rates()[1])
            # per-iteration cost: block time minus the same row's 0-iteration block time when that row ran, else
            # an upper bound (start grid, folding and block forwards included)
            base = next((r["s_per_block"] for r in rows if r["row"] == row.split("-")[0] + "-0"), 0.0)
            if iters:
                rec["ms_per_iter"] = 1000 * (per_block - base) / iters
        rows.append(rec)
        nan = float("nan")
        print(f"{row:<12} {bits:>4} {ppl:>8.3f} {rec['quantize_s']:>8.1f} {qcpu:>8.1f} "
              f"{rec.get('s_per_block', nan):>8.2f} {rec.get('ms_per_iter', nan):>8.1f}", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(rec) + "\n")
        del model
        gc.collect()
    print(f"# blocks quantized: {args.blocks or 'all'}; calibration {args.num_samples}x{args.calib_len} Emma; "
          f"eval ppl@{args.seq_len} over {args.max_windows} "
          f"windows of austen_test_text(), fp32, {args.threads} thread(s)")


def early_stop_study(json_path: str, margins: list[float], num_batches: int) -> None:
    """For each AdaScale row run without early stop, replay every block's per-step losses through the pipeline's
    EarlyStop (window as the pipeline sets it for ``num_batches`` batches) and print the mean steps it would run and
    how the loss of its last window compares with the loss of the run's last window (1.00: stopping lost nothing
    in training loss; a cosine schedule still decays after an early stop, so this is indicative only)."""
    from hf_vq.pipeline.distill import EarlyStop

    window = EarlyStop.over_passes(num_batches, 0.0).window  # as the pipeline sets it
    with open(json_path) as f:
        rows = [json.loads(line) for line in f]
    print(f"window {window} steps\n| row | lr scales/clip | threads | margin | mean steps | "
          f"last-window loss / final (mean, max) |\n|---|---|---|---|---|---|")
    for r in rows:
        if not r["row"].startswith("ada") or r.get("early_stop_margin") is not None or not r.get("iterations"):
            continue
        if r.get("num_samples", 16) != num_batches:
            continue
        for margin in margins:
            steps, ratios = [], []
            for h in r["histories"]:
                stop = EarlyStop.over_passes(num_batches, margin)
                n = next((i + 1 for i, loss in enumerate(h) if stop.update(loss)), len(h))
                steps.append(n)
                tail = min(window, len(h))
                at_stop = h[max(0, n - tail):n]
                ratios.append((sum(at_stop) / len(at_stop)) / (sum(h[-tail:]) / tail))
            print(f"| {r['row']} | {r.get('lr_scales', 5e-4):g}/{r.get('lr_clip', 1e-3):g} | {r.get('threads', 1)} | "
                  f"{margin:g} | {sum(steps) / len(steps):.0f} | {sum(ratios) / len(ratios):.3f}, "
                  f"{max(ratios):.3f} |")


def _series(r: dict) -> tuple:
    """What a row was run with besides bits and iterations (rows from before these fields: 16 windows, AIMET's
    learning rates, 1 thread)."""
    return r.get("num_samples", 16), r.get("lr_scales", 5e-4), r.get("lr_clip", 1e-3), r.get("threads", 1)


def plot(json_path: str, png: str) -> None:
    """ppl vs quantize CPU time per bit width, g128 groups (rows on other grids are left out): GPTQ as stars,
    AdaScale rows (GPTQ start) as lines over iterations, one line per calibration size, learning rates and thread
    count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        rows = [r for r in map(json.loads, f) if r.get("granularity", "group") == "group"]
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = ["o-", "s--", "^-.", "d:"]
    for bits, color in ((4, "tab:blue"), (3, "tab:red")):
        ada = [r for r in rows if r["row"].startswith(f"adag{bits}-") and r.get("early_stop_margin") is None]
        for k, key in enumerate(sorted({_series(r) for r in ada})):
            line = sorted((r for r in ada if _series(r) == key), key=lambda r: r["iterations"])
            n, ls, lc, threads = key
            ax.plot([r["quantize_cpu_s"] for r in line], [r["ppl"] for r in line], styles[k % len(styles)],
                    color=color, label=f"AdaScale {bits}-bit, {n}x512, lr {ls:g}/{lc:g}, {threads} thread(s)")
            for r in line:
                ax.annotate(f"{r['iterations']} it", (r["quantize_cpu_s"], r["ppl"]), fontsize=8,
                            textcoords="offset points", xytext=(4, 4))
        for r in rows:
            if r["row"] == f"gptq{bits}":
                ax.plot(r["quantize_cpu_s"], r["ppl"], "*", ms=14, color=color, mfc="none" if
                        r.get("num_samples", 16) == 16 else color,
                        label=f"GPTQ {bits}-bit, {r.get('num_samples', 16)}x512, {r.get('threads', 1)} thread(s)")
            elif r["row"].startswith(f"adag{bits}-") and r.get("early_stop_margin") is not None:
                ax.plot(r["quantize_cpu_s"], r["ppl"], "x", color=color,
                        label=f"AdaScale {bits}-bit {r['iterations']} it, early stop {r['early_stop_margin']}")
    ax.set_xlabel("quantize CPU time (s)")
    ax.set_ylabel("perplexity (Austen, 2048 tokens x 8)")
    ax.set_title("SmolLM2-135M, g128: AdaScale (GPTQ start) vs GPTQ")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main()
