"""The run lifecycle, written once above every backend: preflight, stage, launch, kill
(versa_spec §8.4, §8.5, §8.11). Reading a run back lives beside it: `status` and `logs`.

A backend only moves bytes and runs target ops; everything about runs lives here and in its
siblings. Nothing is held in memory between commands: the run directory on the target and the
journal entry on the host are the state.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import secrets as _random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from versa_runner.backends.base import Backend, call_target
from versa_runner.errors import PreflightError, RunStateError, TargetError, UsageError
from versa_runner.runs.journal import RunRecord
from versa_runner.runs.logs import FOLLOW_PATIENCE_S
from versa_runner.runs.secrets import JobEnvironment, encode_secrets_env
from versa_runner.runs.status import RunState, RunStatus, read_status
from versa_runner.target import bundle, launcher
from versa_runner.target.layout import (
    INPUT_NOTEBOOK,
    LAUNCH_FILE,
    LAUNCHER_ARCHIVE,
    PARAMS_FILE,
    RUNS_DIR,
    SECRETS_FILE,
)

log = logging.getLogger(__name__)

OP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Settings:
    """Launch knobs; `heartbeat_interval_s` is shortened by tests (env VERSA_RUNNER_HEARTBEAT_S)."""

    heartbeat_interval_s: float = launcher.DEFAULT_HEARTBEAT_INTERVAL_S
    kill_grace_s: float = launcher.DEFAULT_KILL_GRACE_S
    min_free_gb: float = 5.0
    kernel_name: str = "python3"
    execution_timeout_s: float | None = None
    unreachable_patience_s: float = FOLLOW_PATIENCE_S

    @classmethod
    def from_env(cls, environ: dict[str, str], **overrides: Any) -> Settings:
        """Read `VERSA_RUNNER_HEARTBEAT_S`, `_MIN_FREE_GB` and `_PATIENCE_S` at call time."""
        values: dict[str, Any] = {}
        for name, field_name in (("VERSA_RUNNER_HEARTBEAT_S", "heartbeat_interval_s"),
                                 ("VERSA_RUNNER_MIN_FREE_GB", "min_free_gb"),
                                 ("VERSA_RUNNER_PATIENCE_S", "unreachable_patience_s")):  # fmt: skip
            if environ.get(name):
                values[field_name] = _positive_float(name, environ[name])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _positive_float(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"environment variable {name}: expected a positive number, got {text!r}")
    return value


@dataclass
class LaunchAdditions:
    """Target-specific launch.json entries: job PYTHONPATH, non-secret env, bootstrap steps."""

    pythonpath: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    bootstrap: list[dict[str, Any]] = field(default_factory=list)


def new_run_id(now: dt.datetime | None = None) -> str:
    """Run id `yyyymmddThhmmssZ-<6 hex>`: sorts by creation time, unique without coordination."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{_random.token_hex(3)}"


def executed_notebook_relpath(run_id: str, task: str) -> str:
    """Where the executed notebook is kept, relative to the job cwd / output dir."""
    return f"reports/notebooks/{run_id}_{task}.ipynb"


def run_dir_of(run_id: str) -> str:
    """The run directory, relative to the target root."""
    return f"{RUNS_DIR}/{run_id}"


def preflight(
    backend: Backend, *, min_free_gb: float, input_checks: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    """Check python, papermill, ipykernel, free disk and the task's inputs (`input_checks`,
    see `target.inputs`) on the target; refuse early. A bad input is a usage error on the
    local target (the host checked its own files) and a preflight refusal on a remote one."""
    args = {"root": backend.root(), "checks": list(input_checks)}
    info: dict[str, Any] = call_target(backend, "ops.preflight", args, timeout_s=OP_TIMEOUT_S)
    if info.get("input_errors"):
        refusal = UsageError if backend.name == "local" else PreflightError
        raise refusal("; ".join(info["input_errors"]),
                      hint="Nothing was staged; fix the flag and submit again.")  # fmt: skip
    free_gb = info["free_bytes"] / 1e9
    if not info["papermill"] or not info["ipykernel"]:
        missing = [n for n in ("papermill", "ipykernel") if not info[n]]
        raise PreflightError(
            f"{', '.join(missing)} not importable by {info['executable']} on the target",
            hint="pip install papermill ipykernel on the target (or use a bootstrap step).",
        )
    if free_gb < min_free_gb:
        raise PreflightError(
            f"only {free_gb:.1f} GB free under {backend.root()} (need {min_free_gb:.1f} GB)",
            hint="Free space on the target or lower the limit with VERSA_RUNNER_MIN_FREE_GB.",
        )
    return info


def params_hash(params: dict[str, Any]) -> str:
    """Short sha256 of the parameters (journaled instead of the values)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def stage(
    backend: Backend,
    *,
    run_id: str,
    task: str,
    notebook_path: Path,
    params: dict[str, Any],
    job_env: JobEnvironment,
    settings: Settings,
    additions: LaunchAdditions | None = None,
) -> str:
    """Write the run directory on the target; the source notebook is copied, never edited."""
    run_dir = run_dir_of(run_id)
    backend.put_file(notebook_path, f"{run_dir}/{INPUT_NOTEBOOK}")
    params_yaml = yaml.safe_dump({**params, "run_id": run_id}, sort_keys=True)
    backend.put_bytes(f"{run_dir}/{PARAMS_FILE}", params_yaml.encode())
    additions = additions or LaunchAdditions()
    launch_config = {
        "cwd": backend.root(),
        "pythonpath": additions.pythonpath,
        "env": {**additions.env, **job_env.public},
        "heartbeat_interval_s": settings.heartbeat_interval_s,
        "kill_grace_s": settings.kill_grace_s,
        "kernel_name": settings.kernel_name,
        "execution_timeout_s": settings.execution_timeout_s,
        "bootstrap": additions.bootstrap,
        "notebook_copy": executed_notebook_relpath(run_id, task),
    }
    backend.put_bytes(f"{run_dir}/{LAUNCH_FILE}", json.dumps(launch_config, indent=2).encode())
    backend.put_bytes(f"{run_dir}/{LAUNCHER_ARCHIVE}", bundle.launcher_archive())
    if job_env.secrets:
        # The only place secret values travel: a 0600 file the launcher deletes on start.
        backend.put_bytes(f"{run_dir}/{SECRETS_FILE}",
                          encode_secrets_env(job_env.secrets), mode=0o600)  # fmt: skip
    return run_dir


def launch(backend: Backend, run_dir: str) -> dict[str, Any]:
    """Start the launcher in its own session on the target (idempotent per run dir)."""
    root = PurePosixPath(backend.root())
    args = {"run_dir": str(root / run_dir), "cwd": str(root)}
    reply: dict[str, Any] = call_target(backend, "ops.launch", args, timeout_s=OP_TIMEOUT_S)
    return reply


def submit(
    backend: Backend,
    *,
    task: str,
    notebook_path: Path,
    params: dict[str, Any],
    job_env: JobEnvironment,
    settings: Settings,
    save: Callable[[RunRecord], None],
    prepare: Callable[[dict[str, Any]], LaunchAdditions] | None = None,
    run_id: str | None = None,
    input_checks: Sequence[dict[str, Any]] = (),
) -> RunRecord:
    """Preflight, stage and launch one run; `save` journals it before the launch (so a failed
    launch still leaves a record to inspect). `prepare` gets the preflight facts and returns
    what the target needs besides the notebook (code sync, bootstrap steps). `run_id` is new
    unless given (a resume places state under the new run's id before it is launched).
    `input_checks` (from the task's declaration) are checked by preflight, before anything is
    staged."""
    info = preflight(backend, min_free_gb=settings.min_free_gb, input_checks=input_checks)
    additions = prepare(info) if prepare is not None else None
    run_id = run_id or new_run_id()
    run_dir = stage(
        backend, run_id=run_id, task=task, notebook_path=notebook_path, params=params,
        job_env=job_env, settings=settings, additions=additions,
    )  # fmt: skip
    record = RunRecord(
        run_id=run_id, task=task, notebook=notebook_path.name, backend=backend.name,
        target=backend.describe(), root=backend.root(), run_dir=run_dir, job_cwd=backend.root(),
        params_hash=params_hash(params), created_at=dt.datetime.now(dt.timezone.utc).isoformat(),
        secret_names=job_env.secret_names,
    )  # fmt: skip
    save(record)
    launch(backend, run_dir)
    return record


def kill(backend: Backend, record: RunRecord, *, grace_s: float) -> RunStatus:
    """SIGTERM the job's process group (after checking the pid's start time), SIGKILL after grace."""
    status = read_status(backend, record)
    if status.state is RunState.LOST:
        raise RunStateError(f"run {record.run_id} is lost: its directory is gone on the target")
    if status.exit_code is not None:  # already ended; a stale run (no exit_code) is still killed
        return status
    if not status.info:
        raise TargetError(
            f"run {record.run_id} has not written status.json yet",
            hint="Retry `versa-run kill` in a few seconds.",
        )
    root = PurePosixPath(backend.root())
    args = {"run_dir": str(root / record.run_dir), "grace_s": grace_s}
    reply = call_target(backend, "ops.kill", args, timeout_s=grace_s + OP_TIMEOUT_S)
    log.info("kill %s: %s", record.run_id, reply)
    return read_status(backend, record)
