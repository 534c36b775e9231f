"""What every ``hf-vq`` command shares: the help format (each option shows its default), logging, one-line errors."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

# User mistakes (bad option values, missing or unreadable files, bad calibration data): one line, exit status 2.
# hf_vq's ConfigError and CalibrationError are ValueErrors; transformers reports a missing model folder as OSError.
USER_ERRORS = (ValueError, OSError)


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: ...)`` to every option's help unless the help already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.required:
            return text + " (required)"
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return text + " (default: off)" if action.default is False else text + " (default: on)"
        return text + " (default: %(default)s)"


def use_help_format(parser: argparse.ArgumentParser, description: str) -> None:
    """The help format and description of a command's parser (hf-vq's or optimum-cli's)."""
    parser.formatter_class = HelpFormatter
    parser.description = description


def add_verbose_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log each quantized layer and print the full traceback of an error")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


def write_result(result: dict, output: str | None, full: dict | None = None) -> None:
    """Print ``result`` as JSON on one line and, with ``output``, write ``full`` (default: ``result``) there as
    indented JSON (atomically)."""
    print(json.dumps(result, default=str))
    if output:
        from hf_vq.utils.io import atomic_write_text

        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(full if full is not None else result, indent=2, default=str) + "\n")


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
