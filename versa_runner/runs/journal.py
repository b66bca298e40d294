"""The local run journal: what this machine knows about each run it submitted.

Layout (described here once; paths are built only by the functions below)::

    <home>/                         $VERSA_RUNNER_HOME, else <output_dir>/.versa_runner
      runs/<run_id>.json            one RunRecord per run (atomic rewrite)

A record holds the task, the backend name, a redacted target description, the target root and
the run's paths relative to it, a hash of the parameters (never their values when they could be
secret), the names (never values) of the secrets sent, the byte offset up to which `logs` has
shown the log, the last status seen and the creation time. Every command that takes RUN resolves
it here: a full run id, a unique prefix, `last`, or nothing (the newest run).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from versa_runner.errors import UsageError
from versa_runner.fsutil import atomic_write_json

HOME_ENV = "VERSA_RUNNER_HOME"
JOURNAL_SCHEMA_VERSION = 1
LAST = "last"


@dataclass
class RunRecord:
    """One journal entry; paths are POSIX and relative to the target root unless named `*_abs`."""

    run_id: str
    task: str
    notebook: str
    backend: str
    target: str
    root: str
    run_dir: str
    job_cwd: str
    params_hash: str
    created_at: str
    secret_names: list[str] = field(default_factory=list)
    log_offset: int = 0
    last_status: dict[str, Any] = field(default_factory=dict)
    schema_version: int = JOURNAL_SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        """The entry as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        """Read an entry, ignoring keys a newer version added."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def journal_home(output_dir: str | os.PathLike[str]) -> Path:
    """The journal root: $VERSA_RUNNER_HOME (read at call time) or `<output_dir>/.versa_runner`."""
    override = os.environ.get(HOME_ENV)
    return Path(override) if override else Path(output_dir) / ".versa_runner"


def record_path(output_dir: str | os.PathLike[str], run_id: str) -> Path:
    """Path of a run's journal entry."""
    return journal_home(output_dir) / "runs" / f"{run_id}.json"


def save_record(output_dir: str | os.PathLike[str], record: RunRecord) -> None:
    """Write (or rewrite) a run's journal entry atomically."""
    atomic_write_json(record_path(output_dir, record.run_id), record.to_json())


def load_record(output_dir: str | os.PathLike[str], run_id: str) -> RunRecord:
    """Read one run's journal entry."""
    with open(record_path(output_dir, run_id), encoding="utf-8") as fh:
        return RunRecord.from_json(json.load(fh))


def list_run_ids(output_dir: str | os.PathLike[str]) -> list[str]:
    """Run ids in the journal, oldest first (run ids start with a UTC timestamp, so they sort)."""
    runs_dir = journal_home(output_dir) / "runs"
    if not runs_dir.is_dir():
        return []
    return sorted(p.stem for p in runs_dir.glob("*.json") if not p.name.startswith("."))


def list_records(output_dir: str | os.PathLike[str]) -> list[RunRecord]:
    """All journal entries, oldest first."""
    return [load_record(output_dir, run_id) for run_id in list_run_ids(output_dir)]


def resolve_run(output_dir: str | os.PathLike[str], ref: str | None) -> RunRecord:
    """Find the run named by `ref`: id, unique prefix, `last`, or None (the newest run)."""
    run_ids = list_run_ids(output_dir)
    if not run_ids:
        raise UsageError(
            f"no runs in the journal at {journal_home(output_dir)}",
            hint="Submit one with `versa-run --task TASK`, or pass --output-dir where you ran it.",
        )
    if ref is None or ref == LAST:
        return load_record(output_dir, run_ids[-1])
    if ref in run_ids:
        return load_record(output_dir, ref)
    matches = [run_id for run_id in run_ids if run_id.startswith(ref)]
    if len(matches) == 1:
        return load_record(output_dir, matches[0])
    if not matches:
        raise UsageError(
            f"RUN {ref!r} matches no run in the journal",
            hint="`versa-run list` shows the known run ids.",
        )
    shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
    raise UsageError(
        f"RUN {ref!r} is ambiguous: {len(matches)} runs match ({shown})",
        hint="Give more characters of the run id.",
    )
