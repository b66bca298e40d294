"""The verbs that are not about one run: `list`, `doctor`, `fixtures`, `summarize`."""

from __future__ import annotations

import argparse
import importlib
import os

from versa_runner.backends.base import Backend
from versa_runner.backends.local import LocalBackend
from versa_runner.cli.context import Context
from versa_runner.cli.parser import EXAMPLES
from versa_runner.errors import MissingExtraError, PreflightError
from versa_runner.runs import journal, lifecycle, next_steps
from versa_runner.runs.status import read_status

FIXTURES_MODULE = "versa_kernels.fixtures.cli"
HELP_FLAGS = ("-h", "--help")


def cmd_list(ctx: Context) -> int:
    """List journal runs, newest first (local runs refreshed; remote ones as last seen)."""
    records = journal.list_records(ctx.output_dir)
    for record in records:
        if record.backend == "local" and record.last_status.get("exit_code") != 0:
            with LocalBackend(record.root) as backend:
                ctx.remember(record, read_status(backend, record))
    ctx.out.run_list(list(reversed(records)))
    return 0


def cmd_doctor(ctx: Context) -> int:
    """Check the target (python, papermill, disk, GPUs) without starting a run."""
    min_free_gb = lifecycle.Settings.from_env(dict(os.environ)).min_free_gb
    with ctx.target_backend() as backend:
        if backend.name == "jupyter":  # per-check report: reachable, auth, kernel, python, ...
            return _jupyter_doctor(ctx, backend, min_free_gb)
        info = lifecycle.preflight(backend, min_free_gb=min_free_gb)
        ctx.out.mapping(f"target {backend.describe()}: ok", info)
    return 0


def _jupyter_doctor(ctx: Context, backend: Backend, min_free_gb: float) -> int:
    jupyter = importlib.import_module("versa_runner.backends.jupyter.doctor")
    checks = jupyter.doctor(backend, min_free_gb=min_free_gb)
    values = {c.name: f"{'ok' if c.ok else 'FAILED'}: {c.detail}" for c in checks}
    ctx.out.mapping(f"target {backend.describe()}", values)
    failed = [c for c in checks if not c.ok]
    if failed:
        raise PreflightError(f"doctor: {failed[0].name} check failed",
                             hint="The line above says what was seen; fix it and rerun doctor.")  # fmt: skip
    return 0


def cmd_fixtures(ctx: Context) -> int:
    """`fixtures model|packs ...`, run by `versa_kernels.fixtures.cli` (needs the gpu extra)."""
    args = list(ctx.args.args)
    try:
        entry = importlib.import_module(FIXTURES_MODULE)
    except ModuleNotFoundError as exc:
        _raise_missing_extra(exc)
    if not args or args[0] in HELP_FLAGS:
        ctx.out.text(_fixtures_help(entry.build_parser()))
        return 0
    try:
        return int(entry.main(args) or 0)
    except ModuleNotFoundError as exc:  # a host-only install lacks torch, pyarrow, ...
        _raise_missing_extra(exc)


def _raise_missing_extra(exc: ModuleNotFoundError) -> None:
    if exc.name is None or exc.name.split(".")[0] in ("versa_runner", "versa_kernels"):
        raise exc
    raise MissingExtraError("versa-run fixtures", exc.name.split(".")[0]) from exc


def _fixtures_help(parser: argparse.ArgumentParser) -> str:
    """The fixtures parser's help with every sub-command's flags, then our examples."""
    parser.epilog = None
    parts = [parser.format_help()]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                parts.append(f"--- versa-run fixtures {name} ---\n{sub.format_help()}")
    parts.append(EXAMPLES["fixtures"])
    return "\n".join(parts)


def cmd_summarize(ctx: Context) -> int:
    """Compare two eaft_single JSONs, write the report, print the verdict: 0 PASS, 1 FAIL."""
    from versa_runner.parity.summarize import summarize_pair

    a = ctx.args
    summary = summarize_pair(a.left_json, a.right_json, a.out_md, a.gates_json)
    levers = () if summary.passed else next_steps.FAIL_LEVERS
    ctx.out.verdict(out_md=a.out_md, gate=summary.gates.name, passed=summary.passed,
                    failures=list(summary.failures), levers=list(levers))  # fmt: skip
    return 0 if summary.passed else 1
