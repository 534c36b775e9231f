"""``hf-vq eval``: perplexity on a text, or lm-evaluation-harness tasks (``--tasks``), of a model as it loads."""

from __future__ import annotations

import argparse
import importlib.util

from hf_vq.cli.common import use_help_format, write_result

HELP = "evaluate a (quantized) model: perplexity on a text, or lm-evaluation-harness tasks with --tasks"
EVAL_EXTRA = "pip install 'hf_vq[eval]'"


def _tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of task names, got {text!r}")
    return tasks


def _limit(text: str):
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value if value < 1 else int(value) if value.is_integer() else value


def _batch_size(text: str):
    if text == "auto":
        return text
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {text!r}")
    return value


def add_eval_args(e: argparse.ArgumentParser) -> None:
    use_help_format(e, HELP)
    e.add_argument("model", help="folder or Hub id of the model (an hf_vq checkpoint or a float model)")
    e.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the model's own)")
    e.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype the model runs in")
    e.add_argument("--output", metavar="FILE.json",
                   help="also write the result there as JSON; with --tasks, lm_eval's whole output (task configs, "
                        "versions, metrics) (default: stdout only)")
    p = e.add_argument_group("perplexity (without --tasks)")
    p.add_argument("--data", default="austen", help="'austen' (the bundled test text) or a text file or folder")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per perplexity window")
    p.add_argument("--max-tokens", type=int, default=65536, help="tokens of --data scored at most")
    p.add_argument("--max-windows", type=int, default=None, help="windows scored at most (default: all that "
                                                                   "--max-tokens allows)")
    t = e.add_argument_group(f"lm-evaluation-harness tasks (needs {EVAL_EXTRA})")
    t.add_argument("--tasks", type=_tasks, metavar="TASK[,TASK...]",
                   help="run these lm-evaluation-harness tasks instead of perplexity, e.g. arc_easy,hellaswag "
                        "(default: none)")
    t.add_argument("--limit", type=_limit, default=None,
                   help="examples per task: a count, or a fraction if below 1 (default: all)")
    t.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    t.add_argument("--include-path", metavar="DIR", default=None,
                   help="folder of extra task YAML files, e.g. your own local tasks (default: none)")
    t.add_argument("--batch-size", type=_batch_size, default=1, help="examples per forward pass, or 'auto'")


def _eval_text(value):
    if value == "austen":
        from hf_vq import assets

        return assets.austen_test_text()
    from hf_vq.pipeline.data import read_texts

    return "\n\n".join(read_texts(value))


def cmd_eval(args):
    task_only = {"--limit": args.limit, "--num-fewshot": args.num_fewshot, "--include-path": args.include_path}
    if args.tasks is None:
        given = [flag for flag, value in task_only.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to --tasks runs only; add --tasks")
    elif importlib.util.find_spec("lm_eval") is None:
        raise ValueError(f"--tasks runs lm-evaluation-harness, which is not installed: {EVAL_EXTRA}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_vq

    model = AutoModelForCausalLM.from_pretrained(args.model)
    if args.dtype == "bfloat16":
        model.to(torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    if args.tasks is not None:
        results = hf_vq.evaluate(model, tasks=args.tasks, tokenizer=tok, batch_size=args.batch_size,
                                 limit=args.limit, num_fewshot=args.num_fewshot, include_path=args.include_path)
        summary = {"model": str(args.model), "tasks": args.tasks, "results": results.get("results", {})}
        write_result(summary, args.output, full=results)
        return 0
    ppl = hf_vq.evaluate_perplexity(model, tok, _eval_text(args.data), seq_len=args.seq_len,
                                    max_tokens=args.max_tokens, max_windows=args.max_windows)
    write_result({"model": str(args.model), "ppl": round(ppl, 4), "seq_len": args.seq_len}, args.output)
    return 0
