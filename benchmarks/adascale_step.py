"""Per-iteration cost of AdaScale's block distillation on one real decoder block (SmolLM2-135M-Instruct, layer 0).

Inputs: ``--batches`` x ``--seq-len`` tokens of Emma run through the FP model up to the block; targets: the FP block's
outputs. Times ``--iters`` Adam steps of ``train_block`` (4-bit g128, RTN or ``--init gptq`` start, batch of one
sequence, FP inputs only unless ``--fp-input-prob``, after a warm-up of ``--warmup`` steps) and prints ms/iteration,
the training loss and the fp32 loss of the block with the folded weights over all batches (the quality that training
is for), and with ``--eval-batches`` over held-out sequences. The baseline (an older checkout) takes no option
beyond the defaults. Compare two versions of the code on the
same machine by putting one on PYTHONPATH, e.g.

    git worktree add ../adascale_base 1912ffa   # the commit issue 16 was measured against
    OMP_NUM_THREADS=1 PYTHONPATH=../adascale_base .venv/bin/python benchmarks/adascale_step.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adascale_step.py
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_vq
from hf_vq import assets
from hf_vq.algorithms.adascale import quantizer_from_rtn
from hf_vq.pipeline.adascale import train_block

try:
    from hf_vq.pipeline.adascale import folded_block_mse
    from hf_vq.pipeline.blocks import _run_block, capture_block_inputs
except ImportError:  # the baseline commit (1912ffa): no folded-loss helper, block helpers in the runner
    folded_block_mse = None
    from hf_vq.pipeline.runner import _run_block, capture_block_inputs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top operators")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true", help="train under bfloat16 autocast")
    ap.add_argument("--compile", action="store_true", help="torch.compile the quantizer's element-wise math")
    ap.add_argument("--init", choices=("rtn", "gptq"), default="rtn",
                    help="gptq: GPTQ codes from the FP block's Hessians")
    ap.add_argument("--max-frac", type=float, default=None, help="GPTQ start: quantizer_from_affine's max_frac")
    ap.add_argument("--fp-input-prob", type=float, default=1.0)
    ap.add_argument("--eval-batches", type=int, default=0,
                    help="also report the folded block's loss on this many held-out sequences")
    ap.add_argument("--lr-scales", type=float, default=5e-4)
    ap.add_argument("--lr-clip", type=float, default=1e-3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_dir = assets.ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(args.device)
    model.requires_grad_(False)
    ids = tok(assets.austen_calibration_text()[:400_000], return_tensors="pt")["input_ids"][0]
    total = args.batches + args.eval_batches
    ids = ids[:total * args.seq_len].view(total, args.seq_len).to(args.device)
    block = model.model.layers[args.layer]
    captured = capture_block_inputs(model, block, ids, 1, contextlib.nullcontext)
    with torch.no_grad():
        all_targets = [_run_block(block, h, kw) for h, kw in captured]
    held_out = (captured[args.batches:], all_targets[args.batches:])
    captured, targets = captured[:args.batches], all_targets[:args.batches]
    hidden, kws = [h for h, _ in captured], [kw for _, kw in captured]
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}

    starts = {}
    if args.init == "gptq":
        from hf_vq.algorithms.gptq import gptq_quantize
        from hf_vq.pipeline.blocks import collect_hessians

        hessians = collect_hessians(block, linears, captured)
        starts = {n: gptq_quantize(m.weight.data.float(), hessians[n], 4, 128, False) for n, m in linears.items()}

    def make(n, m):
        if args.init == "rtn":
            return quantizer_from_rtn(m.weight.data.float(), 4, 128, False)
        from hf_vq.algorithms.adascale import quantizer_from_affine
        kw = {} if args.max_frac is None else {"max_frac": args.max_frac}
        return quantizer_from_affine(m.weight.data.float(), starts[n], **kw)

    def run(iters):
        qs = {n: make(n, m) for n, m in linears.items()}
        if args.compile:
            from hf_vq.algorithms.adascale import compiled_kernels
            for qz in qs.values():
                qz.kernels = compiled_kernels()
        kw = dict(num_iterations=iters, lr_scales=args.lr_scales, lr_clip=args.lr_clip,
                  fp_input_prob=args.fp_input_prob,
                  generator=torch.Generator().manual_seed(0), progress=False)
        if args.bf16:
            kw["autocast_dtype"] = torch.bfloat16
        if args.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        first, last = train_block(block, qs, hidden, hidden, kws, targets, **kw)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, first, last, qs

    def folded_loss(qs, batches=None):
        """fp32 MSE of the block with the folded weights, over all training batches (what training is for), or over
        ``batches`` ((inputs, targets))."""
        if folded_block_mse is None:
            return float("nan")
        return folded_block_mse(block, linears, qs, *(batches or (captured, targets)))

    run(args.warmup)
    start = run(0)[3]
    print(f"start grid: folded block fp32 loss {folded_loss(start):.5g}"
          + (f", held out {folded_loss(start, held_out):.5g}" if args.eval_batches else ""))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(args.iters)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    base = run(1)[0]  # fixed cost (stand-ins, optimizer) to subtract
    dt, first, last, qs = run(args.iters + 1)
    print(f"hf_vq from {hf_vq.__file__}")
    opts = "".join(f", {o}" for o in ("bf16", "compile") if getattr(args, o)) + f", {args.init} start"
    opts += f" (max_frac {args.max_frac})" if args.max_frac is not None else ""
    print(f"layer {args.layer}, {args.batches}x{args.seq_len}, {args.threads} thread(s), {args.device}{opts}: "
          f"{1000 * (dt - base) / args.iters:.1f} ms/iter over {args.iters} iterations "
          f"(loss {first:.4g} -> {last:.4g}; folded block fp32 loss {folded_loss(qs):.5g}"
          + (f", held out {folded_loss(qs, held_out):.5g}" if args.eval_batches else "") + ")")


if __name__ == "__main__":
    main()
