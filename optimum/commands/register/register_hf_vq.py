"""Registers ``optimum-cli hf-vq`` (installed with hf_vq; see hf_vq/optimum_cli.py).

optimum-cli imports this module on every start, whatever the command: the real commands (and torch with them) are
imported only when ``hf-vq`` is the command being run, so ``optimum-cli export ...`` stays as fast as without hf_vq.
No ``__init__.py`` next to this file: ``optimum.commands.register`` is a namespace package shared with optimum.
"""

import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

HELP = "Quantize models with hf_vq (GPTQ, GPTVQ, AdaScale, QuantSim, RTN), evaluate, export and inspect them"

if sys.argv[1:2] == ["hf-vq"]:  # optimum-cli parses sys.argv; its root parser has no options before the command
    from hf_vq.optimum_cli import HfVQCommand
else:
    class HfVQCommand(BaseOptimumCLICommand):  # listed by `optimum-cli --help`; never run
        COMMAND = CommandInfo("hf-vq", help=HELP)

REGISTER_COMMANDS = [HfVQCommand]
