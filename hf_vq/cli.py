"""The ``hf-vq`` command line: quantize a model at load and save it; evaluate perplexity."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time


def _config_from_args(args):
    import hf_vq

    common = dict(modules_to_not_convert=args.skip or None, lm_head_bits=args.lm_head_bits,
                  lm_head_group_size=args.lm_head_group_size)
    if args.method == "rtn":
        return hf_vq.RTNConfig(bits=args.bits, group_size=args.group_size, sym=args.sym, clip_search=args.clip_search,
                               **common)
    calib = dict(dataset=_dataset_arg(args.dataset), tokenizer=args.tokenizer, num_samples=args.num_samples,
                 seq_len=args.seq_len, seed=args.seed, dataset_config=args.dataset_config,
                 dataset_split=args.dataset_split, calibration_batch_size=args.batch_size)
    if args.method == "gptq":
        return hf_vq.GPTQConfig(bits=args.bits, group_size=args.group_size, sym=args.sym, percdamp=args.percdamp,
                                act_order=not args.no_act_order, true_sequential=not args.no_true_sequential,
                                clip_search=args.clip_search, **common, **calib)
    if args.method == "gptvq":
        return hf_vq.GPTVQConfig(vector_dim=args.vector_dim, index_bits=args.index_bits,
                                 codebook_bits=args.codebook_bits, rows_per_block=args.rows_per_block,
                                 cols_per_block=args.cols_per_block, kmeans_iterations=args.kmeans_iterations,
                                 percdamp=args.percdamp, **common, **calib)
    if args.method == "adascale":
        calib.pop("calibration_batch_size")  # AdaScale refuses it: its batch_size is sequences per Adam step
        return hf_vq.AdaScaleConfig(bits=args.bits, group_size=args.group_size, sym=args.sym,
                                    num_iterations=args.num_iterations, init=args.init, **common, **calib)
    raise SystemExit(f"hf-vq: unknown method {args.method!r}")


def _dataset_arg(value):
    if value == "austen":
        from hf_vq import assets

        return [assets.austen_calibration_text()]
    return value


def _eval_text(value):
    if value == "austen":
        from hf_vq import assets

        return assets.austen_test_text()
    from hf_vq.pipeline.data import read_texts

    return "\n\n".join(read_texts(value))


def cmd_quantize(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _config_from_args(args)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=cfg, dtype=torch.float32)
    elapsed = time.perf_counter() - t0
    from hf_vq.model.safe_save import save_pretrained_safely

    save_pretrained_safely(model, args.out, max_shard_size=args.max_shard_size)   # an earlier --out survives a crash
    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    tok.save_pretrained(args.out)
    if args.push_to_hub:
        import hf_vq

        hf_vq.push_quantized(model, args.push_to_hub, tokenizer=tok)
    run = model.hf_quantizer.last_run or {}
    print(json.dumps({"out": str(args.out), "method": args.method, "layers": run.get("num_layers"),
                      "load_and_quantize_s": round(elapsed, 1), "forward_s": round(run.get("forward_s", 0.0), 1),
                      "math_s": round(run.get("quantize_s", 0.0), 1)}))
    return 0


def cmd_eval(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_vq

    model = AutoModelForCausalLM.from_pretrained(args.model)
    if args.dtype == "bfloat16":
        model.to(torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    ppl = hf_vq.evaluate_perplexity(model, tok, _eval_text(args.data), seq_len=args.seq_len,
                                    max_tokens=args.max_tokens, max_windows=args.max_windows)
    print(json.dumps({"model": str(args.model), "ppl": round(ppl, 4), "seq_len": args.seq_len}))
    return 0


QUANTIZE_HELP = "quantize MODEL at load and save it to --out"
EVAL_HELP = "perplexity of a (quantized) model"


def cmd_export(args):
    from transformers import AutoModelForCausalLM

    import hf_vq

    model = AutoModelForCausalLM.from_pretrained(args.model)   # an hf_vq checkpoint: import hf_vq registers it
    if getattr(getattr(model, "hf_quantizer", None), "quantization_config", None) is None:
        raise ValueError(f"{args.model} is not an hf_vq checkpoint (no hf_vq quantization_config)")
    report = hf_vq.export_checkpoint(model, args.out, args.format, requantize=args.requantize, dtype=args.dtype,
                                     overwrite=args.overwrite, gguf_pre_tokenizer=args.gguf_pre_tokenizer)
    print(json.dumps(report.to_dict(), indent=2))
    return 0


def add_export_args(x: argparse.ArgumentParser) -> None:
    x.add_argument("model", help="folder of an hf_vq checkpoint (save_pretrained output)")
    x.add_argument("--format", required=True, choices=["compressed-tensors", "gptq", "gguf"])
    x.add_argument("--out", required=True)
    x.add_argument("--requantize", action="store_true",
                   help="round layers the format can't hold exactly onto its grid (GGUF); the report gives the error")
    x.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="dtype of the float tensors")
    x.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    x.add_argument("--gguf-pre-tokenizer", default="default", help="llama.cpp pre-tokenizer name, e.g. smollm")


def add_quantize_args(q: argparse.ArgumentParser) -> None:
    """Arguments of ``quantize``; shared by ``hf-vq`` and ``optimum-cli hf-vq`` (hf_vq/optimum_cli.py)."""
    q.add_argument("model")
    q.add_argument("--out", required=True)
    q.add_argument("--method", choices=["rtn", "gptq", "gptvq", "adascale"], default="gptq")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=128)
    q.add_argument("--sym", action="store_true")
    q.add_argument("--clip-search", action="store_true")
    q.add_argument("--percdamp", type=float, default=0.01)
    q.add_argument("--no-act-order", action="store_true")
    q.add_argument("--no-true-sequential", action="store_true")
    q.add_argument("--dataset", default="austen", help="'austen' (bundled), a text file/folder or a datasets name")
    q.add_argument("--dataset-config")
    q.add_argument("--dataset-split", default="train")
    q.add_argument("--tokenizer")
    q.add_argument("--num-samples", type=int, default=128)
    q.add_argument("--seq-len", type=int, default=2048)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--skip", action="append", help="module name/pattern to keep in float (repeatable)")
    q.add_argument("--lm-head-bits", type=int, choices=[4, 8], default=None,
                   help="quantize the output head to 8 or 4 bits (default: keep it in float)")
    q.add_argument("--lm-head-group-size", type=int, default=-1,
                   help="group size of the quantized output head (default: -1, one scale per output channel)")
    q.add_argument("--max-shard-size", default="5GB")
    q.add_argument("--push-to-hub", metavar="REPO_ID", help="also push weights, config, tokenizer and model card")
    v = q.add_argument_group("gptvq")
    v.add_argument("--vector-dim", type=int, default=2)
    v.add_argument("--index-bits", type=int, default=6)
    v.add_argument("--codebook-bits", type=int, default=8)
    v.add_argument("--rows-per-block", type=int, default=32)
    v.add_argument("--cols-per-block", type=int, default=256)
    v.add_argument("--kmeans-iterations", type=int, default=100)
    a = q.add_argument_group("adascale")
    a.add_argument("--num-iterations", type=int, default=300, help="Adam steps per block")
    a.add_argument("--init", choices=["rtn", "gptq"], default=None, help="default: gptq (for lpbq: GPTQ onto the LPBQ grid)")


def add_eval_args(e: argparse.ArgumentParser) -> None:
    e.add_argument("model")
    e.add_argument("--data", default="austen", help="'austen' (bundled test split) or a text file/folder")
    e.add_argument("--tokenizer")
    e.add_argument("--seq-len", type=int, default=2048)
    e.add_argument("--max-tokens", type=int, default=65536)
    e.add_argument("--max-windows", type=int)
    e.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")


def add_verbose_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="per-layer quantization log")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-vq", description="Quantize Hugging Face models with hf_vq")
    add_verbose_arg(p)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help=QUANTIZE_HELP)
    add_quantize_args(q)
    q.set_defaults(func=cmd_quantize)
    e = sub.add_parser("eval", help=EVAL_HELP)
    add_eval_args(e)
    e.set_defaults(func=cmd_eval)
    x = sub.add_parser("export", help="write an hf_vq checkpoint as compressed-tensors, GPTQ or GGUF")
    add_export_args(x)
    x.set_defaults(func=cmd_export)
    return p


# User mistakes (bad option values, missing or unreadable files, bad calibration data): one line, exit status 2.
# hf_vq's ConfigError and CalibrationError are ValueErrors; transformers reports a missing model folder as OSError.
USER_ERRORS = (ValueError, OSError)


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if any(a not in ("-v", "--verbose") for a in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.verbose = bool(args.verbose or extra)  # -v is accepted after the subcommand too
    return run_command(args.func, args)


def run_command(func, args) -> int:
    """Run one command; a user mistake prints one line (the traceback too with -v) and gives exit code 2."""
    setup_logging(args.verbose)
    try:
        return func(args)
    except USER_ERRORS as e:
        if args.verbose:
            import traceback

            traceback.print_exc()
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"hf-vq: error: {message}" + ("" if args.verbose else " (-v for details)"), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
