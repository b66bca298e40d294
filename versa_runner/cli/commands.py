"""The verbs about one run (submit, status, logs, wait, sync, kill): each turns parsed options
into calls of `versa_runner.runs` and lines of `Output`. Expected failures raise
`VersaRunError`; `cli.main` turns them into exit statuses."""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from versa_runner import tasks
from versa_runner.backends import choose_target
from versa_runner.backends.base import Backend
from versa_runner.cli.context import Context
from versa_runner.errors import (
    BootstrapError,
    JobFailedError,
    RunStateError,
    TargetError,
    UnreachableError,
    UsageError,
    VersaRunError,
)
from versa_runner.params import literal_value
from versa_runner.runs import journal, lifecycle, logs, next_steps, resume, sync
from versa_runner.runs.journal import RunRecord
from versa_runner.runs.prepare import PROJECT_ROOT, remote_prepare
from versa_runner.runs.secrets import collect_job_environment
from versa_runner.runs.status import RunState, RunStatus, read_status
from versa_runner.target.layout import OUTPUT_DIRS

INTERRUPTED_EXIT = 130  # what a shell reports for Ctrl-C


def _outcome(ctx: Context, backend: Backend, record: RunRecord, status: RunStatus) -> int:
    """Turn a terminal status into the command's exit status (raising for failures); a success
    prints the command that comes next."""
    logs_hint = f"`versa-run logs {record.run_id} --tail 60` shows the error."
    if status.state is RunState.SUCCEEDED:
        try:
            ctx.out.next_steps(next_steps.after_success(backend, record, local_dir=ctx.output_dir))
        except VersaRunError as error:  # a hint never costs the job's own exit status (#14)
            ctx.out.info(f"(next steps not shown: {error})")
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
        checks = tasks.input_checks(task, params)
    else:
        if a.extra:
            raise UsageError(f"unknown flag {a.extra[0]!r} for --notebook runs (use -p NAME VALUE)")
        notebook = Path(a.notebook).resolve()
        if not notebook.exists():
            raise UsageError(f"--notebook: {notebook} does not exist")
        params = {name: literal_value(name, value) for name, value in a.param}
        task_name = notebook.stem
        checks = []
    job_env = collect_job_environment(secret_names=a.secret, env_pairs=a.env, environ=os.environ)
    for value in job_env.secrets.values():
        ctx.out.redact.add(value)
    settings = lifecycle.Settings.from_env(dict(os.environ), kernel_name=a.kernel_name,
                                           execution_timeout_s=a.execution_timeout)  # fmt: skip
    with ctx.target_backend() as backend:
        record = lifecycle.submit(
            backend, task=task_name, notebook_path=notebook, params=params, job_env=job_env,
            settings=settings, save=lambda r: journal.save_record(ctx.output_dir, r),
            prepare=remote_prepare(backend, task_name, a.profile, ctx.out.transfer),
            input_checks=checks,
        )  # fmt: skip
        _keep_submission(ctx, record, notebook, params)
        ctx.out.submitted(record, detached=not a.no_detach)
        if a.no_detach:
            status = _follow(ctx, backend, record, offset=0)
            if status is None:
                return INTERRUPTED_EXIT
            selection = sync.Selection(with_checkpoints=a.with_checkpoints)
            _sync_after_run(ctx, backend, record, selection)
            ctx.out.status(record, status)
            return _outcome(ctx, backend, record, status)
    return 0


def _keep_submission(
    ctx: Context,
    record: RunRecord,
    notebook: Path,
    params: dict[str, Any],
    *,
    resumed_from: str | None = None,
) -> None:
    """Keep what `versa-run resume` needs to submit this run again (issue 14). The job is
    already launched: a failure here only costs the ability to resume, so it is a warning."""
    a = ctx.args
    try:
        code = resume.keep_code(ctx.output_dir, PROJECT_ROOT)
    except (VersaRunError, OSError) as exc:
        ctx.out.info(f"warning: run {record.run_id} cannot be resumed later: {exc}")
        return
    resume.remember_submission(ctx.output_dir, resume.Submission(
        run_id=record.run_id, task=record.task, notebook=resume.archive_member(notebook, PROJECT_ROOT),
        params=params, code_sha256=code.sha256, env_pairs=list(a.env), secret_names=list(a.secret),
        kernel_name=a.kernel_name, execution_timeout_s=a.execution_timeout, profile=a.profile,
        resumed_from=resumed_from,
    ))  # fmt: skip


def _sync_after_run(
    ctx: Context, backend: Backend, record: RunRecord, selection: sync.Selection
) -> None:
    """Sync a followed run that has ended. The job's outcome is already known from its status
    files, so a sync that fails (the target went away again, its kernel cannot be had) is
    reported with the command that retries it, and the exit status stays the job's own."""
    try:
        ctx.out.synced(sync.sync_run(backend, record, ctx.output_dir, selection=selection))
    except VersaRunError as error:
        options = f" {ctx.out.command_options}" if ctx.out.command_options else ""
        retry = f"versa-run sync {record.run_id}{options}"
        if ctx.out.json_mode:
            ctx.out.emit_json({"warning": f"outputs not synced: {error}", "retry": retry})
            return
        ctx.out.info(f"warning: the run ended but its outputs were not synced: {error}")
        ctx.out.info(f"hint: `{retry}` retries the sync.")


def _follow(ctx: Context, backend: Backend, record: RunRecord, *, offset: int) -> RunStatus | None:
    """Stream the log to the end of the run; None when the user pressed Ctrl-C (job untouched)."""

    def keep_offset(new_offset: int) -> None:
        # Journaled as it advances, so a follower that is killed (or re-attached through a new
        # proxy URL) is resumed by the next `logs --follow` from here (versa_spec §8.6).
        record.log_offset = new_offset
        journal.save_record(ctx.output_dir, record)

    try:
        patience_s = lifecycle.Settings.from_env(dict(os.environ)).unreachable_patience_s
        status = logs.follow(backend, record, emit=ctx.out.log_text, offset=offset,
                             on_offset=keep_offset, patience_s=patience_s)  # fmt: skip
    except KeyboardInterrupt:
        journal.save_record(ctx.output_dir, record)
        ctx.out.interrupted(record.run_id)
        return None
    ctx.remember(record, status)
    return status


def cmd_status(ctx: Context) -> int:
    """Show one run's derived state, exit code and progress."""
    record = ctx.record(ctx.args.run)
    with ctx.backend_for(record) as backend:
        status = read_status(backend, record)
    ctx.out.status(record, status)
    if status.state is RunState.UNREACHABLE:  # the last state seen stays in the journal
        error = UnreachableError(f"run {record.run_id}: its target {record.target} does not answer")
        if not ctx.out.json_mode:  # --json: the status object above says `unreachable`
            ctx.out.error(error)
        return int(error.exit_code)
    ctx.remember(record, status)
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
            text, offset = logs.tail_lines(backend, record, a.tail)
            ctx.out.log_text(text)
        elif a.follow and record.log_offset and not read_status(backend, record).state.is_terminal:
            offset = record.log_offset
            ctx.out.info(
                f"resuming the log at byte {offset}, where the last follower stopped "
                "(--tail N shows earlier lines)"
            )
        if a.follow:  # like `wait`: exit with the run's outcome
            status = _follow(ctx, backend, record, offset=offset)
            return INTERRUPTED_EXIT if status is None else _outcome(ctx, backend, record, status)
        if a.tail is None:
            reader = logs.LogReader(backend, record)
            ctx.out.log_text(reader.read_new())
    return 0


def cmd_wait(ctx: Context) -> int:
    """Block until the run ends; exit with its outcome (124 on --timeout)."""
    record = ctx.record(ctx.args.run)
    with ctx.backend_for(record) as backend:
        patience_s = lifecycle.Settings.from_env(dict(os.environ)).unreachable_patience_s
        status = logs.wait(backend, record, timeout_s=ctx.args.timeout, patience_s=patience_s)
        ctx.remember(record, status)
        if record.backend == "local":  # free: keeps reports/notebooks/<run>_<task>.ipynb current
            sync.copy_executed_notebook(record, Path(record.root))
        ctx.out.status(record, status)
        return _outcome(ctx, backend, record, status)


def cmd_sync(ctx: Context) -> int:
    """Bring the run's outputs home (only what changed, verified)."""
    a = ctx.args
    record = ctx.record(a.run)
    only = [item.strip() for item in a.only.split(",") if item.strip()]
    allowed = set(OUTPUT_DIRS) | set(sync.RUN_FILES)
    for item in only:
        if item not in allowed:
            raise UsageError(
                f"--only: unknown item {item!r}; allowed: {', '.join(sorted(allowed))}"
            )
    if a.watch is not None and a.watch <= 0:
        raise UsageError(f"--watch: expected minutes > 0, got {a.watch:g}")
    dest = Path(a.dest).resolve() if a.dest else ctx.output_dir
    selection = sync.Selection(only=tuple(only), include=tuple(a.include),
                               exclude=tuple(a.exclude), with_checkpoints=a.with_checkpoints)  # fmt: skip
    with ctx.backend_for(record) as backend:
        try:
            result = sync.sync_run(backend, record, dest, selection=selection, verify=a.verify)
            ctx.out.synced(result)
            if a.watch is None:
                result.raise_if_incomplete()
                return 0
            return _watch_sync(ctx, backend, record, dest, selection=selection,
                               every_s=a.watch * 60)  # fmt: skip
        except TargetError as exc:  # a watched session may be gone for good: how the run goes on
            if (
                a.watch is not None
                and dest == ctx.output_dir
                and _has_resumable_state(dest, record.task, record.run_id)
            ):
                exc.hint = (f"The state synced so far is under {dest}: `versa-run resume "
                            f"{record.run_id}` with the new target's flags continues from it.")  # fmt: skip
            raise


def _watch_sync(
    ctx: Context, backend: Backend, record: RunRecord, dest: Path, *, selection: sync.Selection,
    every_s: float,
) -> int:  # fmt: skip
    """Re-sync until the run is terminal, then once more (its last files land just before)."""
    try:
        while not read_status(backend, record).state.is_terminal:
            ctx.out.info(f"watching {record.run_id}: next sync in {every_s:g} s (Ctrl-C stops "
                         "watching, not the job)")  # fmt: skip
            time.sleep(every_s)
            ctx.out.synced(sync.sync_run(backend, record, dest, selection=selection))
    except KeyboardInterrupt:
        ctx.out.interrupted(record.run_id)
        return INTERRUPTED_EXIT
    last = sync.sync_run(backend, record, dest, selection=selection)
    ctx.out.synced(last)
    last.raise_if_incomplete()
    return 0


def _has_resumable_state(dest: Path, task: str, run_id: str) -> bool:
    try:
        return bool(resume.resumable_state(dest, task, run_id))
    except UsageError:
        return False


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
        if read_status(backend, record).state is RunState.UNREACHABLE:
            raise UnreachableError(f"run {record.run_id}: its target {record.target} does not "
                                   "answer; nothing was signalled")  # fmt: skip
        status = lifecycle.kill(backend, record, grace_s=a.grace)
    ctx.remember(record, status)
    ctx.out.status(record, status)
    return 0


def cmd_resume(ctx: Context) -> int:
    """Submit a run again (same task, parameters and code) to the same or a new target, upload
    its synced resumable state, and let the job continue from it (issue 14)."""
    a = ctx.args
    old = ctx.record(a.run)
    sub = resume.load_submission(ctx.output_dir, old.run_id)
    archive = resume.code_archive(ctx.output_dir, sub)
    states = resume.resumable_state(ctx.output_dir, sub.task, old.run_id)
    if not states:
        raise UsageError(f"run {old.run_id}: no resumable state under {ctx.output_dir}",
                         hint="`versa-run sync RUN --watch MIN` brings it home while the run's "
                              "target lives; without it, submit the task again.")  # fmt: skip
    job_env = collect_job_environment(secret_names=sub.secret_names, env_pairs=sub.env_pairs,
                                      environ=os.environ)  # fmt: skip
    for value in job_env.secrets.values():
        ctx.out.redact.add(value)
    settings = lifecycle.Settings.from_env(dict(os.environ), kernel_name=sub.kernel_name,
                                           execution_timeout_s=sub.execution_timeout_s)  # fmt: skip
    # Target flags name a new target; without them the run goes back where it ran.
    same_target = old.backend != "local" and choose_target(ctx.target_options()) == "local"
    with ctx.backend_for(old) if same_target else ctx.target_backend() as backend:
        if (
            backend.name == "local"
            and resume.keep_code(ctx.output_dir, PROJECT_ROOT).sha256 != sub.code_sha256
        ):
            raise UsageError(f"run {old.run_id}: the checkout's code changed since it was submitted, "
                             "and a local run imports the checkout",
                             hint="Resume on a remote target (it gets the run's own code), or "
                                  "restore the code.")  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="versa-resume-") as tmp:
            notebook = resume.notebook_from_archive(archive, sub.notebook, Path(tmp))
            root = Path(backend.root())
            with ctx.out.transfer(f"uploading the resumable state of {old.run_id}") as progress:
                run_id = lifecycle.new_run_id()
                for rel, path in states:
                    dest_rel = resume.state_destination(rel, old.run_id, run_id)
                    if backend.name != "local" or (root / dest_rel).resolve() != path.resolve():
                        backend.put_file(path, dest_rel, progress=progress)
            record = lifecycle.submit(
                backend, task=sub.task, notebook_path=notebook, params=sub.params,
                job_env=job_env, settings=settings,
                save=lambda r: journal.save_record(ctx.output_dir, r),
                prepare=remote_prepare(backend, sub.task, sub.profile, ctx.out.transfer,
                                       archive=archive),
                run_id=run_id,
            )  # fmt: skip
        resume.remember_submission(ctx.output_dir, dataclasses.replace(
            sub, run_id=record.run_id, resumed_from=old.run_id))  # fmt: skip
        ctx.out.info(f"run {record.run_id} continues {old.run_id} from "
                     f"{', '.join(rel for rel, _ in states)}")  # fmt: skip
        ctx.out.submitted(record, detached=not a.no_detach)
        if a.no_detach:
            status = _follow(ctx, backend, record, offset=0)
            if status is None:
                return INTERRUPTED_EXIT
            ctx.out.synced(sync.sync_run(backend, record, ctx.output_dir))
            ctx.out.status(record, status)
            return _outcome(ctx, backend, record, status)
    return 0
