"""Sync back: bring a run's outputs home, only what changed, verified, resumable.

Protocol (versa_spec §8.8), generic over backends:

1. an op on the target (`target.fileops.manifest`) builds the manifest (relative path, size,
   mtime, sha256) of the run's `output.ipynb` / `run.log` and of what *this run* wrote under
   `artifacts/` and `reports/`: the list the launcher recorded at the end (`written.json`), or,
   while it runs, what changed since it started. Checkpoint shards (`*.safetensors`, ...) stay
   on the target unless `with_checkpoints`; `include` / `exclude` globs narrow further. (Another
   run writing into the same folders at the same time is indistinguishable by time; give runs
   their own out_dir.) Symlinks are not followed;
2. each entry's path is checked before anything is written: absolute paths, `..` and links
   leaving the destination raise UnsafePathError;
3. entries whose sha256 matches the local `.versa_manifest.json` (or the file already on disk)
   are skipped; others are downloaded into `<file>.part`, resumed from its size with Range,
   verified by sha256 and renamed into place atomically;
4. the executed notebook is copied to `reports/notebooks/<run_id>_<task>.ipynb`.

Destinations mirror the target's relative paths under `dest`. On the local target the job's
working directory *is* the destination, so every file already matches and nothing is transferred.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from versa_runner.backends.base import Backend, call_target
from versa_runner.errors import TransferError, UnsafePathError
from versa_runner.fsutil import atomic_copy, atomic_write_json, sha256_file
from versa_runner.runs.journal import RunRecord
from versa_runner.target.layout import OUTPUT_DIRS

LOCAL_MANIFEST = ".versa_manifest.json"
RUN_FILES = ("output.ipynb", "run.log")
MANIFEST_TIMEOUT_S = 600.0  # hashing multi-GB checkpoints takes minutes (versa_spec §8.15)
PART_SUFFIX = ".part"


@dataclass(frozen=True)
class ManifestEntry:
    """One file on the target, relative to its root."""

    path: str
    size_bytes: int
    mtime: float
    sha256: str


@dataclass
class SyncResult:
    """What one sync did: files transferred and skipped, bytes moved, the notebook copy."""

    transferred: list[str]
    skipped: list[str]
    bytes_transferred: int
    notebook_copy: Path | None


def safe_destination(dest_root: Path, relative: str) -> Path:
    """Where a remote-supplied relative path lands under `dest_root`; refuses escapes.

    Raises UnsafePathError for an absolute path, any `..` component, or a path whose existing
    parts are symlinks resolving outside `dest_root`.
    """
    pure = PurePosixPath(relative)
    if (
        not relative
        or pure.is_absolute()
        or relative.startswith(("\\", "/"))
        or ":" in pure.parts[0]
    ):
        raise UnsafePathError(f"refusing absolute path {relative!r} from the target")
    if any(part in ("..", ".", "") for part in relative.split("/")) or "\\" in relative:
        raise UnsafePathError(
            f"refusing path {relative!r} from the target: it contains '..', '.' or an empty part"
        )
    root = dest_root.resolve()
    candidate = root.joinpath(*pure.parts)
    if candidate.is_symlink() or not candidate.parent.resolve().is_relative_to(root):
        raise UnsafePathError(f"refusing path {relative!r}: a symlink leads outside {root}")
    return candidate


@dataclass(frozen=True)
class Selection:
    """Which files of a run a sync brings back (see the module docstring)."""

    only: tuple[str, ...] = ()  # subset of OUTPUT_DIRS + RUN_FILES; empty: all of them
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    with_checkpoints: bool = False


def remote_manifest(
    backend: Backend, *, dirs: Iterable[str], files: Iterable[str], run_dir: str | None = None,
    selection: Selection | None = None,
) -> list[ManifestEntry]:  # fmt: skip
    """Build the manifest on the target (one op) and parse it; `run_dir` limits `dirs` to what
    that run wrote."""
    selection = selection or Selection()
    args = {"root": backend.root(), "dirs": list(dirs), "files": list(files), "run_dir": run_dir,
            "include": list(selection.include), "exclude": list(selection.exclude),
            "with_checkpoints": selection.with_checkpoints}  # fmt: skip
    reply = call_target(backend, "fileops.manifest", args, timeout_s=MANIFEST_TIMEOUT_S)
    return [ManifestEntry(**entry) for entry in reply["entries"]]


def load_local_manifest(dest_root: Path) -> dict[str, Any]:
    """The destination's `.versa_manifest.json` (path -> sha256, size, mtime), or {}."""
    path = dest_root / LOCAL_MANIFEST
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def fetch_file(backend: Backend, entry: ManifestEntry, target: Path) -> int:
    """Download one file via `<target>.part` with Range resume; verify sha256; rename. Returns bytes."""
    part = target.with_name(target.name + PART_SUFFIX)
    offset = part.stat().st_size if part.exists() else 0
    if offset > entry.size_bytes:  # a stale part from an older version of the file
        part.unlink()
        offset = 0
    backend.download(entry.path, part, offset=offset)
    if sha256_file(part) != entry.sha256:
        part.unlink()
        raise TransferError(f"{entry.path}: sha256 mismatch after download (the part was removed)")
    os.replace(part, target)
    return entry.size_bytes - offset


def sync_run(
    backend: Backend, record: RunRecord, dest_root: Path, *, selection: Selection | None = None
) -> SyncResult:
    """Bring `record`'s outputs to `dest_root`; idempotent and resumable."""
    selection = selection or Selection()
    wanted = set(selection.only)
    dirs = [d for d in OUTPUT_DIRS if not wanted or d in wanted]
    files = [f"{record.run_dir}/{name}" for name in RUN_FILES if not wanted or name in wanted]
    entries = remote_manifest(backend, dirs=dirs, files=files, run_dir=record.run_dir,
                              selection=selection)  # fmt: skip
    targets = {entry.path: safe_destination(dest_root, entry.path) for entry in entries}
    local = load_local_manifest(dest_root)
    result = SyncResult([], [], 0, None)
    for entry in entries:
        target = targets[entry.path]
        known = local.get(entry.path, {})
        on_disk = target.exists() and target.stat().st_size == entry.size_bytes
        if on_disk and (known.get("sha256") == entry.sha256 or sha256_file(target) == entry.sha256):
            result.skipped.append(entry.path)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            result.bytes_transferred += fetch_file(backend, entry, target)
            result.transferred.append(entry.path)
        local[entry.path] = {
            "sha256": entry.sha256,
            "size_bytes": entry.size_bytes,
            "mtime": entry.mtime,
        }
    atomic_write_json(dest_root / LOCAL_MANIFEST, local)
    result.notebook_copy = copy_executed_notebook(record, dest_root)
    return result


def executed_notebook_path(dest_root: Path, record: RunRecord) -> Path:
    """`reports/notebooks/<run_id>_<task>.ipynb` under the destination (the launcher keeps the
    same copy on the target, so after a sync the two agree and nothing is copied twice)."""
    return dest_root / "reports" / "notebooks" / f"{record.run_id}_{record.task}.ipynb"


def copy_executed_notebook(record: RunRecord, dest_root: Path) -> Path | None:
    """Keep the executed notebook under reports/ (atomic copy; skipped when unchanged)."""
    source = safe_destination(dest_root, f"{record.run_dir}/output.ipynb")
    if not source.exists():
        return None
    target = executed_notebook_path(dest_root, record)
    if target.exists() and sha256_file(target) == sha256_file(source):
        return target
    atomic_copy(source, target)
    return target
