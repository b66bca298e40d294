"""`versa-run`: the console entry point. Parses (`cli.parser`), dispatches to a verb
(`cli.commands` for one run, `cli.tools` for the rest), and is the one place errors become exit
statuses; `--debug` adds the traceback.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable, Sequence

from versa_runner.cli import commands, tools
from versa_runner.cli.context import Context
from versa_runner.cli.output import Output
from versa_runner.cli.parser import build_parser, option_strings, with_implicit_submit
from versa_runner.errors import JobFailedError, UsageError, VersaRunError
from versa_runner.params import did_you_mean

COMMANDS: dict[str, Callable[[Context], int]] = {
    "submit": commands.cmd_submit,
    "status": commands.cmd_status,
    "logs": commands.cmd_logs,
    "wait": commands.cmd_wait,
    "sync": commands.cmd_sync,
    "kill": commands.cmd_kill,
    "list": tools.cmd_list,
    "doctor": tools.cmd_doctor,
    "fixtures": tools.cmd_fixtures,
    "summarize": tools.cmd_summarize,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; the one place errors become exit statuses."""
    argv = with_implicit_submit(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except UsageError as error:
        Output(json_mode="--json" in argv).error(error)
        return int(error.exit_code)
    if getattr(args, "verb", None) == "fixtures":
        # The delegated verb gets its tail verbatim: argparse.REMAINDER moves a leading --flag
        # into `extra` (`fixtures --help` lost --help).
        args.args, extra = argv[argv.index(args.verb) + 1 :], []
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING)
    ctx = Context(args)
    try:
        if extra and args.verb != "submit":
            verb_parser = parser.verb_parsers[args.verb] if args.verb else parser
            where = f"versa-run {args.verb}" if args.verb else "versa-run"
            flag = extra[0].partition("=")[0]
            raise UsageError(f"{where}: unknown argument {extra[0]!r}"
                             f"{did_you_mean(flag, option_strings(verb_parser))}",
                             hint=f"`{where} --help` lists its options.")  # fmt: skip
        if args.verb is None:
            parser.print_help()
            return 0
        args.extra = extra
        return COMMANDS[args.verb](ctx)
    except VersaRunError as error:
        if debug:
            traceback.print_exc()
        ctx.out.error(error)
        return error.job_exit_code if isinstance(error, JobFailedError) else int(error.exit_code)


if __name__ == "__main__":
    sys.exit(main())
