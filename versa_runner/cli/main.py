"""`versa-run`: the console entry point. Parses (`cli.parser`), dispatches to a verb
(`cli.commands`), and is the one place errors become exit statuses; `--debug` adds the
traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys
import traceback
from collections.abc import Sequence

from versa_runner.cli import commands, recipe_cmds
from versa_runner.cli.context import Context
from versa_runner.cli.output import Output
from versa_runner.cli.parser import build_parser, with_implicit_submit
from versa_runner.errors import JobFailedError, MissingExtraError, UsageError, VersaRunError


def _delegate(verb: str, module: str, args: list[str]) -> int:
    # A host-only install (no `gpu` extra) lacks torch, pyarrow, ...: name the extra, not a traceback.
    try:
        entry = importlib.import_module(module)
        return int(entry.main(args) or 0)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] in ("versa_runner", "versa_kernels"):
            raise
        raise MissingExtraError(f"versa-run {verb}", exc.name.split(".")[0]) from exc


COMMANDS = {
    "submit": commands.cmd_submit, "status": commands.cmd_status, "logs": commands.cmd_logs,
    "wait": commands.cmd_wait, "sync": commands.cmd_sync, "kill": commands.cmd_kill,
    "list": commands.cmd_list, "doctor": commands.cmd_doctor,
    "fixtures": lambda ctx: _delegate("fixtures", "versa_kernels.fixtures.cli", ctx.args.args),
    "summarize": lambda ctx: _delegate("summarize", "versa_runner.parity.summarize", ctx.args.args),
    "summarize-decode": lambda ctx: _delegate("summarize-decode", "versa_runner.parity.decode", ctx.args.args),
    "recipe": recipe_cmds.cmd_recipe, "playbook": recipe_cmds.cmd_playbook, "demo": recipe_cmds.cmd_demo,
}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; the one place errors become exit statuses."""
    argv = with_implicit_submit(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except UsageError as error:
        Output(json_mode="--json" in argv).error(error)
        return int(error.exit_code)
    if getattr(args, "verb", None) in ("fixtures", "summarize", "summarize-decode"):
        # Delegated verbs get their tail verbatim: argparse.REMAINDER moves a leading --flag
        # into `extra` (`summarize --left-json A ...` lost --left-json). H5 minimal edit.
        args.args, extra = argv[argv.index(args.verb) + 1 :], []
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING)
    ctx = Context(args)
    try:
        if args.verb is None:
            parser.print_help()
            return 0
        if extra and args.verb != "submit":
            raise UsageError(f"versa-run {args.verb}: unknown argument {extra[0]!r}",
                             hint=f"`versa-run {args.verb} --help` lists its options.")  # fmt: skip
        args.extra = extra
        return COMMANDS[args.verb](ctx)
    except VersaRunError as error:
        if debug:
            traceback.print_exc()
        ctx.out.error(error)
        return error.job_exit_code if isinstance(error, JobFailedError) else int(error.exit_code)


if __name__ == "__main__":
    sys.exit(main())
