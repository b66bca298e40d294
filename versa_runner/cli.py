"""`versa-run`: argument parsing and dispatch only; the work happens in lifecycle/sync/runs.

`versa-run --task T [flags]` is short for `versa-run submit --task T [flags]`. Verbs, in workflow
order: submit, status, logs, wait, sync, kill, list, doctor, fixtures, summarize. Expected
failures (`VersaRunError`) print one line plus a hint and map to the process exit status in
exactly one place, `main`; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from versa_runner import lifecycle, runs, sync, tasks
from versa_runner.backends import get_backend_class
from versa_runner.backends.base import Backend
from versa_runner.backends.local import LocalBackend
from versa_runner.errors import (
    BootstrapError,
    JobFailedError,
    MissingExtraError,
    PreflightError,
    RunStateError,
    UsageError,
    VersaRunError,
)
from versa_runner.lifecycle import RunState, RunStatus
from versa_runner.output import Output
from versa_runner.secrets import collect_job_environment, secret_values_from_env

VERBS = (
    "submit",
    "status",
    "logs",
    "wait",
    "sync",
    "kill",
    "list",
    "doctor",
    "fixtures",
    "summarize",
)
PROJECT_ROOT = Path(__file__).resolve().parent.parent  # holds kernels/ and notebooks/
INTERRUPTED_EXIT = 130  # what a shell reports for Ctrl-C

EXAMPLES = {
    None: """examples:
  versa-run --task validate_expert_math_toy              # detached; prints the run id
  versa-run --task validate_expert_math_toy --no-detach  # stream the log, exit with the job's code
  versa-run status                                      # newest run
  versa-run logs last --follow
  versa-run --task build_pruned_20b_eaftreap_budgeted --help""",
    "submit": """examples:
  versa-run submit --task validate_expert_math_toy --trials 5
  versa-run --task eaft_single --model-id openai/gpt-oss-20b --seq-lens-csv 1024,2048 --no-detach
  versa-run submit --notebook my.ipynb -p steps 10 --secret HF_TOKEN
  versa-run --task validate_expert_math_toy --ssh me@gpu-box --ssh-key ~/.ssh/id_ed25519 --no-detach
tasks: """
    + ", ".join(tasks.TASKS),
    "status": "examples:\n  versa-run status\n  versa-run status 20260101T0000 --json",
    "logs": "examples:\n  versa-run logs --tail 50\n  versa-run logs last --follow",
    "wait": "examples:\n  versa-run wait\n  versa-run wait RUN --timeout 3600",
    "sync": "examples:\n  versa-run sync\n  versa-run sync RUN --only reports,output.ipynb --dest ./pulled\n  versa-run sync last --watch 10",
    "kill": "examples:\n  versa-run kill RUN\n  versa-run kill RUN --grace 5 --yes",
    "list": "examples:\n  versa-run list\n  versa-run list --json",
    "doctor": "examples:\n  versa-run doctor\n  versa-run doctor --url-file ~/.kaggle_url\n"
    "  versa-run doctor --ssh me@gpu-box:2222 --ssh-accept-new",
    "fixtures": "examples:\n  versa-run fixtures --help",
    "summarize": "examples:\n  versa-run summarize --left-json A.json --right-json B.json --out-md S.md",
}
RUN_HELP = "run id, unique prefix of one, or `last`; omitted: the newest run in the journal"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line UsageErrors (printed by `main` like every other)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}", hint=f"`{self.prog} --help` lists the options.")


# fmt: off
def _common_options() -> argparse.ArgumentParser:
    """Global options, accepted before or after the verb (absent unless given: SUPPRESS)."""
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    s = argparse.SUPPRESS
    common.add_argument("--output-dir", default=s, help="where artifacts/, reports/ and the journal live (default: .)")
    common.add_argument("--json", action="store_true", default=s, help="machine-readable output")
    common.add_argument("--debug", action="store_true", default=s, help="show tracebacks and debug logs")
    common.add_argument("--url", default=s, help="Jupyter server URL (prefer --url-file: argv is visible)")
    common.add_argument("--url-file", default=s, help="file holding the Jupyter server URL")
    common.add_argument("--token-file", default=s, help="file holding the Jupyter token")
    common.add_argument("--kernel-id", default=s, help="reuse this Jupyter kernel as launcher")
    common.add_argument("--ssh", default=s, metavar="USER@HOST[:PORT]", help="run on this SSH host (paramiko)")
    common.add_argument("--ssh-key", default=s, metavar="FILE", help="private key for --ssh (passphrase: env VERSA_SSH_PASSPHRASE)")
    common.add_argument("--ssh-port", type=int, default=s, metavar="N", help="SSH port (default 22)")
    common.add_argument("--ssh-python", default=s, metavar="PATH", help="Python on the SSH host (default python3)")
    common.add_argument("--ssh-accept-new", action="store_true", default=s,
                        help="add an unknown SSH host key to ~/.ssh/known_hosts (otherwise refused)")
    common.add_argument("--remote-root", default=s, metavar="DIR", help="target root on the SSH host (default ~/versa_work)")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: global options, verbs in workflow order, each with Examples."""
    common = _common_options()
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="versa-run", parents=[common], allow_abbrev=False, formatter_class=fmt,
        description="Run gpt-oss pruning/evaluation notebooks on this machine, a Jupyter server or an SSH host.",
        epilog=EXAMPLES[None],
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    def verb(name: str, text: str, **kw: Any) -> argparse.ArgumentParser:
        return verbs.add_parser(name, help=text, description=text, parents=[common], allow_abbrev=False,
                                formatter_class=fmt, epilog=EXAMPLES[name], **kw)

    submit = verb("submit", "submit a task (or a notebook) and detach", add_help=False)
    submit.add_argument("-h", "--help", action="store_true", help="this help, or a task's flags with --task")
    submit.add_argument("--task", help="registered task name")
    submit.add_argument("--notebook", help="run this notebook instead of a task")
    submit.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="notebook parameter (with --notebook; VALUE parsed as YAML)")
    submit.add_argument("--secret", action="append", default=[], metavar="NAME",
                        help="forward env var NAME to the job as a secret (value never in argv)")
    submit.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="non-secret job env var")
    submit.add_argument("--no-detach", action="store_true", help="stream the log, wait, sync, exit with the job's code")
    submit.add_argument("--kernel-name", default="python3", help="Jupyter kernel for papermill")
    submit.add_argument("--profile", default="auto", choices=("auto", "none", "kaggle"),
                        help="bootstrap profile of a remote target (auto: kaggle when the root is /kaggle/working)")
    submit.add_argument("--execution-timeout", type=float, default=None, metavar="S", help="per-cell timeout")
    submit.set_defaults(help_text=submit.format_help)

    for name, text in (("status", "show a run's state and progress"), ("logs", "show a run's log"),
                       ("wait", "wait until a run ends; exit with its outcome"),
                       ("sync", "bring artifacts/, reports/ and the executed notebook back"),
                       ("kill", "end a run's whole process group")):
        sub = verb(name, text)
        sub.add_argument("run", nargs="?", default=None, metavar="RUN", help=RUN_HELP)
        if name == "logs":
            sub.add_argument("--follow", action=argparse.BooleanOptionalAction, default=False,
                             help="keep printing until the run ends (Ctrl-C stops following, not the job)")
            sub.add_argument("--tail", type=int, default=None, metavar="N", help="only the last N lines")
        if name == "wait":
            sub.add_argument("--timeout", type=float, default=None, metavar="S", help="give up after S seconds (exit 124)")
        if name == "sync":
            sub.add_argument("--only", default="", help="comma list of artifacts,reports,output.ipynb,run.log")
            sub.add_argument("--dest", default=None, help="destination directory (default: --output-dir)")
            sub.add_argument("--watch", type=float, default=None, metavar="MIN",
                             help="sync again every MIN minutes until the run ends (a session that dies keeps what was synced)")
        if name == "kill":
            sub.add_argument("--grace", type=float, default=30.0, metavar="S", help="seconds between SIGTERM and SIGKILL")
            sub.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    verb("list", "list runs in the journal, newest first")
    verb("doctor", "check the target: python, papermill, disk, GPUs")
    for name, text in (("fixtures", "build test fixtures (versa_kernels.fixtures)"),
                       ("summarize", "summarize a base/pruned EAFT pair and apply the gates")):
        verb(name, text).add_argument("args", nargs=argparse.REMAINDER, help="passed through")
    return parser
# fmt: on


GLOBAL_VALUE_OPTIONS = (
    "--output-dir",
    "--url",
    "--url-file",
    "--token-file",
    "--kernel-id",
    "--ssh",
    "--ssh-key",
    "--ssh-port",
    "--ssh-python",
    "--remote-root",
)


def _with_implicit_submit(argv: list[str]) -> list[str]:
    """`versa-run --task T ...` means `versa-run submit --task T ...`.

    The verb is the first bare word that is not a global option's value, so a task flag whose
    value happens to be a verb (`--name status`) is not mistaken for one.
    """
    index = 0
    while index < len(argv):
        token = argv[index]
        if token in GLOBAL_VALUE_OPTIONS:
            index += 2
            continue
        if not token.startswith("-"):
            has_task = any(t == "--task" or t.startswith("--task=") for t in argv)
            return ["submit", *argv] if token not in VERBS and has_task else argv
        if token == "--task" or token.startswith("--task="):
            return ["submit", *argv]
        index += 1
    return argv


class Context:
    """Parsed global options plus the single Output of this invocation."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.output_dir = Path(getattr(args, "output_dir", None) or ".").resolve()
        self.out = Output(
            json_mode=getattr(args, "json", False), command_options=self._repeat_options()
        )

    def _repeat_options(self) -> str:
        """Global options a follow-up command needs again. Only file paths: a URL given with
        --url is never echoed."""
        parts: list[str] = []
        if self.output_dir != Path.cwd().resolve():
            parts += ["--output-dir", shlex.quote(str(self.output_dir))]
        for flag in ("url_file", "token_file", "ssh_key", "ssh_python"):
            if getattr(self.args, flag, None):
                parts += ["--" + flag.replace("_", "-"), shlex.quote(str(getattr(self.args, flag)))]
        return " ".join(parts)

    def target_backend(self) -> Backend:
        """The target the flags name: local unless --url/--url-file/--ssh."""
        a = self.args
        if getattr(a, "ssh", None):
            if getattr(a, "url", None) or getattr(a, "url_file", None):
                raise UsageError("--ssh and --url/--url-file name two targets; give one of them")
            return self._ssh_backend(a.ssh)
        if getattr(a, "remote_root", None):
            raise UsageError("--remote-root applies to --ssh targets only")
        jupyter_url = importlib.import_module("versa_runner.backends.jupyter_url")
        flags = ("url", "url_file", "token_file", "kernel_id")
        if any(getattr(a, name, None) for name in flags) or any(
            os.environ.get(name) for name in jupyter_url.URL_ENV_VARS
        ):  # issue 4: REMOTE_JUPYTER_URL alone selects the Jupyter target (URL out of argv)
            return self._jupyter_backend()
        return LocalBackend(self.output_dir)

    def backend_for(self, record: runs.RunRecord) -> Backend:
        """The backend a journaled run lives on (remote ones need the URL again)."""
        if record.backend == "local":
            return LocalBackend(record.root)
        if record.backend == "jupyter":
            return self._jupyter_backend(root=record.root)
        if record.backend == "ssh":  # host, user and port come from the journal
            return self._ssh_backend(record.target, root=record.root)
        raise UsageError(
            f"run {record.run_id} uses target {record.backend!r}, which this build cannot reach"
        )

    def _jupyter_backend(self, root: str | None = None) -> Backend:
        backend_class: Any = get_backend_class("jupyter")
        jupyter_url = importlib.import_module("versa_runner.backends.jupyter_url")
        a = self.args
        target = jupyter_url.resolve_target(
            url=getattr(a, "url", None), url_file=getattr(a, "url_file", None),
            token_file=getattr(a, "token_file", None), kernel_id=getattr(a, "kernel_id", None),
        )  # fmt: skip
        return backend_class(target, root=root)

    def _ssh_backend(self, spec: str, root: str | None = None) -> Backend:
        ssh = importlib.import_module("versa_runner.backends.ssh")
        a = self.args
        user, host, port = ssh.parse_ssh_spec(spec, port=getattr(a, "ssh_port", None))
        key = Path(a.ssh_key).expanduser() if getattr(a, "ssh_key", None) else None
        if key is not None and not key.is_file():
            raise UsageError(f"--ssh-key: {key} is not a file")
        passphrase = os.environ.get("VERSA_SSH_PASSPHRASE") or None
        if passphrase:
            self.out.redact.add(passphrase)
        target = ssh.SshTarget(host=host, user=user, port=port, key_file=key, passphrase=passphrase,
                               accept_new=bool(getattr(a, "ssh_accept_new", False)))  # fmt: skip
        return ssh.SshBackend(target, root=root, python=getattr(a, "ssh_python", None) or "python3",
                              remote_root=getattr(a, "remote_root", None) or ssh.DEFAULT_REMOTE_ROOT)  # fmt: skip

    def record(self, ref: str | None) -> runs.RunRecord:
        """Resolve RUN in the journal and register its secrets' current values for redaction."""
        record = runs.resolve_run(self.output_dir, ref)
        for value in secret_values_from_env(record.secret_names):
            self.out.redact.add(value)
        return record

    def remember(self, record: runs.RunRecord, status: RunStatus) -> None:
        """Store the last seen status in the run's journal entry."""
        record.last_status = {"state": status.state.value, "exit_code": status.exit_code}
        runs.save_record(self.output_dir, record)


def _outcome(record: runs.RunRecord, status: RunStatus) -> int:
    """Turn a terminal status into the command's exit status (raising for failures)."""
    logs_hint = f"`versa-run logs {record.run_id} --tail 60` shows the error."
    if status.state is RunState.SUCCEEDED:
        return 0
    if status.state is RunState.BOOTSTRAP_FAILED:
        raise BootstrapError(f"run {record.run_id}: bootstrap failed")
    if status.state in (RunState.STALE, RunState.LOST):
        raise RunStateError(f"run {record.run_id} is {status.state.value}", hint=logs_hint)
    code = status.exit_code if status.exit_code else 1
    raise JobFailedError(f"run {record.run_id} {status.state.value} (exit code {code})",
                         job_exit_code=code, hint=logs_hint)  # fmt: skip


def cmd_submit(ctx: Context) -> int:
    """Validate, stage and launch a task or notebook; detach, or follow to the end."""
    a = ctx.args
    if a.help:
        ctx.out.text(tasks.task_help(tasks.get_task(a.task)) if a.task else a.help_text())
        return 0
    if bool(a.task) == bool(a.notebook):
        raise UsageError("submit needs exactly one of --task TASK or --notebook PATH",
                         hint=f"known tasks: {', '.join(tasks.TASKS)}")  # fmt: skip
    if a.task:
        task = tasks.get_task(a.task)
        params = tasks.parse_task_args(task, a.extra)
        notebook = task.notebook_path()
        if not notebook.exists():
            raise UsageError(f"task {task.name}: its notebook {notebook} does not exist yet",
                             hint="This task's notebook has not been written; pick another task.")  # fmt: skip
        task_name = task.name
    else:
        if a.extra:
            raise UsageError(f"unknown flag {a.extra[0]!r} for --notebook runs (use -p NAME VALUE)")
        notebook = Path(a.notebook).resolve()
        if not notebook.exists():
            raise UsageError(f"--notebook: {notebook} does not exist")
        params = {name: yaml.safe_load(value) for name, value in a.param}
        task_name = notebook.stem
    job_env = collect_job_environment(secret_names=a.secret, env_pairs=a.env, environ=os.environ)
    for value in job_env.secrets.values():
        ctx.out.redact.add(value)
    settings = lifecycle.Settings.from_env(dict(os.environ), kernel_name=a.kernel_name,
                                           execution_timeout_s=a.execution_timeout)  # fmt: skip
    with ctx.target_backend() as backend:
        record = lifecycle.submit(
            backend, task=task_name, notebook_path=notebook, params=params, job_env=job_env,
            settings=settings, save=lambda r: runs.save_record(ctx.output_dir, r),
            prepare=_remote_prepare(backend, task_name, a.profile, ctx.out),
        )  # fmt: skip
        ctx.out.submitted(record, detached=not a.no_detach)
        if a.no_detach:
            status = _follow(ctx, backend, record, offset=0)
            if status is None:
                return INTERRUPTED_EXIT
            ctx.out.synced(sync.sync_run(backend, record, ctx.output_dir))
            ctx.out.status(record, status)
            return _outcome(record, status)
    return 0


def _remote_prepare(
    backend: Backend, task_name: str, profile: str, out: Output
) -> Callable[[dict[str, Any]], lifecycle.LaunchAdditions] | None:
    """Remote targets get the code tree and a bootstrap plan; the local target has both already."""
    if backend.name == "local":
        return None

    def prepare(preflight_info: dict[str, Any]) -> lifecycle.LaunchAdditions:
        codesync = importlib.import_module("versa_runner.codesync")
        bootstrap = importlib.import_module("versa_runner.bootstrap")
        with tempfile.TemporaryDirectory(prefix="versa-code-") as work_dir:
            with out.transfer("uploading code") as progress:
                code_dir = codesync.stage_code(
                    backend, PROJECT_ROOT, Path(work_dir), progress=progress
                )
        plan = bootstrap.plan_bootstrap(
            profile=profile,
            python=preflight_info["executable"],
            task=task_name,
            root=backend.root(),
        )
        return lifecycle.LaunchAdditions(
            pythonpath=[*codesync.code_pythonpath(code_dir), *plan.pythonpath],
            env=dict(plan.env), bootstrap=list(plan.steps),
        )  # fmt: skip

    return prepare


def _follow(
    ctx: Context, backend: Backend, record: runs.RunRecord, *, offset: int
) -> RunStatus | None:
    """Stream the log to the end of the run; None when the user pressed Ctrl-C (job untouched)."""

    def keep_offset(new_offset: int) -> None:
        # Journaled as it advances, so a follower that is killed (or re-attached through a new
        # proxy URL) is resumed by the next `logs --follow` from here (versa_spec §8.6).
        record.log_offset = new_offset
        runs.save_record(ctx.output_dir, record)

    try:
        status = lifecycle.follow(
            backend, record, emit=ctx.out.log_text, offset=offset, on_offset=keep_offset
        )
    except KeyboardInterrupt:
        runs.save_record(ctx.output_dir, record)
        ctx.out.interrupted(record.run_id)
        return None
    ctx.remember(record, status)
    return status


def cmd_status(ctx: Context) -> int:
    """Show one run's derived state, exit code and progress."""
    record = ctx.record(ctx.args.run)
    with ctx.backend_for(record) as backend:
        status = lifecycle.read_status(backend, record)
    ctx.remember(record, status)
    ctx.out.status(record, status)
    return 0


def cmd_logs(ctx: Context) -> int:
    """Print run.log (whole, --tail N lines, and/or --follow until the run ends)."""
    a = ctx.args
    record = ctx.record(a.run)
    with ctx.backend_for(record) as backend:
        offset = 0
        if a.tail is not None:
            if a.tail < 0:
                raise UsageError(f"--tail: expected a non-negative number of lines, got {a.tail}")
            text, offset = lifecycle.tail_lines(backend, record, a.tail)
            ctx.out.log_text(text)
        elif (
            a.follow
            and record.log_offset
            and not lifecycle.read_status(backend, record).state.is_terminal
        ):
            offset = record.log_offset
            ctx.out.info(
                f"resuming the log at byte {offset}, where the last follower stopped "
                "(--tail N shows earlier lines)"
            )
        if a.follow:
            return (
                0 if _follow(ctx, backend, record, offset=offset) is not None else INTERRUPTED_EXIT
            )
        if a.tail is None:
            reader = lifecycle.LogReader(backend, record)
            ctx.out.log_text(reader.read_new())
    return 0


def cmd_wait(ctx: Context) -> int:
    """Block until the run ends; exit with its outcome (124 on --timeout)."""
    record = ctx.record(ctx.args.run)
    with ctx.backend_for(record) as backend:
        status = lifecycle.wait(backend, record, timeout_s=ctx.args.timeout)
        ctx.remember(record, status)
        if record.backend == "local":  # free: keeps reports/notebooks/<run>_<task>.ipynb current
            sync.copy_executed_notebook(record, Path(record.root))
    ctx.out.status(record, status)
    return _outcome(record, status)


def cmd_sync(ctx: Context) -> int:
    """Bring the run's outputs home (only what changed, verified)."""
    a = ctx.args
    record = ctx.record(a.run)
    only = [item.strip() for item in a.only.split(",") if item.strip()]
    allowed = set(sync.OUTPUT_DIRS) | set(sync.RUN_FILES)
    for item in only:
        if item not in allowed:
            raise UsageError(
                f"--only: unknown item {item!r}; allowed: {', '.join(sorted(allowed))}"
            )
    if a.watch is not None and a.watch <= 0:
        raise UsageError(f"--watch: expected minutes > 0, got {a.watch:g}")
    dest = Path(a.dest).resolve() if a.dest else ctx.output_dir
    with ctx.backend_for(record) as backend:
        ctx.out.synced(sync.sync_run(backend, record, dest, only=only))
        if a.watch is None:
            return 0
        return _watch_sync(ctx, backend, record, dest, only=only, every_s=a.watch * 60)


def _watch_sync(
    ctx: Context, backend: Backend, record: runs.RunRecord, dest: Path, *, only: list[str],
    every_s: float,
) -> int:  # fmt: skip
    """Re-sync until the run is terminal, then once more (its last files land just before)."""
    try:
        while not lifecycle.read_status(backend, record).state.is_terminal:
            ctx.out.info(f"watching {record.run_id}: next sync in {every_s:g} s (Ctrl-C stops "
                         "watching, not the job)")  # fmt: skip
            time.sleep(every_s)
            ctx.out.synced(sync.sync_run(backend, record, dest, only=only))
    except KeyboardInterrupt:
        ctx.out.interrupted(record.run_id)
        return INTERRUPTED_EXIT
    ctx.out.synced(sync.sync_run(backend, record, dest, only=only))
    return 0


def cmd_kill(ctx: Context) -> int:
    """End the run's process group (SIGTERM, grace, SIGKILL); records `killed`."""
    a = ctx.args
    if a.grace < 0:
        raise UsageError(f"--grace: expected seconds >= 0, got {a.grace:g}")
    record = ctx.record(a.run)
    prompt = f"kill run {record.run_id} ({record.task})? [y/N] "
    confirmed = a.yes or not sys.stdin.isatty() or input(prompt).strip().lower() in ("y", "yes")
    if not confirmed:
        return 0
    with ctx.backend_for(record) as backend:
        status = lifecycle.kill(backend, record, grace_s=a.grace)
    ctx.remember(record, status)
    ctx.out.status(record, status)
    return 0


def cmd_list(ctx: Context) -> int:
    """List journal runs, newest first (local runs refreshed)."""
    records = runs.list_records(ctx.output_dir)
    for record in records:  # local runs are cheap to refresh; remote ones show the last seen state
        if record.backend == "local" and not record.last_status.get("exit_code") == 0:
            with LocalBackend(record.root) as backend:
                ctx.remember(record, lifecycle.read_status(backend, record))
    ctx.out.run_list(records)
    return 0


def cmd_doctor(ctx: Context) -> int:
    """Check the target (python, papermill, disk, GPUs) without starting a run."""
    with ctx.target_backend() as backend:
        if backend.name == "jupyter":  # per-check report: reachable, auth, kernel, python, ...
            return _jupyter_doctor(ctx, backend)
        info = lifecycle.preflight(
            backend, min_free_gb=lifecycle.Settings.from_env(dict(os.environ)).min_free_gb
        )
        ctx.out.mapping(f"target {backend.describe()}: ok", info)
    return 0


def _jupyter_doctor(ctx: Context, backend: Backend) -> int:
    jupyter = importlib.import_module("versa_runner.backends.jupyter")
    min_free_gb = lifecycle.Settings.from_env(dict(os.environ)).min_free_gb
    checks = jupyter.doctor(backend, min_free_gb=min_free_gb)
    values = {c.name: f"{'ok' if c.ok else 'FAILED'}: {c.detail}" for c in checks}
    ctx.out.mapping(f"target {backend.describe()}", values)
    failed = [c for c in checks if not c.ok]
    if failed:
        raise PreflightError(f"doctor: {failed[0].name} check failed",
                             hint="The line above says what was seen; fix it and rerun doctor.")  # fmt: skip
    return 0


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
    "submit": cmd_submit, "status": cmd_status, "logs": cmd_logs, "wait": cmd_wait,
    "sync": cmd_sync, "kill": cmd_kill, "list": cmd_list, "doctor": cmd_doctor,
    "fixtures": lambda ctx: _delegate("fixtures", "versa_kernels.fixtures.cli", ctx.args.args),
    "summarize": lambda ctx: _delegate("summarize", "versa_runner.summarize", ctx.args.args),
}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; the one place errors become exit statuses."""
    argv = _with_implicit_submit(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except UsageError as error:
        Output(json_mode="--json" in argv).error(error)
        return int(error.exit_code)
    if getattr(args, "verb", None) in ("fixtures", "summarize"):
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
