"""The ``hf-vq`` command line: ``quantize`` a model while it loads and save it, ``eval`` it (perplexity or
lm-evaluation-harness tasks), ``export`` it to another format, and show what a checkpoint holds (``info``).

One module per command; ``optimum-cli hf-vq`` (hf_vq/optimum_cli.py) builds its parsers with the same functions.
"""

from __future__ import annotations

import argparse
import sys

from hf_vq.cli.common import USER_ERRORS, HelpFormatter, add_verbose_arg, run_command, setup_logging
from hf_vq.cli.evaluate import HELP as EVAL_HELP
from hf_vq.cli.evaluate import add_eval_args, cmd_eval
from hf_vq.cli.export import HELP as EXPORT_HELP
from hf_vq.cli.export import add_export_args, cmd_export
from hf_vq.cli.info import HELP as INFO_HELP
from hf_vq.cli.info import add_info_args, checkpoint_info, cmd_info
from hf_vq.cli.quantize import HELP as QUANTIZE_HELP
from hf_vq.cli.quantize import add_quantize_args, build_config, cmd_quantize

# (name, help, argument builder, command): the subcommands of both `hf-vq` and `optimum-cli hf-vq`
COMMANDS = (
    ("quantize", QUANTIZE_HELP, add_quantize_args, cmd_quantize),
    ("eval", EVAL_HELP, add_eval_args, cmd_eval),
    ("export", EXPORT_HELP, add_export_args, cmd_export),
    ("info", INFO_HELP, add_info_args, cmd_info),
)

__all__ = ["main", "build_parser", "run_command", "build_config", "checkpoint_info", "COMMANDS", "USER_ERRORS",
           "HelpFormatter", "add_verbose_arg", "setup_logging", "add_quantize_args", "add_eval_args",
           "add_export_args", "add_info_args", "cmd_quantize", "cmd_eval", "cmd_export", "cmd_info",
           "QUANTIZE_HELP", "EVAL_HELP", "EXPORT_HELP", "INFO_HELP"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-vq", description="Quantize Hugging Face models with hf_vq",
                                formatter_class=HelpFormatter)
    add_verbose_arg(p)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text, add_args, func in COMMANDS:
        s = sub.add_parser(name, help=help_text)
        add_args(s)
        s.set_defaults(func=func)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if any(a not in ("-v", "--verbose") for a in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.verbose = bool(args.verbose or extra)  # -v is accepted after the subcommand too
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
