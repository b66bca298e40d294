"""A lost GPU session resumes elsewhere: what a run needs to be submitted again, and its state.

A Kaggle session ends after its hours and a borrowed box can vanish; papermill cannot resume a
failed cell. What survives is on this machine: the run's submission (task, parameters, non-secret
environment, the names of its secrets) and its code archive, both kept at submit time, and the
resumable state the job wrote under its outputs, brought home by `sync --watch`. `versa-run
resume RUN` submits the same task, parameters and code again, to the same or a new target,
uploads that state first, and the job continues from it (the kernels resume from a state whose
fingerprint matches their inputs and ignore any other).

Layout under the journal home (`journal.journal_home`)::

    submissions/<run_id>.json       task, notebook, params, env pairs, secret names, code sha256
    code/<sha256[:16]>.tar.gz       the exact code archive the run used (content-addressed)

Resumable state, relative to the job's working directory (= the sync destination):
`build_pruned`'s profile state (`versa_kernels.eaftreap.build.PROFILE_STATE`, one file per
rank with `--gpus N`, `versa_kernels.distributed.rank_state_path`).
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from versa_runner import tasks
from versa_runner.errors import UsageError
from versa_runner.fsutil import atomic_write_json, sha256_file
from versa_runner.runs import codesync, journal
from versa_runner.runs.sync import LOCAL_MANIFEST, load_local_manifest, local_key
from versa_runner.target.layout import RESUME_STATE_GLOBS

SUBMISSION_SCHEMA_VERSION = 1


@dataclass
class Submission:
    """Everything needed to submit a run again (no secret values: only their names)."""

    run_id: str
    task: str
    notebook: str
    """Path of the notebook inside the code archive (`notebooks/x.ipynb`), else absolute."""
    params: dict[str, Any]
    code_sha256: str
    env_pairs: list[str] = field(default_factory=list)
    secret_names: list[str] = field(default_factory=list)
    kernel_name: str = "python3"
    execution_timeout_s: float | None = None
    profile: str = "auto"
    resumed_from: str | None = None
    schema_version: int = SUBMISSION_SCHEMA_VERSION


def submission_path(output_dir: Path, run_id: str) -> Path:
    """Where a run's submission is kept."""
    return journal.journal_home(output_dir) / "submissions" / f"{run_id}.json"


def code_archive_path(output_dir: Path, sha256: str) -> Path:
    """Where the code archive with this sha256 is kept."""
    return journal.journal_home(output_dir) / "code" / f"{sha256[:16]}.tar.gz"


def keep_code(output_dir: Path, project_root: Path) -> codesync.CodeArchive:
    """Build the code archive of `project_root` and keep it (once per code state)."""
    staging = journal.journal_home(output_dir) / "code" / "incoming"
    staging.mkdir(parents=True, exist_ok=True)
    archive = codesync.build_archive(project_root, staging)
    kept = code_archive_path(output_dir, archive.sha256)
    if not kept.exists() or sha256_file(kept) != archive.sha256:
        archive.path.replace(kept)
    else:
        archive.path.unlink()
    return codesync.CodeArchive(kept, archive.sha256, archive.files, archive.size_bytes)


def remember_submission(output_dir: Path, submission: Submission) -> None:
    """Keep `submission` beside the journal (atomic)."""
    atomic_write_json(submission_path(output_dir, submission.run_id), asdict(submission))


def load_submission(output_dir: Path, run_id: str) -> Submission:
    """The kept submission of `run_id`; UsageError when there is none."""
    path = submission_path(output_dir, run_id)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(
            f"run {run_id} cannot be resumed: no submission was kept for it ({path})",
            hint="Runs submitted by this version keep one; submit the task again.",
        ) from None
    known = {name for name in Submission.__dataclass_fields__}
    return Submission(**{k: v for k, v in data.items() if k in known})


def code_archive(output_dir: Path, submission: Submission) -> codesync.CodeArchive:
    """The run's own code archive, checked against its recorded sha256."""
    path = code_archive_path(output_dir, submission.code_sha256)
    if not path.exists() or sha256_file(path) != submission.code_sha256:
        raise UsageError(
            f"run {submission.run_id} cannot be resumed: its code archive {path} is missing or "
            "changed",
            hint="Submit the task again (its code is gone from this machine).",
        )
    with tarfile.open(path, "r:gz") as tar:
        files = sum(1 for m in tar.getmembers() if m.isfile())
    return codesync.CodeArchive(path, submission.code_sha256, files, path.stat().st_size)


def notebook_from_archive(archive: codesync.CodeArchive, member: str, out_dir: Path) -> Path:
    """Extract the run's notebook from its code archive into `out_dir` (same code, same cells)."""
    if PurePosixPath(member).is_absolute():
        return Path(member)  # a --notebook run outside the code trees: the file itself
    with tarfile.open(archive.path, "r:gz") as tar:
        try:
            source = tar.extractfile(member)
        except KeyError:
            source = None
        if source is None:
            raise UsageError(f"the run's code archive holds no notebook {member!r}")
        target = out_dir / PurePosixPath(member).name
        with open(target, "wb") as out:
            shutil.copyfileobj(source, out)
    return target


def archive_member(notebook: Path, project_root: Path) -> str:
    """The notebook's path inside the code archive, or its absolute path when outside it."""
    try:
        relative = notebook.resolve().relative_to(project_root.resolve())
    except ValueError:
        return str(notebook.resolve())
    member = PurePosixPath(relative.as_posix())
    return str(member) if not codesync.is_excluded(member) else str(notebook.resolve())


def _output_dirs(task_name: str, run_id: str) -> set[str] | None:
    """Directories a registered task's run writes its outputs to; None for a plain notebook."""
    task = tasks.TASKS.get(task_name)
    if task is None:
        return None
    return {str(PurePosixPath(out.replace("<run_id>", run_id)).parent) for out in task.outputs}


def state_destination(rel: str, old_run_id: str, new_run_id: str) -> str:
    """Where a state file goes for the resumed run: a collection keeps its state in its run's
    own folder (`artifacts/eaft_models/<run_id>/`), so that part is renamed; a profile's
    state is keyed by its build folder and keeps its path."""
    parts = [new_run_id if part == old_run_id else part for part in PurePosixPath(rel).parts]
    return str(PurePosixPath(*parts))


def resumable_state(dest_root: Path, task_name: str, run_id: str) -> list[tuple[str, Path]]:
    """(relative path, local file) of the resumable state under `dest_root`, each verified.

    Only state in the task's own output directories counts (another task's profile would be
    ignored by the job anyway, its fingerprint differing). A file is taken only when it is what
    sync verified: its size, mtime, inode and ctime are the ones recorded after that
    verification, or it hashes to the recorded sha256.
    """
    local = load_local_manifest(dest_root)
    own_dirs = _output_dirs(task_name, run_id)
    found: list[tuple[str, Path]] = []
    for rel, known in sorted(local.items()):
        if not isinstance(known, dict) or not any(
            fnmatch.fnmatch(rel, pattern) for pattern in RESUME_STATE_GLOBS
        ):
            continue
        if own_dirs is not None and str(PurePosixPath(rel).parent) not in own_dirs:
            continue
        path = dest_root / rel
        if not path.is_file():
            continue
        if known.get("local") != local_key(path) and sha256_file(path) != known.get("sha256"):
            raise UsageError(
                f"{path} is not the copy sync verified (it changed since)",
                hint=f"`versa-run sync RUN --verify` fetches it again ({LOCAL_MANIFEST}).",
            )
        found.append((rel, path))
    return found


__all__ = [
    "RESUME_STATE_GLOBS",
    "Submission",
    "archive_member",
    "code_archive",
    "keep_code",
    "load_submission",
    "notebook_from_archive",
    "remember_submission",
    "resumable_state",
    "state_destination",
]
