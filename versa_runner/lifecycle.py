"""The run lifecycle, written once above every backend: preflight, stage, launch, then
status / progress / logs / wait / kill from files on the target (versa_spec §8.4-§8.6, §8.11).

A backend only moves bytes and runs snippets; everything about runs lives here. State is never
held in memory between commands: each call re-reads `status.json`, `exit_code`, `heartbeat` and
`output.ipynb` from the run directory, so any later `versa-run` process can follow a run that an
earlier one started. Time is injected (`clock`, `sleep`) so tests control deadlines, which
always use `time.monotonic`.
"""

from __future__ import annotations

import codecs
import datetime as dt
import hashlib
import json
import logging
import secrets as _random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from versa_runner import launcher, snippets
from versa_runner.backends.base import Backend
from versa_runner.errors import (
    PreflightError,
    RunStateError,
    TargetError,
    UnreachableError,
    UsageError,
    WaitTimeoutError,
)
from versa_runner.runs import RunRecord
from versa_runner.secrets import JobEnvironment, encode_secrets_env

log = logging.getLogger(__name__)

RUNS_DIR = "versa_runs"
STALE_AFTER_HEARTBEATS = 4  # a run is stale when its heartbeat is older than 4 intervals
LOG_READ_BYTES = 1 << 20  # 1 MiB per Range read (versa_spec §8.15)
FOLLOW_PATIENCE_S = 600.0
"""How long `follow` keeps retrying an unreachable target before giving up."""
LOG_POLL_S = 1.0  # follow/wait poll interval (brief: 1-2 s)
SNIPPET_TIMEOUT_S = 60.0
ERROR_CELL_TAG = "papermill-error-cell-tag"


class RunState(str, Enum):
    """States a run can be in, as `status` derives them from the run directory."""

    STARTING = "starting"
    RUNNING = "running"
    STALE = "stale"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    KILLED = "killed"
    TIMEOUT = "timeout"
    BOOTSTRAP_FAILED = "bootstrap_failed"
    LOST = "lost"
    UNREACHABLE = "unreachable"

    @property
    def is_terminal(self) -> bool:
        """True when the job will not change any more (or cannot be observed any more)."""
        return self not in (RunState.STARTING, RunState.RUNNING, RunState.UNREACHABLE)


@dataclass(frozen=True)
class Settings:
    """Launch knobs; `heartbeat_interval_s` is shortened by tests (env VERSA_RUNNER_HEARTBEAT_S)."""

    heartbeat_interval_s: float = launcher.DEFAULT_HEARTBEAT_INTERVAL_S
    kill_grace_s: float = launcher.DEFAULT_KILL_GRACE_S
    min_free_gb: float = 5.0
    kernel_name: str = "python3"
    execution_timeout_s: float | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str], **overrides: Any) -> Settings:
        """Read `VERSA_RUNNER_HEARTBEAT_S` / `VERSA_RUNNER_MIN_FREE_GB` at call time."""
        values: dict[str, Any] = {}
        for name, field_name in (("VERSA_RUNNER_HEARTBEAT_S", "heartbeat_interval_s"),
                                 ("VERSA_RUNNER_MIN_FREE_GB", "min_free_gb")):  # fmt: skip
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


@dataclass(frozen=True)
class Progress:
    """Where papermill is in the notebook (from output.ipynb's `metadata.papermill`)."""

    cells_done: int
    cells_total: int
    current_cell: int | None  # 1-based index of the running cell
    current_cell_elapsed_s: float | None
    failed_cell: int | None


@dataclass
class RunStatus:
    """What `status` reports; `info` is the raw status.json (no secrets ever go there)."""

    state: RunState
    exit_code: int | None = None
    heartbeat_age_s: float | None = None
    elapsed_s: float | None = None  # started_at to ended_at, or to now while it runs
    progress: Progress | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The status.json fields overlaid with what was derived (state, exit code, ages)."""
        out: dict[str, Any] = {
            **self.info,
            "state": self.state.value,
            "exit_code": self.exit_code,
            "heartbeat_age_s": self.heartbeat_age_s,
            "elapsed_s": self.elapsed_s,
        }
        if self.progress is not None:
            out["progress"] = self.progress.__dict__
        return out


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


def _call(
    backend: Backend, template: str, args: dict[str, Any], *, what: str,
    timeout_s: float = SNIPPET_TIMEOUT_S,
) -> dict[str, Any]:  # fmt: skip
    code = snippets.render(template, args)
    return snippets.parse_reply(backend.run_python(code, timeout_s=timeout_s), what=what)


def preflight(backend: Backend, *, min_free_gb: float) -> dict[str, Any]:
    """Check python, papermill, ipykernel and free disk on the target; refuse early."""
    info = _call(backend, snippets.PREFLIGHT, {"root": backend.root()}, what="preflight")
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
    backend.put_file(notebook_path, f"{run_dir}/input.ipynb")
    params_yaml = yaml.safe_dump({**params, "run_id": run_id}, sort_keys=True)
    backend.put_bytes(f"{run_dir}/params.yaml", params_yaml.encode())
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
    backend.put_bytes(f"{run_dir}/launch.json", json.dumps(launch_config, indent=2).encode())
    backend.put_bytes(f"{run_dir}/launcher.py", Path(launcher.__file__).read_bytes())
    if job_env.secrets:
        # The only place secret values travel: a 0600 file the launcher deletes on start.
        backend.put_bytes(f"{run_dir}/{launcher.SECRETS_FILE}",
                          encode_secrets_env(job_env.secrets), mode=0o600)  # fmt: skip
    return run_dir


def launch(backend: Backend, run_dir: str) -> dict[str, Any]:
    """Start the launcher in its own session on the target (idempotent per run dir)."""
    root = PurePosixPath(backend.root())
    args = {"run_dir": str(root / run_dir), "cwd": str(root)}
    return _call(backend, snippets.LAUNCH, args, what="launch")


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
) -> RunRecord:
    """Preflight, stage and launch one run; `save` journals it before the launch (so a failed
    launch still leaves a record to inspect). `prepare` gets the preflight facts and returns
    what the target needs besides the notebook (code sync, bootstrap steps)."""
    info = preflight(backend, min_free_gb=settings.min_free_gb)
    additions = prepare(info) if prepare is not None else None
    run_id = new_run_id()
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


def read_status(
    backend: Backend, record: RunRecord, *, now: Callable[[], float] = time.time
) -> RunStatus:
    """Derive the run's state from its files (see RunState)."""
    run_dir = record.run_dir
    try:
        raw_status = backend.read_bytes(f"{run_dir}/{launcher.STATUS_FILE}")
        raw_exit = backend.read_bytes(f"{run_dir}/{launcher.EXIT_CODE_FILE}")
        beat = backend.stat(f"{run_dir}/{launcher.HEARTBEAT_FILE}")
        if raw_status is None and backend.stat(f"{run_dir}/input.ipynb") is None:
            return RunStatus(RunState.LOST)
    except UnreachableError:
        return RunStatus(RunState.UNREACHABLE)
    info = json.loads(raw_status) if raw_status else {}
    status = RunStatus(RunState.STARTING, info=info)
    if beat is not None:
        status.heartbeat_age_s = max(0.0, now() - beat.mtime)
    status.progress = read_progress(backend, record)
    if info.get("started_at"):
        end = _timestamp(str(info["ended_at"])) if info.get("ended_at") else now()
        status.elapsed_s = max(0.0, end - _timestamp(str(info["started_at"])))
    if raw_exit is not None:
        status.exit_code = int(raw_exit.decode().strip() or "1")
        recorded = info.get("state")
        if recorded in {s.value for s in RunState} and RunState(recorded).is_terminal:
            status.state = RunState(recorded)
        else:  # exit_code is written before the final status.json: trust the code
            status.state = RunState.SUCCEEDED if status.exit_code == 0 else RunState.FAILED
        return status
    interval = float(info.get("heartbeat_interval_s", launcher.DEFAULT_HEARTBEAT_INTERVAL_S))
    if raw_status is None:
        age = now() - _timestamp(record.created_at)
        status.state = (
            RunState.STALE
            if age > STALE_AFTER_HEARTBEATS * interval + SNIPPET_TIMEOUT_S
            else RunState.STARTING
        )
        return status
    age = status.heartbeat_age_s
    if age is None:  # the launcher writes its first heartbeat right after status.json
        age = now() - _timestamp(str(info.get("started_at", record.created_at)))
    stale = age > STALE_AFTER_HEARTBEATS * interval
    status.state = RunState.STALE if stale else RunState.RUNNING
    return status


def _timestamp(stamp: str) -> float:
    """Unix time of an ISO-8601 stamp (naive stamps are UTC)."""
    parsed = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.timestamp()


def read_progress(backend: Backend, record: RunRecord) -> Progress | None:
    """Code cell k of N from output.ipynb's papermill metadata; None before papermill wrote it."""
    raw = backend.read_bytes(f"{record.run_dir}/output.ipynb")
    if not raw:
        return None
    try:
        cells = json.loads(raw).get("cells", [])
    except ValueError:  # papermill rewrites the file in place; a torn read is retried next poll
        return None
    # papermill inserts an error banner cell on failure; count the notebook's code cells only
    cells = [c for c in cells if c.get("cell_type") == "code"
             and ERROR_CELL_TAG not in c.get("metadata", {}).get("tags", [])]  # fmt: skip
    done, current, failed, elapsed = 0, None, None, None
    for index, cell in enumerate(cells, start=1):
        meta = cell.get("metadata", {}).get("papermill", {})
        state = meta.get("status")
        if state == "completed":
            done += 1
        elif state == "running":
            current = index
            elapsed = _elapsed_since(meta.get("start_time"))
        elif state == "failed":
            failed = index
    return Progress(done, len(cells), current, elapsed, failed)


def _elapsed_since(stamp: str | None) -> float | None:
    if not stamp:
        return None
    try:
        return time.time() - _timestamp(stamp)
    except ValueError:
        return None


class LogReader:
    """Reads run.log from a byte offset, decoding UTF-8 incrementally across reads.

    A multibyte character split by a read boundary is carried to the next read instead of being
    replaced (versa_spec §6 item 12).
    """

    def __init__(self, backend: Backend, record: RunRecord, *, offset: int = 0) -> None:
        self.backend = backend
        self.path = f"{record.run_dir}/{launcher.LOG_FILE}"
        self.offset = offset
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def read_new(self) -> str:
        """Everything appended since the last call (reads in 1 MiB Range requests)."""
        parts: list[str] = []
        while True:
            chunk = self.backend.read_bytes(self.path, offset=self.offset, length=LOG_READ_BYTES)
            if not chunk:
                return "".join(parts)
            self.offset += len(chunk)
            parts.append(self._decoder.decode(chunk))
            if len(chunk) < LOG_READ_BYTES:
                return "".join(parts)


def tail_lines(backend: Backend, record: RunRecord, lines: int) -> tuple[str, int]:
    """The last `lines` lines of run.log and the log's size (the offset to follow from)."""
    path = f"{record.run_dir}/{launcher.LOG_FILE}"
    info = backend.stat(path)
    if info is None:
        return "", 0
    window = max(LOG_READ_BYTES, lines * 512)
    start = max(0, info.size_bytes - window)
    data = backend.read_bytes(path, offset=start, length=info.size_bytes - start) or b""
    text = data.decode("utf-8", errors="replace")
    kept = text.splitlines(keepends=True)[-lines:] if lines > 0 else []
    return "".join(kept), start + len(data)


def follow(
    backend: Backend,
    record: RunRecord,
    *,
    emit: Callable[[str], None],
    offset: int = 0,
    poll_s: float = LOG_POLL_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    patience_s: float = FOLLOW_PATIENCE_S,
    on_offset: Callable[[int], None] | None = None,
) -> RunStatus:
    """Stream run.log until the run is terminal, then do one final read; returns the status.

    A target that stops answering (a dropped proxy, a Kaggle hiccup) is retried from the same
    byte offset for up to `patience_s` seconds before the UnreachableError is raised.
    """
    reader = LogReader(backend, record, offset=offset)
    unreachable_since: float | None = None
    while True:
        status = read_status(backend, record)
        try:
            text = reader.read_new()
        except UnreachableError:
            now = clock()
            unreachable_since = now if unreachable_since is None else unreachable_since
            if now - unreachable_since > patience_s:
                raise
            sleep(poll_s)
            continue
        unreachable_since = None
        if text:
            emit(text)
            if on_offset is not None:
                on_offset(reader.offset)
        if status.state.is_terminal:
            text = reader.read_new()  # the launcher's last lines land just before exit_code
            if text:
                emit(text)
                if on_offset is not None:
                    on_offset(reader.offset)
            return status
        sleep(poll_s)


def wait(
    backend: Backend,
    record: RunRecord,
    *,
    timeout_s: float | None,
    poll_s: float = LOG_POLL_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> RunStatus:
    """Poll until the run is terminal; WaitTimeoutError when `timeout_s` runs out first."""
    deadline = None if timeout_s is None else clock() + timeout_s
    while True:
        status = read_status(backend, record)
        if status.state.is_terminal:
            return status
        if deadline is not None and clock() >= deadline:
            raise WaitTimeoutError(
                f"run {record.run_id} still {status.state.value} after {timeout_s:g} s"
            )
        sleep(poll_s)


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
    reply = _call(backend, snippets.KILL, args, what="kill", timeout_s=grace_s + SNIPPET_TIMEOUT_S)
    log.info("kill %s: %s", record.run_id, reply)
    return read_status(backend, record)
