"""``optimum-cli hf-vq quantize|eval``: the ``hf-vq`` commands inside optimum's CLI.

optimum-cli imports every module of the ``optimum.commands.register`` namespace package at startup and registers the
commands listed in its ``REGISTER_COMMANDS``; hf_vq ships ``optimum/commands/register/register_hf_vq.py``, which
imports this module only when ``hf-vq`` is the command being run (importing hf_vq means importing torch). Arguments
and behaviour are those of ``hf-vq`` itself: the parsers are built by hf_vq/cli.py's builders.
"""

from __future__ import annotations

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from hf_vq import cli

COMMAND_NAME = "hf-vq"
COMMAND_HELP = "Quantize models with hf_vq (GPTQ, GPTVQ, AdaScale, RTN) and evaluate them"


class _HfVQLeaf(BaseOptimumCLICommand):
    FUNC = None  # the hf_vq.cli command function

    def run(self):
        rc = cli.run_command(type(self).FUNC, self.args)
        if rc:  # optimum's main ignores run()'s return value
            raise SystemExit(rc)


class QuantizeCommand(_HfVQLeaf):
    COMMAND = CommandInfo("quantize", help=cli.QUANTIZE_HELP)
    FUNC = staticmethod(cli.cmd_quantize)
    parse_args = staticmethod(cli.add_quantize_args)


class EvalCommand(_HfVQLeaf):
    COMMAND = CommandInfo("eval", help=cli.EVAL_HELP)
    FUNC = staticmethod(cli.cmd_eval)
    parse_args = staticmethod(cli.add_eval_args)


class HfVQCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(COMMAND_NAME, help=COMMAND_HELP)
    SUBCOMMANDS = (
        CommandInfo(QuantizeCommand.COMMAND.name, help=QuantizeCommand.COMMAND.help, subcommand_class=QuantizeCommand),
        CommandInfo(EvalCommand.COMMAND.name, help=EvalCommand.COMMAND.help, subcommand_class=EvalCommand),
    )
    parse_args = staticmethod(cli.add_verbose_arg)
