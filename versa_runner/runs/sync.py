"""Sync back: bring a run's outputs home, only what changed, verified, resumable.

Protocol (versa_spec §8.8), generic over backends:

1. an op on the target (`target.fileops.manifest`) builds the manifest (relative path, size,
   mtime, sha256) of the run's `output.ipynb` / `run.log` and of what *this run* wrote under
   `artifacts/` and `reports/`: the list the launcher recorded at the end (`written.json`), or,
   while it runs, what changed since it started. Checkpoint shards (`*.safetensors`, ...) stay
   on the target unless `with_checkpoints`; `include` / `exclude` globs narrow further. (Another
   run writing into the same folders at the same time is indistinguishable by time; give runs
   their own out_dir.) Symlinks are not followed, and one leaving the target root is reported
   as a refusal;
2. each entry is checked alone (`runs.entries`): a malformed record or an unsafe or unwritable
   name is refused with a one-line reason while every other entry goes on;
3. free space under the destination is checked against the bytes still to fetch;
4. an entry is skipped when the local file hashes to the target's sha256. The hash is taken
   from `.versa_manifest.json` only while the file's size, mtime, inode and ctime are those
   recorded after its last verification (`--verify` re-hashes every local copy regardless);
5. others are downloaded into `<file>.part` (`runs.transfer`), resumed from its size after
   every dropped connection, verified by sha256 and renamed into place atomically;
6. the executed notebook is copied to `reports/notebooks/<run_id>_<task>.ipynb`.

Destinations mirror the target's relative paths under `dest`. On the local target the job's
working directory *is* the destination, so every file already matches and nothing is transferred.
"""

from __future__ import annotations

import contextlib
import errno
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from versa_runner.backends.base import Backend, call_target
from versa_runner.errors import DiskFullError, SyncIncompleteError, TransferError
from versa_runner.fsutil import atomic_copy, atomic_write_json, sha256_file
from versa_runner.runs import transfer
from versa_runner.runs.entries import (  # re-exported: callers know them as sync.*
    PART_SUFFIX,
    ManifestEntry,
    Refusal,
    accept,
    safe_destination,
)
from versa_runner.runs.journal import RunRecord
from versa_runner.target.layout import OUTPUT_DIRS

LOCAL_MANIFEST = ".versa_manifest.json"
RUN_FILES = ("output.ipynb", "run.log")
MANIFEST_TIMEOUT_S = 600.0  # hashing multi-GB checkpoints takes minutes (versa_spec §8.15)


@dataclass
class SyncResult:
    """What one sync did: files transferred and skipped, bytes moved, the notebook copy, and
    every name it refused or could not verify (each with its one-line reason)."""

    transferred: list[str]
    skipped: list[str]
    bytes_transferred: int
    notebook_copy: Path | None
    refused: list[Refusal] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    """Local copies that no longer matched the target's sha256 and were fetched again."""

    def raise_if_incomplete(self) -> None:
        """SyncIncompleteError (exit 3) summarising the refusals; nothing when there are none."""
        if self.refused:
            raise SyncIncompleteError(
                f"sync: {len(self.refused)} name(s) refused or not verified (listed above); "
                f"{len(self.transferred) + len(self.skipped)} other file(s) are synced and verified"
            )


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
) -> tuple[list[Any], list[Refusal]]:  # fmt: skip
    """Build the manifest on the target (one op): its raw entries, and what the target refused
    to list (symlinks leaving its root, names that are not UTF-8). `run_dir` limits `dirs` to
    what that run wrote."""
    selection = selection or Selection()
    args = {"root": backend.root(), "dirs": list(dirs), "files": list(files), "run_dir": run_dir,
            "include": list(selection.include), "exclude": list(selection.exclude),
            "with_checkpoints": selection.with_checkpoints}  # fmt: skip
    reply = call_target(backend, "fileops.manifest", args, timeout_s=MANIFEST_TIMEOUT_S)
    if not isinstance(reply, dict):
        return [], [Refusal("<manifest>", "malformed manifest reply from the target")]
    refused = [
        Refusal(str(item.get("path")), str(item.get("reason")))
        for item in reply.get("refused") or []
        if isinstance(item, dict)
    ]
    entries = reply.get("entries")
    if not isinstance(entries, list):
        return [], [*refused, Refusal("<manifest>", "malformed manifest: no list of entries")]
    return entries, refused


def load_local_manifest(dest_root: Path) -> dict[str, Any]:
    """The destination's `.versa_manifest.json` (path -> sha256, size, mtime, local key), or {}."""
    path = dest_root / LOCAL_MANIFEST
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # a damaged cache only costs re-hashing
    return data if isinstance(data, dict) else {}


def local_key(path: Path) -> list[int]:
    """What must not change for a recorded hash to stand: size, mtime, inode and ctime.

    ctime is set by the kernel on every write and `utime`, so a same-size edit with its mtime
    put back is still noticed.
    """
    info = path.stat()
    return [info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns]


def fetch_file(backend: Backend, entry: ManifestEntry, target: Path) -> int:
    """Download one file via `<target>.part` with Range resume; verify sha256; rename. Returns bytes."""
    return transfer.fetch(backend, entry, target)


def _matches(entry: ManifestEntry, target: Path, known: dict[str, Any], verify: bool) -> bool:
    """True when the local file holds the target's bytes (hash reused only under the same key)."""
    try:
        if target.stat().st_size != entry.size_bytes:
            return False
    except FileNotFoundError:
        return False
    if (
        not verify
        and known.get("sha256") == entry.sha256
        and known.get("local") == local_key(target)
    ):
        return True
    return sha256_file(target) == entry.sha256


def sync_run(
    backend: Backend, record: RunRecord, dest_root: Path, *, selection: Selection | None = None,
    verify: bool = False,
) -> SyncResult:  # fmt: skip
    """Bring `record`'s outputs to `dest_root`; idempotent and resumable.

    Refused names are listed in the result (`raise_if_incomplete` turns them into exit 3); a
    lost connection or a full disk stops the sync with every completed file in place.
    """
    selection = selection or Selection()
    wanted = set(selection.only)
    dirs = [d for d in OUTPUT_DIRS if not wanted or d in wanted]
    files = [f"{record.run_dir}/{name}" for name in RUN_FILES if not wanted or name in wanted]
    raw_entries, refused = remote_manifest(backend, dirs=dirs, files=files, run_dir=record.run_dir,
                                           selection=selection)  # fmt: skip
    accepted, bad_names = accept(raw_entries, dest_root)
    local = load_local_manifest(dest_root)
    result = SyncResult([], [], 0, None, refused=[*refused, *bad_names])
    todo: list[tuple[ManifestEntry, Path]] = []
    for entry, target in accepted:
        known = local.get(entry.path)
        known = known if isinstance(known, dict) else {}
        if _matches(entry, target, known, verify):
            result.skipped.append(entry.path)
            _remember(local, entry, target)
        else:
            if target.exists() and known.get("sha256") == entry.sha256:  # the target is unchanged
                result.repaired.append(entry.path)
            todo.append((entry, target))
    needed = sum(max(entry.size_bytes - transfer.part_size(target), 0) for entry, target in todo)
    try:
        transfer.check_room(dest_root, needed)
        for entry, target in todo:
            try:
                result.bytes_transferred += transfer.fetch(backend, entry, target)
            except TransferError as exc:
                if isinstance(exc, DiskFullError):
                    raise
                result.refused.append(Refusal(entry.path, exc.message))
                continue
            result.transferred.append(entry.path)
            _remember(local, entry, target)
    except BaseException:  # what was verified stays recorded, even when the sync stops half-way
        with contextlib.suppress(OSError, DiskFullError):  # never hide the error that stopped us
            _save_local_manifest(dest_root, local)
        raise
    _save_local_manifest(dest_root, local)
    result.notebook_copy = copy_executed_notebook(record, dest_root)
    return result


def _save_local_manifest(dest_root: Path, local: dict[str, Any]) -> None:
    try:
        atomic_write_json(dest_root / LOCAL_MANIFEST, local)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFullError(f"disk full in {dest_root}: cannot record {LOCAL_MANIFEST}") from None


def _remember(local: dict[str, Any], entry: ManifestEntry, target: Path) -> None:
    local[entry.path] = {
        "sha256": entry.sha256,
        "size_bytes": entry.size_bytes,
        "mtime": entry.mtime,
        "local": local_key(target),
    }


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


__all__ = [
    "LOCAL_MANIFEST",
    "PART_SUFFIX",
    "ManifestEntry",
    "Refusal",
    "SyncResult",
    "copy_executed_notebook",
    "fetch_file",
    "load_local_manifest",
    "remote_manifest",
    "safe_destination",
    "sha256_file",
    "sync_run",
]
