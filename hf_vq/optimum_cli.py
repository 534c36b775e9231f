"""``optimum-cli hf-vq quantize|eval|export|info``: the ``hf-vq`` commands inside optimum's CLI.

optimum-cli imports every module of the ``optimum.commands.register`` namespace package at startup and registers the
commands listed in its ``REGISTER_COMMANDS``; hf_vq ships ``optimum/commands/register/register_hf_vq.py``, which
imports this module only when ``hf-vq`` is the command being run (importing hf_vq means importing torch). Arguments
and behaviour are those of ``hf-vq`` itself: the parsers are built by hf_vq.cli's builders (``cli.COMMANDS``).
"""

from __future__ import annotations

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from hf_vq import cli

COMMAND_NAME = "hf-vq"
COMMAND_HELP = "Quantize models with hf_vq (GPTQ, GPTVQ, AdaScale, QuantSim, RTN), evaluate, export and inspect them"


class _HfVQLeaf(BaseOptimumCLICommand):
    FUNC = None  # the hf_vq.cli command function

    def run(self):
        rc = cli.run_command(type(self).FUNC, self.args)
        if rc:  # optimum's main ignores run()'s return value
            raise SystemExit(rc)


def _leaf(name: str, help_text: str, add_args, func) -> type[_HfVQLeaf]:
    return type(f"{name.capitalize()}Command", (_HfVQLeaf,), {
        "COMMAND": CommandInfo(name, help=help_text), "FUNC": staticmethod(func),
        "parse_args": staticmethod(add_args), "__module__": __name__})


LEAVES = [_leaf(*command) for command in cli.COMMANDS]
QuantizeCommand, EvalCommand, ExportCommand, InfoCommand = LEAVES


class HfVQCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(COMMAND_NAME, help=COMMAND_HELP)
    SUBCOMMANDS = tuple(CommandInfo(c.COMMAND.name, help=c.COMMAND.help, subcommand_class=c) for c in LEAVES)
    parse_args = staticmethod(cli.add_verbose_arg)
