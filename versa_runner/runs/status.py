"""A run's state, derived from the files of its run directory on the target (versa_spec §8.6).

State is never held in memory between commands: each call re-reads `status.json`, `exit_code`,
`heartbeat` and `output.ipynb`, so any later `versa-run` process can follow a run an earlier one
started. Time is injected (`now`) so tests control ages.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from versa_runner.backends.base import Backend
from versa_runner.errors import UnreachableError
from versa_runner.runs.journal import RunRecord
from versa_runner.target import launcher
from versa_runner.target.fileops import epoch
from versa_runner.target.layout import (
    EXIT_CODE_FILE,
    HEARTBEAT_FILE,
    INPUT_NOTEBOOK,
    OUTPUT_NOTEBOOK,
    STATUS_FILE,
)

STALE_AFTER_HEARTBEATS = 4  # a run is stale when its heartbeat is older than 4 intervals
LAUNCH_GRACE_S = 60.0  # a launch may take this long to write its first status.json
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
class Progress:
    """Where papermill is in the notebook (from output.ipynb's `metadata.papermill`)."""

    cells_done: int
    cells_total: int
    current_cell: int | None  # 1-based index of the running cell
    current_cell_elapsed_s: float | None
    failed_cell: int | None
    interrupted_cell: int | None = None  # the cell that was running when the run ended


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


def read_status(
    backend: Backend, record: RunRecord, *, now: Callable[[], float] = time.time
) -> RunStatus:
    """Derive the run's state from its files (see RunState)."""
    run_dir = record.run_dir
    try:
        raw_status = backend.read_bytes(f"{run_dir}/{STATUS_FILE}")
        raw_exit = backend.read_bytes(f"{run_dir}/{EXIT_CODE_FILE}")
        beat = backend.stat(f"{run_dir}/{HEARTBEAT_FILE}")
        if raw_status is None and backend.stat(f"{run_dir}/{INPUT_NOTEBOOK}") is None:
            return RunStatus(RunState.LOST)
    except UnreachableError:
        return RunStatus(RunState.UNREACHABLE)
    info = json.loads(raw_status) if raw_status else {}
    status = RunStatus(RunState.STARTING, info=info)
    if beat is not None:
        status.heartbeat_age_s = max(0.0, now() - beat.mtime)
    status.progress = read_progress(backend, record)
    if info.get("started_at"):
        end = epoch(str(info["ended_at"])) if info.get("ended_at") else now()
        status.elapsed_s = max(0.0, end - epoch(str(info["started_at"])))
    if raw_exit is not None:
        status.exit_code = int(raw_exit.decode().strip() or "1")
        recorded = info.get("state")
        if recorded in {s.value for s in RunState} and RunState(recorded).is_terminal:
            status.state = RunState(recorded)
        else:  # exit_code is written before the final status.json: trust the code
            status.state = RunState.SUCCEEDED if status.exit_code == 0 else RunState.FAILED
        if status.progress is not None and status.progress.current_cell is not None:
            # papermill never marks the cell it was in when the job was killed: nothing runs now
            status.progress = dataclasses.replace(
                status.progress, current_cell=None, current_cell_elapsed_s=None,
                interrupted_cell=status.progress.current_cell,
            )  # fmt: skip
        return status
    interval = float(info.get("heartbeat_interval_s", launcher.DEFAULT_HEARTBEAT_INTERVAL_S))
    if raw_status is None:
        age = now() - epoch(record.created_at)
        status.state = (
            RunState.STALE
            if age > STALE_AFTER_HEARTBEATS * interval + LAUNCH_GRACE_S
            else RunState.STARTING
        )
        return status
    beat_age = status.heartbeat_age_s
    if beat_age is None:  # the launcher writes its first heartbeat right after status.json
        beat_age = now() - epoch(str(info.get("started_at", record.created_at)))
    stale = beat_age > STALE_AFTER_HEARTBEATS * interval
    status.state = RunState.STALE if stale else RunState.RUNNING
    return status


def read_progress(backend: Backend, record: RunRecord) -> Progress | None:
    """Code cell k of N from output.ipynb's papermill metadata; None before papermill wrote it."""
    raw = backend.read_bytes(f"{record.run_dir}/{OUTPUT_NOTEBOOK}")
    if not raw:
        return None
    import nbformat  # only status reads notebooks; keeps other commands light

    try:
        notebook = nbformat.reads(raw.decode("utf-8"), as_version=nbformat.NO_CONVERT)  # type: ignore[no-untyped-call]
    except (ValueError, UnicodeDecodeError):  # papermill rewrites in place: a torn read is retried
        return None
    # papermill inserts an error banner cell on failure; count the notebook's code cells only
    cells = [c for c in notebook.cells if c.cell_type == "code"
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
        return time.time() - epoch(stamp)
    except ValueError:
        return None
